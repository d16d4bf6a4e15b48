"""The law of every unmasking rule in the registry, checked on a model whose positions depend on each other.

One block of three masked tokens after a clean prompt block, over four tokens (+ mask): 64 outcomes. The
exact law of the block under a rule is computed from the model's own conditionals by running the
registered rule itself on exact proposals (law_of): every reachable partial block, every combination of
proposed tokens (with its probability under the row's tempered, nucleus-cut law) and every cell of the
block's random order (which stratum of [0, 1) each position's uniform lies in, and their ranks). n rows
drawn in one batched call of each sampler (bd3lm.generate and engine.generate, token for token the same)
are compared with it by a chi-square test at false-alarm rate ALPHA.

A check that cannot fail proves nothing, so the model is one whose orders disagree: the joint law of a
block differs strongly between 'revealed together', 'one at a time' and 'left to right' (a random model
with sharp attention and a sharp output layer). test_mutations_have_power asserts, from exact laws, that
each plausible wrong law sits far beyond the threshold at the n used; test_mutations_are_rejected shows
the samplers running each mutation fail the check.

Which rules: every rule in the registry (engine.rules(): bd3lm.RULES and the engine's drafting rules) when
this file is collected. SETTINGS lists knobs that exercise the known rules; a rule it does not list is
checked at settings taken from its declared knob range and orders. A drafting rule (rule.draft,
bd3lm_tools/speculative.py) keeps the law of its order's one-token-per-call rule, which is what it is
checked against (engine only: bd3lm.generate does not run them). law_of asserts that a rule reads p.uniform
only through its ranks and the strata it is told (cuts_for: steps reads floor(u K)), and needs only the
fields of bd3lm.Proposal: a rule that reads more fails with a message saying so, not silently.
"""
import functools
import itertools
import math
from types import SimpleNamespace
from statistics import NormalDist

import pytest
import torch

import bd3lm
from bd3lm_tools import engine

N = 5_000           # rows drawn per law check
ALPHA = 1e-4        # false-alarm rate of one check
POWER = 3.0         # a mutation's noncentrality must exceed POWER x the threshold
BS, V = 3, 5        # block size; vocabulary (4 tokens + the mask, id 4)
PROMPT = (3, 0, 1)  # one clean block: BOS = 3, then two tokens


# --- the model -----------------------------------------------------------------------------------------

@functools.lru_cache(None)
def law_model(seed=3, qkv=4.0, out=4.0, std=0.5):
    """Blocks of 3 in a window of 6, float64. Random weights, then sharp attention (qkv x 4), unit adaLN
    gates and a sharp output layer: each position's conditional leans hard on the tokens revealed beside
    it, and differently in each order."""
    torch.manual_seed(seed)
    model = bd3lm.BD3LM(bd3lm.BD3LMConfig(block_size=BS, vocab_size=V, model_length=2 * BS, hidden_dim=32,
                                          cond_dim=16, n_layers=2, n_heads=4, dropout=0.0))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
        for mod in [model.output_layer.adaLN_modulation] + [b.adaLN_modulation for b in model.blocks]:
            mod.weight.zero_()
            mod.bias.zero_()
        for b in model.blocks:
            b.adaLN_modulation.bias.view(6, -1)[[2, 5]] = 1.0       # gate1 = gate2 = 1
            b.attn_qkv.weight.mul_(qkv)
        model.output_layer.linear.weight.mul_(out)
    return model.double().eval()


# --- exact laws ------------------------------------------------------------------------------------------

M = V - 1                                                    # the mask id
STATES = list(itertools.product(range(M + 1), repeat=BS))    # a partial block: M where still masked
INDEX = {s: i for i, s in enumerate(STATES)}


@functools.lru_cache(None)
def conditionals(model):
    """The model's logits (S, BS, V) at the block's positions in every partial block (mask excluded)."""
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT + s for s in STATES])).double()[:, len(PROMPT):]
    logits[..., M] = -math.inf
    return logits


@functools.lru_cache(None)
def moves():
    """Every (partial block, proposed tokens) pair with something masked: state index (R,), the tokens
    (R, BS) (proposed where masked, the revealed token elsewhere), masked (R, BS)."""
    rows = []
    for i, s in enumerate(STATES):
        masked = [j for j in range(BS) if s[j] == M]
        for proposed in itertools.product(range(M), repeat=len(masked)) if masked else []:
            t = list(s)
            for j, a in zip(masked, proposed):
                t[j] = a
            rows.append((i, t, [x == M for x in s]))
    return (torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows]), torch.tensor([r[2] for r in rows]))


def order_cells(cuts):
    """The cells of the block's random order: each position's stratum of [0, 1) between `cuts`, and the
    ranks of the positions (ties within a stratum broken by a uniformly random permutation). -> weights
    (C,), a point of each cell (C, BS), and a second, random point of the same cell (C, BS)."""
    edges = torch.tensor((0.0,) + tuple(sorted(cuts)) + (1.0,), dtype=torch.float64)
    lo, width = edges[:-1], edges[1:] - edges[:-1]
    strata = torch.tensor(list(itertools.product(range(len(lo)), repeat=BS)))
    perms = torch.tensor(list(itertools.permutations(range(BS))))
    s = strata.repeat_interleave(len(perms), 0)
    pi = perms.repeat(len(strata), 1)
    weight = width[s].prod(-1) / len(perms)
    point = lo[s] + width[s] * (pi + 0.5) / BS
    r = torch.rand(s.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).sort(-1).values
    other = lo[s] + width[s] * r.gather(-1, pi)
    return weight, point, other


@functools.lru_cache(None)
def per_state(model, temperature, top_p):
    """p_theta (temperature 1), the law tokens are drawn from (temperature, then nucleus) and the entropy of
    p_theta, at every position of every partial block: (S, BS, V), (S, BS, V), (S, BS)."""
    logits = conditionals(model)
    log_p = logits.log_softmax(-1)
    if temperature == 0:
        law = torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    else:
        law = (logits / temperature).softmax(-1)
    law = law if top_p >= 1 else bd3lm.nucleus(law, top_p)
    return log_p.exp(), law, -(log_p.exp() * log_p.nan_to_num(neginf=0.0)).sum(-1)


def proposal(model, state, tokens, masked, uniform, order, temperature, top_p):
    """The exact proposal of one model call, as an unmasking rule reads it (bd3lm.Proposal's fields, computed
    here from the conditionals) for rows of (partial block, proposed tokens, the block's uniforms)."""
    probs, law, entropy = (f[state] for f in per_state(model, temperature, top_p))
    confidence = probs.gather(-1, tokens[..., None]).squeeze(-1)
    priority = {'uniform': uniform, 'confidence': confidence, 'entropy': -entropy}[order]
    first = priority.masked_fill(~masked, -math.inf).argmax(-1, keepdim=True)   # ties: the lowest position
    leading = masked & torch.zeros_like(masked).scatter_(-1, first, True)
    return SimpleNamespace(masked=masked, uniform=uniform, probs=probs, law=law, tokens=tokens,
                           confidence=confidence, entropy=entropy, priority=priority, leading=leading)


def law_of(model, rule, knob=None, order=None, temperature=1.0, top_p=1.0, cuts=(), chunk=256):
    """The exact law (M^BS,) of the block's tokens under `rule` (a function of the registry's kind) by a
    dynamic program over partial blocks, run for each cell of the random order. Exact for a rule that
    reads p.uniform only through its ranks and the strata between `cuts` (checked: the rule must reveal
    the same at a second point of every cell)."""
    fn = rule
    order = order or getattr(fn, 'order', 'confidence')
    state, tokens, masked = moves()
    R = len(state)
    weight, point, other = order_cells(cuts)
    final = torch.zeros(len(STATES), dtype=torch.float64)
    base = (M + 1) ** torch.arange(BS - 1, -1, -1)
    for c0 in range(0, len(weight), chunk):
        w, u, u2 = weight[c0:c0 + chunk], point[c0:c0 + chunk], other[c0:c0 + chunk]
        C = len(w)
        st, tk, mk = state.repeat(C), tokens.repeat(C, 1), masked.repeat(C, 1)
        uni, uni2 = u.repeat_interleave(R, 0), u2.repeat_interleave(R, 0)
        knobs = torch.full((C * R,), 0.0 if knob is None else float(knob), dtype=torch.float64)
        p = proposal(model, st, tk, mk, uni, order, temperature, top_p)
        chance = torch.where(mk, p.law.gather(-1, tk[..., None]).squeeze(-1), 1.0).prod(-1)
        reveal = fn(p, knobs) & mk
        reveal |= p.leading & ~reveal.any(-1, keepdim=True)
        q = proposal(model, st, tk, mk, uni2, order, temperature, top_p)
        again = fn(q, knobs) & mk
        again |= q.leading & ~again.any(-1, keepdim=True)
        differ = (reveal != again).any(-1) & (chance > 0)
        assert not differ.any(), (f'{getattr(fn, "__name__", fn)} reads p.uniform finer than the strata between '
                                  f'{cuts}: its law is not computed exactly here (pass the cuts it reads)')
        after = torch.where(reveal, tk, torch.where(mk, M, tk))
        nxt = (after * base).sum(-1)
        cell = torch.arange(C).repeat_interleave(R)
        dist = torch.zeros(C, len(STATES), dtype=torch.float64)
        dist[:, INDEX[(M,) * BS]] = 1.0
        for _ in range(BS):                                  # at least one reveal per call
            new = torch.zeros_like(dist)
            done = torch.tensor([M not in s for s in STATES])
            new[:, done] = dist[:, done]
            new.view(-1).index_add_(0, cell * len(STATES) + nxt, dist[cell, st] * chance)
            dist = new
        final += (w[:, None] * dist).sum(0)
    done = torch.tensor([M not in s for s in STATES])
    assert math.isclose(float(final.sum()), 1.0, rel_tol=1e-9), float(final.sum())
    law = torch.zeros(M ** BS, dtype=torch.float64)
    for i in done.nonzero().flatten().tolist():
        s = STATES[i]
        law[sum(t * M ** (BS - 1 - j) for j, t in enumerate(s))] = final[i]
    return law


# --- the chi-square test -----------------------------------------------------------------------------------

def threshold_of(df, alpha=ALPHA):
    """The (1 - alpha) quantile of chi-square with df degrees of freedom (Wilson-Hilferty)."""
    z, a = NormalDist().inv_cdf(1 - alpha), 2 / (9 * df)
    return df * (1 - a + z * math.sqrt(a)) ** 3


def cells(law, n=N):
    """The chi-square cells of a law at n rows: outcomes expected at least 5 times each, the rest pooled."""
    big = law * n >= 5
    return lambda x: torch.cat([x[big], x[~big].sum()[None]]) if (~big).any() else x[big]


def chi_square(counts, law):
    """(statistic, threshold) of counts against the exact law; infinite if something impossible was drawn."""
    if counts[law == 0].sum() > 0:
        return math.inf, 0.0
    pool = cells(law, int(counts.sum()))
    o, e = pool(counts), pool(law) * counts.sum()
    keep = e > 0
    if keep.sum() < 2:                     # one possible outcome: drawing only it is the whole test
        return 0.0, 1.0
    return float(((o[keep] - e[keep]) ** 2 / e[keep]).sum()), threshold_of(int(keep.sum()) - 1)


def noncentrality(wrong, law, n=N):
    """n sum (p_wrong - p)^2 / p over the test's cells: how far a wrong law's statistic moves (its mean is
    df + this)."""
    pool = cells(law, n)
    p, q = pool(law), pool(wrong)
    if (q[p == 0] > 0).any():
        return math.inf
    keep = p > 0
    return n * float(((q[keep] - p[keep]) ** 2 / p[keep]).sum())


# --- what is checked: every rule in the registry -----------------------------------------------------------

# Settings that exercise each rule (a rule not listed here gets settings from its knob range: knob_settings).
SETTINGS = {
    'first_hitting': [{}],
    'steps': [dict(knob=1), dict(knob=2), dict(knob=3), dict(knob=10 ** 15)],    # together ... first-hitting
    'threshold': [dict(knob=0.7), dict(knob=0.7, order='uniform'), dict(knob=0.0)],
    'entropy_bound': [dict(knob=0.0), dict(knob=0.5), dict(knob=0.5, order='uniform')],
    'tokens_per_call': [dict(knob=2), dict(knob=2, order='uniform')],
}
SAMPLINGS = [dict(), dict(temperature=0.7, top_p=0.9)]     # the law of the proposed tokens, and threshold's


def cuts_for(name, knob):
    """Where a rule's reveal may change with a position's uniform besides its rank: steps reads
    floor(u K), which changes at multiples of 1 / K (for a huge K only the ranks matter)."""
    return tuple(i / knob for i in range(1, int(knob))) if name == 'steps' and knob <= 12 else ()


def knob_settings(fn):
    """Settings for a rule SETTINGS does not list, from its declared knob range and orders."""
    spec = getattr(fn, 'knob', ...)
    if spec is None or spec is ...:
        knobs = [None]
    else:
        low, high = spec
        knobs = [low, low + 1] if isinstance(low, int) else [low + (min(high, low + 1.0) - low) / 2]
    orders = [None] + [o for o in ('uniform',) if o in getattr(fn, 'orders', bd3lm.ORDERS)
                       and o != getattr(fn, 'order', 'confidence')]
    return [dict(knob=k, order=o) for k in knobs for o in orders]


def one_per_call(order):
    """The one-token-per-call rule whose law a drafting rule keeps (bd3lm_tools/speculative.py), by order."""
    return {'uniform': ('first_hitting', None), 'entropy': ('entropy_bound', 0.0),
            'confidence': ('tokens_per_call', 1)}[order]


def cases():
    out = []
    for name, fn in engine.rules().items():
        if hasattr(fn, 'draft'):           # a drafting rule: the engine's only; its order's one-per-call law
            for order in getattr(fn, 'orders', ('uniform',)):
                out.append(pytest.param(name, dict(knob=2, order=order), {}, id=f'{name}-{order}'))
            continue
        for setting in SETTINGS.get(name) or knob_settings(fn):
            for sampling in SAMPLINGS:
                out.append(pytest.param(name, setting, sampling,
                                        id='-'.join([name] + [f'{k}={v}' for k, v in {**setting, **sampling}.items()])))
    return out


def exact(name, setting, sampling, rules=None):
    """The exact law of the block under the registered rule `name` at these settings."""
    fn = (rules or engine.rules())[name]
    knob, order = setting.get('knob'), setting.get('order')
    if hasattr(fn, 'draft'):
        name, knob = one_per_call(order or fn.order)
        fn = bd3lm.RULES[name]
    return law_of(law_model(), fn, knob, order, sampling.get('temperature', 1.0), sampling.get('top_p', 1.0),
                  cuts_for(name, knob or 0))


def draw(sampler, name, setting, sampling, n=N, seed=0):
    """Counts (M^BS,) of the block's outcomes in n rows drawn by one batched call of `sampler`."""
    idx = torch.tensor([PROMPT]).expand(n, -1)
    out = sampler(law_model(), idx, BS, rule=name, generator=torch.Generator().manual_seed(seed), **setting, **sampling)
    block = out[:, len(PROMPT):]
    assert not (block == M).any()
    return out, torch.bincount((block * M ** torch.arange(BS - 1, -1, -1)).sum(-1), minlength=M ** BS).double()


def check_law(name, setting, sampling, both=True):
    """Draw N rows with the engine (and with bd3lm.generate: the same tokens) and test them against the
    exact law; -> (statistic, threshold)."""
    law = exact(name, setting, sampling)
    out, counts = draw(engine.generate, name, setting, sampling)
    if both and name in bd3lm.RULES:
        assert torch.equal(draw(bd3lm.generate, name, setting, sampling)[0], out)
    return chi_square(counts, law)


@pytest.mark.parametrize('name, setting, sampling', cases())
def test_every_rule_draws_its_law(name, setting, sampling):
    # N blocks from both samplers against the exact law of the registered rule (law_of); a rule with no
    # way to compute its law fails here rather than go unchecked.
    stat, limit = check_law(name, setting, sampling)
    assert stat < limit, f'{name} {setting} {sampling}: chi-square {stat:.1f} > {limit:.1f}'


# --- mutations: plausible wrong laws, each rejected -----------------------------------------------------

def cosine_steps(p, K):
    # steps on the grid t_i = cos(pi i / 2K) instead of 1 - i / K: a position is revealed at the first
    # step i with t_{i+1} < its reveal time 1 - u, so its step is no longer uniform over the K steps
    step = (2 * K[:, None] / math.pi * torch.arccos(1 - p.uniform)).floor().clamp(max=K[:, None] - 1)
    return p.masked & (step == step.masked_fill(~p.masked, math.inf).amin(-1, keepdim=True))


def left_to_right(p, knob):
    # first-hitting in a fixed order: the leftmost masked position instead of the block's random order
    return p.masked & (p.masked.cumsum(-1) == 1)


def tempered_threshold(p, tau):
    # threshold comparing tau with the proposed token's tempered probability instead of p_theta's
    return p.masked & (p.law.gather(-1, p.tokens[..., None]).squeeze(-1) >= tau[:, None])


# name: (the rule it replaces, the mutant, its setting, its sampling, the cuts its law needs)
MUTATIONS = {
    'steps on a cosine grid': ('steps', cosine_steps, dict(knob=2), {},
                               (0.5, 1 - math.cos(math.pi / 4))),
    'first-hitting left to right': ('first_hitting', left_to_right, {}, {}, ()),
    'threshold on the tempered probability': ('threshold', tempered_threshold, dict(knob=0.7),
                                              dict(temperature=0.7), ()),
}


def mutant(name):
    rule, fn, *_ = MUTATIONS[name]
    for attr in ('knob', 'order', 'orders'):
        if hasattr(bd3lm.RULES[rule], attr):
            setattr(fn, attr, getattr(bd3lm.RULES[rule], attr))
    return rule, fn


@pytest.mark.parametrize('name', list(MUTATIONS))
def test_mutations_have_power(name):
    # The noncentrality n sum (p_wrong - p)^2 / p of each mutation's exact law at N rows, against the
    # threshold of the check (ALPHA = 1e-4). At N = 5,000 (lambda is linear in N; measured at 20,000 and
    # divided by 4; under a mutation the statistic has mean df + lambda, sd sqrt(2 (df + 2 lambda))):
    #   steps on a cosine grid (K = 2)                       lambda ~ 265        df 26, threshold 61.9
    #   first-hitting left to right                          lambda ~ 6,364      df 27, threshold 63.4
    #   threshold on the tempered probability (T 0.7, 0.7)   lambda ~ 283,888    df 6,  threshold 28.4
    # (the old test's random model: 'together' vs 'one at a time' 0.0021 apart, lambda ~ 0.76 against ~51.)
    # A change of the model that brings the laws close together again fails here.
    rule, fn = mutant(name)
    _, _, setting, sampling, cuts = MUTATIONS[name]
    law = exact(rule, setting, sampling)
    wrong = law_of(law_model(), fn, setting.get('knob'), setting.get('order'), sampling.get('temperature', 1.0),
                   sampling.get('top_p', 1.0), cuts)
    df = len(cells(law)(law)) - 1
    assert noncentrality(wrong, law) > POWER * threshold_of(df), (noncentrality(wrong, law), threshold_of(df))


@pytest.mark.parametrize('name', list(MUTATIONS))
def test_mutations_are_rejected(name, monkeypatch):
    # The samplers running each mutation (both read bd3lm.RULES at call time) fail the law check.
    rule, fn = mutant(name)
    _, _, setting, sampling, _ = MUTATIONS[name]
    law = exact(rule, setting, sampling)
    monkeypatch.setitem(bd3lm.RULES, rule, fn)
    stat, limit = chi_square(draw(engine.generate, rule, setting, sampling)[1], law)
    assert stat > limit, (stat, limit)
