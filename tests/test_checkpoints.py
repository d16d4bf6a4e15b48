"""Real checkpoints: each model's own tokenizer and special tokens, data formats, and the official protocols."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import bd3lm
from bd3lm_tools.tokenizer import get_tokenizer
import prepare
from conftest import REFERENCE, random_model

ROOT = os.path.join(os.path.dirname(__file__), '..')
LM1B = os.path.join(REFERENCE, '..', 'lm1b_bert_tiny_bs8')
LM1B_CKPT = os.path.join(LM1B, 'lightning.ckpt')
SENTENCES = ['Zorblick fenfen, zorblicks quarquared!', 'MIPMIP snuvashing: trovtrov? [SEP] Kreedrum.',
             "yeltyelt's zorzor don't blickblickly", 'Ünïcödé zorfen — unknownword ...']


@pytest.fixture(scope='module')
def lm1b():
    return bd3lm.BD3LM.from_pretrained(LM1B_CKPT), torch.load(os.path.join(LM1B, 'reference.pt'), weights_only=False)


def test_lm1b_checkpoint_takes_its_special_tokens_from_the_pickled_tokenizer(lm1b):
    model, ref = lm1b
    cfg = model.config
    # EOS = [CLS] = 101: bd3lms' tokenizer.encode('[SEP]')[0] is the [CLS] that encode() puts first
    assert (cfg.tokenizer, cfg.mask_id, cfg.bos_id, cfg.eos_id) == ('wordpiece', 103, 101, 101) == \
        ('wordpiece', ref['mask_index'], ref['bos'], 101)
    assert cfg.vocab_size == 281 and model.vocab[103] == '[MASK]'
    assert model.vocab == json.load(open(os.path.join(LM1B, 'words.json')))
    with torch.no_grad():
        torch.testing.assert_close(model(ref['xt'], ref['x0']), ref['logits_train'], atol=1e-4, rtol=0)
        torch.testing.assert_close(model(ref['xs']), ref['logits_sample'], atol=1e-4, rtol=0)
        per_token = model.nelbo(ref['x0'], t=ref['t'], xt=ref['xt'], reduction='none')
        nelbo = model.nelbo(ref['x0'], t=ref['t'], xt=ref['xt'])
    torch.testing.assert_close(per_token, ref['nelbo_tokens'].float(), atol=1e-4, rtol=1e-5)
    assert abs(nelbo.item() / ref['nelbo'].item() - 1) < 1e-5
    assert nelbo.item() > 1.0  # the old loader masked with id 280 and scored 0.0


def test_special_tokens_and_vocabulary_survive_save_pretrained(lm1b, tmp_path):
    model, ref = lm1b
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / 'config.json').read_text())
    assert (saved['mask_id'], saved['bos_id'], saved['eos_id'], saved['tokenizer']) == (103, 101, 101, 'wordpiece')
    assert (tmp_path / 'vocab.txt').read_text().split('\n')[:-1] == model.vocab
    again = bd3lm.BD3LM.from_pretrained(tmp_path)
    assert again.config == model.config and again.vocab == model.vocab
    with torch.no_grad():
        assert again.nelbo(ref['x0'], t=ref['t'], xt=ref['xt']).item() == pytest.approx(ref['nelbo'].item(), rel=1e-5)
    (tmp_path / 'vocab.txt').unlink()
    with pytest.raises(FileNotFoundError, match='vocab.txt'):
        bd3lm.BD3LM.from_pretrained(tmp_path)


def test_lightning_checkpoint_loads_without_transformers_or_omegaconf_and_runs_nothing(tmp_path):
    # Importing either package fails in this process, and any attempt to build a pickled object's real
    # class would need them: the loader only reads data.
    code = ("import sys; sys.modules['transformers'] = None; sys.modules['omegaconf'] = None; "
            "sys.modules['tokenizers'] = None; import bd3lm; "
            f"m = bd3lm.BD3LM.from_pretrained({LM1B_CKPT!r}); "
            "print(m.config.mask_id, m.config.bos_id, m.config.eos_id, 'transformers' in sys.modules and sys.modules['transformers'])")
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ['103', '101', '101', 'None']


def test_sample_py_prints_text_in_the_checkpoint_s_vocabulary():
    out = subprocess.run([sys.executable, 'sample.py', f'--init_from={LM1B_CKPT}', '--start=Zorblick fenfen,',
                          '--max_new_tokens=20', '--seed=3'], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    text = out.stdout.strip()
    assert text.startswith('zorblick fenfen,')           # the prompt as the uncased model reads it
    words = set(json.load(open(os.path.join(LM1B, 'words.json'))))
    pieces = text.replace(',', ' ').replace('.', ' ').replace('!', ' ').replace('?', ' ').split()
    assert len(pieces) >= 10 and all(p in words or p.rstrip('sedingly') in words or p.startswith('[') for p in pieces)
    assert 'Overriding' not in out.stdout and 'Overriding' in out.stderr


def test_wordpiece_matches_bert_tokenizer():
    transformers = pytest.importorskip('transformers')
    model = bd3lm.BD3LM.from_pretrained(LM1B_CKPT)
    enc = get_tokenizer(model)
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, 'vocab.txt'), 'w') as f:
            f.write(''.join(t + '\n' for t in model.vocab))
        bert = transformers.BertTokenizer(os.path.join(d, 'vocab.txt'))
    for s in SENTENCES:
        ids = enc.encode(s)
        assert ids == bert.encode(s, add_special_tokens=False), s
        assert enc.decode(ids) == bert.decode([i for i in ids if i not in (101, 102, 103)]), s


@pytest.mark.parametrize('kind', ['gpt2', 'wordpiece'])
def test_text_stream_adds_up_to_the_completion(kind):
    if kind == 'gpt2':
        enc = get_tokenizer()
        prompt, new = enc.encode('Prompt:'), enc.encode(' naïve café 日本語 😀 done.\n and more')
    else:
        enc = get_tokenizer(bd3lm.BD3LM.from_pretrained(LM1B_CKPT))
        # '##ing' continues the prompt's last word, '##ed' a generated one, punctuation is cleaned up
        prompt, new = enc.encode('zorblick'), [279, 136, 105, 109, 278, 150, 104, 122, 106, 102, 164]
    for size in (1, 2, 3):  # blocks that split characters (GPT-2 bytes) and words ('##' pieces)
        stream = enc.stream(prompt)
        pieces = [stream.feed(new[i:i + size]) for i in range(0, len(new), size)] + [stream.feed([], final=True)]
        assert ''.join(pieces) == enc.completion(prompt, new)
        assert all('\ufffd' not in p for p in pieces)
    if kind == 'gpt2':
        assert enc.completion(prompt, new) == ' naïve café 日本語 😀 done.\n and more'
    else:
        assert enc.completion(prompt, new) == 'ing fenfen, zorblicked quarquar. blickblick! mipmip'


# --- data formats (item 4) ------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def docs():
    return [(f'd{i}', f'Document number {i}. ' * (5 + i % 7)) for i in range(40)]


def test_formats_are_recorded_and_cut_as_bd3lms_does(docs, tmp_path):
    plain = prepare.write(docs, str(tmp_path / 'plain'), 0.2, 'test', fmt='plain')
    wrapped = prepare.write(docs, str(tmp_path / 'wrapped'), 0.2, 'test', fmt='wrapped')
    assert plain['format'] == 'plain' and wrapped['format'] == 'wrapped'
    tokens = np.fromfile(tmp_path / 'plain' / 'val.bin', dtype=np.uint16)
    meta = prepare.read_meta(str(tmp_path / 'plain'))
    x = prepare.chunks(tokens, 16, meta)
    assert x.shape == (len(tokens) // 16, 16) and torch.equal(x.flatten(), torch.from_numpy(tokens[:x.numel()].astype(np.int64)))
    meta = prepare.read_meta(str(tmp_path / 'wrapped'))
    y = prepare.chunks(tokens, 16, meta)
    assert y.shape == (len(tokens) // 14, 16) and (y[:, 0] == 50256).all() and (y[:, -1] == 50256).all()
    assert torch.equal(y[:, 1:-1].flatten(), torch.from_numpy(tokens[:y.shape[0] * 14].astype(np.int64)))
    w = prepare.sample_windows(tokens, 5, 16, prepare.read_meta(str(tmp_path / 'plain')), torch.Generator().manual_seed(0))
    assert w.shape == (5, 16) and not (w[:, 0] == 50256).all()   # plain: nothing inserted


def test_dataset_defaults_follow_the_paper():
    owt, lm1b = prepare.HF_DATASETS['openwebtext'], prepare.HF_DATASETS['lm1b']
    assert owt[3:6] == ('last:100000', 'gpt2', 'plain')            # OWT: last 100K docs, no inserted BOS
    assert lm1b[3:6] == ('test', 'bert-base-uncased', 'wrapped')
    # bd3lms' dataloader.py: validation_split = 'test' for text8, lm1b, ag_news, else 'validation'; LAMBADA
    # and OWT are read whole (OpenAI's lambada_test.jsonl; OWT's last 100K documents)
    bd3lms_split = {'lm1b': 'test', 'lm1b-gpt2': 'test', 'ag_news': 'test', 'wikitext103': 'validation',
                    'wikitext2': 'validation', 'ptb': 'validation', 'scientific_papers_pubmed': 'validation',
                    'scientific_papers_arxiv': 'validation', 'lambada': 'all', 'openwebtext': 'last:100000'}
    assert {name: spec[3] for name, spec in prepare.HF_DATASETS.items()} == bd3lms_split
    assert prepare.HF_DATASETS['lambada'][0] == 'https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl'
    assert prepare.detokenize('lm1b', 'He said , " hi " to me .') == 'He said, "hi" to me.'


def test_wordpiece_dataset_trains_a_model_with_the_vocabulary(docs, tmp_path):
    vocab = tmp_path / 'vocab.txt'
    vocab.write_text(''.join(t + '\n' for t in json.load(open(os.path.join(LM1B, 'words.json')))))
    zdocs = [(f'd{i}', 'Zorblick fenfen, quarquar mipmip. Kreedrum yeltyelt! ' * (3 + i % 5)) for i in range(30)]
    meta = prepare.write(zdocs, str(tmp_path / 'z'), 0.2, 'test', tokenizer=str(vocab))
    assert (meta['tokenizer'], meta['mask_id'], meta['bos_id'], meta['eos_id']) == ('wordpiece', 103, 101, 101)
    fields = prepare.model_config_fields(prepare.read_meta(str(tmp_path / 'z')))
    assert fields['vocab_size'] == 281                             # [MASK] inside: nothing appended
    out = subprocess.run([sys.executable, 'train.py', f'--data_dir={tmp_path}', '--dataset=z', f'--out_dir={tmp_path / "o"}',
                          '--block_size=4', '--model_length=16', '--n_layers=1', '--n_heads=2', '--hidden_dim=16',
                          '--cond_dim=8', '--batch_size=4', '--max_iters=3', '--eval_interval=3', '--eval_iters=1',
                          '--clip_search_iters=1', '--num_samples=1', '--sample_tokens=8', '--max_minutes=0'],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    model = bd3lm.BD3LM.from_pretrained(tmp_path / 'o')
    assert model.config.mask_id == 103 and model.vocab[101] == '[CLS]'


# --- loss and search protocol (item 5) -----------------------------------------------------------------

def test_nelbo_defaults_to_the_full_interval_not_the_clipped_one():
    model = random_model()
    model.sampling_eps_min.fill_(0.6)
    model.sampling_eps_max.fill_(0.7)
    x0 = torch.randint(0, 35, (3, 16), generator=torch.Generator().manual_seed(0))
    run = lambda **kw: model.nelbo(x0, generator=torch.Generator().manual_seed(5), **kw).item()
    assert run() == run(interval=bd3lm.FULL_INTERVAL) != run(interval=model.clipped_interval())


def test_resampling_at_the_schedule_floor_only_redraws_blocks_with_too_many_masks():
    x0 = torch.randint(0, 10, (16, 64), generator=torch.Generator().manual_seed(0))
    t = torch.full(x0.shape, 0.05)                 # most 8-token blocks have no mask at all
    plain = bd3lm.q_xt(x0, t, 10, 8, generator=torch.Generator().manual_seed(1))
    floor = bd3lm.q_xt(x0, t, 10, 8, interval=(bd3lm.EPS, 0.5), generator=torch.Generator().manual_seed(1))
    assert ((plain == 10).view(16, -1, 8).sum(-1) == 0).any()
    assert torch.equal(plain, floor)               # nothing above 50% masked: nothing redrawn
    clipped = bd3lm.q_xt(x0, t, 10, 8, interval=(0.25, 0.5), generator=torch.Generator().manual_seed(1))
    counts = (clipped == 10).view(16, -1, 8).sum(-1)[:, 1:]
    assert (counts >= 2).all()                     # a real lower bound is enforced


def test_clip_search_measures_variance_with_the_training_estimator(monkeypatch):
    model = random_model()
    seen = []
    original = model.nelbo
    monkeypatch.setattr(model, 'nelbo', lambda *a, **kw: seen.append(kw.get('resample')) or original(*a, **kw))
    batches = [torch.randint(0, 35, (2, 16), generator=torch.Generator().manual_seed(0))]
    bd3lm.search_clip_interval(model, batches, widths=(0.5,), delta=0.5, resample=True)
    assert seen and all(seen)


# --- loading edge cases (item 6) -------------------------------------------------------------------------

def test_config_without_block_size_is_a_clear_error_not_a_silent_default(tmp_path):
    random_model().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / 'config.json').read_text())
    for key in ('block_size', 'cond_dim', 'model_length'):
        broken = {k: v for k, v in cfg.items() if k != key}
        (tmp_path / 'config.json').write_text(json.dumps(broken))
        with pytest.raises(ValueError, match=f"lacks \\['{key}'\\]"):
            bd3lm.BD3LM.from_pretrained(tmp_path)


def test_var_min_false_export_without_interval_tensors_loads(tmp_path):
    from safetensors.torch import load_file, save_file
    model = random_model()
    model.save_pretrained(tmp_path)
    sd = load_file(tmp_path / 'model.safetensors')
    del sd['sampling_eps_min'], sd['sampling_eps_max']
    save_file(sd, tmp_path / 'model.safetensors')
    cfg = json.loads((tmp_path / 'config.json').read_text())
    cfg.update(var_min=False)
    del cfg['sampling_eps_min'], cfg['sampling_eps_max']
    (tmp_path / 'config.json').write_text(json.dumps(cfg))
    again = bd3lm.BD3LM.from_pretrained(tmp_path)
    assert again.clipped_interval() == pytest.approx(bd3lm.FULL_INTERVAL)
    x = torch.randint(0, 35, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x))


@pytest.mark.parametrize('algo,noise', [({'name': 'sedd', 'parameterization': 'sedd'}, 'loglinear'),
                                        ({'name': 'bd3lm', 'parameterization': 'subs'}, 'cosine')])
def test_lightning_checkpoints_of_other_objectives_are_refused(tmp_path, algo, noise):
    model = random_model()
    sd = {'backbone.' + k: v for k, v in model.state_dict().items() if not k.startswith('sampling')}
    hp = {'config': {'algo': algo, 'noise': {'type': noise}, 'block_size': 4,
                     'model': {'length': 16, 'n_heads': 4, 'hidden_size': 32, 'cond_dim': 16}}}
    torch.save({'state_dict': sd, 'hyper_parameters': hp}, tmp_path / 'x.ckpt')
    with pytest.raises(ValueError, match='only BD3-LM / MDLM'):
        bd3lm.BD3LM.from_pretrained(tmp_path / 'x.ckpt')


def test_lm1b_stream_and_frames_equal_what_bd3lms_builds_with_bert_tokenizer(tmp_path):
    # bd3lms (dataloader.py) with BertTokenizer: bos/eos tokens set to [CLS]/[SEP], then
    # BOS = tokenizer.encode(bos_token)[0], EOS = tokenizer.encode(eos_token)[0]; each sentence tokenized
    # without special tokens plus [EOS]; the stream cut into (L - 2)-token pieces framed [BOS] piece [EOS].
    transformers = pytest.importorskip('transformers')
    words = json.load(open(os.path.join(LM1B, 'words.json')))
    vocab = tmp_path / 'vocab.txt'
    vocab.write_text(''.join(t + '\n' for t in words))
    bert = transformers.BertTokenizer(str(vocab))
    bert.bos_token, bert.eos_token = bert.cls_token, bert.sep_token
    BOS, EOS = bert.encode(bert.bos_token)[0], bert.encode(bert.eos_token)[0]
    assert (BOS, EOS) == (101, 101)                                      # not 102
    sentences = SENTENCES * 3
    stream = [i for s in sentences for i in bert(s, add_special_tokens=False)['input_ids'] + [EOS]]
    L = 16
    n = len(stream) // (L - 2) * (L - 2)
    expected = [[BOS] + stream[i:i + L - 2] + [EOS] for i in range(0, n, L - 2)]
    meta = prepare.write([(f's{i}', s, 'val') for i, s in enumerate(sentences)], str(tmp_path / 'lm1b'), 0.0, 'test',
                         tokenizer=str(vocab), fmt='wrapped', eos_per_doc=True, splits=('val',))
    assert (meta['bos_id'], meta['eos_id']) == (101, 101)
    tokens = np.fromfile(tmp_path / 'lm1b' / 'val.bin', dtype=np.uint16)
    assert tokens.tolist() == stream
    assert prepare.chunks(tokens, L, prepare.read_meta(str(tmp_path / 'lm1b'))).tolist() == expected
