"""
The serving engine: continuous batching of rows that sit at different places in their texts.

bd3lm.generate runs a batch whose rows move block by block in lockstep. A server cannot wait for that:
requests arrive and leave at any moment, with their own prompts, lengths, seeds and unmasking rules.
Here every running row keeps its own block and position, and one engine step is one model call for all
of them, the same call bd3lm.generate makes (bd3lm.block_pass + bd3lm.denoise_step): every row's block
is denoised, and a row whose previous block just finished writes it into its cache in that same call.
Rows join between steps (their prompt written into the cache in one pass) and leave at once when done
or cancelled. A row's tokens are what bd3lm.generate gives it alone with the same generator.

Memory is bounded: one bd3lm.KVCache of `max_rows` rows is allocated when the engine starts, and rows
are kept in its first rows. Rows without a cache (kv_cache=False, the reference path) run one model call
at a time in turn with the cached batch.
"""
import threading
import time

import torch

import bd3lm


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
    """Rows that run together, one model call per step: with a bd3lm.KVCache (every cached row) or, for one
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
        self.uniform[i] = bd3lm.rand((1, bs), [row.generator], self.device, self.masked[i:i + 1])[0]

    def admit(self, row):
        """The row joins: its settings are checked, its prompt's complete blocks are written into its cache row
        (the first free one) in one pass, and it starts its block. If anything fails, nothing has changed."""
        bs, n = self.model.config.block_size, len(self.rows)
        sampling = self.settings(self.rows + [row])           # checked before anything changes
        prompt = torch.tensor([row.prompt], device=self.device)
        complete = len(row.prompt) // bs * bs
        if self.cache is not None:
            if complete:
                bd3lm.prefill(self.model, self.cache, prompt[:, :complete], row=n)
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
        return bd3lm.Sampling(len(rows), self.device, [x.rule for x in rows], [x.knob for x in rows],
                              [x.order for x in rows], [float(x.temperature) for x in rows],
                              [float(x.top_p) for x in rows]) if rows else None

    def step(self):
        """One model call: every row is denoised; a row whose previous block just finished writes it into its
        cache in the same call (bd3lm.block_pass). Returns the rows that left."""
        bs = self.model.config.block_size
        starts = [row.lo for row in self.rows]
        if self.cache is not None:
            finished = (list(self.finished), torch.stack(list(self.finished.values()))) if self.finished else None
            forward = bd3lm.block_pass(self.model, None, starts, self.cache, finished)
        else:                                       # one row, the pass over its text
            self.x[:, starts[0]:starts[0] + bs] = self.xb
            forward = bd3lm.block_pass(self.model, self.x, starts, None)
        with torch.no_grad():
            generators = [row.generator for row in self.rows]
            u_token = bd3lm.rand(self.masked.shape, generators, self.device, self.masked)
            bd3lm.denoise_step(self.model, self.xb, self.masked, self.uniform, u_token,
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
        self.cache = bd3lm.KVCache(model, max_rows, device)     # all the KV cache it will ever hold
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
