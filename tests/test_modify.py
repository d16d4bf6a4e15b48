"""README's "Modify it" recipes, run exactly as printed there: a new unmasking rule (through generate,
sample.py and serve.py), a different training mask, a new noise schedule."""
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import torch

import bd3lm
from bd3lm_tools import engine
from conftest import random_model, random_tokens

ROOT = os.path.join(os.path.dirname(__file__), '..')

RULE_RECIPE = '''
def margin(p, knob):
    # reveal the masked positions whose top two tokens are at least `knob` apart in probability
    top2 = p.probs.topk(2, dim=-1).values                  # (B, bs, 2)
    return p.masked & (top2[..., 0] - top2[..., 1] >= knob[:, None])

margin.knob = (0.0, 1.0)          # optional: the knob's range, checked before sampling
RULES['margin'] = margin
'''

MASK_RECIPE = '''
import bd3lm

def near_block_diff_mask_mod(q, kv, L, block_size):
    # the block-diffusion mask, but every block sees at most the two blocks before it
    near = (q % L) // block_size - (kv % L) // block_size <= 2
    return bd3lm.block_diff_mask_mod(q, kv, L, block_size) & near

bd3lm.BD3LM.train_mask_mod = staticmethod(near_block_diff_mask_mod)
'''

SCHEDULE_RECIPE = '''
import bd3lm

def cubic(t):
    # 1 - alpha_t = t^3: returns the move chance and the NELBO weight -alpha_t' / (1 - alpha_t)
    move_chance = (t ** 3).clamp(min=bd3lm.EPS)
    return move_chance, 3 * t ** 2 / move_chance

bd3lm.SCHEDULES['cubic'] = cubic
'''


def test_readme_shows_each_recipe_verbatim():
    readme = open(os.path.join(ROOT, 'README.md')).read()
    for recipe in (RULE_RECIPE, MASK_RECIPE, SCHEDULE_RECIPE):
        assert recipe.strip() in readme


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_a_new_rule_is_one_function_registered_in_a_copy_of_bd3lm(tmp_path):
    # Register the rule in a copy of the project's bd3lm.py; nothing else changes.
    for name in ('bd3lm.py', 'sample.py', 'serve.py', 'configurator.py'):
        shutil.copy(os.path.join(ROOT, name), tmp_path / name)
    shutil.copytree(os.path.join(ROOT, 'bd3lm_tools'), tmp_path / 'bd3lm_tools')
    with open(tmp_path / 'bd3lm.py', 'a') as f:
        f.write('\n' + RULE_RECIPE)
    model_dir = tmp_path / 'model'
    random_model(vocab_size=50258, block_size=4, model_length=32, hidden_dim=32, n_heads=2, seed=1).save_pretrained(model_dir)
    run = lambda *args, **kw: subprocess.run([sys.executable, *args], cwd=tmp_path, capture_output=True, text=True,
                                             timeout=300, **kw)
    # the engine, knobs per row; against the rule applied by hand: margin 1 can never hold, so it is the
    # fallback (most confident first, one per call); margin 0 always holds, one call per block. The textbook
    # sampler (model.generate) gives the engine's tokens.
    out = run('-c', 'import torch, bd3lm; from bd3lm_tools import engine; m = bd3lm.BD3LM.from_pretrained("model"); '
                    'x, s = engine.generate(m, torch.tensor([[50256]] * 2), 15, rule="margin", knob=[0.0, 1.0], '
                    'generator=torch.Generator().manual_seed(0), return_stats=True); '
                    'g = lambda: torch.Generator().manual_seed(1); idx = torch.tensor([[50256, 1, 2]] * 2); '
                    'same = torch.equal(m.generate(idx, 9, rule="margin", knob=0.2, generator=g()), '
                    'engine.generate(m, idx, 9, rule="margin", knob=0.2, generator=g())); '
                    'print(s["row_nfe"].tolist() + [same])')
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().lower()) == [4, 15, True]
    out = run('sample.py', f'--init_from={model_dir}', '--rule=margin', '--knob=0.2', '--max_new_tokens=12',
              f'--out_file={tmp_path / "s.json"}')
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads((tmp_path / 's.json').read_text())['settings']['rule'] == 'margin'
    assert 'margin' in run('sample.py', '--help').stdout                # the registered names are listed
    port = free_port()
    server = subprocess.Popen([sys.executable, 'serve.py', f'--init_from={model_dir}', f'--port={port}'], cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            try:
                conn = http.client.HTTPConnection('127.0.0.1', port, timeout=60)
                conn.request('POST', '/v1/completions', json.dumps({'prompt': 'Hi', 'max_tokens': 8, 'rule': 'margin',
                                                                    'knob': 0.2, 'n': 2, 'seed': 3}))
                answer = conn.getresponse()
                break
            except OSError:
                time.sleep(0.2)
        assert answer.status == 200 and len(json.loads(answer.read())['choices']) == 2
        conn = http.client.HTTPConnection('127.0.0.1', port, timeout=60)
        conn.request('POST', '/v1/completions', json.dumps({'prompt': 'Hi', 'rule': 'margin', 'knob': 3.0}))
        answer = conn.getresponse()
        error = json.loads(answer.read())['error']
        assert answer.status == 400 and error['param'] == 'knob' and 'margin' in error['message']
        conn = http.client.HTTPConnection('127.0.0.1', port, timeout=60)
        conn.request('POST', '/v1/completions', json.dumps({'prompt': 'Hi', 'rule': 'nope'}))
        answer = conn.getresponse()
        assert answer.status == 400 and 'margin' in json.loads(answer.read())['error']['message']   # names listed
    finally:
        server.kill()


def test_a_different_training_mask_is_one_function(monkeypatch):
    namespace = {}
    with monkeypatch.context() as m:
        m.setattr(bd3lm.BD3LM, 'train_mask_mod', bd3lm.BD3LM.train_mask_mod)      # undone after the test
        exec(MASK_RECIPE, namespace)
        model = random_model(block_size=4, model_length=24, n_layers=1)          # one layer: no second hop
        x0 = random_tokens(model, batch_size=1)
        t, xt = model.forward_process(x0, generator=torch.Generator().manual_seed(0))
        changed = x0.clone()
        changed[:, 1] = (changed[:, 1] + 1) % (model.config.vocab_size - 1)     # a token of block 0
        with torch.no_grad():
            a, b = model(xt, x0), model(xt, changed)
        # block 3 no longer sees block 0; blocks 1 and 2 still do
        torch.testing.assert_close(a[:, 12:16], b[:, 12:16], rtol=0, atol=0)
        assert not torch.allclose(a[:, 4:8], b[:, 4:8])
        assert torch.isfinite(model.nelbo(x0))
    model = random_model(block_size=4, model_length=24, n_layers=1)               # the default mask again
    with torch.no_grad():
        assert not torch.allclose(model(xt, x0)[:, 12:16], model(xt, changed)[:, 12:16])


def test_a_new_noise_schedule_is_one_function(monkeypatch, data_dir, tmp_path):
    monkeypatch.setattr(bd3lm, 'SCHEDULES', dict(bd3lm.SCHEDULES))                 # undone after the test
    exec(SCHEDULE_RECIPE, {})
    model = random_model(block_size=4, model_length=16)
    x0 = random_tokens(model)
    t = torch.rand(3, 4, generator=torch.Generator().manual_seed(0)) * 0.9 + 0.1
    xt = torch.where(torch.rand(3, 16) < 0.5, model.config.mask_id, x0)
    xt[:, 0] = x0[:, 0]
    terms = model.nelbo(x0, t=t, xt=xt, schedule='cubic', reduction='none')
    loglinear = model.nelbo(x0, t=t, xt=xt, reduction='none')
    tt = t.repeat_interleave(4, 1)
    # the same -log p, weighted 3 t^2 / t^3 = 3 / t instead of 1 / t
    torch.testing.assert_close(terms, loglinear * 3, rtol=1e-5, atol=1e-6)
    config = tmp_path / 'cubic.py'
    config.write_text(SCHEDULE_RECIPE)           # train.py takes it from a config file, like any setting
    out = subprocess.run([sys.executable, 'train.py', str(config), '--noise_schedule=cubic', f'--data_dir={data_dir}',
                          '--dataset=tiny', f'--out_dir={tmp_path / "out"}', '--block_size=4', '--model_length=16',
                          '--n_layers=1', '--n_heads=2', '--hidden_dim=16', '--cond_dim=8', '--batch_size=2',
                          '--max_iters=2', '--eval_interval=2', '--eval_iters=1', '--clip_search=False',
                          '--sample_tokens=0', '--device=cpu'], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert re.search(r'val NELBO [0-9.]+', out.stderr + out.stdout)
