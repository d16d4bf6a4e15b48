"""
Lossless speculative decoding for BD3-LM: several tokens per model call, each one still drawn from the law
of a one-token-per-call sampler. Registered as bd3lm.RULES['speculative'] (bd3lm.py imports this file).

First-hitting's law (positions in a uniformly random order drawn once per block, each token from p_theta
given what is revealed so far) costs one call per token, but the calls can be checked ahead: speculative
sampling (Leviathan et al. 2023; for any-order models ASSD, Guo & Ermon 2025). In their names:

  draft q     the law a draft token is drawn from: the proposal of the hidden states this rule kept from
              its previous call (stale, which is allowed: any q keeps the law exact)
  target p    p_theta(. | verify row j) at the position the order picks, at the row's temperature and top_p
  accept      draft j is kept with probability min(1, p/q) at its token
  residual    the first rejected draft is replaced by a draw from (p - q)+ (normalised), which makes the
              kept-or-redrawn token exactly p-distributed

A round drafts the next n <= k positions in the order and runs, in one call, the n + 1 verify rows
v_j = the block with the first j drafts written in. They are separate rows because attention inside a
block is bidirectional: the law of the j-th position given drafts 0..j-1 needs a pass in which exactly
those drafts are present, so one pass over the drafted block cannot check every prefix of the drafts the
way one causal pass of an AR model does. When all n drafts are kept, v_n gives one more token: 1..n + 1
tokens per call. With order='entropy' the law is lowest-entropy-first (entropy_bound with gamma = 0):
a round also stops where the position that v_j's entropies pick is not the drafted one.
"""
import math
from dataclasses import dataclass

import torch

import bd3lm


@dataclass
class Draft:
    """A round's drafts for G rows (column j < n of each field is draft j)."""
    versions: torch.Tensor   # (G, m, bs) verify rows: v_j = the block with drafts 0..j-1 written in
    n: torch.Tensor          # (G,) drafts per row; m = max(n) + 1
    positions: torch.Tensor  # (G, m) the drafted positions, in the order
    tokens: torch.Tensor     # (G, m) the drafted tokens
    q: torch.Tensor          # (G, m, V) the law each draft was drawn from
    u_accept: torch.Tensor   # (G, bs) the uniforms of the accept tests


def draft(source, k, xb, generator):
    """Before the call: draft up to k (G,) positions per row from `source`, the proposal of the verify row
    the row's previous round ended in (all zeros at a block's start: nothing to draft from yet). At least
    one masked position is left for the last verify row to draw."""
    G, bs = source.masked.shape
    device = xb.device
    has_source = source.hidden.flatten(1).any(-1)
    n = torch.minimum(k.clamp(max=bs).long(), source.masked.sum(-1) - 1).clamp(min=0) * has_source
    m = int(n.max()) + 1
    zeros = torch.zeros(G, m, dtype=torch.long, device=device)
    if m == 1:                          # no row drafts: the block alone
        return Draft(xb[:, None], n, zeros, zeros, torch.zeros(G, m, 0, dtype=torch.float64, device=device),
                     torch.zeros(G, bs, dtype=torch.float64, device=device))
    u_draft, u_accept = bd3lm.rand((G, 2, bs), generator, device, n > 0).unbind(1)
    source.masked = source.masked & (n > 0)[:, None]          # the source's own order picks the positions
    positions = source.priority.masked_fill(~source.masked, -math.inf).argsort(-1, descending=True)[:, :m]
    r, j = (torch.arange(m, device=device) < n[:, None]).nonzero(as_tuple=True)
    q = torch.zeros(G, m, source.model.config.vocab_size, dtype=torch.float64, device=device)
    q[r, j] = source.law((r, positions[r, j]))
    tokens = zeros.clone()
    tokens[r, j] = bd3lm.sample_categorical(q[r, j], u_draft[r, positions[r, j]])
    versions = xb[:, None].repeat(1, m, 1)
    for i in range(1, m):
        versions[:, i] = versions[:, i - 1]
        r = (n >= i).nonzero().flatten()
        versions[r, i, positions[r, i - 1]] = tokens[r, i - 1]
    return Draft(versions, n, positions, tokens, q, u_accept)


def speculative(p, k):
    """After the call: walk the verify rows, accepting or redrawing one token per row; returns (reveal,
    tokens, the hidden states of the verify row each round ended in: the next round's draft source)."""
    d = getattr(p, 'draft', None)
    if d is None:                       # called without drafts (a caller that runs no verify rows)
        return bd3lm.first(p.priority, p.masked, 1)
    G, bs = p.masked.shape
    rows = torch.arange(G, device=p.masked.device)
    masked, alive = p.masked.clone(), p.masked.any(-1)
    tokens = torch.zeros(G, bs, dtype=torch.long, device=rows.device)
    ends = torch.zeros(G, dtype=torch.long, device=rows.device)   # the verify row each row's round ends in
    m = d.versions.shape[1]
    for j in range(m):
        pj = p if j == 0 else p.version(j, masked & alive[:, None])
        at = bd3lm.first(pj.priority, masked & alive[:, None], 1).double().argmax(-1)   # (G,) the order's pick
        r = alive.nonzero().flatten()
        target = pj.law((r, at[r]))                                                  # (N, V) p at the pick
        drafted = (j < d.n[r]) & (at[r] == d.positions[r, j])
        if j < m - 1:                   # (the last verify row has no draft to check: n <= m - 1)
            token, q = d.tokens[r, j], d.q[r, j]                                     # (N,), (N, V)
            p_d, q_d = target.gather(-1, token[:, None])[:, 0], q.gather(-1, token[:, None])[:, 0]
            keep = drafted & (d.u_accept[r, at[r]] * q_d < p_d)                       # probability min(1, p/q)
            residual = torch.where(drafted[:, None], (target - q).clamp(min=0), target)
        else:
            token, keep, residual = at[r], drafted, target
        tokens[r, at[r]] = torch.where(keep, token, bd3lm.sample_categorical(residual, p.u_token[r, at[r]]))
        masked[r, at[r]] = False
        ends[r] = j
        alive[r] = keep
    return p.masked & ~masked, tokens, p.versions[0][rows, ends]


speculative.knob, speculative.order, speculative.orders = (0, math.inf), 'uniform', ('uniform', 'entropy')
speculative.draft = draft
bd3lm.RULES['speculative'] = speculative
