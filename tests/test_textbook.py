"""The textbook and the engine are one sampler: bd3lm.generate (the plain Alg. 2 loop) and engine.generate
(one pass per call, ring cache, per-row settings) give the same tokens with the same generator."""
import copy
import warnings

import pytest
import torch

import bd3lm
from bd3lm_tools import engine
from conftest import random_model

SETTINGS = [dict(), dict(rule='steps', knob=3, temperature=0.7, top_p=0.9), dict(rule='threshold', knob=0.3),
            dict(rule='entropy_bound', knob=1.0, temperature=0), dict(rule='tokens_per_call', knob=2, top_p=0.8),
            dict(rule='tokens_per_call', knob=1, order='entropy', nucleus='bd3lms', top_p=0.7)]


def both(model, idx, n, **kw):
    a = bd3lm.generate(model, idx, n, generator=torch.Generator().manual_seed(5), **kw)
    b = engine.generate(model, idx, n, generator=torch.Generator().manual_seed(5), **kw)
    return a, b


def test_every_rule_of_the_registry_is_in_the_parity_table():
    assert {s.get('rule', 'first_hitting') for s in SETTINGS} == set(bd3lm.RULES)


@pytest.mark.parametrize('block_size, model_length', [(4, 16), (1, 8), (8, 8)])
@pytest.mark.parametrize('kv_cache', [True, False])
@pytest.mark.parametrize('kw', SETTINGS, ids=lambda kw: kw.get('rule', 'first_hitting'))
def test_the_engine_gives_the_textbook_s_tokens(block_size, model_length, kv_cache, kw):
    # prompts of 1 (BOS only), bs - 1, bs, bs + 1 and past model_length tokens; generation past model_length
    model = random_model(block_size=block_size, model_length=model_length).double()
    mdlm = block_size == model_length
    for P in sorted({1, max(block_size - 1, 1), block_size, block_size + 1, model_length + 3}):
        n = model_length - P if mdlm else 2 * model_length + 3
        if n <= 0:
            continue
        idx = torch.randint(0, model.config.mask_id, (2, P), generator=torch.Generator().manual_seed(P))
        a, b = both(model, idx, n, kv_cache=kv_cache, **kw)
        assert torch.equal(a, b), (P, kw)
        assert a.shape == (2, P + n) and not (a == model.config.mask_id).any()


def test_float32_and_time_conditioning_give_the_same_tokens():
    for model in (random_model(), random_model(time_conditioning=True)):
        idx = torch.randint(0, 36, (3, 6), generator=torch.Generator().manual_seed(0))
        for kw in SETTINGS:
            a, b = both(model, idx, 37, **kw)
            assert torch.equal(a, b), kw


def test_rows_that_stop_early_stop_alike():
    model = random_model(vocab_size=8).double()             # a small vocabulary: EOS comes early
    idx = torch.full((4, 1), 6)
    for kw in (dict(stop_at_eos=True, eos_id=2), dict(stop_entropy=5.0)):
        a, b = both(model, idx, 300, **kw)
        assert torch.equal(a, b)
    assert (a == 2).any()


def test_a_served_row_is_the_textbook_row_alone():
    model = random_model().double()
    rows = [engine.Row([35, 3, 4, 5, 6][:P], 21, torch.Generator().manual_seed(P), rule=rule, knob=knob)
            for P, rule, knob in ((1, 'first_hitting', None), (3, 'steps', 2), (5, 'threshold', 0.4))]
    batch = engine.Batch(model, 'cpu', engine.KVCache(model, len(rows), 'cpu'))
    for row in rows:
        batch.admit(row)
    while batch.rows:
        batch.step()
    for P, row in zip((1, 3, 5), rows):
        alone = bd3lm.generate(model, torch.tensor([row.prompt]), 21, rule=row.rule, knob=row.knob,
                               generator=torch.Generator().manual_seed(P))
        assert alone[0, P:].tolist() == row.tokens


# --- No cache keyed on parameter versions: a model's outputs follow its weights however they change ------

def _logits_and_tokens(model):
    x = torch.randint(0, 36, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(x)
    return logits, engine.generate(model, x[:, :5], 9, generator=torch.Generator().manual_seed(1))


def _fresh_twin(model):
    twin = random_model(seed=123)
    twin.load_state_dict(model.state_dict())
    return twin


@pytest.mark.parametrize('change', ['fused_adamw', 'data_copy', 'vector_to_parameters', 'assign_load',
                                    'functional_call'])
def test_outputs_follow_the_weights_however_they_change(change):
    model, other = random_model(), random_model(seed=1)
    _logits_and_tokens(model)                    # a call before the change (a cache would be filled here)
    if change == 'fused_adamw':                  # train.py's optimizer on CUDA: fused steps move no _version
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
        model.nelbo(torch.randint(0, 36, (2, 16))).backward()
        opt.step()
        model.eval()
    elif change == 'data_copy':
        for p, q in zip(model.parameters(), other.parameters()):
            p.data.copy_(q)
    elif change == 'vector_to_parameters':
        vector = torch.nn.utils.parameters_to_vector(model.parameters())
        torch.nn.utils.vector_to_parameters(vector, model.parameters())    # the parameters become views of it
        _logits_and_tokens(model)
        vector.add_(0.3)                                                   # ... so this moves them all
    elif change == 'assign_load':
        model.load_state_dict(copy.deepcopy(other.state_dict()), assign=True)
    if change == 'functional_call':              # another model's weights, without touching this one's
        x = torch.randint(0, 36, (2, 8), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            got = torch.func.functional_call(model, dict(other.named_parameters()), (x,))
            expect = other(x)
        torch.testing.assert_close(got, expect, rtol=0, atol=0)
        model_after = _logits_and_tokens(model)[0]
        torch.testing.assert_close(model_after, _logits_and_tokens(_fresh_twin(model))[0], rtol=0, atol=0)
        return
    logits, tokens = _logits_and_tokens(model)
    twin_logits, twin_tokens = _logits_and_tokens(_fresh_twin(model))
    torch.testing.assert_close(logits, twin_logits, rtol=0, atol=0)
    assert torch.equal(tokens, twin_tokens)


# --- Bad arguments: one-line errors before anything runs; 0-d tensors are numbers -------------------------

@pytest.mark.parametrize('kw, message', [
    (dict(temperature=float('inf')), 'temperature must be 0'), (dict(temperature=1e-310), 'temperature must be 0'),
    (dict(temperature=float('nan')), 'temperature must be 0'), (dict(eos_id=1000), 'eos_id must be'),
    (dict(eos_id=-5), 'eos_id must be'), (dict(eos_id=36), 'eos_id must be'),     # 36: the mask id
    (dict(generator=5), 'generator must be'), (dict(stop_entropy='4'), 'stop_entropy must be'),
    (dict(top_p=float('nan')), 'top_p must be'), (dict(knob=0.5), 'takes no knob')])
@pytest.mark.parametrize('sample', [bd3lm.generate, engine.generate], ids=['textbook', 'engine'])
def test_bad_arguments_are_refused_in_one_line(sample, kw, message):
    with pytest.raises(ValueError, match=message):
        sample(random_model(), torch.tensor([[35, 1]]), 8, **kw)


@pytest.mark.parametrize('sample', [bd3lm.generate, engine.generate], ids=['textbook', 'engine'])
def test_bad_prompts_are_refused_in_one_line(sample):
    model = random_model()
    for idx in (torch.tensor([[True, False]]), torch.zeros(0, 1, dtype=torch.long), torch.tensor([[1.0]]),
                torch.tensor([[36]]), torch.tensor([[40]]), [[1, 2]]):
        with pytest.raises(ValueError, match='idx must be|prompt ids'):
            sample(model, idx, 4)


@pytest.mark.parametrize('sample', [bd3lm.generate, engine.generate], ids=['textbook', 'engine'])
def test_zero_dimensional_tensors_are_numbers(sample):
    model, idx = random_model(), torch.tensor([[35, 1, 2]])
    a = sample(model, idx, torch.tensor(9), rule='threshold', knob=torch.tensor(0.5),
               temperature=torch.tensor(0.7), top_p=torch.tensor(0.9), generator=torch.Generator().manual_seed(0))
    b = sample(model, idx, 9, rule='threshold', knob=0.5, temperature=0.7, top_p=0.9,
               generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)


# --- Documented recipes: autocast with the KV cache, compiled sampling across many shapes and settings ------

@pytest.mark.parametrize('sample', [bd3lm.generate, engine.generate], ids=['textbook', 'engine'])
def test_generate_under_autocast_with_the_kv_cache(sample):
    model, idx = random_model(), torch.tensor([[35, 1, 2, 3, 4, 5]])
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = sample(model, idx, 30, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 36) and not (out == model.config.mask_id).any()


def test_the_compiled_sampler_takes_any_batch_size_and_setting():
    # Six batch sizes and six settings in one process: past torch's recompile limit, calls run eagerly
    # with one warning, and the tokens are the eager ones throughout.
    model = random_model()
    cases = [(B, kw) for B in range(1, 7) for kw in SETTINGS[:1]] + [(2, kw) for kw in SETTINGS]
    eager = [engine.generate(model, torch.full((B, 2), 5), 10, generator=torch.Generator().manual_seed(B), **kw)
             for B, kw in cases]
    engine.compile_sampler(backend='eager')
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            compiled = [engine.generate(model, torch.full((B, 2), 5), 10, generator=torch.Generator().manual_seed(B),
                                        **kw) for B, kw in cases]
    finally:
        engine.compile_sampler(disable=True)
    assert all(torch.equal(a, b) for a, b in zip(eager, compiled))
    assert sum('recompile limit' in str(w.message) for w in caught) == 1
