"""
The fast sampler (generate: what sample.py and the harness run; the same tokens as bd3lm.generate) and the
serving engine (Row, Batch, Engine): continuous batching of rows that sit at different places in their texts.

bd3lm.generate runs a batch whose rows move block by block in lockstep. A server cannot wait for that:
requests arrive and leave at any moment, with their own prompts, lengths, seeds and unmasking rules.
Here every running row keeps its own block and position, and one engine step is one model call for all
of them, the call generate makes (block_pass + denoise_step): every row's block
is denoised, and a row whose previous block just finished writes it into its cache in that same call.
Rows join between steps (their prompt written into the cache in one pass) and leave at once when done
or cancelled. A row's tokens are what bd3lm.generate gives it alone with the same generator.

Memory is bounded: one KVCache of `max_rows` rows is allocated when the engine starts, and rows
are kept in its first rows. Rows without a cache (kv_cache=False, the reference path) run one model call
at a time in turn with the cached batch.
"""
import math
import threading
import time
import warnings

import torch
import torch.nn.functional as F

import bd3lm
from bd3lm import apply_stops, nucleus, sample_categorical

# -----------------------------------------------------------------------------
# The fast sampler

@torch.no_grad()
def generate(model, idx, max_new_tokens, rule='first_hitting', knob=None, order=None, temperature=1.0, top_p=1.0,
             nucleus='standard', kv_cache=True, generator=None, stop_at_eos=False, stop_entropy=None, eos_id=None,
             on_block=None, return_stats=False):
    """bd3lm.generate's tokens, faster, and its arguments each one value or one per row: idx (B, P) prompt
    ids -> (B, P + max(max_new_tokens)). docs/sampling.md.

    rule: an unmasking rule's name in rules() (bd3lm.RULES and the drafting rules), knob its setting, order the order it ranks positions in
    ('uniform', 'confidence', 'entropy'; default the rule's own). rule, knob, order, max_new_tokens,
    temperature (0 = greedy) and top_p (nucleus; nucleus='bd3lms' drops the token that crosses it): one
    value, or one per row. generator: a torch.Generator, or a list of one per row (see rand).
    stop_at_eos, stop_entropy: where a row ends early (apply_stops; the paper uses stop_entropy=4); ended
    rows hold eos_id (default config.eos_id). on_block(x, end): called after each block with the tokens so
    far. return_stats: also return {'nfe', 'row_nfe', 'rows_x_tokens', 'forward_passes', 'lengths'} (the
    batch's model calls; each row's own calls and the block rows x tokens they ran; nfe + 1 prefill pass)."""
    sampling, lengths, eos_id = check_generate(model, idx, max_new_tokens, rule, knob, order, temperature, top_p,
                                               nucleus, generator, stop_entropy, eos_id)
    cfg, device = model.config, lengths.device
    bs, mask_id, (B, P) = cfg.block_size, cfg.mask_id, idx.shape
    total = int(lengths.max())
    x = torch.full((B, -(-total // bs) * bs), mask_id, dtype=torch.long, device=device)
    x[:, :P] = idx
    done = torch.zeros(B, dtype=torch.bool, device=device)
    ran = []                                          # (B,) block rows each row ran, per call
    cache = KVCache(model, B, device) if kv_cache else None
    if cache is not None and P >= bs:                 # the prompt's complete blocks, in one pass
        prefill(model, cache, x[:, :P // bs * bs])
    state = torch.zeros(B, bs, cfg.hidden_dim, device=device, dtype=model.vocab_embed.embedding.dtype) \
        if sampling.drafting else None                # drafting rules only: their hidden states between calls
    finished = None                                   # the block the next call writes into the cache
    compiled = COMPILED_STEP is not None and cache is not None and state is None   # compile_sampler()
    step = compiled_step if compiled else denoise_step
    for lo in range(P // bs * bs, x.shape[1], bs):    # Alg. 2: blocks left to right
        xb = x[:, lo:lo + bs]                         # a view: denoise_step updates it and masked in place
        masked = (xb == mask_id) & (torch.arange(lo, lo + bs, device=device) < lengths[:, None]) & ~done[:, None]
        if not masked.any():                          # every row has ended
            break
        uniform = rand(masked.shape, generator, device, masked)     # the block's random order
        while masked.any():                           # denoise the block, one model call at a time
            u_token = rand(masked.shape, generator, device, masked)  # this call's draws
            forward = block_pass(model, x, [lo] * B, cache, finished, compiled, (sampling.c, sampling.mods))
            ran.append(step(model, xb, masked, uniform, u_token, state, sampling, forward,
                            None if compiled else generator))   # (the generator: drafting rules only)
            finished = None
        finished = None if cache is None else (list(range(B)), xb)
        end = min(lo + bs, total)
        apply_stops(x, done, lengths, P, end, stop_at_eos, stop_entropy, eos_id)
        if on_block is not None:
            on_block(x[:, :end], end)
        if done.all():
            break
    x = x[:, :total]
    x[x == mask_id] = eos_id                          # past each row's own end
    if not return_stats:
        return x
    ran = torch.stack(ran).long() if ran else torch.zeros(0, B, dtype=torch.long, device=device)
    return x, {'nfe': len(ran), 'forward_passes': len(ran) + (cache is not None and P >= bs),
               'row_nfe': (ran > 0).sum(0), 'rows_x_tokens': ran.sum(0) * bs, 'lengths': lengths}


def denoise_step(model, xb, masked, uniform, u_token, state, sampling, forward, generator=None):
    """One model call for a batch of blocks (Alg. 2's inner loop): run the model, let each row's rule
    choose which masked positions to reveal, write the proposed tokens there. xb (B, bs) tokens and masked
    (B, bs) are updated in place; uniform (B, bs) is the block's random order, u_token (B, bs) this call's
    token uniforms; state (B, bs, D) the drafting rules' hidden states and generator their draws (None: no
    row drafts); sampling the rows' settings by rule and order (Sampling.rules). forward(versions, c,
    ahead) runs the model on versions (B, m, bs) of the blocks (block_pass): m = 1 and no lookahead unless
    a rule drafts. Returns (B,) the block rows each row ran (0: it drew nothing; a bool when no row drafts).
    Without drafts it compiles (compile_sampler)."""
    B, bs = xb.shape
    drawing = masked.any(-1)
    # t: the masked fraction; without time conditioning c is the generation's constant (Sampling.c)
    c = model.cond(masked.sum(-1) / bs, B) if model.config.time_conditioning else sampling.c
    versions, c_versions, drafts, n_rows, ahead = xb[:, None], c, {}, 1, None
    if state is not None:                     # drafting rules only: their verify rows
        versions, c_versions, drafts, n_rows, ahead = verify_rows(model, xb, masked, uniform, u_token,
                                                                  state, sampling, c, generator)
    h = forward(versions, c_versions, ahead)                                        # (B, m, bs, D)
    for i, (rule, order, rows) in enumerate(sampling.rules):
        take = (lambda t: t) if rows is None else (lambda t: t[rows])          # this group's rows
        p = Proposal(model, take(h[:, 0]), take(masked), take(uniform), take(u_token), sampling, rows, order,
                     None if c is None else take(c))
        if i in drafts:                                                   # drafting rules only
            p.draft = drafts[i]
            p.versions = take(h), None if c_versions is None else take(c_versions.view(B, -1, c.shape[-1]))
        out = rule(p, take(sampling.knob))
        reveal, tokens, keep = out if isinstance(out, tuple) else (out, None, None)
        reveal = reveal & p.masked                               # a rule may name any positions
        fallback = p.leading & ~reveal.any(-1, keepdim=True)     # progress: a row that revealed nothing
        reveal = reveal | fallback
        # The revealed positions take tokens drawn from p.law (where a rule drew its own, only the fallback).
        new = take(xb) if tokens is None else torch.where(reveal, tokens, take(xb))
        put = (lambda t, v: t.copy_(v)) if rows is None else (lambda t, v: t.index_put_((rows,), v))
        put(xb, p.fill(reveal if tokens is None else fallback, new))
        put(masked, take(masked) ^ reveal)                                   # reveal lies in masked
        if keep is not None:                                      # (a row that drew nothing keeps its own)
            put(state, torch.where(take(drawing)[:, None, None], keep.to(state.dtype), take(state)))
    return drawing * n_rows if drafts else drawing


def lazy(fn):
    """A property computed on first use, then kept (cached_property without the lock torch.compile can't trace)."""
    def get(self):
        if fn.__name__ not in self.__dict__:
            self.__dict__[fn.__name__] = fn(self)
        return self.__dict__[fn.__name__]
    return property(get, doc=fn.__doc__)


class Proposal:
    """What one model call proposes for a batch of blocks: the fields an unmasking rule reads.

      masked      (B, bs) bool     positions still masked
      uniform     (B, bs)          i.i.d. U[0, 1), drawn once per block: a uniformly random order
      probs       (B, bs, V)       p_theta at each position (temperature 1, before nucleus; float64)
      confidence  (B, bs)          p_theta (temperature 1) of the token proposed there (drawn from the row's law)
      entropy     (B, bs)          entropy of p_theta there
      priority    (B, bs)          the call's order as a score, higher first
      leading     (B, bs) bool     the first masked position in that order (none in a row without one)
      law         (B, bs, V)       the law a token is drawn from: the row's temperature and top_p applied to
                                   p_theta (law_at(where): (N, V) at positions `where` only)
      tokens      (B, bs)          the token proposed at each position, drawn from law with u_token

    Computed on first use, at masked positions only (every position under torch.compile): first-hitting,
    which reads none, projects only the positions it reveals. Built from the hidden states (B, bs, D),
    u_token (each position's token uniform), c (the conditioning), the Sampling and its rows (None: all);
    a drafting rule also gets p.draft and p.versions (docs/sampling.md)."""

    def __init__(self, model, hidden, masked, uniform, u_token, sampling, rows, order, c=None):
        self.model, self.hidden, self.masked, self.uniform, self.u_token = model, hidden, masked, uniform, u_token
        self.sampling, self.rows, self.order, self.c = sampling, rows, order, c

    def law_at(self, where, logits=None):
        """The law (N, V) a token is drawn from at `where`: p_theta (mask token excluded, SUBS) at the row's
        temperature (0 = all mass on the most likely token) and top_p, float64. (logits: p_theta's logits
        there, when already projected.)"""
        logits = self._logits(where) if logits is None else logits
        s = self.sampling
        rows = where[0] if self.rows is None else self.rows[where[0]]
        if s.any_scaled:
            temperature = s.temperature[rows]
            logits = logits / torch.where(temperature == 0, 1.0, temperature)[:, None]
        probs = logits.softmax(-1)
        if s.any_greedy:
            one_hot = F.one_hot(logits.argmax(-1), logits.shape[-1]).double()
            probs = torch.where(s.greedy[rows][:, None], one_hot, probs)
        if s.any_nucleus:                                        # (rows with top_p = 1 keep theirs)
            top_p = s.top_p[rows][:, None]
            probs = torch.where(top_p >= 1, probs, nucleus(probs, top_p, s.nucleus))
        return probs

    def fill(self, reveal, xb):
        """A copy of the tokens xb (B, bs) with the proposed tokens written where `reveal`: each position's
        token is drawn from law() with its own uniform, so projecting only the revealed positions gives the
        same tokens as projecting all."""
        if '_at_masked' in self.__dict__ or torch.compiler.is_compiling():
            return torch.where(reveal, self._full(self._at_masked[2], 0), xb)
        where = reveal.nonzero(as_tuple=True)
        return xb.index_put(where, sample_categorical(self.law_at(where), self.u_token[where]))

    def _logits(self, where):
        c = None if self.c is None else self.c[where[0]]
        logits = self.model.output_layer(self.hidden[where], c).double()
        logits.select(-1, self.model.config.mask_id).fill_(-math.inf)
        return logits

    @lazy
    def _at_masked(self):
        # every masked position: where, log p_theta (N, V), the proposed token (N,). Under torch.compile,
        # every position instead: fixed shapes, one graph (the values at unmasked positions are unused).
        if torch.compiler.is_compiling():
            B, bs = self.masked.shape
            rows = torch.arange(B, device=self.masked.device)
            where = rows.repeat_interleave(bs), torch.arange(bs, device=rows.device).repeat(B)
        else:
            where = self.masked.nonzero(as_tuple=True)
        logits = self._logits(where)
        return where, logits.log_softmax(-1), sample_categorical(self.law_at(where, logits), self.u_token[where])

    def _full(self, values, fill=0.0):
        out = torch.full(self.masked.shape + values.shape[1:], fill, dtype=values.dtype, device=values.device)
        out[self._at_masked[0]] = values
        return out

    @lazy
    def probs(self):
        return self._full(self._at_masked[1].exp())

    @lazy
    def confidence(self):
        _, log_p, token = self._at_masked
        return self._full(log_p.gather(-1, token[:, None]).squeeze(-1).exp())

    @lazy
    def entropy(self):
        log_p = self._at_masked[1]
        return self._full(-(log_p.exp() * log_p.nan_to_num(neginf=0.0)).sum(-1))

    @lazy
    def priority(self):
        return {'uniform': lambda: self.uniform, 'confidence': lambda: self.confidence,
                'entropy': lambda: -self.entropy}[self.order]()

    @lazy
    def leading(self):
        first_in_order = torch.where(self.masked, self.priority, -math.inf).argmax(-1, keepdim=True)
        return self.masked & torch.zeros_like(self.masked).scatter_(-1, first_in_order, True)

    @lazy
    def tokens(self):
        return self._full(self._at_masked[2], 0)

    @lazy
    def law(self):
        return self._full(self.law_at(self._at_masked[0]))

# --- What denoise_step runs when some row's rule drafts (has rule.draft: speculative.py) ---------------

def verify_rows(model, xb, masked, uniform, u_token, state, sampling, c, generator):
    """Before the model call: each drafting row's verify rows (rule.draft of its group), the other rows'
    block alone, padded with copies of it. Returns versions (B, m, bs), their conditioning (B * m, cond_dim)
    or None, {group index: the group's draft} and (B,) the rows each row really runs."""
    B, bs = xb.shape
    drafts = {}
    for i, (rule, order, rows) in enumerate(sampling.rules):
        if hasattr(rule, 'draft'):
            take = (lambda t: t) if rows is None else (lambda t: t[rows])
            source = Proposal(model, take(state), take(masked), take(uniform), take(u_token), sampling, rows,
                                    order, None if c is None else take(c))
            per_row = isinstance(generator, (list, tuple)) and rows is not None
            gen = [generator[r] for r in rows.tolist()] if per_row else generator
            drafts[i] = rule.draft(source, take(sampling.knob), take(xb), gen)
    m = max([d.versions.shape[1] for d in drafts.values()] + [1])
    versions = xb[:, None].repeat(1, m, 1)
    n_rows = torch.ones(B, dtype=torch.long, device=xb.device)
    ahead = torch.full((B,), -1, dtype=torch.long, device=xb.device)
    for i, d in drafts.items():
        rows = slice(None) if sampling.rules[i][2] is None else sampling.rules[i][2]
        versions[rows, :d.versions.shape[1]] = d.versions
        n_rows[rows] = 1 + d.n + (d.ahead >= 0)
        ahead[rows] = d.ahead
    t = (masked[:, None] & (versions == model.config.mask_id)).sum(-1) / bs      # each version's masked fraction
    return versions, model.cond(t.flatten(), t.numel()), drafts, n_rows, ahead if (ahead >= 0).any() else None


# --- The KV cache and the passes that use it ---------------------------------------

class KVCache:
    """Keys and values of each row's clean blocks, one buffer per layer, preallocated once.

    Row r's buffer is a ring of `window` = model_length positions: position i lives at i % window. A block
    denoised alone writes its keys where it will live once clean (where the block leaving the sliding window
    was) and attends to the ring in place. A pass that also carries a finished block, verify rows or
    lookahead rows gives each pass row a copy of its ring instead, so the finished block still sees the
    oldest block of its window. Keys carry rotary at absolute positions; rows may sit at different blocks
    (Batch, Engine below). Before each pass plan() says which rows run where; update() then runs once per layer."""

    def __init__(self, model, n_rows, device):
        cfg = model.config
        shape = (cfg.n_layers, n_rows, cfg.n_heads, cfg.model_length, cfg.hidden_dim // cfg.n_heads)
        dtype = model.vocab_embed.embedding.dtype
        self.k, self.v = torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype)
        self.block_size, self.window = cfg.block_size, cfg.model_length

    def plan(self, starts, rows=None, write=None, static=False, sees=None):
        """The next pass: pass row i is a block at positions starts[i]..+block_size (host ints) of cache row
        rows[i] (default i). Without `rows`, every pass row writes its keys into its ring and attends to it.
        With `rows` (a finished block beside the next, verify rows) only the pass rows where `write` is True
        write into the ring, each attending to a copy of its ring with its own keys in it (and with sees =
        {i: j}, pass row j's too: a lookahead row). Returns the positions (P, bs) or (bs,). static: the same
        shapes whatever the positions (the whole ring, masked), as a compiled call needs."""
        bs, device = self.block_size, self.k.device
        n_keys = self.window if static else min(max(starts) + bs, self.window)     # no slot past it is written yet
        if rows is None and len(set(starts)) == 1 and not static:   # every row at the same block: slices
            self._plan = 'shared', starts[0] % self.window, n_keys
            return torch.arange(starts[0], starts[0] + bs, device=device)
        positions = torch.tensor(starts, device=device)[:, None] + torch.arange(bs, device=device)   # (P, bs)
        slots = positions % self.window
        mask = None                                                 # rows whose ring is not full yet see less
        if min(starts) + bs < n_keys or static:
            mask = (torch.arange(n_keys, device=device) < positions[:, -1:] + 1)[:, None, None]   # (P, 1, 1, n_keys)
        if rows is not None:
            rows = torch.tensor(rows, device=device)
            write = torch.tensor([i for i, w in enumerate(write) if w], dtype=torch.long, device=device)
        sees = [torch.tensor(list(side), device=device) for side in zip(*sees.items())] if sees else None
        self._plan = 'rows', rows, write, slots, n_keys, mask, sees
        return positions

    def attend(self, layer, q, k, v):
        """The model's attention over this cache (BD3LM.transformer's attend): write, then attend as planned."""
        k, v, valid = self.update(layer, k, v)
        return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=valid)

    def update(self, layer, k, v):
        """Write the pass's keys and values (P, H, bs, head_dim) as planned; return the keys and values to
        attend to and an attention mask (None: every key returned is valid). Under autocast the keys are
        stored in the cache's dtype (the model's)."""
        K, V = self.k[layer], self.v[layer]
        k, v = k.to(K.dtype), v.to(V.dtype)
        P = k.shape[0]
        if self._plan[0] == 'prefill':                              # keep the last window's keys
            _, row, start, keep, mask = self._plan                  # pass positions start.., kept from keep
            slots = torch.arange(keep, start + k.shape[2], device=k.device) % self.window
            keep -= start
            K[row:row + P, :, slots], V[row:row + P, :, slots] = k[:, :, keep:], v[:, :, keep:]
            return k, v, mask
        if self._plan[0] == 'shared':
            _, start, n_keys = self._plan
            K[:P, :, start:start + self.block_size], V[:P, :, start:start + self.block_size] = k, v
            return K[:P, :, :n_keys], V[:P, :, :n_keys], None
        _, rows, write, slots, n_keys, mask, sees = self._plan
        i = torch.arange(P, device=k.device)[:, None]
        if rows is None:                                            # rows at different blocks
            K[i, :, slots], V[i, :, slots] = k.transpose(1, 2), v.transpose(1, 2)
            return K[:P, :, :n_keys], V[:P, :, :n_keys], mask
        w = rows[write][:, None]
        K[w, :, slots[write]], V[w, :, slots[write]] = k[write].transpose(1, 2), v[write].transpose(1, 2)
        keys, values = K[rows, :, :n_keys], V[rows, :, :n_keys]      # copies: each pass row adds its own keys
        keys[i, :, slots], values[i, :, slots] = k.transpose(1, 2), v.transpose(1, 2)
        if sees is not None:
            at, of = sees[0][:, None], sees[1]
            keys[at, :, slots[of]], values[at, :, slots[of]] = k[of].transpose(1, 2), v[of].transpose(1, 2)
        return keys, values, mask

    def plan_prefill(self, row, start, keep, mask):
        """The next pass is a prefill (prefill): positions start.. of rows row.., their keys kept from keep."""
        self._plan = 'prefill', row, start, keep, mask

    def move(self, src, dst):
        """Row src's keys now live in row dst (engine.py keeps its rows in the first slots)."""
        self.k[:, dst], self.v[:, dst] = self.k[:, src], self.v[:, src]


def block_pass(model, x, starts, cache, finished=None, static=False, constant=(None, None)):
    """forward(versions, c, ahead=None) for the blocks at starts (B,) (host ints) of x (B, T): versions
    (B, m, bs) of each row's block (and verify rows) -> hidden states (B, m, bs, D); with ahead (B,) (a
    drafting rule's lookahead) row r also runs its next block, masked, after its version ahead[r] (-1:
    none), returned as version m (zeros without). With a cache: one pass over the cached prefix, which also
    writes finished = (rows, tokens (K, bs)), those rows' blocks just before theirs, at t = 0; planned here
    (static: fixed shapes, for a compiled call); constant = (c, its modulations) of the generation
    (Sampling.c, Sampling.mods), used by a pass of the blocks alone. Without: the pass over the block's receptive field under
    the banded mask (n_layers windows back: exact, affordable for long uncached text); rows at one block."""
    bs, B, mask_id = model.config.block_size, len(starts), model.config.mask_id

    def lookahead(ahead, m):    # the rows that run one, and the (flat) version each one follows
        a = [] if ahead is None else list(enumerate(ahead.tolist()))
        return [r for r, n in a if n >= 0], [r * m + n for r, n in a if n >= 0]

    def attach(h, rows, h_ahead):
        if rows:
            h = torch.cat([h, torch.zeros_like(h[:, :1])], 1)
            h[rows, -1] = h_ahead
        return h

    if cache is None:
        lo = starts[0]
        start = max(0, lo - model.config.n_layers * (model.config.model_length - bs))

        def uncached(versions, c, ahead=None):     # (with a lookahead every row also runs its next block)
            (_, m, _), (rows, after) = versions.shape, lookahead(ahead, versions.shape[1])
            tail = [torch.full_like(versions, mask_id)] if rows else []
            tokens = torch.cat([x[:, None, start:lo].expand(-1, m, -1), versions] + tail, -1).flatten(0, 1)
            h = model.hidden(tokens, c, torch.arange(start, start + tokens.shape[1], device=x.device))
            return attach(h[:, lo - start:lo - start + bs].unflatten(0, (B, m)), rows, h[after, lo - start + bs:])
        return uncached

    def plan(m, ahead=((), ())):    # the pass's rows: m versions of each block, lookahead rows, finished blocks
        rows, at = [r for r in range(B) for _ in range(m)], [s for s in starts for _ in range(m)]
        sees = {B * m + i: j for i, j in enumerate(ahead[1])}
        rows, at = rows + list(ahead[0]), at + [starts[r] + bs for r in ahead[0]]
        write = [False] * len(rows)
        if finished is not None:
            writers = finished[0]
            rows, at, write = rows + writers, at + [starts[r] - bs for r in writers], write + [True] * len(writers)
        mapped = finished is not None or m > 1 or bool(sees)    # (unmapped, every pass row writes its keys)
        return cache.plan(at, rows if mapped else None, write if mapped else None, static, sees)

    positions = plan(1)     # planned now, outside any compiled call (verify rows re-plan in the call)
    c_clean = None if finished is None else model.cond(None, len(finished[0]))    # clean: t = 0

    def cached(versions, c, ahead=None):
        m, (rows, after) = versions.shape[1], lookahead(ahead, versions.shape[1])
        tokens, cs = [versions.flatten(0, 1)], [c]
        if rows:
            tokens, cs = tokens + [versions.new_full((len(rows), bs), mask_id)], cs + [c if c is None else c[after]]
        if finished is not None:
            tokens, cs = tokens + [finished[1]], cs + [c_clean]
        alone = len(cs) == 1 and c is not None and c is constant[0]     # the constant's modulations serve
        h = model.transformer(torch.cat(tokens), plan(m, (rows, after)) if m > 1 or rows else positions,
                              c if c is None or len(cs) == 1 else torch.cat(cs), cache.attend,
                              constant[1] if alone else None)
        return attach(h[:B * m].unflatten(0, (B, m)), rows, h[B * m:B * m + len(rows)])
    return cached


COMPILED_STEP = None
COMPILE_FULL = False     # the compiled step met more batch sizes and settings than torch.compile keeps graphs for


def compile_sampler(**options):
    """Compile denoise_step for the cached calls of rules that do not draft: fullgraph, fixed shapes (one
    graph per batch size, settings and kind of call: a block's first call also carries the finished block),
    every position projected to the vocabulary. generate uses it from then on. options go to torch.compile:
    mode='reduce-overhead' captures CUDA graphs. compile_sampler(disable=True) goes back to eager. Past
    torch's recompile limit (torch._dynamo.config.recompile_limit graphs, 8 by default) a new batch size or
    setting runs eagerly, with one warning: the same tokens, without the speed-up."""
    global COMPILED_STEP, COMPILE_FULL
    COMPILED_STEP, COMPILE_FULL = None if options.pop('disable', False) else \
        torch.compile(denoise_step, fullgraph=True, dynamic=False, **options), False


def compiled_step(*args):
    """denoise_step through the compiled graphs; eagerly where no graph is kept for these shapes and settings."""
    global COMPILE_FULL
    try:
        return COMPILED_STEP(*args)
    except torch._dynamo.exc.FailOnRecompileLimitHit:
        if not COMPILE_FULL:
            warnings.warn('compile_sampler: torch.compile keeps no more graphs (recompile limit); calls of new batch '
                          'sizes or settings run eagerly (same tokens, slower). Fewer distinct batch sizes and '
                          'settings per process avoid this.', stacklevel=2)
        COMPILE_FULL = True
        return denoise_step(*args)


@torch.no_grad()
def prefill(model, cache, x, row=0):
    """Write the clean blocks x (B, T) (T a multiple of block_size) into cache rows row..row+B-1 in one
    pass: the pass over the receptive field of the last window's keys, under the block-causal banded mask
    (the uncached pass), keeping the keys of positions max(0, T - window)..T-1."""
    bs, window = model.config.block_size, model.config.model_length
    B, T = x.shape
    keep = max(0, T - window)
    start = max(0, keep - model.config.n_layers * window) // bs * bs
    mask = model.attention_mask('infer', T - start)[0]
    cache.plan_prefill(row, start, keep, mask)
    model.transformer(x[:, start:], torch.arange(start, T, device=x.device), model.cond(None, B), cache.attend)


def rand(shape, generator, device, rows=None):
    """U[0, 1) float64 draws of `shape` = (B, ...). generator: one torch.Generator for the batch, or a list
    of B, one per row, so that a row's draws never depend on which other rows share the batch (a server
    batches requests that each carry a seed). With a list only the rows that are True somewhere in `rows`
    (B, ...) bool draw; the others get zeros and their generators do not advance."""
    if not isinstance(generator, (list, tuple)):
        return torch.rand(shape, generator=generator, device=device, dtype=torch.float64)
    out = torch.zeros(shape, device=device, dtype=torch.float64)
    rows = None if rows is None else rows.reshape(shape[0], -1).any(-1)
    for r in (range(shape[0]) if rows is None else rows.nonzero().flatten().tolist()):
        out[r] = torch.rand(shape[1:], generator=generator[r], device=device, dtype=torch.float64)
    return out


# --- Settings: per row, checked by bd3lm's checks ----------------------------------

RULES = {}   # the rules only the engine runs (drafting rules: speculative.py registers its own here)


def rules():
    """Every rule the engine runs: bd3lm.RULES (as it is now: a rule registered there works here too) and RULES."""
    return {**bd3lm.RULES, **RULES}


class Sampling:
    """How a batch of rows samples, row by row (what a row draws never depends on its batch mates): each
    row's rule, knob and order, temperature and top_p, each checked by bd3lm.check_generate. Each argument:
    one value, or one per row (B rows). Also what is constant for one generation: the conditioning c
    (B, cond_dim) of a model without time conditioning and its layers' modulations, computed here once and
    dropped with the Sampling (a serving Batch makes a new one whenever its rows change)."""

    def __init__(self, model, B, rule='first_hitting', knob=None, order=None, temperature=1.0, top_p=1.0,
                 nucleus='standard'):
        groups, device = {}, model.vocab_embed.embedding.device          # (rule, order) -> its rows
        settings = dict(rule=rule, knob=knob, order=order, temperature=temperature, top_p=top_p)
        settings = list(zip(*(per_row(n, v, B) for n, v in settings.items())))
        rows = check_each(settings, lambda setting: bd3lm.check_generate(None, None, None, *setting, nucleus,
                                                                          rules=rules()))
        for r, (setting, row) in enumerate(zip(settings, rows)):
            groups.setdefault((setting[0], row.order), []).append(r)
        as_tensor = lambda field: torch.tensor([getattr(x, field) for x in rows], dtype=torch.float64, device=device)
        self.knob, self.temperature, self.top_p = as_tensor('knob'), as_tensor('temperature'), as_tensor('top_p')
        self.nucleus = nucleus
        # (rule, order, its rows or None for all): what denoise_step loops over
        self.rules = [(rules()[name], o, None if len(r) == B else torch.tensor(r, device=device))
                      for (name, o), r in groups.items()]
        self.drafting = any(hasattr(rule, 'draft') for rule, _, _ in self.rules)   # some row runs verify rows
        # Decided once, not per model call: which of temperature, greedy rows and nucleus are in play.
        self.greedy = self.temperature == 0
        self.any_greedy, self.any_scaled = bool(self.greedy.any()), bool((self.temperature != 1).any())
        self.any_nucleus = bool((self.top_p < 1).any())
        self.c = None if model.config.time_conditioning else model.cond(None, B)
        self.mods = None if self.c is None else model.modulations(self.c)


def per_row(name, value, B):
    """One value per row: a list or tuple (or a tensor of B values) as it is, anything else B times."""
    if isinstance(value, torch.Tensor) and value.dim() == 1:
        value = value.tolist()
    values = list(value) if isinstance(value, (list, tuple)) else [value] * B
    if len(values) != B:
        raise ValueError(f'{name} takes one value or one per row ({B} rows), got {len(values)}')
    return values


def check_each(values, check):
    """[check(v) for v in values], each distinct value (by repr: values may be unhashable) checked once."""
    done = {}
    for v in values:
        if repr(v) not in done:
            done[repr(v)] = check(v)
    return [done[repr(v)] for v in values]


def check_generate(model, idx, max_new_tokens, rule, knob, order, temperature, top_p, nucleus, generator,
                   stop_entropy, eos_id):
    """generate's arguments checked (bd3lm.check_generate, row by row): -> (Sampling, each row's end, eos_id)."""
    single = None if isinstance(generator, (list, tuple)) else generator
    s = bd3lm.check_generate(model.config, idx, 1, generator=single, stop_entropy=stop_entropy, eos_id=eos_id)
    B, P = idx.shape
    new = check_each(per_row('max_new_tokens', max_new_tokens, B),
                     lambda n: bd3lm.check_generate(model.config, idx[:1], n).new)
    if isinstance(generator, (list, tuple)) and (len(generator) != B or
                                                 not all(isinstance(g, torch.Generator) for g in generator)):
        raise ValueError(f'generator must be a torch.Generator, None, or a list of one per row ({B} rows)')
    sampling = Sampling(model, B, rule, knob, order, temperature, top_p, nucleus)
    lengths = torch.tensor([P + n for n in new], dtype=torch.long, device=model.vocab_embed.embedding.device)
    return sampling, lengths, s.eos_id


# -----------------------------------------------------------------------------
# Continuous batching (serve.py)



class Row:
    """One sequence being generated: its prompt (BOS first), how many tokens it may add, its generator and
    sampling settings. The engine calls block_done(ids) with each finished block's new tokens; it returns
    True when the row is done (serve.py's rows turn them into text). cancel() makes it leave."""

    def __init__(self, prompt, max_new_tokens, generator, rule='first_hitting', knob=None, order=None,
                 temperature=1.0, top_p=1.0, kv_cache=True):
        self.prompt, self.end, self.generator = list(prompt), len(prompt) + max_new_tokens, generator
        self.rule, self.knob, self.order, self.temperature, self.top_p = rule, knob, order, temperature, top_p
        self.kv_cache, self.cancelled, self.tokens = kv_cache, False, []

    def block_done(self, ids):
        self.tokens += ids
        return len(self.prompt) + len(self.tokens) >= self.end

    def fail(self, message):
        """The engine could not finish this row (an exception while serving it)."""
        self.cancelled = True

    def cancel(self):
        self.cancelled = True


class Batch:
    """Rows that run together, one model call per step: with a KVCache (every cached row) or, for one
    uncached row, over its whole text. Row i lives in cache row i."""

    PER_ROW = ('xb', 'masked', 'uniform', 'state')      # tensors with one entry per row, in row order

    def __init__(self, model, device, cache=None):
        bs = model.config.block_size
        self.model, self.device, self.cache, self.rows = model, device, cache, []
        self.xb = torch.zeros(0, bs, dtype=torch.long, device=device)     # each row's current block
        self.masked = torch.zeros(0, bs, dtype=torch.bool, device=device)
        self.uniform = torch.zeros(0, bs, dtype=torch.float64, device=device)
        self.state = torch.zeros(0, bs, model.config.hidden_dim, device=device,   # drafting rules' hidden
                                 dtype=model.vocab_embed.embedding.dtype)        # states (speculative.py)
        self.finished = {}              # row -> its finished block (bs,), which the next step writes into its cache
        self.sampling, self.x = None, None                                # uncached: the row's whole text

    def start_block(self, i, row):
        # Row i's block at row.lo: the prompt tokens it holds, masks up to the row's end, a random order.
        bs, mask_id = self.model.config.block_size, self.model.config.mask_id
        block = torch.full((bs,), mask_id, dtype=torch.long, device=self.device)
        head = row.prompt[row.lo:row.lo + bs]
        block[:len(head)] = torch.tensor(head, dtype=torch.long, device=self.device)
        self.xb[i] = block
        self.masked[i] = (block == mask_id) & (torch.arange(row.lo, row.lo + bs, device=self.device) < row.end)
        self.uniform[i] = rand((1, bs), [row.generator], self.device, self.masked[i:i + 1])[0]

    def admit(self, row):
        """The row joins: its settings are checked, its prompt's complete blocks are written into its cache row
        (the first free one) in one pass, and it starts its block. If anything fails, nothing has changed."""
        bs, n = self.model.config.block_size, len(self.rows)
        sampling = self.settings(self.rows + [row])           # checked before anything changes
        prompt = torch.tensor([row.prompt], device=self.device)
        complete = len(row.prompt) // bs * bs
        if self.cache is not None:
            if complete:
                prefill(self.model, self.cache, prompt[:, :complete], row=n)
        else:
            self.x = torch.full((1, -(-row.end // bs) * bs), self.model.config.mask_id, device=self.device)
            self.x[:, :len(row.prompt)] = prompt
        for name in self.PER_ROW:
            t = getattr(self, name)
            setattr(self, name, torch.cat([t, t.new_zeros((1,) + t.shape[1:])]))
        row.lo = complete
        self.rows.append(row)
        self.sampling = sampling
        self.start_block(n, row)
        return bool(complete)                                  # whether it ran a prefill pass

    def settings(self, rows):
        # The sampler's settings for these rows: one unmasking rule, knob, order, ... per row.
        return Sampling(self.model, len(rows), [x.rule for x in rows], [x.knob for x in rows],
                        [x.order for x in rows], [float(x.temperature) for x in rows],
                        [float(x.top_p) for x in rows]) if rows else None

    def step(self):
        """One model call: every row is denoised; a row whose previous block just finished writes it into its
        cache in the same call (block_pass). Returns the rows that left."""
        bs = self.model.config.block_size
        starts = [row.lo for row in self.rows]
        if self.cache is not None:
            finished = (list(self.finished), torch.stack(list(self.finished.values()))) if self.finished else None
            forward = block_pass(self.model, None, starts, self.cache, finished, False,
                                 (self.sampling.c, self.sampling.mods))
        else:                                       # one row, the pass over its text
            self.x[:, starts[0]:starts[0] + bs] = self.xb
            forward = block_pass(self.model, self.x, starts, None)
        with torch.no_grad():
            generators = [row.generator for row in self.rows]
            u_token = rand(self.masked.shape, generators, self.device, self.masked)
            denoise_step(self.model, self.xb, self.masked, self.uniform, u_token,
                               self.state if self.sampling.drafting else None, self.sampling, forward, generators)
        complete = (~self.masked.any(-1)).tolist()
        self.finished, left = {}, []
        for i, row in enumerate(self.rows):
            if complete[i]:
                if row.block_done(self.xb[i, max(len(row.prompt) - row.lo, 0):min(row.end - row.lo, bs)].tolist()):
                    left.append(i)
                    continue
                if self.cache is None:
                    self.x[:, row.lo:row.lo + bs] = self.xb[i]
                else:                               # the next call writes it into the cache
                    self.finished[i] = self.xb[i].clone()
                row.lo += bs
                self.start_block(i, row)
            if row.cancelled:
                left.append(i)
        self.remove(left)
        return left

    def remove(self, indices):
        """Rows at `indices` leave; the others move down into the first cache rows."""
        if not indices:
            return
        keep = [i for i in range(len(self.rows)) if i not in set(indices)]
        for new, old in enumerate(keep):
            if new != old and self.cache is not None:
                self.cache.move(old, new)
        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.rows = [self.rows[i] for i in keep]
        for name in self.PER_ROW:
            setattr(self, name, getattr(self, name)[idx])
        moved = {old: new for new, old in enumerate(keep)}
        self.finished = {moved[i]: block for i, block in self.finished.items() if i in moved}
        self.sampling = self.settings(self.rows)


class EngineStopped(RuntimeError):
    pass


class Engine:
    """The one thread that runs the model: admits waiting rows between steps (up to max_rows running),
    steps the cached batch and each uncached row one model call at a time, and retires rows that are done
    or cancelled. A failure in a step fails that step's rows (row.fail) and the engine goes on; if the
    thread itself ever stops, `alive` turns False and submit() refuses at once."""

    def __init__(self, model, device, max_rows, batch_wait_s=0.02):
        self.model, self.device, self.max_rows, self.batch_wait_s = model, device, max_rows, batch_wait_s
        self.cache = KVCache(model, max_rows, device)     # all the KV cache it will ever hold
        self.cached, self.uncached, self.waiting, self.joining = Batch(model, device, self.cache), [], [], []
        self.calls, self.alive, self.error = 0, True, None
        self.cv = threading.Condition()
        self.snapshot = self._snapshot()
        threading.Thread(target=self.run, daemon=True).start()

    def running(self):
        return len(self.cached.rows) + len(self.uncached)

    def _snapshot(self):
        return {'running': self.running(), 'waiting': len(self.waiting), 'model_calls': self.calls,
                'alive': self.alive, 'error': self.error}

    def submit(self, rows):
        with self.cv:
            if not self.alive:
                raise EngineStopped(f'the engine has stopped ({self.error})')
            self.waiting.extend(rows)
            self.snapshot = self._snapshot()
            self.cv.notify()

    def run(self):
        try:
            while True:
                self.loop_once()
        except BaseException as e:                 # the engine itself broke: say so, answer everyone
            with self.cv:
                self.alive, self.error = False, f'{type(e).__name__}: {e}'
                uncached = [r for b in self.uncached for r in b.rows]     # (a joining row may be in a batch)
                rows = list(dict.fromkeys(self.waiting + self.joining + self.cached.rows + uncached))
                self.waiting = []
                self.snapshot = self._snapshot()
            for row in rows:
                row.fail(self.error)

    def loop_once(self):
        with self.cv:
            idle = not self.running()
            while not self.waiting and not self.running():
                self.cv.wait()
        if idle:
            time.sleep(self.batch_wait_s)             # let a burst of requests start together
        with self.cv:
            self.waiting = [r for r in self.waiting if not r.cancelled]
            self.joining = joining = self.waiting[:max(self.max_rows - self.running(), 0)]
            self.waiting = self.waiting[len(joining):]
        for row in joining:
            if row.kv_cache:
                prefilled = []
                if self.guard([row], lambda: prefilled.append(self.cached.admit(row))):
                    self.calls += prefilled[0]                  # its prefill pass
            else:
                batch = Batch(self.model, self.device)
                if self.guard([row], lambda: batch.admit(row)):
                    self.uncached.append(batch)
        self.joining = []
        if self.cached.rows:
            if self.guard(self.cached.rows, self.cached.step):
                self.calls += 1
            else:
                self.cached = Batch(self.model, self.device, self.cache)  # its rows failed: start clean
        for batch in list(self.uncached):             # the reference path, one call each, in turn
            ok = self.guard(batch.rows, batch.step)
            self.calls += ok
            if not ok or not batch.rows:
                self.uncached.remove(batch)
        with self.cv:
            self.snapshot = self._snapshot()

    def guard(self, rows, work):
        """Run work(); on an exception fail `rows` and return False (the engine goes on)."""
        try:
            work()
            return True
        except Exception as e:
            for row in rows:
                row.fail(f'{type(e).__name__}: {e}')
            return False
