"""rule='speculative': drafts checked by one batched call per round, each token still drawn from the law
of first-hitting (or of lowest-entropy-first with order='entropy'), at fewer model calls."""
import functools
import itertools

import pytest
import torch
from scipy.stats import chi2

import bd3lm
from bd3lm_tools import engine
from bd3lm_tools import speculative
from conftest import check_engine_rows_equal_generate_alone, random_model


def dependent_model(seed=0, block_size=4, model_length=4):
    """One block [BOS, ?, ?, ?] over 4 tokens (+ mask), float64, whose positions depend strongly on each
    other (sharp attention, unit adaLN gates): a draft from a stale q is often wrong, so the accept and
    residual steps are what the law hangs on. (Blocks of 2 in a window of 4: [BOS, ?] [?, ?].)"""
    torch.manual_seed(seed)
    model = bd3lm.BD3LM(bd3lm.BD3LMConfig(block_size=block_size, vocab_size=5, model_length=model_length,
                                          hidden_dim=32, cond_dim=16, n_layers=2, n_heads=4))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
        for mod in [model.output_layer.adaLN_modulation] + [b.adaLN_modulation for b in model.blocks]:
            mod.weight.zero_()
            mod.bias.zero_()
        for b in model.blocks:
            b.adaLN_modulation.bias.view(6, -1)[[2, 5]] = 1.0       # gate1 = gate2 = 1
            b.attn_qkv.weight.mul_(4.0)
        model.output_layer.linear.weight.mul_(1.5)
    return model.double().eval()


def exact_law(model, order, temperature=1.0, top_p=1.0, head=(3,), n=3):
    """The law (M^n,) of n masked tokens after the clean `head` (BOS; with blocks of 4, the block [BOS, ?,
    ?, ?]) under one-token-per-call sampling, by a dynamic program
    over revealed subsets from the model's own conditionals: 'uniform' reveals a uniformly random masked
    position (a random order drawn once per block), 'entropy' the one of lowest entropy at temperature 1;
    each token from the tempered, nucleus-filtered conditional. 'confidence': a token is proposed at every
    masked position from that conditional and the proposal of highest p_theta (temperature 1) is revealed,
    ties to the lowest position (every combination of proposals enumerated)."""
    M, h = model.config.mask_id, len(head)
    states = list(itertools.product(range(M + 1), repeat=n))         # M: still masked
    with torch.no_grad():
        logits = model(torch.tensor([[*head, *s] for s in states])).double()[:, h:]
    logits[..., M] = -float('inf')
    p1 = logits.softmax(-1)
    entropy = -(p1 * p1.log().nan_to_num(neginf=0.0)).sum(-1)
    law = bd3lm.nucleus((logits / temperature).softmax(-1), top_p)
    index = {s: i for i, s in enumerate(states)}

    @functools.lru_cache(None)
    def outcomes(s):
        masked = [i for i in range(n) if s[i] == M]
        if not masked:
            return {s: 1.0}
        i = index[s]
        out = {}
        for (j, t), w in reveals(i, masked).items():
            if w > 0:
                for final, q in outcomes(s[:j] + (t,) + s[j + 1:]).items():
                    out[final] = out.get(final, 0.0) + w * q
        return out

    def reveals(i, masked):
        """{(position, token): probability} of the next reveal in state i."""
        if order == 'confidence':
            out = {}
            for proposed in itertools.product(range(M), repeat=len(masked)):
                w = 1.0
                for j, t in zip(masked, proposed):
                    w *= float(law[i, j, t])
                conf = [float(p1[i, j, t]) for j, t in zip(masked, proposed)]
                best = conf.index(max(conf))                         # the first of the highest: ties to the lowest
                key = (masked[best], proposed[best])
                out[key] = out.get(key, 0.0) + w
            return out
        picks = masked if order == 'uniform' else [min(masked, key=lambda j: float(entropy[i, j]))]
        return {(j, t): float(law[i, j, t]) / len(picks) for j in picks for t in range(M)}

    exact = torch.zeros(M ** n, dtype=torch.float64)
    for final, q in outcomes((M,) * n).items():
        exact[sum(t * M ** (n - 1 - i) for i, t in enumerate(final))] = q
    return exact


def counts_of(out, M):
    x = out[:, 1:4]
    return torch.bincount(x[:, 0] * M * M + x[:, 1] * M + x[:, 2], minlength=M ** 3).double()


def chi_square_p(counts, probs):
    keep = probs > 0
    assert counts[~keep].sum() == 0                   # nothing drawn outside the support
    expected = probs[keep] * counts.sum()
    stat = float(((counts[keep] - expected) ** 2 / expected).sum())
    return chi2.sf(stat, int(keep.sum()) - 1)


@pytest.mark.parametrize('rule', ['speculative', 'speculative_wide'])
@pytest.mark.parametrize('k, order, temperature, top_p', [
    (2, 'uniform', 1.0, 1.0), (3, 'uniform', 0.7, 0.85), (2, 'entropy', 1.0, 1.0), (3, 'entropy', 1.3, 0.9),
    (2, 'confidence', 1.0, 1.0), (3, 'confidence', 0.8, 0.9)])
def test_speculative_draws_the_one_token_per_call_law(rule, k, order, temperature, top_p):
    # 20,000 blocks drawn speculatively against the exact law of their order (first-hitting's,
    # lowest-entropy-first: entropy_bound with gamma = 0, or most-confident-first: tokens_per_call with
    # knob 1), with one candidate per reveal or several (speculative_wide). Redrawing a rejected draft
    # from p instead of the residual (p - q)+, testing a second candidate against p instead of the
    # residual, keeping a draft at a position the entropy order did not pick, or breaking the confidence
    # order's ties towards the higher position, fails it.
    model = dependent_model()
    n, M = 20_000, model.config.mask_id
    out, stats = engine.generate(model, torch.full((n, 1), 3), 3, rule=rule, knob=k, order=order,
                                temperature=temperature, top_p=top_p, generator=torch.Generator().manual_seed(1),
                                return_stats=True)
    exact = exact_law(model, order, temperature, top_p)
    assert chi_square_p(counts_of(out, M), exact) > 0.01
    assert stats['row_nfe'].double().mean() < 3         # it did draw several tokens per call
    other = exact_law(model, 'entropy' if order == 'uniform' else 'uniform', temperature, top_p)
    assert (exact - other).abs().sum() > 0.05           # the two laws differ: the test tells them apart


@pytest.mark.parametrize('rule, order, temperature, top_p', [
    ('speculative', 'uniform', 1.0, 1.0), ('speculative_wide', 'uniform', 0.7, 0.85),
    ('speculative', 'entropy', 1.0, 1.0), ('speculative_wide', 'confidence', 0.8, 0.9)])
def test_a_block_drafted_from_the_lookahead_keeps_the_law(rule, order, temperature, top_p):
    # Blocks of 2, [BOS, x] [y, z]: the call that reveals x also runs the lookahead row (the next block
    # after [BOS, ?]), and the second block's first call drafts from it: a draft that saw a mask where x
    # now is. 20,000 texts against the exact law: x from the model, then y, z one per call given [BOS, x].
    model = dependent_model(block_size=2, model_length=4)
    n, M = 20_000, model.config.mask_id
    out, stats = engine.generate(model, torch.full((n, 1), 3), 3, rule=rule, knob=2, order=order, temperature=temperature,
                                top_p=top_p, generator=torch.Generator().manual_seed(2), return_stats=True)
    first = exact_law(model, order, temperature, top_p, head=(3,), n=1)
    exact = torch.cat([first[x] * exact_law(model, order, temperature, top_p, head=(3, x), n=2) for x in range(M)])
    assert chi_square_p(counts_of(out, M), exact) > 0.01
    assert stats['row_nfe'].double().mean() < 2.9    # without the lookahead every text takes 3 calls
    assert stats['rows_x_tokens'].double().mean() > stats['row_nfe'].double().mean() * 2   # verify rows ran


def test_confidence_order_law_is_tokens_per_call_one():
    # The same law drawn by bd3lm's own one-token-per-call sampler (tokens_per_call, knob 1).
    model = dependent_model()
    n, M = 20_000, model.config.mask_id
    out = engine.generate(model, torch.full((n, 1), 3), 3, rule='tokens_per_call', knob=1, order='confidence',
                         temperature=0.8, top_p=0.9, generator=torch.Generator().manual_seed(1))
    assert chi_square_p(counts_of(out, M), exact_law(model, 'confidence', 0.8, 0.9)) > 0.01


def test_pick_law_has_the_ties_to_the_lowest_position():
    # Two masked positions with the same confidences: position 0 wins every tie, so it is picked with
    # P(conf_1 <= conf_0); the third position is unmasked and takes no part.
    probs = torch.tensor([[[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [1.0, 0.0, 0.0]]], dtype=torch.float64)
    law = torch.tensor([[[0.3, 0.7, 0.0], [0.6, 0.4, 0.0], [0.0, 0.0, 0.0]]], dtype=torch.float64)
    masked = torch.tensor([[True, True, False]])
    P = speculative.pick_law(probs, law, masked).view(3, 3)
    torch.testing.assert_close(P, torch.tensor([[0.3, 0.7, 0], [0, 0, 0], [0, 0, 0]], dtype=torch.float64))
    probs[0, 1] = torch.tensor([0.6, 0.4, 0.0], dtype=torch.float64)   # position 1's token 0 now beats 0.5
    P = speculative.pick_law(probs, law, masked).view(3, 3)
    torch.testing.assert_close(P, torch.tensor([[0.3 * 0.4, 0.7 * 0.4, 0], [0.6, 0, 0], [0, 0, 0]],
                                               dtype=torch.float64))


@pytest.mark.parametrize('chunk', [speculative.PICK_CHUNK, 1])
def test_pick_law_equals_counting_every_proposal(monkeypatch, chunk):
    # Against the obvious computation: every joint proposal (a_0, a_1, a_2) of the three masked positions
    # (one unmasked), its probability, and which pair wins (highest confidence, ties to the lowest
    # position). chunk=1 tests one pair at a time (pick_law's chunking changes nothing).
    monkeypatch.setattr(speculative, 'PICK_CHUNK', chunk)
    g = torch.Generator().manual_seed(3)
    probs = torch.rand(1, 4, 3, generator=g, dtype=torch.float64).softmax(-1)
    probs[0, 2] = probs[0, 0]                                       # ties between positions 0 and 2
    law = torch.rand(1, 4, 3, generator=g, dtype=torch.float64).softmax(-1)
    masked = torch.tensor([[True, False, True, True]])
    want = torch.zeros(4, 3, dtype=torch.float64)
    for a in itertools.product(range(3), repeat=3):
        where = [0, 2, 3]
        chance = law[0, where, list(a)].prod()
        conf = [probs[0, i, t].item() for i, t in zip(where, a)]
        winner = max(range(3), key=lambda j: (conf[j], -j))
        want[where[winner], a[winner]] += chance
    torch.testing.assert_close(speculative.pick_law(probs, law, masked).view(4, 3), want, rtol=1e-12, atol=1e-15)


def test_draft_bytes_is_what_a_draft_keeps(monkeypatch):
    # serve.py caps rule.draft_bytes: it must be the size of the largest Draft.q a row really keeps.
    model = dependent_model(block_size=4, model_length=8)
    sizes, real_draft = [], speculative.draft

    def draft(*args, **kwargs):
        d = real_draft(*args, **kwargs)
        sizes.append(d.q[0])
        return d
    monkeypatch.setattr(speculative, 'draft', draft)
    for name, k, order in (('speculative', 2, 'uniform'), ('speculative_wide', 16, 'confidence')):
        sizes.clear()
        engine.generate(model, torch.full((1, 1), 3), 7, rule=name, knob=k, order=order)
        rule = engine.RULES[name]
        assert max(q.numel() * q.element_size() for q in sizes) == rule.draft_bytes(k, order, model.config) > 0


def test_entropy_order_law_is_entropy_bound_zero():
    # The same law drawn by bd3lm's own one-token-per-call sampler (entropy_bound, gamma = 0).
    model = dependent_model()
    n, M = 20_000, model.config.mask_id
    out = engine.generate(model, torch.full((n, 1), 3), 3, rule='entropy_bound', knob=0.0,
                         generator=torch.Generator().manual_seed(1))
    assert chi_square_p(counts_of(out, M), exact_law(model, 'entropy')) > 0.01


def test_knob_0_is_first_hitting_token_for_token():
    model = random_model(block_size=4, model_length=16)
    idx = torch.randint(0, 36, (3, 5), generator=torch.Generator().manual_seed(0))
    kw = dict(temperature=0.9, top_p=0.95, return_stats=True)
    a, sa = engine.generate(model, idx, 30, rule='speculative', knob=0, generator=torch.Generator().manual_seed(3), **kw)
    b, sb = engine.generate(model, idx, 30, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(a, b) and torch.equal(sa['row_nfe'], sb['row_nfe'])
    assert sa['nfe'] == 30 and torch.equal(sa['rows_x_tokens'], 30 * 4 * torch.ones(3, dtype=torch.long))


def test_greedy_matches_first_hitting_in_one_block():
    # Temperature 0 is an exact-match test: the same order, the same argmax tokens.
    model = random_model(block_size=8, model_length=8)
    idx = torch.full((4, 1), 3)
    for k in (1, 3, 7):
        a = engine.generate(model, idx, 7, rule='speculative', knob=k, temperature=0.0, generator=torch.Generator().manual_seed(5))
        b = engine.generate(model, idx, 7, temperature=0.0, generator=torch.Generator().manual_seed(5))
        assert torch.equal(a, b)


def test_calls_fall_with_k_on_a_confident_model():
    # Every position's law nearly one-hot: each draft is kept. The first block costs one call for its first
    # token (nothing to draft from yet) and ceil(15 / (k + 1)) for the rest; a later block drafts from the
    # lookahead row its predecessor's last call ran, so ceil(16 / (k + 1)). k = 0 is first-hitting.
    model = random_model(block_size=16, model_length=64)
    with torch.no_grad():
        model.output_layer.linear.bias[7] = 60.0
    idx = torch.full((2, 16), 3)
    new = 48
    for k, calls in ((0, new), (1, 9 + 2 * 8), (3, 5 + 2 * 4), (15, 2 + 2 * 1)):
        _, stats = engine.generate(model, idx, new, rule='speculative', knob=k, generator=torch.Generator().manual_seed(0),
                                  return_stats=True)
        assert stats['nfe'] == calls, k
        # rows x tokens: a call runs one row per token it reveals (1 + drafts), 16 tokens each, and each
        # block's last call one lookahead row (k > 0)
        assert int(stats['rows_x_tokens'][0]) == 16 * (new + 3 * (k > 0)), k


@pytest.mark.parametrize('rule, order', [('speculative', 'uniform'), ('speculative', 'entropy'),
                                         ('speculative_wide', 'entropy'), ('speculative_wide', 'confidence')])
def test_cached_equals_uncached_past_model_length(rule, order):
    model = random_model(block_size=4, model_length=16)
    idx = torch.randint(0, 36, (2, 6), generator=torch.Generator().manual_seed(0))
    outs = [engine.generate(model, idx, 40, rule=rule, knob=3, order=order, temperature=0.8, top_p=0.9,
                           kv_cache=kv, generator=torch.Generator().manual_seed(7)) for kv in (True, False)]
    assert torch.equal(outs[0], outs[1])
    assert not (outs[0] == model.config.mask_id).any()


SETTINGS = [dict(rule='speculative_wide', knob=3, temperature=0.8, top_p=0.9),
            dict(rule='speculative', knob=1, order='entropy', temperature=1.0, top_p=1.0),
            dict(rule='first_hitting', temperature=0.7, top_p=1.0),
            dict(rule='speculative_wide', knob=6, order='confidence', temperature=1.2, top_p=0.8)]


def test_a_row_alone_equals_the_row_in_a_batch():
    model = random_model(block_size=4, model_length=16).double()
    idx = torch.randint(0, 36, (4, 3), generator=torch.Generator().manual_seed(0))
    lengths = [21, 9, 30, 14]
    per_row = {key: [s.get(key) for s in SETTINGS] for key in ('rule', 'knob', 'order', 'temperature', 'top_p')}
    gens = [torch.Generator().manual_seed(100 + i) for i in range(4)]
    out, stats = engine.generate(model, idx, lengths, generator=gens, return_stats=True, **per_row)
    for i, s in enumerate(SETTINGS):
        alone, st = engine.generate(model, idx[i:i + 1], lengths[i], generator=[torch.Generator().manual_seed(100 + i)],
                                   return_stats=True, **s)
        assert torch.equal(out[i, :3 + lengths[i]], alone[0]), i
        assert stats['row_nfe'][i] == st['row_nfe'][0] and stats['rows_x_tokens'][i] == st['rows_x_tokens'][0]


def test_engine_rows_equal_generate_alone():
    # Served rows join at different times, sit at different blocks and leave at different times; each
    # keeps its own drafts, cached or not.
    model = random_model(block_size=4, model_length=16).double()
    g = torch.Generator().manual_seed(0)
    prompts = [[35] + torch.randint(0, 35, (n,), generator=g).tolist() for n in (0, 2, 5, 9)]
    lengths = [30, 11, 25, 17]
    check_engine_rows_equal_generate_alone(model, prompts, lengths, SETTINGS, joining_late=2, steps_before=3)


def test_wide_drafts_more_rows_for_fewer_calls():
    # Two candidates per reveal: more verify rows per call, fewer calls than one candidate (the same k).
    model = dependent_model()
    idx = torch.full((4000, 1), 3)
    runs = [engine.generate(model, idx, 3, rule=rule, knob=2, generator=torch.Generator().manual_seed(0),
                           return_stats=True)[1] for rule in ('speculative', 'speculative_wide')]
    assert runs[1]['row_nfe'].double().mean() < runs[0]['row_nfe'].double().mean()
    rows_per_call = [float(r['rows_x_tokens'].sum()) / float(r['row_nfe'].sum()) for r in runs]
    assert rows_per_call[1] > rows_per_call[0]


def test_a_huge_knob_drafts_the_whole_block():
    # A knob past int64 (10**19) is clamped to the block before it becomes an integer: it drafts as much
    # as knob = block_size, token for token (it once overflowed to a negative count and drafted nothing).
    model = random_model(block_size=4, model_length=16)
    idx = torch.randint(0, 36, (8, 3), generator=torch.Generator().manual_seed(0))
    runs = [engine.generate(model, idx, 30, rule='speculative', knob=k, generator=torch.Generator().manual_seed(2),
                           return_stats=True) for k in (10 ** 19, 4, 0)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1]['row_nfe'], runs[1][1]['row_nfe'])
    assert runs[0][1]['row_nfe'].sum() < runs[2][1]['row_nfe'].sum()      # fewer calls than one per token
