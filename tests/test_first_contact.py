"""What a new user runs into first: half-precision sampling, one's own text file, diverging runs, resuming,
lax types, non-finite numbers, cryptic errors, and a kill in the middle of a save."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import bd3lm
from bd3lm_tools import engine
from bd3lm_tools import checkpoints
from conftest import random_model, random_tokens

ROOT = os.path.join(os.path.dirname(__file__), '..')
TINY = ['--block_size=4', '--model_length=16', '--n_layers=1', '--n_heads=2', '--hidden_dim=16', '--cond_dim=8',
        '--batch_size=4', '--eval_iters=1', '--clip_search_iters=1', '--num_samples=0', '--max_minutes=0',
        '--log_interval=1', '--warmup_iters=1']


def run(script, *args, timeout=300):
    return subprocess.run([sys.executable, script, *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout)


# --- 1. half precision ----------------------------------------------------------------------------------

@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('kv_cache', [True, False])
def test_half_precision_models_generate(tmp_path, dtype, kv_cache):
    random_model().save_pretrained(tmp_path)
    model = bd3lm.BD3LM.from_pretrained(tmp_path).to(dtype)
    out = engine.generate(model, torch.zeros(2, 1, dtype=torch.long), 20, kv_cache=kv_cache, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 21) and not (out == model.config.mask_id).any()


def test_bf16_autocast_training_step_on_cpu():
    model = random_model().train()
    x0 = random_tokens(model)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        loss = model.nelbo(x0, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_float64_cached_and_uncached_samples_are_identical_far_past_the_context():
    # README's guarantee: identical tokens in float64 (float32 sums attention in another order).
    model = random_model(block_size=4, model_length=16, vocab_size=200).double()
    a, b = (engine.generate(model, torch.zeros(2, 1, dtype=torch.long), 300, kv_cache=kv, generator=torch.Generator().manual_seed(1))
            for kv in (True, False))
    assert torch.equal(a, b)


# --- 2. prepare.py on one's own files -----------------------------------------------------------------------

def test_one_text_file_gives_two_non_empty_splits(tmp_path):
    book = tmp_path / 'book.txt'
    book.write_text('A single paragraph of a book with no blank lines at all. ' * 80)
    out = run('prepare.py', f'--input={book}', f'--data_dir={tmp_path}')
    assert out.returncode == 0, out.stderr
    meta = json.loads((tmp_path / 'book' / 'meta.json').read_text())
    assert meta['train_tokens'] > 0 and meta['val_tokens'] > 0


@pytest.mark.parametrize('args,message', [(['--val_fraction=1.5'], 'val_fraction'), (['--name=../escape'], 'plain folder name'),
                                          (['--input=BINARY'], 'binary')])
def test_prepare_refuses_bad_input(tmp_path, args, message):
    binary = tmp_path / 'weights.safetensors'
    binary.write_bytes(b'\x00\x01\x02' * 1000)
    args = [a.replace('BINARY', str(binary)) for a in args]
    if not any(a.startswith('--input') for a in args):
        args.append(f'--input={ROOT}/README.md')
    out = run('prepare.py', *args, f'--data_dir={tmp_path}')
    assert out.returncode != 0 and message in out.stderr and 'Traceback' not in out.stderr
    assert not (tmp_path.parent / 'escape').exists()


# --- 3. a diverging run keeps its last good weights ----------------------------------------------------------

def test_diverging_run_stops_clearly_and_keeps_the_last_good_weights(data_dir, tmp_path):
    out = run('train.py', *TINY, f'--data_dir={data_dir}', '--dataset=tiny', f'--out_dir={tmp_path}',
              '--learning_rate=1e30', '--max_iters=40', '--eval_interval=1000', '--grad_clip=0', '--ema=0')
    assert 'Traceback' not in out.stderr
    assert out.returncode != 0 and 'training diverged' in out.stderr
    model = bd3lm.BD3LM.from_pretrained(tmp_path)  # finite weights (the loader checks)
    assert all(torch.isfinite(p).all() for p in model.parameters())


# --- 4. resuming does not half-apply model flags ------------------------------------------------------------

def test_resume_refuses_conflicting_model_flags(data_dir, tmp_path):
    common = [*TINY, f'--data_dir={data_dir}', '--dataset=tiny', f'--out_dir={tmp_path}', '--eval_interval=1000']
    assert run('train.py', *common, '--max_iters=1').returncode == 0
    out = run('train.py', *common, '--max_iters=2', '--init_from=resume', '--model_length=8', '--hidden_dim=32')
    assert out.returncode != 0 and 'model_length=8 (checkpoint: 16)' in out.stderr and 'hidden_dim=32' in out.stderr
    empty = tmp_path / 'ckpt.pt'
    empty.write_bytes(b'')
    out = run('train.py', *common, '--max_iters=2', '--init_from=resume')
    assert out.returncode != 0 and 'not a readable checkpoint' in out.stderr and 'Traceback' not in out.stderr


# --- 5. types are checked -------------------------------------------------------------------------------------

@pytest.mark.parametrize('key,value', [('time_conditioning', 'false'), ('mask_id', 36.0), ('block_size', True),
                                       ('dropout', '0.1'), ('adaln', 1)])
def test_config_types_are_strict(tmp_path, key, value):
    random_model().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / 'config.json').read_text())
    cfg[key] = value
    (tmp_path / 'config.json').write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=f'{key} must be a'):
        bd3lm.BD3LM.from_pretrained(tmp_path)


# --- 6. no silent non-finite numbers ------------------------------------------------------------------------------

def test_nan_t_and_mask_in_x0_are_errors():
    model = random_model()
    x0 = random_tokens(model)
    with pytest.raises(ValueError, match='no NaN'):
        model.nelbo(x0, t=torch.full((3, 16), float('nan')))
    x0[1, 5] = model.config.mask_id
    with pytest.raises(ValueError, match='contains the mask id'):
        model.nelbo(x0)


def test_nan_weights_are_refused_on_load(tmp_path):
    from safetensors.torch import load_file, save_file
    random_model().save_pretrained(tmp_path)
    sd = load_file(tmp_path / 'model.safetensors')
    sd['backbone.blocks.0.attn_qkv.weight'][3, 3] = float('nan')
    save_file(sd, tmp_path / 'model.safetensors')
    with pytest.raises(ValueError, match='NaN or infinite'):
        bd3lm.BD3LM.from_pretrained(tmp_path)


# --- 7. one clear line for each mistake -------------------------------------------------------------------------

def test_broken_files_name_themselves(tmp_path):
    random_model().save_pretrained(tmp_path)
    (tmp_path / 'config.json').write_text('{"block_size": 4, "vocab_')
    with pytest.raises(ValueError, match='config.json is not valid JSON'):
        bd3lm.BD3LM.from_pretrained(tmp_path)
    random_model().save_pretrained(tmp_path)
    (tmp_path / 'model.safetensors').write_bytes(b'\xff' * 64)
    with pytest.raises(ValueError, match='model.safetensors is not a readable safetensors file'):
        bd3lm.BD3LM.from_pretrained(tmp_path)
    torch.save({'state_dict': {}}, tmp_path / 'empty.ckpt')
    with pytest.raises(ValueError, match='holds no bd3lms DiT weights'):
        bd3lm.BD3LM.from_pretrained(tmp_path / 'empty.ckpt')
    (tmp_path / 'zero.ckpt').write_bytes(b'')
    with pytest.raises(ValueError, match='not a readable PyTorch checkpoint'):
        bd3lm.BD3LM.from_pretrained(tmp_path / 'zero.ckpt')
    os.makedirs(tmp_path / 'out-tiny', exist_ok=True)
    with pytest.raises(FileNotFoundError, match='does not exist'):
        bd3lm.BD3LM.from_pretrained(str(tmp_path / 'out-tiny' / 'typo'))


@pytest.mark.parametrize('args,message', [
    (['--eval_interval=0'], '--eval_interval=0: must be a positive integer'),
    (['--batch_size=0'], '--batch_size=0: must be a positive integer'),
    (['--dtype=foo'], "--dtype='foo': choose one of"),
    (['--flex_attention=maybe'], "--flex_attention='maybe': choose one of"),
    (['--out_dir=FILE/sub'], 'cannot write there'),
    (['--device=cuda'], 'no CUDA GPU'),
    (['--flex_attention=True', '--device=cpu'], 'no FlexAttention backward on CPU'),
])
def test_train_py_rejects_bad_settings_before_any_work(data_dir, tmp_path, args, message):
    if args == ['--device=cuda'] and torch.cuda.is_available():
        pytest.skip('this machine has CUDA')
    (tmp_path / 'file').write_text('')
    args = [a.replace('FILE', str(tmp_path / 'file')) for a in args]
    if not any(a.startswith('--out_dir') for a in args):
        args.append(f'--out_dir={tmp_path / "o"}')
    out = run('train.py', *TINY, f'--data_dir={data_dir}', '--dataset=tiny', *args)
    assert out.returncode != 0 and message in out.stderr and 'Traceback' not in out.stderr


@pytest.mark.parametrize('block_size,args,message', [
    (16, ['--max_new_tokens=40'], '--max_new_tokens=40: this model is MDLM-like'),
    (4, ['--device=gpu'], '--device=gpu: '),
    (4, ['--device=mps'], '--device=mps: '),
    (4, ['--start=FILE:/nonexistent.txt'], '--start=FILE:/nonexistent.txt: '),
    (4, ['--out_file=/nonexistent/x.json'], '--out_file=/nonexistent/x.json: '),
    (4, ['--max_new_tokens=99999999999'], '--max_new_tokens=99999999999: must be a positive integer <= 1,000,000'),
])
def test_sample_py_refuses_bad_settings_in_one_line_before_generating(tmp_path, block_size, args, message):
    # Once: a traceback from inside the sampler, from torch or from open(); --out_file after generating;
    # an attempt to allocate 800 GB.
    if args == ['--device=mps'] and torch.backends.mps.is_available():
        pytest.skip('this machine has MPS')
    random_model(vocab_size=50258, block_size=block_size, model_length=16, hidden_dim=16, cond_dim=8, n_layers=1,
                 n_heads=2).save_pretrained(tmp_path)
    out = run('sample.py', f'--init_from={tmp_path}', *args, timeout=120)
    lines = out.stderr.strip().splitlines()
    assert out.returncode != 0 and 'Traceback' not in out.stderr and lines[-1].startswith(message), out.stderr[-2000:]
    assert out.stdout == ''         # refused before generating anything


def test_flags_take_every_documented_value(data_dir, tmp_path):
    out = run('train.py', *TINY, f'--data_dir={data_dir}', '--dataset=tiny', f'--out_dir={tmp_path}',
              '--flex_attention=False', '--max_iters=1', '--eval_interval=1000')
    assert out.returncode == 0, out.stderr[-1500:]
    for args, message in [(['--stop_entropy=abc'], 'stop_entropy'), (['--rule=steps', '--knob=0'], 'knob'), (['--top_p=2'], 'top_p')]:
        out = run('sample.py', f'--init_from={tmp_path}', *args)
        assert out.returncode != 0 and message in out.stderr and 'Traceback' not in out.stderr
    out = run('sample.py', f'--init_from={tmp_path}', '--rule=steps', '--knob=2', '--stop_entropy=4.0', '--max_new_tokens=8')
    assert out.returncode == 0, out.stderr[-1500:]
    assert 'Overriding' not in out.stdout


# --- 8. a kill in the middle of a save -------------------------------------------------------------------------

def test_kill_during_save_leaves_checkpoint_and_model_from_the_same_iteration(data_dir, tmp_path):
    from safetensors.torch import load_file
    rng = random.Random(0)
    args = [*TINY, f'--data_dir={data_dir}', '--dataset=tiny', f'--out_dir={tmp_path}', '--eval_interval=1',
            '--max_iters=100000', '--ema=0.9', '--clip_search=False']
    checked = 0
    for attempt in range(6):  # bounded: six kills at random moments
        proc = subprocess.Popen([sys.executable, 'train.py', *args, *(['--init_from=resume'] if checked else [])],
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(4.0, 7.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        checkpoints.recover_folder(str(tmp_path))     # what train.py does first on its next start
        assert not [n for n in os.listdir(tmp_path) if n.endswith('.tmp') or n == '.saving']
        if not (tmp_path / 'ckpt.pt').exists():
            continue
        ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
        saved = load_file(tmp_path / 'model.safetensors')
        names = [k for k, _ in bd3lm.BD3LM(bd3lm.BD3LMConfig(**ckpt['model_args'])).named_parameters()]
        for name, ema in zip(names, ckpt['ema']):
            assert torch.equal(saved['backbone.' + name], ema), (attempt, name)   # same iteration's EMA
        checked += 1
    assert checked >= 3
