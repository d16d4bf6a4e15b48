"""What a GPU run uses, exercised on CPU: the compiled training step is one graph, bf16 autocast, compiled
FlexAttention against SDPA, and sample.py --compile."""
import os
import re
import subprocess
import sys

import pytest
import torch

import bd3lm
from bd3lm_tools import engine
from conftest import random_model

ROOT = os.path.join(os.path.dirname(__file__), '..')


class Step(torch.nn.Module):  # what train.py compiles
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x0, t, xt):
        return self.model.nelbo(x0, t=t, xt=xt)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_compiled_training_step_is_one_graph_and_equals_eager(dtype):
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    model = random_model(block_size=4, model_length=16, dropout=0.0).train()   # no dropout: comparable passes
    step = torch.compile(Step(model), backend='aot_eager', fullgraph=True)   # dynamo's graph capture, no codegen
    g = torch.Generator().manual_seed(0)
    for i, interval in enumerate([(0.05, 0.2), (0.5, 1.0), bd3lm.FULL_INTERVAL]):  # varying numbers of masks
        x0 = torch.randint(0, 35, (3, 16), generator=g)
        t, xt = model.forward_process(x0, interval, generator=g)
        with torch.autocast('cpu', dtype=dtype, enabled=dtype != torch.float32):
            eager = model.nelbo(x0, t=t, xt=xt)   # first: builds the cached mask, as train.py's first evaluation does
            compiled = step(x0, t, xt)
        compiled.backward()
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        assert compiled.item() == pytest.approx(eager.item(), rel=tol), i
    assert not counters['graph_break'], dict(counters['graph_break'])
    assert counters['stats']['unique_graphs'] == 1                   # one graph for every mask count
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.blocks[0].attn_qkv.weight.grad.abs().sum() > 0


def test_train_py_compile_bf16_has_no_graph_break_and_learns(data_dir, tmp_path):
    env = {**os.environ, 'TORCH_LOGS': 'graph_breaks,recompiles'}
    out = subprocess.run([sys.executable, 'train.py', '--compile=True', '--dtype=bfloat16', f'--data_dir={data_dir}',
                          '--dataset=tiny', f'--out_dir={tmp_path}', '--block_size=4', '--model_length=32', '--n_layers=2',
                          '--n_heads=2', '--hidden_dim=64', '--cond_dim=16', '--batch_size=4', '--max_iters=30',
                          '--eval_interval=15', '--eval_iters=1', '--clip_search_iters=1', '--num_samples=0',
                          '--log_interval=10', '--max_minutes=0'], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stdout + out.stderr
    assert not re.search(r'[Gg]raph break.*(bd3lm|train)\.py', log), log[-3000:]
    assert len(re.findall(r'Recompiling function', log)) <= 2
    vals = [float(v) for v in re.findall(r'val NELBO ([0-9.]+)', log)]
    assert vals[-1] < vals[0] - 1.0


def test_compiled_flex_attention_equals_sdpa_for_both_masks():
    from torch.nn.attention.flex_attention import flex_attention
    flex = torch.compile(flex_attention, dynamic=False)
    model = random_model(block_size=4, model_length=32).use_flex_attention()
    g = torch.Generator().manual_seed(0)
    for kind, n in (('train', 32), ('infer', 32)):
        dense, block_mask = model.attention_mask(kind, n)
        size = dense.shape[0]
        q, k, v = (torch.randn(2, 4, size, 16, generator=g) for _ in range(3))
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense)
        torch.testing.assert_close(flex(q, k, v, block_mask=block_mask), expected, atol=1e-5, rtol=1e-5)


def test_sample_py_compile_has_no_graph_break(tmp_path):
    random_model(vocab_size=50258, block_size=4, model_length=32, hidden_dim=32, n_heads=2).save_pretrained(tmp_path)
    env = {**os.environ, 'TORCH_LOGS': 'graph_breaks'}
    out = subprocess.run([sys.executable, 'sample.py', f'--init_from={tmp_path}', '--compile=True', '--max_new_tokens=24'],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert 'raph break' not in out.stderr and '24 tokens' in out.stderr


@pytest.mark.parametrize('kwargs', [dict(), dict(rule='threshold', knob=0.3, temperature=0.8, top_p=0.9),
                                    dict(rule='entropy_bound', knob=1.0), dict(rule='steps', knob=3)])
def test_the_compiled_cached_call_is_one_graph_and_draws_the_same_tokens(kwargs):
    # engine.compile_sampler: the cached call (model pass + rule + write-back) under fullgraph=True, fixed
    # shapes; two graphs in all (a block's first call also carries the finished block), past the window too.
    from torch._dynamo.utils import counters
    model = random_model(block_size=4, model_length=16).double()
    idx = torch.randint(0, 36, (2, 5), generator=torch.Generator().manual_seed(0))
    eager = engine.generate(model, idx, 40, generator=torch.Generator().manual_seed(3), **kwargs)
    torch._dynamo.reset()
    counters.clear()
    engine.compile_sampler(backend='aot_eager')     # dynamo's capture without codegen: quick on CPU
    try:
        compiled, stats = engine.generate(model, idx, 40, generator=torch.Generator().manual_seed(3), return_stats=True,
                                         **kwargs)
    finally:
        engine.compile_sampler(disable=True)
    assert torch.equal(eager, compiled)
    assert not counters['graph_break'] and counters['stats']['unique_graphs'] == 2
    assert stats['forward_passes'] == stats['nfe'] + 1
