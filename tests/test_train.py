"""train.py and prepare.py: learning, exact resume, DDP, the clipped-schedule search, checkpoints, errors."""
import json
import os
import subprocess
import sys

import numpy as np
import torch

import bd3lm
from bd3lm_tools import tokenizer
from bd3lm_tools.tokenizer import get_tokenizer
from conftest import random_model

ROOT = os.path.join(os.path.dirname(__file__), '..')
TINY = ['--block_size=4', '--model_length=32', '--n_layers=1', '--n_heads=2', '--hidden_dim=32', '--cond_dim=16',
        '--batch_size=4', '--eval_iters=2', '--clip_search_iters=1', '--num_samples=1', '--sample_tokens=8',
        '--log_interval=1', '--warmup_iters=2', '--max_minutes=0']


def run_train(*args, check=True, launcher=(sys.executable,)):
    proc = subprocess.run([*launcher, os.path.join(ROOT, 'train.py'), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f'train.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}')
    return proc


def test_prepare_writes_eos_separated_uint16_tokens(data_dir):
    meta = json.load(open(os.path.join(data_dir, 'tiny', 'meta.json')))
    train = np.fromfile(os.path.join(data_dir, 'tiny', 'train.bin'), dtype=np.uint16)
    assert meta['train_tokens'] == len(train) > 1000 and meta['val_tokens'] > 100
    assert train[-1] == tokenizer.EOS_ID and (train == tokenizer.EOS_ID).sum() >= 2
    text = get_tokenizer().decode(train[:50].tolist())
    assert meta['format'] == 'wrapped' and meta['tokenizer'] == 'gpt2' and meta['bos_id'] == 50256
    assert text.isprintable() or '\n' in text


def test_loss_falls_when_overfitting_one_batch():
    model = random_model(block_size=4, vocab_size=37).train()
    x0 = torch.randint(0, 35, (4, 16), generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    t = bd3lm.sample_t(4, 4, generator=g).repeat_interleave(4, 1)
    xt = bd3lm.q_xt(x0, t, model.config.mask_id, 4, generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = model.nelbo(x0, t=t, xt=xt).item()
    for _ in range(60):
        loss = model.nelbo(x0, t=t, xt=xt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first


def _params(out_dir):
    return torch.load(os.path.join(out_dir, 'ckpt.pt'), weights_only=True)


def test_resume_continues_exactly(data_dir, tmp_path):
    common = [*TINY, f'--data_dir={data_dir}', '--dataset=tiny', '--eval_interval=3', '--lr_decay_iters=6']
    run_train(*common, f'--out_dir={tmp_path / "a"}', '--max_iters=6')
    run_train(*common, f'--out_dir={tmp_path / "b"}', '--max_iters=3')
    run_train(*common, f'--out_dir={tmp_path / "b"}', '--max_iters=6', '--init_from=resume')
    a, b = _params(tmp_path / 'a'), _params(tmp_path / 'b')
    assert a['iter_num'] == b['iter_num'] == 6
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k
    for x, y in zip(a['ema'], b['ema']):
        assert torch.equal(x, y)


def test_out_dir_loads_with_from_pretrained_and_holds_the_ema_weights(data_dir, tmp_path):
    run_train(*TINY, f'--data_dir={data_dir}', '--dataset=tiny', f'--out_dir={tmp_path}', '--max_iters=4',
              '--eval_interval=100')
    model = bd3lm.BD3LM.from_pretrained(tmp_path)
    ckpt = _params(tmp_path)
    assert model.config == bd3lm.BD3LMConfig(**ckpt['model_args'])
    for p, e in zip(model.parameters(), ckpt['ema']):
        assert torch.equal(p, e)
    assert not all(torch.equal(p, ckpt['model'][k]) for k, p in model.named_parameters())  # EMA != raw
    assert json.load(open(tmp_path / 'final.json'))['iter'] == 4
    assert not [f for f in os.listdir(tmp_path) if f.endswith('.tmp')]


def test_training_on_the_embedded_corpus_lowers_held_out_nelbo(tmp_path):
    proc = run_train('--block_size=16', '--model_length=64', '--n_layers=2', '--hidden_dim=64', '--cond_dim=32',
                     '--batch_size=8', '--max_iters=60', '--eval_interval=60', '--eval_iters=4', '--lr_decay_iters=60',
                     '--warmup_iters=5', '--clip_search=False', '--num_samples=0', '--max_minutes=0',
                     f'--out_dir={tmp_path}')
    lines = [l for l in proc.stdout.splitlines() if 'val NELBO' in l]
    initial = float(lines[0].split('val NELBO ')[1].split()[0])
    final = json.load(open(tmp_path / 'final.json'))['val_nelbo']
    assert initial > 10.0              # uniform predictions over 50257 tokens: ln(50257) = 10.8 nats
    assert final < initial - 2.0       # a clearly better model of held-out English after 60 steps


def test_two_process_gloo_torchrun_smoke(data_dir, tmp_path):
    run_train(*TINY, f'--data_dir={data_dir}', '--dataset=tiny', f'--out_dir={tmp_path}', '--max_iters=3',
              '--eval_interval=2', '--gradient_accumulation_steps=2', '--device=cpu',
              launcher=(sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2'))
    assert bd3lm.BD3LM.from_pretrained(tmp_path).config.block_size == 4


def test_fine_tuning_changes_block_size_and_keeps_weights(data_dir, tmp_path):
    random_model(block_size=32, model_length=32, vocab_size=50258, n_layers=1, n_heads=2, hidden_dim=32,
                 cond_dim=16).save_pretrained(tmp_path / 'mdlm')
    run_train(*TINY, f'--data_dir={data_dir}', '--dataset=tiny', f'--init_from={tmp_path / "mdlm"}',
              f'--out_dir={tmp_path / "ft"}', '--max_iters=1', '--eval_interval=100', '--ema=0', '--learning_rate=0')
    ft = bd3lm.BD3LM.from_pretrained(tmp_path / 'ft')
    mdlm = bd3lm.BD3LM.from_pretrained(tmp_path / 'mdlm')
    assert ft.config.block_size == 4 and mdlm.config.block_size == 32
    for (k, a), b in zip(ft.named_parameters(), mdlm.parameters()):
        assert torch.equal(a, b), k   # lr 0: the weights are the pretrained ones


def test_clear_errors(data_dir, tmp_path):
    proc = run_train(f'--data_dir={data_dir}', '--dataset=nope', check=False)
    assert proc.returncode != 0 and "dataset 'nope' not found" in proc.stderr and 'prepare.py' in proc.stderr
    proc = run_train(f'--data_dir={data_dir}', '--dataset=tiny', '--model_length=30', '--block_size=4', check=False)
    assert proc.returncode != 0 and 'not a multiple of block_size=4' in proc.stderr
    random_model(vocab_size=50258, hidden_dim=48, n_heads=4).save_pretrained(tmp_path / 'wide')
    proc = run_train(*TINY, f'--data_dir={data_dir}', '--dataset=tiny', f'--init_from={tmp_path / "wide"}', check=False)
    assert proc.returncode != 0 and 'shape mismatches' in proc.stderr and 'hidden_dim' in proc.stderr
    proc = run_train('--learning_rate=fast', check=False)
    assert proc.returncode != 0 and 'expected a float' in proc.stderr


class _FakeModel:
    """nelbo(...) returns per-token terms whose spread is known for every interval: smallest at [0.3, 0.8]."""

    class config:
        block_size = 4

    def nelbo(self, x0, interval, schedule, resample, reduction, generator):
        beta, omega = interval
        std = 0.01 + abs(beta - 0.3) + abs(omega - 0.8)
        return torch.randn(x0.shape, generator=generator) * std


def test_clip_search_picks_the_lowest_variance_interval():
    batches = [torch.zeros(8, 32, dtype=torch.long)] * 3
    best, variances = bd3lm.search_clip_interval(_FakeModel(), batches, widths=(0.25, 0.5, 0.75), delta=0.05,
                                                 generator=torch.Generator().manual_seed(0))
    assert best == (0.3, 0.8)
    assert (1e-3, 1.0) in variances and len(variances) == len(bd3lm.clip_intervals((0.25, 0.5, 0.75), 0.05))


def test_clip_search_on_a_real_model_returns_a_candidate():
    model = random_model(block_size=4)
    batches = [torch.randint(0, 35, (4, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    best, variances = bd3lm.search_clip_interval(model, batches, widths=(0.5,), delta=0.25)
    assert best in variances and variances[best] == min(variances.values())
    assert set(variances) == {(1e-3, 1.0), (1e-3, 0.5), (0.25, 0.75), (0.5, 1.0)}


def test_block_size_one_trains_at_t_one_after_the_first_evaluation(data_dir, tmp_path):
    # bd3lms searches {[1e-3, 1], (1, 1)} for block size 1: at t = 1 every token is masked with weight 1,
    # the exact AR loss with no noise variance, so an AR-like model trains as an AR model.
    model = random_model(block_size=1, model_length=16)
    batches = [torch.randint(0, 35, (4, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    best, variances = bd3lm.search_clip_interval(model, batches)
    assert set(variances) == {bd3lm.FULL_INTERVAL, (1.0, 1.0)} and best == (1.0, 1.0)
    proc = run_train(f'--data_dir={data_dir}', '--dataset=tiny', f'--out_dir={tmp_path}', *TINY, '--block_size=1',
                     '--max_iters=4', '--eval_interval=2')
    assert 'iter 0: val NELBO' in proc.stdout and 'clipped schedule' not in proc.stdout.split('iter 2:')[0]
    assert 'clipped schedule [1.000, 1.000]' in proc.stdout          # from the first search (iteration 2) on
    assert bd3lm.BD3LM.from_pretrained(tmp_path).clipped_interval() == (1.0, 1.0)
