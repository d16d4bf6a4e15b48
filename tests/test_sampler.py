"""The block-by-block sampler: exact KV cache, counts of model calls, the distribution it draws from."""
import itertools

import pytest
import torch

import bd3lm
from conftest import random_model


def prompt(model, B=2, P=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.mask_id, (B, P), generator=g)


@pytest.mark.parametrize('steps', [None, 1, 3])
@pytest.mark.parametrize('P', [1, 4, 6])          # prompt ends at, or in the middle of, a block
def test_cached_equals_uncached_even_past_model_length(steps, P):
    model = random_model(block_size=4, model_length=16)
    idx = prompt(model, P=P)
    outs = []
    for kv_cache in (True, False):
        g = torch.Generator().manual_seed(7)
        outs.append(model.generate(idx, 45, steps=steps, kv_cache=kv_cache, generator=g))   # ~3x model_length
    assert torch.equal(outs[0], outs[1])
    out = outs[0]
    assert out.shape == (2, P + 45)
    assert torch.equal(out[:, :P], idx)                      # the prompt is kept
    assert not (out == model.config.mask_id).any()           # every mask was filled


def test_window_matters_past_model_length():
    # Beyond model_length the sliding window really drops old blocks: a change in the first block no
    # longer changes the logits of a block n_layers windows later.
    model = random_model(block_size=4, model_length=8, n_blocks=1)
    x = torch.randint(0, 36, (1, 24))
    y = x.clone()
    y[:, 1] = (y[:, 1] + 1) % 36
    with torch.no_grad():
        a, b = model(x), model(y)
    assert not torch.allclose(a[:, 4:8], b[:, 4:8])          # inside the window: depends on token 1
    torch.testing.assert_close(a[:, 16:], b[:, 16:])          # two blocks later: out of reach


@pytest.mark.parametrize('block_size', [1, 4, 16])
def test_first_hitting_makes_one_model_call_per_new_token(block_size):
    model = random_model(block_size=block_size, model_length=32)
    _, stats = model.generate(prompt(model, P=5), 23, generator=torch.Generator().manual_seed(0), return_stats=True)
    assert stats['nfe'] == 23


@pytest.mark.parametrize('steps', [1, 2, 8])
def test_fixed_steps_make_at_most_steps_calls_per_block(steps):
    model = random_model(block_size=4, model_length=16)
    new = 30
    out, stats = model.generate(prompt(model, P=2), new, steps=steps, generator=torch.Generator().manual_seed(0),
                                return_stats=True)
    blocks = -(-(2 + new) // 4)
    assert 0 < stats['nfe'] <= steps * blocks
    assert not (out == model.config.mask_id).any()


def _chi_square(counts, probs):
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def _conditionals(model, x):
    with torch.no_grad():
        logits = model(x).double()
    logits[..., model.config.mask_id] = -float('inf')
    return logits.softmax(-1)


@pytest.mark.parametrize('steps', [None, 1])
def test_sampler_draws_from_the_model_distribution(steps):
    # One block [BOS, ?, ?, pad]: two new tokens over a 5-token vocabulary (+ mask). The exact law of
    # the two tokens is computed from the model's conditionals; 20,000 draws are compared by chi-square.
    # It fails if the sampler uses the wrong position's conditional, a biased categorical draw, or
    # ignores the other revealed token (checked by mutating the sampler).
    model = random_model(block_size=4, model_length=4, vocab_size=6, seed=3)
    M, bos = model.config.mask_id, 4
    p_mm = _conditionals(model, torch.tensor([[bos, M, M, M]]))[0]   # both masked
    exact = torch.zeros(5, 5, dtype=torch.float64)
    for a, b in itertools.product(range(5), range(5)):
        if steps == 1:   # one ancestral step from t=1 to 0 reveals both tokens independently
            exact[a, b] = p_mm[1, a] * p_mm[2, b]
        else:            # first hitting: a uniformly chosen position first, then the other given it
            p_a_then = _conditionals(model, torch.tensor([[bos, a, M, M]]))[0, 2, b]
            p_b_then = _conditionals(model, torch.tensor([[bos, M, b, M]]))[0, 1, a]
            exact[a, b] = 0.5 * p_mm[1, a] * p_a_then + 0.5 * p_mm[2, b] * p_b_then
    n = 20_000
    out = model.generate(torch.full((n, 1), bos), 2, steps=steps, generator=torch.Generator().manual_seed(0))
    counts = torch.zeros(5, 5, dtype=torch.float64)
    counts.index_put_((out[:, 1], out[:, 2]), torch.ones(n, dtype=torch.float64), accumulate=True)
    # 24 degrees of freedom: P(chi2 > 51.18) = 0.001. A sampler off by a few percent anywhere fails.
    assert _chi_square(counts.flatten(), exact.flatten()) < 51.18


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64)
    torch.testing.assert_close(bd3lm._nucleus(probs, 0.5), torch.tensor([[1.0, 0, 0, 0]], dtype=torch.float64))
    torch.testing.assert_close(bd3lm._nucleus(probs, 0.6), torch.tensor([[0.625, 0.375, 0, 0]], dtype=torch.float64))
    torch.testing.assert_close(bd3lm._nucleus(probs, 0.9), torch.tensor([[0.5, 0.3, 0.15, 0]], dtype=torch.float64) / 0.95)
    assert torch.equal(bd3lm._nucleus(probs, 1.0), probs)


def test_tiny_top_p_is_greedy():
    # With one-token blocks greedy decoding is fully determined: any seed gives the argmax chain.
    model = random_model(block_size=1, model_length=16)
    idx = prompt(model, P=4)
    c = model.generate(idx, 12, top_p=1e-9, generator=torch.Generator().manual_seed(0))
    d = model.generate(idx, 12, top_p=1e-9, generator=torch.Generator().manual_seed(1))
    assert torch.equal(c, d)
    with torch.no_grad():
        for i in range(4, 16):
            x = c[:, :i + 1].clone()
            x[:, i] = model.config.mask_id
            logits = model(x)[:, -1]
            logits[:, model.config.mask_id] = -float('inf')
            assert torch.equal(c[:, i], logits.argmax(-1))


def _biased_model(token, **overrides):
    model = random_model(**overrides)
    with torch.no_grad():
        model.output_layer.linear.bias[token] = 1e4        # the model always predicts `token`
    return model


def test_stop_at_eos_rows_stop_independently():
    eos = 7
    model = _biased_model(eos, block_size=4, model_length=16)
    idx = torch.tensor([[1, 2, 3], [1, 2, 3]])
    out, stats = model.generate(idx, 20, stop_at_eos=True, eos_id=eos, return_stats=True)
    assert out.shape == (2, 23)
    assert stats['lengths'].tolist() == [4, 4]                # prompt + the first EOS
    assert (out[:, 3:] == eos).all()
    assert stats['nfe'] == 1                                  # stopped after the first block


def test_stop_on_low_entropy_drops_the_degenerate_window_as_bd3lms():
    model = _biased_model(5, block_size=16, model_length=32, vocab_size=400)
    prompt = torch.arange(10, 310)[None]                      # 300 distinct tokens: entropy ln 256 per window
    full = model.generate(prompt, 400)                        # the model only says 5
    # Slow rule: the first block end whose last 256 tokens have entropy < 4; bd3lms drops those 256.
    end = next(e for e in range(304, 701, 16) if bd3lm._unigram_entropy(full[0, e - 256:e]) < 4)
    # With a constant output the window still reaches into the prompt when the rule fires, so the cut
    # stops at the prompt (it is never cut): every generated token of that window is dropped.
    out, stats = model.generate(prompt, 400, stop_entropy=4.0, return_stats=True)
    assert end == 400 and stats['lengths'].item() == max(300, end - 256) == 300
    assert torch.equal(out[0, :300], prompt[0]) and (out[0, 300:] == model.config.eos_id).all()
    _, stats = model.generate(torch.tensor([[1]]), 400, stop_entropy=4.0, return_stats=True)
    assert stats['lengths'].item() == 1 and stats['nfe'] == 255


def test_generate_rejects_bad_arguments():
    model = random_model()
    good = torch.tensor([[1, 2]])
    with pytest.raises(ValueError, match='max_new_tokens'):
        model.generate(good, 0)
    with pytest.raises(ValueError, match='top_p'):
        model.generate(good, 4, top_p=0)
    with pytest.raises(ValueError, match='top_p'):
        model.generate(good, 4, top_p=1.5)
    with pytest.raises(ValueError, match='mask id'):
        model.generate(torch.tensor([[1, model.config.mask_id]]), 4)
    with pytest.raises(ValueError, match='P >= 1'):
        model.generate(torch.zeros(1, 0, dtype=torch.long), 4)
    with pytest.raises(ValueError, match='steps'):
        model.generate(good, 4, steps=0)
    with pytest.raises(ValueError, match='one per row'):
        model.generate(good, [3, 4])                           # two lengths for one row


def test_mdlm_past_its_context_is_refused_not_generated_blind():
    # With block_size == model_length a block past the context would see nothing before it.
    model = random_model(block_size=16, model_length=16)
    assert model.generate(torch.tensor([[1]]), 15).shape == (1, 16)
    with pytest.raises(ValueError, match='MDLM-like'):
        model.generate(torch.tensor([[1]]), 16)


def test_eos_defaults_to_the_model_s_own():
    model = _biased_model(9, block_size=4, model_length=16, eos_id=9)
    out, stats = model.generate(torch.tensor([[1, 2]]), 12, stop_at_eos=True, return_stats=True)
    assert stats['lengths'].tolist() == [3] and (out[0, 2:] == 9).all()
