"""The block-by-block sampler: exact KV cache, counts of model calls, the distribution it draws from."""
from types import SimpleNamespace

import pytest
import torch

import bd3lm
from bd3lm_tools import engine
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
        rule = dict(rule='steps', knob=steps) if steps else {}
        outs.append(engine.generate(model, idx, 45, kv_cache=kv_cache, generator=g, **rule))   # ~3x model_length
    assert torch.equal(outs[0], outs[1])
    out = outs[0]
    assert out.shape == (2, P + 45)
    assert torch.equal(out[:, :P], idx)                      # the prompt is kept
    assert not (out == model.config.mask_id).any()           # every mask was filled


def test_window_matters_past_model_length():
    # Beyond model_length the sliding window really drops old blocks: a change in the first block no
    # longer changes the logits of a block n_layers windows later.
    model = random_model(block_size=4, model_length=8, n_layers=1)
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
    _, stats = engine.generate(model, prompt(model, P=5), 23, generator=torch.Generator().manual_seed(0), return_stats=True)
    assert stats['nfe'] == 23


@pytest.mark.parametrize('steps', [1, 2, 8])
def test_fixed_steps_make_at_most_steps_calls_per_block(steps):
    model = random_model(block_size=4, model_length=16)
    new = 30
    out, stats = engine.generate(model, prompt(model, P=2), new, rule='steps', knob=steps,
                                generator=torch.Generator().manual_seed(0), return_stats=True)
    blocks = -(-(2 + new) // 4)
    assert 0 < stats['nfe'] <= steps * blocks
    assert not (out == model.config.mask_id).any()


def _chi_square(counts, probs):
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


# The law of every unmasking rule (each registered rule, at several settings): tests/test_laws.py.


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64)
    torch.testing.assert_close(bd3lm.nucleus(probs, 0.5), torch.tensor([[1.0, 0, 0, 0]], dtype=torch.float64))
    torch.testing.assert_close(bd3lm.nucleus(probs, 0.6), torch.tensor([[0.625, 0.375, 0, 0]], dtype=torch.float64))
    torch.testing.assert_close(bd3lm.nucleus(probs, 0.9), torch.tensor([[0.5, 0.3, 0.15, 0]], dtype=torch.float64) / 0.95)
    assert torch.equal(bd3lm.nucleus(probs, 1.0), probs)


def test_bd3lms_nucleus_drops_the_token_that_crosses_top_p():
    # bd3lms' _nucleus_sample: sorted, keep while cumsum <= p, the first always kept, renormalised.
    def bd3lms(p_x0, p):
        sorted_probs, idx = p_x0.sort(dim=-1, descending=True)
        keep = sorted_probs.cumsum(-1) <= p
        keep[..., 0] = True
        out = torch.zeros_like(p_x0).scatter(-1, idx, sorted_probs * keep)
        return out / out.sum(-1, keepdim=True)
    cases = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5], [0.95, 0.03, 0.01, 0.01],
                          [0.25, 0.25, 0.25, 0.25], [0.4, 0.4, 0.1, 0.1]], dtype=torch.float64)
    for p in (0.5, 0.8, 0.9, 0.95):                   # 0.9 with [0.95, ...]: the top token alone crosses p
        torch.testing.assert_close(bd3lm.nucleus(cases, p, 'bd3lms'), bd3lms(cases, p), rtol=0, atol=1e-12)
    # the two rules differ exactly on the crossing token: 0.5 + 0.3 crosses 0.6
    assert bd3lm.nucleus(cases[:1], 0.6, 'bd3lms').tolist() == [[1.0, 0.0, 0.0, 0.0]]
    assert bd3lm.nucleus(cases[:1], 0.6)[0, 1] > 0
    with pytest.raises(ValueError, match='nucleus must be one of'):
        random_model().generate(torch.tensor([[1]]), 4, nucleus='top')


def test_tiny_top_p_is_greedy():
    # With one-token blocks greedy decoding is fully determined: any seed gives the argmax chain.
    model = random_model(block_size=1, model_length=16)
    idx = prompt(model, P=4)
    c = engine.generate(model, idx, 12, top_p=1e-9, generator=torch.Generator().manual_seed(0))
    d = engine.generate(model, idx, 12, top_p=1e-9, generator=torch.Generator().manual_seed(1))
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
    out, stats = engine.generate(model, idx, 20, stop_at_eos=True, eos_id=eos, return_stats=True)
    assert out.shape == (2, 23)
    assert stats['lengths'].tolist() == [4, 4]                # prompt + the first EOS
    assert (out[:, 3:] == eos).all()
    assert stats['nfe'] == 1                                  # stopped after the first block


def test_stop_on_low_entropy_drops_the_degenerate_window_as_bd3lms():
    model = _biased_model(5, block_size=16, model_length=32, vocab_size=400)
    prompt = torch.arange(10, 310)[None]                      # 300 distinct tokens: entropy ln 256 per window
    full = engine.generate(model, prompt, 400)                        # the model only says 5
    # Slow rule: the first block end whose last 256 tokens have entropy < 4; bd3lms drops those 256.
    end = next(e for e in range(304, 701, 16) if e > 256 and bd3lm.unigram_entropy(full[0, e - 256:e]) < 4)
    # With a constant output the window still reaches into the prompt when the rule fires, so the cut
    # stops at the prompt (it is never cut): every generated token of that window is dropped.
    out, stats = engine.generate(model, prompt, 400, stop_entropy=4.0, return_stats=True)
    assert end == 400 and stats['lengths'].item() == max(300, end - 256) == 300
    assert torch.equal(out[0, :300], prompt[0]) and (out[0, 300:] == model.config.eos_id).all()
    _, stats = engine.generate(model, torch.tensor([[1]]), 400, stop_entropy=4.0, return_stats=True)
    # bd3lms checks once more than 256 tokens exist: not at 256 (where the old rule cut to the bare prompt)
    # but at 272, dropping the last 256 and keeping 16
    assert stats['lengths'].item() == 16 and stats['nfe'] == 271


def test_generate_rejects_bad_arguments():
    model = random_model()
    good = torch.tensor([[1, 2]])
    with pytest.raises(ValueError, match='max_new_tokens'):
        engine.generate(model, good, 0)
    with pytest.raises(ValueError, match='top_p'):
        engine.generate(model, good, 4, top_p=0)
    with pytest.raises(ValueError, match='top_p'):
        engine.generate(model, good, 4, top_p=1.5)
    with pytest.raises(ValueError, match='mask id'):
        engine.generate(model, torch.tensor([[1, model.config.mask_id]]), 4)
    with pytest.raises(ValueError, match='P >= 1'):
        engine.generate(model, torch.zeros(1, 0, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="knob: rule 'steps'"):
        engine.generate(model, good, 4, rule='steps', knob=0)
    with pytest.raises(ValueError, match='one per row'):
        engine.generate(model, good, [3, 4])                           # two lengths for one row


def test_mdlm_past_its_context_is_refused_not_generated_blind():
    # With block_size == model_length a block past the context would see nothing before it.
    model = random_model(block_size=16, model_length=16)
    assert engine.generate(model, torch.tensor([[1]]), 15).shape == (1, 16)
    with pytest.raises(ValueError, match='MDLM-like'):
        engine.generate(model, torch.tensor([[1]]), 16)


def test_eos_defaults_to_the_model_s_own():
    model = _biased_model(9, block_size=4, model_length=16, eos_id=9)
    out, stats = engine.generate(model, torch.tensor([[1, 2]]), 12, stop_at_eos=True, return_stats=True)
    assert stats['lengths'].tolist() == [3] and (out[0, 2:] == 9).all()


# --- the adaptive unmasking rules ------------------------------------------------------------------


def hand_made(masked, confidence=None, entropy=None, priority=None):
    # A Proposal's fields, as a rule reads them
    t = lambda v: None if v is None else torch.tensor(v, dtype=torch.float64)
    return SimpleNamespace(masked=torch.tensor(masked), confidence=t(confidence), entropy=t(entropy),
                           priority=t(priority) if priority is not None else None if entropy is None else -t(entropy))


def test_rules_are_their_papers_definitions_on_hand_made_blocks():
    T, F_ = True, False
    knob = lambda v, B=1: torch.tensor([v] * B, dtype=torch.float64)
    # Fast-dLLM: every masked position with confidence >= tau (position 3 is not masked)
    p = hand_made([[T, T, T, F_]], confidence=[[0.9, 0.3, 0.6, 0.99]])
    assert bd3lm.threshold(p, knob(0.6)).tolist() == [[T, F_, T, F_]]
    # ... and none at all above it: the sampler's fallback (confidence order) reveals the most confident
    p = hand_made([[T, T, T, T]], confidence=[[0.9, 0.1, 0.1, 0.1]])
    assert not bd3lm.threshold(p, knob(0.95)).any()
    assert bd3lm.first(p.confidence, p.masked, 1).tolist() == [[T, F_, F_, F_]]
    # EB-sampler: the longest prefix, lowest entropy first, with sum H - max H <= gamma
    p = hand_made([[T, T, T, T]], entropy=[[0.3, 0.3, 0.3, 0.3]])
    assert bd3lm.entropy_bound(p, knob(0.3)).sum().item() == 2
    assert bd3lm.entropy_bound(p, knob(0.9)).sum().item() == 4
    p = hand_made([[T, T, T, F_]], entropy=[[0.2, 2.0, 0.5, 0.0]])          # order: 0 (0.2), 2 (0.5), 1 (2.0)
    assert bd3lm.entropy_bound(p, knob(0.0)).tolist() == [[T, F_, F_, F_]]
    assert bd3lm.entropy_bound(p, knob(0.2)).tolist() == [[T, F_, T, F_]]    # 0.2 + 0.5 - 0.5
    assert bd3lm.entropy_bound(p, knob(0.69)).tolist() == [[T, F_, T, F_]]
    assert bd3lm.entropy_bound(p, knob(0.71)).tolist() == [[T, T, T, F_]]    # 0.2 + 0.5 + 2.0 - 2.0
    # LLaDA: the k first in order (most confident)
    p = hand_made([[T, T, T, F_]], confidence=[[0.9, 0.3, 0.6, 0.99]], priority=[[0.9, 0.3, 0.6, 0.99]])
    assert bd3lm.tokens_per_call(p, knob(2)).tolist() == [[T, F_, T, F_]]


def test_a_rule_that_reveals_nothing_falls_back_to_its_order(monkeypatch):
    # The sampler guarantees progress: nothing revealed -> the first masked position in the order
    # (confidence), which is exactly what one-most-confident-per-call draws, token for token.
    model = random_model(block_size=4, model_length=16, vocab_size=12, seed=2)
    monkeypatch.setitem(bd3lm.RULES, 'nothing', lambda p, knob: torch.zeros_like(p.masked))
    run = lambda **kw: engine.generate(model, prompt(model, P=2), 30, generator=torch.Generator().manual_seed(1),
                                      return_stats=True, **kw)
    (a, sa), (b, sb) = run(rule='nothing'), run(rule='tokens_per_call', knob=1)
    assert torch.equal(a, b) and sa['nfe'] == sb['nfe'] == 30
    # A rule that names only positions already revealed reveals nothing too (it once stalled the loop: the
    # fallback looked at what the rule named, not at what it could reveal).
    calls = []

    def revealed(p, knob):
        calls.append(1)
        assert len(calls) <= 30, 'no progress'
        return ~p.masked
    monkeypatch.setitem(bd3lm.RULES, 'revealed', revealed)
    c, sc = run(rule='revealed')
    assert torch.equal(c, b) and sc['nfe'] == 30


@pytest.mark.parametrize('kwargs,calls_per_block', [
    (dict(rule='threshold', knob=1.0), None), (dict(rule='threshold', knob=1.0, order='uniform'), None),
    (dict(rule='entropy_bound', knob=0.0), None), (dict(rule='threshold', knob=0.0), 1),
    (dict(rule='entropy_bound', knob=1e9), 1), (dict(rule='entropy_bound', knob=1e9, order='uniform'), 1),
    (dict(rule='tokens_per_call', knob=3), 2), (dict(rule='tokens_per_call', knob=4), 1),
    (dict(rule='tokens_per_call', knob=1), None), (dict(rule='steps', knob=1), 1), (dict(rule='steps', knob=10 ** 9), None)])
def test_model_calls_per_rule(kwargs, calls_per_block):
    # None: one token per call (NFE = new tokens); else calls per full block (ceil(block / k)).
    model = random_model(block_size=4, model_length=16)
    new = 24                                  # prompt of 4 = one full block, then 6 full blocks
    _, stats = engine.generate(model, prompt(model, P=4), new, generator=torch.Generator().manual_seed(0), return_stats=True,
                              **kwargs)
    assert stats['nfe'] == (new if calls_per_block is None else 6 * calls_per_block)
    assert stats['row_nfe'].tolist() == [stats['nfe']] * 2


RULE_CASES = [dict(rule='threshold', knob=0.05), dict(rule='threshold', knob=0.05, order='uniform'),
              dict(rule='entropy_bound', knob=4.0), dict(rule='entropy_bound', knob=4.0, order='uniform'),
              dict(rule='tokens_per_call', knob=2), dict(rule='steps', knob=2)]


@pytest.mark.parametrize('kwargs', RULE_CASES)
@pytest.mark.parametrize('P', [1, 6])
def test_cached_equals_uncached_for_every_rule(kwargs, P):
    model = random_model(block_size=4, model_length=16, vocab_size=12, seed=2).double()   # confident enough to batch
    idx = prompt(model, P=P)
    outs = [engine.generate(model, idx, 45, kv_cache=kv, generator=torch.Generator().manual_seed(3), return_stats=True, **kwargs)
            for kv in (True, False)]
    assert torch.equal(outs[0][0], outs[1][0]) and outs[0][1]['nfe'] == outs[1][1]['nfe']
    assert outs[0][1]['nfe'] < 45 * 2          # several tokens per call somewhere (else the rule is not exercised)
    assert not (outs[0][0] == model.config.mask_id).any()


def test_a_row_is_the_same_alone_and_in_a_batch_with_other_settings():
    model = random_model(block_size=4, model_length=16, vocab_size=12, seed=2).double()
    idx = prompt(model, B=3, P=3)
    taus, temps, top_ps, lengths = [0.05, 0.5, 1.0], [1.0, 0.7, 0.0], [1.0, 0.8, 0.5], [30, 17, 23]
    batch, stats = engine.generate(model, idx, lengths, rule='threshold', knob=taus, temperature=temps, top_p=top_ps,
                                  return_stats=True,
                                  generator=[torch.Generator().manual_seed(s) for s in (5, 6, 7)])
    for r in range(3):
        alone, alone_stats = engine.generate(model, idx[r:r + 1], lengths[r], rule='threshold', knob=taus[r], temperature=temps[r],
                                            top_p=top_ps[r], generator=[torch.Generator().manual_seed(5 + r)],
                                            return_stats=True)
        assert torch.equal(alone[0], batch[r, :alone.shape[1]])
        assert alone_stats['nfe'] == stats['row_nfe'][r]           # each row's own calls: what it pays alone
    # blocks advance together, so the batch's calls are the per-block maximum summed over blocks
    assert max(stats['row_nfe'].tolist()) <= stats['nfe'] < sum(stats['row_nfe'].tolist())


@pytest.mark.parametrize('kwargs', RULE_CASES + [{}])
def test_revealed_tokens_never_change(kwargs, monkeypatch):
    model = random_model(block_size=4, model_length=16, vocab_size=12, seed=2)
    M = model.config.mask_id
    step, calls = engine.denoise_step, []

    def watched(model, xb, masked, *args):
        before = xb.clone()
        called = step(model, xb, masked, *args)
        revealed = before != M
        assert torch.equal(xb[revealed], before[revealed])            # a revealed token stays as it was
        assert not (xb[masked] != M).any()                             # still-masked positions hold the mask
        calls.append(int(((before == M) & (xb != M)).sum()))
        return called
    monkeypatch.setattr(engine, 'denoise_step', watched)
    out = engine.generate(model, prompt(model, P=2), 30, generator=torch.Generator().manual_seed(1), **kwargs)
    assert sum(calls) == 2 * 30 and not (out == M).any()


@pytest.mark.parametrize('kwargs', [dict(rule='threshold', knob=0.5), dict(rule='entropy_bound', knob=1.0),
                                    dict(rule='tokens_per_call', knob=2), {}])
def test_the_proposed_token_follows_the_row_s_temperature_and_top_p(kwargs):
    # One masked position: every rule reveals it with the proposed token, which must follow the row's law
    # softmax(logits / temperature) cut to its nucleus (chi-square over 20,000 draws).
    model = random_model(block_size=2, model_length=2, vocab_size=9, seed=4)
    bos, M = 7, model.config.mask_id
    with torch.no_grad():
        logits = model(torch.tensor([[bos, M]]))[0, 1].double()
    logits[M] = -float('inf')
    law = bd3lm.nucleus((logits / 0.7).softmax(-1), 0.8)
    n = 20_000
    out = engine.generate(model, torch.full((n, 1), bos), 1, temperature=0.7, top_p=0.8,
                         generator=torch.Generator().manual_seed(0), **kwargs)
    counts = torch.bincount(out[:, 1], minlength=9).double()
    support = law > 0
    assert counts[~support].sum() == 0                                 # nothing outside the nucleus
    dof = int(support.sum()) - 1
    assert _chi_square(counts[support], law[support]) < {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}[dof]


@pytest.mark.parametrize('kwargs,message', [
    (dict(rule='threshold', knob=1.5), "rule 'threshold' needs a knob that is a number in"),
    (dict(rule='threshold', knob=-0.1), 'in \\[0.0, 1.0\\]'), (dict(rule='threshold'), 'needs a knob'),
    (dict(rule='entropy_bound', knob=-1.0), "rule 'entropy_bound' needs"), (dict(rule='tokens_per_call', knob=0), 'an integer'),
    (dict(rule='tokens_per_call', knob=1.5), 'an integer'), (dict(rule='threshold', knob=float('nan')), 'needs a knob'),
    (dict(rule='first_hitting', knob=2), 'takes no knob'), (dict(rule='margin'), 'rule must be one of'),
    (dict(rule='threshold', knob=0.9, order='random'), 'order must be one of'),
    (dict(rule='threshold', knob=[0.9, 0.5, 0.1]), 'one value or one per row')])
def test_bad_rule_settings_are_one_line_errors(kwargs, message):
    model = random_model()
    with pytest.raises(ValueError, match=message) as e:
        engine.generate(model, torch.tensor([[1, 2]]), 4, **kwargs)
    assert '\n' not in str(e.value)


def test_low_entropy_in_the_same_block_as_an_eos_cuts_as_bd3lms():
    # bd3lms' _check_stop_conds sets the EOS cut, then the entropy cut overrides it.
    eos = 5
    model = _biased_model(eos, block_size=16, model_length=32, vocab_size=400, eos_id=eos)
    idx = torch.arange(10, 300)[None]                         # 290 distinct tokens, then only EOS is generated
    out, stats = engine.generate(model, idx, 100, stop_at_eos=True, stop_entropy=4.0, return_stats=True)
    # first block end past the prompt: 304; window 48..304 holds 242 distinct + 14 EOS: entropy > 4, so EOS cuts
    assert stats['lengths'].item() == 291
    out, stats = engine.generate(model, idx[:, :40], 300, stop_at_eos=True, stop_entropy=6.0, return_stats=True)
    assert stats['lengths'].item() == 41                      # short: only the EOS rule can fire


def test_a_short_row_stops_at_its_own_length_beside_a_longer_one():
    # A row past its own max_new_tokens once stayed 'running': its later entropy checks read the mask tokens
    # after its end and cut its real tokens. Each row must end as it does alone.
    torch.manual_seed(0)
    cfg = bd3lm.BD3LMConfig(block_size=16, vocab_size=1000, model_length=64, hidden_dim=32, cond_dim=16, n_heads=4,
                            n_layers=2)
    model = bd3lm.BD3LM(cfg).eval()
    idx = torch.full((2, 1), cfg.bos_id)
    kw = dict(rule='tokens_per_call', knob=16, stop_entropy=4.0, stop_at_eos=True, return_stats=True)
    seeds = lambda: [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]
    out, stats = engine.generate(model, idx, [300, 600], generator=seeds(), **kw)
    for r, n in enumerate((300, 600)):
        alone, alone_stats = engine.generate(model, idx[r:r + 1], n, generator=seeds()[r:r + 1], **kw)
        assert stats['lengths'][r] == alone_stats['lengths'][0]
        assert torch.equal(out[r, :alone.shape[1]], alone[0])
    assert stats['lengths'][0] == 301                   # the short row kept all its tokens
