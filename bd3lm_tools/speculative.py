"""
Lossless speculative decoding for BD3-LM: several tokens per model call, each one still drawn from the law
of a one-token-per-call sampler. Registered with the engine as engine.RULES['speculative'] (one candidate per
reveal) and engine.RULES['speculative_wide'] (WIDE_CANDIDATES per reveal): engine.generate and serve.py run
them (bd3lm_tools imports this file).

The one-token-per-call laws, by order:
  'uniform'     first-hitting's: positions in a uniformly random order drawn once per block
  'entropy'     lowest-entropy-first (entropy_bound with gamma = 0)
  'confidence'  tokens_per_call with knob 1: a token is proposed at every masked position from the row's
                law and the one of highest p_theta (temperature 1) is revealed, ties to the lowest position
Each call of such a sampler reveals one (position, token) pair from a law the call's row fixes, so the
calls can be checked ahead: speculative sampling (Leviathan et al. 2023; for any-order models ASSD, Guo &
Ermon 2025). In their names:

  draft q     the law a draft is drawn from: the proposal of the hidden states this rule kept from its
              previous call (stale, which is allowed: any q keeps the law exact)
  target p    the law of the next reveal given verify row v: over the tokens at the position the order
              picks ('uniform', 'entropy'), or over (position, token) pairs ('confidence', pick_law)
  accept      a draft is kept with probability min(1, p/q) at its outcome
  residual    after a rejection the target becomes (p - q)+ (normalised): the next candidate is tested
              against it, and the last residual is drawn from when every candidate is rejected

A round drafts a tree. Its spine is the next n <= k reveals (in the order, or drawn pair by pair for
'confidence'); at each depth C candidates are drawn without replacement from q (C = 1: a chain), the
first of them continuing the spine. Every node is a verify row: the block with its path's drafts
written in. Rows are separate because attention inside a block is bidirectional: the law of a reveal
given drafts 0..j-1 needs a pass in which exactly those drafts are present. The walk tests a node's
candidates one by one (recursive rejection sampling: exact for any sequence of draft laws, Jeon et al.
2024), moves to the accepted one, and ends at the first node whose candidates are all rejected (or that
has none: a leaf, which gives one more token from its own row): 1..n + 1 tokens per call, for 1 + C n
rows. With 'entropy' a candidate is also out where the position its row's entropies pick is not the
drafted one.

Lookahead: a round that may end its block (every masked position but one drafted) also runs the next
block, fully masked, after the spine's end node (one more row in the same pass, attending to that node's
keys as if they were clean). When the round does end the block, the next block's first round drafts from
it: without it that round has nothing to draft from and reveals one token. Its view of the finished block
misses the last reveal, which is allowed: a draft may come from anywhere the round's uniforms cannot see.
"""
import math
from dataclasses import dataclass

import torch

import bd3lm
from bd3lm_tools import engine

WIDE_CANDIDATES = 4     # candidates per reveal of RULES['speculative_wide'] (known_law.py: why 4)
PICK_CHUNK = 2 ** 22    # rival tests (N x bs x pairs) pick_law holds at once: ~32 MB per float64 temporary
MIN_MASS = 1e-9         # a candidate is drafted only where q has this much mass left (else a wasted row)


@dataclass
class Draft:
    """A round's draft tree for G rows. Node 0 is the block itself; node 1 + d C + i is candidate i of
    the reveal at depth d, written into spine(d) (spine(0) = 0, spine(d) = 1 + (d - 1) C)."""
    versions: torch.Tensor   # (G, m, bs) each node's verify row; m = 1 + C * (the deepest spine)
    n: torch.Tensor          # (G,) verify rows each row needs beyond the block (its present nodes - 1)
    present: torch.Tensor    # (G, m) bool: the node was drafted (else a padding copy of its parent)
    positions: torch.Tensor  # (G, m) the position each node writes
    tokens: torch.Tensor     # (G, m) the token it writes there
    q: torch.Tensor          # (G, m, W) the law its outcome was drawn from: over tokens (W = V) or pairs
    u_accept: torch.Tensor   # (G, m) the uniforms of the accept tests
    candidates: int          # C
    ahead: torch.Tensor      # (G,) the node a lookahead row follows (the spine's end), -1: none


def spine(depth, candidates):
    """The node the reveal at `depth` (an int or a tensor) is drafted from."""
    return (1 + (depth - 1) * candidates) * (depth > 0)


def pick_law(probs, law, masked):
    """The law (N, bs V) of the pair (position, token) that order='confidence' reveals: a token a_k is
    proposed at every masked position k from `law` (N, bs, V) and the one of highest confidence
    probs_k(a_k) (probs: p_theta at temperature 1) wins, ties to the lowest position. So
        P(i, a) = law_i(a) prod_{k < i} P(conf_k < probs_i(a)) prod_{k > i} P(conf_k <= probs_i(a)),
    each conf_k's law being `law_k` carried over to the values probs_k. Unmasked positions take no part.
    Pairs go PICK_CHUNK rival tests at a time, so the temporaries stay small at any vocabulary."""
    N, bs, V = probs.shape
    values, order = probs.sort(-1)                                   # each position's confidences, ascending
    mass = torch.cat([torch.zeros_like(law[..., :1]), law.gather(-1, order).cumsum(-1)], -1)   # (N, bs, V + 1)
    out = (law * masked[..., None]).reshape(N, bs * V)
    k = torch.arange(bs, device=probs.device)[:, None]
    step = max(1, PICK_CHUNK // max(1, N * bs))
    for s in range(0, bs * V, step):                                 # pairs s .. s + step - 1
        c = probs.reshape(N, 1, bs * V)[..., s:s + step]
        c = c.expand(N, bs, c.shape[-1]).contiguous()                # each pair's confidence, per rival k
        below = mass.gather(-1, torch.searchsorted(values, c, right=False))    # P(conf_k < c)
        at_or_below = mass.gather(-1, torch.searchsorted(values, c, right=True))
        i = torch.arange(s, s + c.shape[-1], device=probs.device)[None] // V    # each pair's position
        beats = torch.where(k < i, below, at_or_below)               # (N, bs_k, pairs): pair (i, a) beats k
        beats = torch.where((k == i) | ~masked[:, :, None], 1.0, beats)
        out[:, s:s + step] *= beats.prod(1)
    return out


def full_law(p, rows):
    """(probs, law) (N, bs, V) at every masked position of `rows`, zeros elsewhere."""
    probs = p.probs[rows]
    where = p.masked[rows].nonzero(as_tuple=True)
    law = torch.zeros_like(probs)
    law[where] = p.law_at((rows[where[0]], where[1]))
    return probs, law


def draft(source, k, xb, generator, candidates=1):
    """Before the call: draft the tree of up to k (G,) reveals per row from `source`, the proposal of the
    node the row's previous round ended in, or at a block's start of the previous block's lookahead row
    (all zeros where there is none: nothing to draft from). At least one masked position is left for the
    deepest rows to draw."""
    G, bs = source.masked.shape
    device, C, cfg = xb.device, candidates, source.model.config
    has_source = source.hidden.flatten(1).any(-1)
    left = source.masked.sum(-1)
    depth = torch.minimum(k.clamp(max=bs).long(), left - 1).clamp(min=0) * has_source
    deepest, pairs, V = int(depth.max()), source.order == 'confidence', cfg.vocab_size
    m = 1 + C * deepest
    # A round that may end its block also runs the next block after the spine's end (lookahead): the next
    # block's first round drafts from it (only where the ring holds both blocks and drafts can be made).
    can_ahead = (k > 0) & (left == depth + 1) & (bs > 1) & (2 * bs <= cfg.model_length)
    ahead = torch.where(can_ahead, spine(depth, C), -1)
    zeros = torch.zeros(G, m, dtype=torch.long, device=device)
    present = torch.zeros(G, m, dtype=torch.bool, device=device)
    present[:, 0] = True
    if deepest == 0:                    # no row drafts: the block alone
        return Draft(xb[:, None], depth, present, zeros, zeros, torch.zeros(G, m, 0, dtype=torch.float64,
                     device=device), torch.zeros(G, m, dtype=torch.float64, device=device), C, ahead)
    # Uniforms indexed by (depth, candidate), never by m: a row draws the same whatever its batch mates do.
    u_draft, u_accept = engine.rand((G, 2, bs * C), generator, device, depth > 0).unbind(1)
    source.masked = source.masked & (depth > 0)[:, None]    # rows that draft nothing compute no fields
    q = torch.zeros(G, m, bs * V if pairs else V, dtype=torch.float64, device=device)
    positions, tokens, versions = zeros.clone(), zeros.clone(), xb[:, None].repeat(1, m, 1)
    if pairs:
        probs, law = full_law(source, torch.arange(G, device=device))
        still = source.masked.clone()     # masked once the spine's drafts so far are written
    else:                               # the source's own order picks the positions
        ranked = source.priority.masked_fill(~source.masked, -math.inf).argsort(-1, descending=True)
    for d in range(deepest):
        r = (depth > d).nonzero().flatten()
        if pairs:
            remaining = pick_law(probs[r], law[r], still[r])
        else:
            remaining = source.law_at((r, ranked[r, d]))
        for i in range(C):
            node = 1 + d * C + i
            mass = remaining.sum(-1)
            ok = mass > MIN_MASS if i > 0 else torch.ones_like(mass, dtype=torch.bool)
            q[r, node] = remaining / mass.clamp(min=1e-300)[:, None]
            outcome = bd3lm.sample_categorical(q[r, node], u_draft[r, d * C + i])
            remaining = remaining.scatter(-1, outcome[:, None], 0.0)            # without replacement
            present[r, node] = ok
            positions[r, node] = outcome // V if pairs else ranked[r, d]
            tokens[r, node] = outcome % V if pairs else outcome
            versions[r, node] = versions[r, spine(d, C)]
            versions[r, node, positions[r, node]] = tokens[r, node]
        if pairs:
            still[r, positions[r, spine(d + 1, C)]] = False
    return Draft(versions, present.sum(-1) - 1, present, positions, tokens, q, u_accept[:, :m - 1], C, ahead)


def target_law(here, r, pairs):
    """The law (N, W) of the next reveal of rows r given their verify rows, and the position the order
    picks (N,) (None with pairs: the position is part of the outcome)."""
    if pairs:
        return pick_law(*full_law(here, r), here.masked[r]), None
    pick = bd3lm.first(here.priority, here.masked, 1).double().argmax(-1)[r]
    return here.law_at((r, pick)), pick


def version(p, j, masked):
    """The Proposal of verify row j (an int, or (G,) one per row) of p's call (p.versions): the same rows,
    order and draws, still masked where `masked`. (What the walk below reads at each depth.)"""
    h, c = p.versions
    j = (slice(None), j) if isinstance(j, int) else (torch.arange(h.shape[0], device=h.device), j)
    return engine.Proposal(p.model, h[j], masked, p.uniform, p.u_token, p.sampling, p.rows, p.order,
                          None if c is None else c[j])


def speculative(p, k):
    """After the call: walk the draft tree from its root, one reveal per node; returns (reveal, tokens, the
    next round's draft source: the hidden states of the node the round ended in, or of the lookahead row
    where the round ended the block)."""
    d = getattr(p, 'draft', None)
    if d is None:                       # called without drafts (a caller that runs no verify rows)
        return bd3lm.first(p.priority, p.masked, 1)
    G, bs = p.masked.shape
    device, C, pairs = p.masked.device, d.candidates, p.order == 'confidence'
    V = p.model.config.vocab_size
    masked, alive = p.masked.clone(), p.masked.any(-1)
    tokens = torch.zeros(G, bs, dtype=torch.long, device=device)
    node = torch.zeros(G, dtype=torch.long, device=device)     # the node each row stands at
    ends = node.clone()                                          # the node each row's round ends in
    deepest = (d.versions.shape[1] - 1) // C
    for depth in range(deepest + 1):
        r = alive.nonzero().flatten()
        here = p if depth == 0 else version(p, node, masked & alive[:, None])
        residual, pick = target_law(here, r, pairs)
        accepted = torch.zeros(len(r), dtype=torch.bool, device=device)
        to = node[r].clone()
        on_spine = node[r] == spine(depth, C)         # a row that moved to a leaf has no candidates left
        for i in range(C if depth < deepest else 0):
            child = 1 + depth * C + i
            valid = on_spine & d.present[r, child] & ~accepted
            if not pairs:               # a candidate at another position than the order's pick is out
                valid = valid & (d.positions[r, child] == pick)
            q = d.q[r, child]
            outcome = d.tokens[r, child] + (d.positions[r, child] * V if pairs else 0)
            p_x, q_x = residual.gather(-1, outcome[:, None])[:, 0], q.gather(-1, outcome[:, None])[:, 0]
            keep = valid & (d.u_accept[r, child - 1] * q_x < p_x)            # probability min(1, p/q)
            rejected = valid & ~keep
            left = (residual - q).clamp(min=0)
            left = left / left.sum(-1, keepdim=True).clamp(min=1e-300)
            residual = torch.where(rejected[:, None], left, residual)
            accepted, to = accepted | keep, torch.where(keep, child, to)
        u = p.u_token[r, 0] if pairs else p.u_token[r, pick]
        drawn = bd3lm.sample_categorical(residual, u)
        position = torch.where(accepted, d.positions[r, to], drawn // V if pairs else pick)
        tokens[r, position] = torch.where(accepted, d.tokens[r, to], drawn % V if pairs else drawn)
        masked[r, position] = False
        ends[r] = node[r]
        node[r] = to
        alive[r] = accepted
    keep = p.versions[0][torch.arange(G, device=device), ends]
    ended = ~masked.any(-1, keepdim=True)[..., None]     # a finished block: the next one drafts from the lookahead
    lookahead = p.versions[0][:, -1] if (d.ahead >= 0).any() else torch.zeros_like(keep)
    return p.masked & ~masked, tokens, torch.where(ended, lookahead, keep)


def draft_bytes(candidates, k, order, config):
    """Bytes of the draft laws (Draft.q) a row keeps per call at knob k: 1 + C min(k, bs - 1) nodes, each a
    float64 law over the vocabulary, or over (position, token) pairs with order='confidence' (serve.py caps it)."""
    bs = config.block_size
    return 8 * (1 + candidates * min(int(k), bs - 1)) * config.vocab_size * (bs if order == 'confidence' else 1)


def speculative_rule(candidates):
    """The rule drafting `candidates` per reveal (the walk reads C from its draft)."""
    def rule(p, k):
        return speculative(p, k)
    rule.draft = lambda source, k, xb, generator: draft(source, k, xb, generator, candidates)
    rule.knob, rule.order, rule.orders = (0, math.inf), 'uniform', ('uniform', 'entropy', 'confidence')
    rule.draft_bytes = lambda k, order, config: draft_bytes(candidates, k, order, config)
    rule.__doc__ = f'speculative decoding, {candidates} candidate(s) per reveal: knob = the reveals drafted per call'
    return rule


engine.RULES['speculative'] = speculative_rule(1)
engine.RULES['speculative_wide'] = speculative_rule(WIDE_CANDIDATES)
