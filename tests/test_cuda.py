"""What only a GPU can check: FlexAttention's backward, bf16 autocast, the compiled step (inductor),
the KV cache, the serving engine and every unmasking rule, on CUDA. Marked `cuda`, skipped on CPU:

    python -m pytest -m cuda tests/test_cuda.py

Each check is a plain function of the device, so that `benchmarks/gpu_check.py --smoke` runs the
same code on CPU at toy size (where FlexAttention has no backward, and compiling stops at aot_eager)."""
import math

import pytest
import torch

import bd3lm
from bd3lm_tools import engine
from conftest import random_model, random_tokens

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')]

# Knobs for the rules every check runs; a rule registered later gets one from its range (knob_for).
KNOBS = {'steps': 4, 'threshold': 0.9, 'entropy_bound': 1.0, 'tokens_per_call': 2, 'speculative': 2}


def knob_for(name):
    """A sensible knob for the rule registered as `name`: KNOBS, else the middle of its range (its low
    end when the range is unbounded), an integer for an integer knob, None for a rule without one."""
    if name in KNOBS:
        return KNOBS[name]
    span = getattr(bd3lm.RULES[name], 'knob', None)
    if span is None:
        return None
    low, high = span
    value = low if math.isinf(high) else (low + high) / 2
    return int(value) if isinstance(low, int) else value


def sizes(device):
    # A few seconds each on a GPU; a toy on CPU (what the smoke run and CI can afford).
    if device == 'cpu':
        return dict(block_size=4, model_length=16, hidden_dim=32, cond_dim=16, n_layers=2, n_heads=2)
    return dict(block_size=16, model_length=128, hidden_dim=128, cond_dim=64, n_layers=2, n_heads=4)


def rel_error(a, b):
    """||a - b|| / ||b||, in float64: one number for a whole tensor (a gradient, a loss)."""
    a, b = a.double(), b.double()
    return float(f"{float((a - b).norm() / b.norm().clamp_min(1e-30)):.3g}")


def autocast(device, dtype):
    return torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32)


def corpus_batch(batch_size, length, device):
    """(B, L) GPT-2 tokens of the embedded corpus (prepare.python_docs): BOS, then running text."""
    import prepare
    from bd3lm_tools.tokenizer import get_tokenizer
    enc, ids = get_tokenizer(), []
    for _, text in prepare.python_docs():
        ids += enc.encode(text) + [enc.eos_id]
        if len(ids) >= batch_size * (length - 1):
            break
    x = torch.tensor(ids[:batch_size * (length - 1)]).view(batch_size, length - 1)
    return torch.cat([torch.full((batch_size, 1), enc.bos_id), x], 1).to(device)


# --- the checks ---------------------------------------------------------------

def training_pass(model, x0, t, xt, backend, dtype, grads=True):
    """The loss and every gradient of one training pass, by name."""
    model.use_flex_attention(backend == 'flex').zero_grad(set_to_none=True)
    with autocast(x0.device.type, dtype), torch.set_grad_enabled(grads):
        loss = model.nelbo(x0, t=t, xt=xt)
    if grads:
        loss.backward()
    model.use_flex_attention(False)
    return {'loss': loss.detach(), **{n: p.grad for n, p in model.named_parameters() if p.grad is not None}}


def check_flex_equals_sdpa(device, dtype=torch.float32):
    """FlexAttention's training pass over cat([xt, x0]) under the block-diffusion mask: its loss and
    every gradient equal SDPA's in float32, to float error; in bf16 they are no further from float32
    SDPA than bf16 SDPA's are (twice, plus 1e-3). On CPU the loss only (no Flex backward there)."""
    model = random_model(vocab_size=1000, dropout=0.0, **sizes(device)).to(device).train()
    x0 = random_tokens(model, batch_size=4).to(device)
    t, xt = model.forward_process(x0, generator=torch.Generator(device).manual_seed(0))
    exact = training_pass(model, x0, t, xt, 'sdpa', torch.float32)
    flex = training_pass(model, x0, t, xt, 'flex', dtype, grads=device != 'cpu')
    assert device == 'cpu' or flex.keys() == exact.keys(), 'Flex and SDPA reach different parameters'
    error = {n: rel_error(flex[n], exact[n]) for n in flex}
    if dtype == torch.float32:
        bound = {n: 1e-5 if n == 'loss' else 1e-3 for n in flex}
    else:
        sdpa = training_pass(model, x0, t, xt, 'sdpa', dtype)
        bound = {n: 2 * rel_error(sdpa[n], exact[n]) + 1e-3 for n in flex}
    bad = {n: (error[n], bound[n]) for n in flex if error[n] > bound[n]}
    assert not bad, f'relative error above its bound (error, bound): {bad}'
    worst = max(flex, key=lambda n: error[n] / bound[n])
    return {'loss_rel_error': error['loss'], 'compared': len(flex), 'closest_to_bound': worst,
            'its_error': error[worst], 'its_bound': round(bound[worst], 5)}


def check_bf16_training_learns(device, steps=20):
    """bf16 autocast training on the embedded corpus (the real init, AdamW): every loss and gradient
    is finite and the loss falls over a few steps."""
    torch.manual_seed(0)
    model = bd3lm.BD3LM(bd3lm.BD3LMConfig(dropout=0.0, **sizes(device))).to(device).train()
    x0 = corpus_batch(8, model.config.model_length, device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g, losses = torch.Generator(device).manual_seed(0), []
    for _ in range(steps):
        t, xt = model.forward_process(x0, generator=g)
        with autocast(device, torch.bfloat16):
            loss = model.nelbo(x0, t=t, xt=xt)
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses), losses
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.5, f'the loss did not fall: {first:.2f} -> {last:.2f} ({losses})'
    return {'first_losses': round(first, 3), 'last_losses': round(last, 3), 'steps': steps}


def check_compiled_step(device, dtype=torch.float32):
    """The training step as train.py compiles it (t and xt drawn eagerly, nelbo under torch.compile
    with fullgraph=True): one graph for every number of masks, the eager loss, finite gradients. On
    CPU the graph is captured, not code-generated (aot_eager: inductor's CPU build takes minutes)."""
    backend = 'inductor' if device != 'cpu' else 'aot_eager'
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    model = random_model(vocab_size=1000, dropout=0.0, **sizes(device)).to(device).train()
    step = torch.compile(lambda x0, t, xt: model.nelbo(x0, t=t, xt=xt), fullgraph=True,
                         backend=backend)
    x0 = random_tokens(model, batch_size=4).to(device)
    g, errors = torch.Generator(device).manual_seed(0), []
    for interval in [(0.05, 0.2), (0.5, 1.0), bd3lm.FULL_INTERVAL]:   # few masks, many, any
        t, xt = model.forward_process(x0, interval, generator=g)
        with autocast(device, dtype):
            eager = model.nelbo(x0, t=t, xt=xt)
            compiled = step(x0, t, xt)
        compiled.backward()
        errors.append(rel_error(compiled.detach(), eager.detach()))
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert max(errors) <= tol, f'compiled loss differs from eager: relative errors {errors}'
    assert not counters['graph_break'], dict(counters['graph_break'])
    assert counters['stats']['unique_graphs'] == 1, dict(counters['stats'])
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    return {'backend': backend, 'loss_rel_errors': errors,
            'graphs': counters['stats']['unique_graphs']}


def check_cached_equals_uncached(device):
    """In float32 the KV-cached sampler gives the uncached one's tokens, past model_length too (a
    small vocabulary and confident random weights: a float-level difference rarely moves a draw)."""
    model = random_model(vocab_size=64, seed=1, **sizes(device)).to(device)
    idx = random_tokens(model, batch_size=2, length=3).to(device)
    n = 2 * model.config.model_length + 5
    for rule in ('first_hitting', 'steps', 'threshold'):
        outs = [engine.generate(model, idx, n, rule=rule, knob=knob_for(rule), kv_cache=kv,
                               generator=torch.Generator(device).manual_seed(3))
                for kv in (True, False)]
        same = (outs[0] == outs[1]).float().mean().item()
        assert torch.equal(outs[0], outs[1]), \
            f'{rule}: cached and uncached differ ({100 * same:.1f}% of tokens equal)'
    return {'new_tokens': n, 'rules': 3}


def check_engine_row_equals_generate(device):
    """engine.Batch with a engine.KVCache on the device: rows of different prompt lengths and rules, joining
    while others run, each get what model.generate gives them alone (float64: no draw can move)."""
    model = random_model(vocab_size=50258, block_size=4, model_length=16, hidden_dim=32, n_heads=2)
    model = model.double().to(device)
    g = torch.Generator().manual_seed(0)
    prompts = [[50256] + torch.randint(0, 50000, (n,), generator=g).tolist()
               for n in (0, 2, 3, 4, 6, 9)]
    lengths = [30, 11, 25, 40, 17, 22]
    names = list(bd3lm.RULES)
    rules = [dict(rule=names[i % len(names)], knob=knob_for(names[i % len(names)])) for i in range(6)]
    gen = lambda i: torch.Generator(device).manual_seed(1000 + i)
    rows = [engine.Row(prompts[i], lengths[i], gen(i), temperature=0.8, top_p=0.9, **rules[i])
            for i in range(6)]
    batch = engine.Batch(model, device, engine.KVCache(model, 6, device))
    for i, row in enumerate(rows):
        batch.admit(row)
        for _ in range(3 * (i < 2)):          # the first two are mid-text when the others join
            batch.step()
    for _ in range(400):
        if not batch.rows:
            break
        batch.step()
    assert not batch.rows, 'the engine did not finish its rows'
    for i, row in enumerate(rows):
        out = engine.generate(model, torch.tensor([prompts[i]], device=device), lengths[i],
                             generator=[gen(i)], temperature=0.8, top_p=0.9, **rules[i])
        assert row.tokens == out[0, len(prompts[i]):].tolist(), f'row {i} ({rules[i]}) != generate'
    return {'rows': len(rows), 'rules': sorted(set(names))}


def check_every_rule_runs(device):
    """Every unmasking rule in bd3lm.RULES (any added later too) fills its blocks, batched."""
    model = random_model(vocab_size=1000, **sizes(device)).to(device)
    idx = random_tokens(model, batch_size=2, length=3).to(device)
    n, calls = 3 * model.config.block_size + 2, {}
    for name in bd3lm.RULES:
        out, stats = engine.generate(model, idx, n, rule=name, knob=knob_for(name), return_stats=True,
                                    generator=torch.Generator(device).manual_seed(0))
        assert out.shape == (2, 3 + n) and torch.equal(out[:, :3], idx), name
        assert not (out == model.config.mask_id).any(), f'{name} left masks'
        assert 1 <= stats['nfe'] <= n + model.config.block_size, (name, stats['nfe'])
        calls[name] = stats['nfe']
    return {'model_calls': calls, 'new_tokens': n}


# The checks with their arguments: what gpu_check.py runs on CPU (--smoke) and pytest runs on CUDA.
CHECKS = {
    'flex_equals_sdpa_fp32': (check_flex_equals_sdpa, dict(dtype=torch.float32)),
    'flex_equals_sdpa_bf16': (check_flex_equals_sdpa, dict(dtype=torch.bfloat16)),
    'bf16_training_learns': (check_bf16_training_learns, {}),
    'compiled_step_bf16': (check_compiled_step, dict(dtype=torch.bfloat16)),   # as train.py on a GPU
    'cached_equals_uncached_fp32': (check_cached_equals_uncached, {}),
    'engine_row_equals_generate': (check_engine_row_equals_generate, {}),
    'every_rule_runs': (check_every_rule_runs, {}),
}


@pytest.mark.parametrize('name', list(CHECKS))
def test_on_cuda(name):
    check, kwargs = CHECKS[name]
    print(check('cuda', **kwargs))   # the measured errors: kept in gpu_check's junit report
