"""
The serving engine: continuous batching of rows that sit at different places in their texts.

bd3lm.generate runs a batch whose rows move block by block in lockstep. A server cannot wait for that:
requests arrive and leave at any moment, with their own prompts, lengths, seeds and unmasking rules.
Here every running row keeps its own block, position and KV-cache count, and one engine step is one
model call for all of them (bd3lm.denoise_step, the sampler's own step): rows mid-block are denoised,
rows whose block just finished write it into their cache in the same call (a clean block has nothing
masked, so the step only writes its keys). Rows join between steps and leave at once when done or
cancelled. A row's tokens are what bd3lm.generate gives it alone with the same generator.

Memory is bounded: one RowCache of `max_rows` rows is allocated when the engine starts, and rows are
kept in its first slots. Rows without a cache (kv_cache=False, the reference path) run one model call
at a time in turn with the cached batch.
"""
import threading
import time

import torch

import bd3lm


class RowCache:
    """bd3lm.KVCache's contract (the model calls update(layer, k, v)) for rows at different blocks: slot i
    holds row i's ring of model_length positions and its own count of finished blocks."""

    def __init__(self, model, n_rows, device):
        cfg = model.config
        shape = (cfg.n_layers, n_rows, cfg.n_heads, cfg.model_length, cfg.hidden_dim // cfg.n_heads)
        dtype = model.vocab_embed.embedding.dtype
        self.k, self.v = torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype)
        self.block_size, self.n_slots = cfg.block_size, cfg.model_length // cfg.block_size
        self.counts = [0] * n_rows                 # finished blocks per slot (on the host)
        self.use(0, n_rows)

    def use(self, lo, hi):
        """The next passes run the rows in slots lo..hi-1. Where each row's block goes and what it may attend
        to is worked out here, once per pass (plain ints when the rows agree)."""
        bs, counts, device = self.block_size, self.counts[lo:hi], self.k.device
        starts = [(n % self.n_slots) * bs for n in counts]
        valid = [min(n + 1, self.n_slots) * bs for n in counts]
        index = None if len(set(starts)) == 1 else (
            torch.tensor(starts, device=device)[:, None] + torch.arange(bs, device=device))        # (B, bs)
        mask = None if len(set(valid)) == 1 else (
            torch.arange(max(valid), device=device) < torch.tensor(valid, device=device)[:, None])[:, None, None]
        self.plan = lo, hi, starts[0], max(valid), index, mask

    def update(self, layer, k, v):
        lo, hi, start, n_valid, index, mask = self.plan
        keys, values = self.k[layer, lo:hi], self.v[layer, lo:hi]
        if index is None:
            keys[:, :, start:start + self.block_size] = k
            values[:, :, start:start + self.block_size] = v
        else:
            rows = torch.arange(k.shape[0], device=k.device)[:, None]
            keys[rows, :, index] = k.transpose(1, 2)          # (B, bs, H, head_dim) at each row's slot
            values[rows, :, index] = v.transpose(1, 2)
        return keys[:, :, :n_valid], values[:, :, :n_valid], mask

    def commit(self):
        """The planned rows' block is clean and in the cache (bd3lm.prefill calls this after each block)."""
        lo, hi = self.plan[:2]
        for i in range(lo, hi):
            self.counts[i] += 1
        self.use(lo, hi)

    def move(self, src, dst):
        """Row src now lives in slot dst (rows stay in the first slots as others leave)."""
        self.k[:, dst], self.v[:, dst], self.counts[dst] = self.k[:, src], self.v[:, src], self.counts[src]


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
    """Rows that run together, one model call per step: with a RowCache (every cached row) or, for one
    uncached row, over its whole text."""

    PER_ROW = ('xb', 'masked', 'u_block', 'drafts')    # tensors with one entry per row, in row order

    def __init__(self, model, device, cache=None):
        bs = model.config.block_size
        self.model, self.device, self.cache, self.rows = model, device, cache, []
        self.xb = torch.zeros(0, bs, dtype=torch.long, device=device)     # each row's current block
        self.masked = torch.zeros(0, bs, dtype=torch.bool, device=device)
        self.u_block = torch.zeros(0, bs, dtype=torch.float64, device=device)
        self.drafts = torch.zeros(0, bs, model.config.hidden_dim, device=device,   # speculative rows' draft
                                  dtype=model.vocab_embed.embedding.dtype)       # sources (bd3lm.draft_rows)
        self.x = None                                                     # uncached: the row's whole text

    def start_block(self, i, row):
        # Row i's block at row.lo: the prompt tokens it holds, masks up to the row's end, a random order.
        bs, mask_id = self.model.config.block_size, self.model.config.mask_id
        block = torch.full((bs,), mask_id, dtype=torch.long, device=self.device)
        head = row.prompt[row.lo:row.lo + bs]
        block[:len(head)] = torch.tensor(head, dtype=torch.long, device=self.device)
        self.xb[i] = block
        self.masked[i] = (block == mask_id) & (torch.arange(row.lo, row.lo + bs, device=self.device) < row.end)
        self.u_block[i] = bd3lm.rand((1, bs), [row.generator], self.device, self.masked[i:i + 1].any(-1))[0]
        self.drafts[i] = 0

    def admit(self, row):
        """The row joins: its prompt's complete blocks are written into its cache slot (the first free one)
        and it starts its block. Nothing changes if this fails."""
        bs, n = self.model.config.block_size, len(self.rows)
        row.lo = len(row.prompt) // bs * bs
        prompt = torch.tensor([row.prompt], device=self.device)
        if self.cache is not None:
            self.cache.counts[n] = 0
            self.cache.use(n, n + 1)
            bd3lm.prefill(self.model, prompt, self.cache)
        else:
            self.x = torch.full((1, -(-row.end // bs) * bs), self.model.config.mask_id, device=self.device)
            self.x[:, :len(row.prompt)] = prompt
        for name in self.PER_ROW:
            t = getattr(self, name)
            setattr(self, name, torch.cat([t, t.new_zeros((1,) + t.shape[1:])]))
        self.rows.append(row)
        self.start_block(n, row)
        self.regroup()

    def regroup(self):
        # The sampler's settings for the rows as they are now: one unmasking rule, knob, order, ... per row.
        r = self.rows
        self.sampling = bd3lm.Sampling(len(r), self.device, [x.rule for x in r], [x.knob for x in r],
                                       [x.order for x in r], [float(x.temperature) for x in r],
                                       [float(x.top_p) for x in r]) if r else None

    def step(self):
        """One model call: every row mid-block is denoised; a row whose block was complete writes it into its
        cache (a clean block has nothing masked: the call only writes its keys). Returns the rows that left."""
        bs = self.model.config.block_size
        committing = (~self.masked.any(-1)).tolist()
        if self.cache is not None:
            self.cache.use(0, len(self.rows))
            positions = torch.tensor([row.lo for row in self.rows], device=self.device)[:, None] \
                + torch.arange(bs, device=self.device)
            hidden = lambda xb, c: self.model.hidden(xb, c, positions, self.cache)
        else:                                       # one row, the pass over its text (bd3lm.block_pass)
            lo = self.rows[0].lo
            self.x[:, lo:lo + bs] = self.xb
            hidden = bd3lm.block_pass(self.model, self.x, lo, None)
        with torch.no_grad():
            bd3lm.denoise_step(self.model, self.xb, self.masked, self.u_block, self.sampling, hidden,
                               [row.generator for row in self.rows], self.drafts)
        complete = (~self.masked.any(-1)).tolist()
        left = []
        for i, row in enumerate(self.rows):
            if committing[i]:                       # its clean block is in the cache now: start the next
                self.cache.counts[i] += 1
                row.lo += bs
                self.start_block(i, row)
            elif complete[i]:
                if row.block_done(self.xb[i, max(len(row.prompt) - row.lo, 0):min(row.end - row.lo, bs)].tolist()):
                    left.append(i)
                    continue
                if self.cache is None:              # nothing to write: the next block starts at once
                    self.x[:, row.lo:row.lo + bs] = self.xb[i]
                    row.lo += bs
                    self.start_block(i, row)
            if row.cancelled:
                left.append(i)
        self.remove(left)
        return left

    def remove(self, indices):
        """Rows at `indices` leave; the others move down into the first slots."""
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
        self.regroup()


class EngineStopped(RuntimeError):
    pass


class Engine:
    """The one thread that runs the model: admits waiting rows between steps (up to max_rows running),
    steps the cached batch and each uncached row one model call at a time, and retires rows that are done
    or cancelled. A failure in a step fails that step's rows (row.fail) and the engine goes on; if the
    thread itself ever stops, `alive` turns False and submit() refuses at once."""

    def __init__(self, model, device, max_rows, batch_wait_s=0.02):
        self.model, self.device, self.max_rows, self.batch_wait_s = model, device, max_rows, batch_wait_s
        self.cache = RowCache(model, max_rows, device)          # all the KV cache it will ever hold
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
                if self.guard([row], lambda: self.cached.admit(row)):
                    self.calls += len(row.prompt) // self.model.config.block_size     # its prefill passes
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
