"""
BD3-LM in EleutherAI's lm-evaluation-harness (lm-eval 0.4). Importing this module registers the
model as 'bd3lm'; running it as a script runs lm-eval's own command line with the model registered.

    import lm_eval, bd3lm_tools.harness
    lm_eval.simple_evaluate(model='bd3lm', model_args='init_from=out-demo', tasks=['piqa'])

    python -m bd3lm_tools.harness --model bd3lm --model_args init_from=out-demo,estimator=exact --tasks piqa

A block diffusion model factorizes over blocks: log p(continuation | context) is a sum over the
continuation's blocks, each conditioned on the clean blocks before it. One training pass
model(xt, x0) scores every block at once (each noisy block of xt sees itself and the clean x0 blocks
before it), so every estimator below is batched over all blocks of a request. Per block, context
positions in the continuation's first block stay clean, and the padding after the continuation's end
stays masked: the block's law restricted to the scored positions.

model_args (besides lm-eval's device and batch_size, here the sequences per forward pass):
  init_from  anything BD3LM.from_pretrained takes (a folder, a hub id, a .ckpt), or a BD3LM
  estimator  'bound' (default): minus the NELBO (Eq. 8), a lower bound on log p, estimated with
             `samples` noise draws per request, stratified noise levels per block and common random
             numbers across the answer choices of one question (the seed comes from the context).
             'exact': log p of first-hitting's law of each block (block_size <= 8), by a dynamic
             program over revealed subsets: 2^n - 1 masking patterns for blocks of n tokens.
             'elbo': the exact ELBO (the bound's expectation) from the same passes.
  samples    noise draws per request for 'bound' (default 32)
  seed       makes every number reproducible (default 0)
  rule, knob the unmasking rule for generate_until (bd3lm.RULES), also accepted in gen_kwargs
is_greedy follows LLaDA: the continuation equals the greedy decoding of its blocks (most confident
position first, argmax token), each block given the true blocks before it.
"""
import hashlib
import math

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

import bd3lm
from bd3lm_tools import engine

from bd3lm_tools.tokenizer import get_tokenizer

ESTIMATORS = ('bound', 'exact', 'elbo')
EXACT_MAX_BLOCK = 8  # 2^8 - 1 = 255 masking patterns per request; beyond, the DP costs too much

# -----------------------------------------------------------------------------
# Scoring one token sequence: the layout, the bound, the exact DP, the greedy check


def windows(n, n_cont, model_length):
    """The windows (lo, hi, k) that score the last n_cont of n tokens: ids[lo:hi] scores its last k. One
    window, the last model_length tokens, when the continuation fits beside a token of context (lm-eval's
    HF model); else loglikelihood_rolling's windows of the whole text (ids[0:model_length], then
    model_length - 1 new tokens at a time, the last window ending at n), each scoring the continuation
    tokens among its new ones: every continuation token is scored once."""
    if n_cont < model_length:
        return [(max(0, n - model_length), n, n_cont)]
    ends = list(range(model_length, n, model_length - 1)) + [n]
    start = n - n_cont
    return [(max(0, hi - model_length), hi, hi - max(new, start)) for new, hi in zip([1] + ends, ends) if hi > start]


def layout(ids, n_cont, block_size, model_length, pad_id):
    """The last n_cont of `ids` are scored. Keeps the last model_length tokens (position 0 of what
    is kept is context, never scored) and pads the end to a whole block with pad_id.
    Returns x0 (1, L), scored (1, L) bool and pad (1, L) bool."""
    ids = list(ids)[-model_length:]
    if n_cont >= len(ids):
        raise ValueError(f'{n_cont} tokens to score need at least one token of context before them within '
                         f'model_length={model_length}; score longer continuations in windows (harness.windows)')
    L = -(-len(ids) // block_size) * block_size
    x0 = torch.full((1, L), pad_id, dtype=torch.long)
    x0[0, :len(ids)] = torch.tensor(ids)
    pos = torch.arange(L)
    scored = (pos >= len(ids) - n_cont) & (pos < len(ids))
    return x0, scored[None], (pos >= len(ids))[None]


def bound_noise(x0, scored, pad, mask_id, block_size, samples, generator, max_length=None):
    """`samples` draws of (t, xt) for the bound: per block, noise levels stratified over [bd3lm.EPS, 1]
    (one in each of `samples` equal bins); scored positions masked with probability t, padding always
    masked, the rest clean. The uniforms are drawn for max_length positions and cut to x0's length,
    so requests that share a context (the choices of one question) share their noise (common random
    numbers)."""
    L = x0.shape[1]
    max_length = max_length or L
    strata = torch.arange(samples, dtype=torch.float32)[:, None]
    u = torch.rand(samples, max_length // block_size, generator=generator)[:, :L // block_size]
    t = bd3lm.EPS + (1 - bd3lm.EPS) * (strata + u) / samples                          # (S, L // bs)
    v = torch.rand(samples, max_length, generator=generator)[:, :L]
    masked = (scored & (v < t.repeat_interleave(block_size, 1))) | pad   # (S, L)
    return t, torch.where(masked, mask_id, x0)


@torch.no_grad()
def bound(model, x0, scored, t, xt, batch_size=16):
    """Per draw, minus the NELBO of the scored tokens: (S,) lower-bound estimates of log p, whose
    mean is the estimate. The loss is the project's own model.nelbo with these t and xt."""
    device = next(model.parameters()).device
    out = []
    for lo in range(0, t.shape[0], batch_size):
        t_, xt_ = t[lo:lo + batch_size].to(device), xt[lo:lo + batch_size].to(device)
        x0_ = x0.to(device).expand_as(xt_)
        terms = model.nelbo(x0_, t=t_, xt=xt_, reduction='none')       # (b, L)
        out.append(-(terms * scored.to(device)).sum(-1).double().cpu())
    return torch.cat(out)


def _patterns(M, n):
    # The revealed subsets T that some block needs a pass for: every T strictly inside some M_b.
    return [T for T in range(2 ** n) if any((T & ~m) == 0 and T != m for m in M)]


@torch.no_grad()
def _pattern_log_probs(model, x0, scored, pad, patterns, batch_size):
    # One row per pattern T: in every block the scored positions in T are revealed, the other scored
    # positions and the padding masked. Returns log p_theta(x0 | row) at every position, (R, L).
    cfg, device = model.config, next(model.parameters()).device
    bit = torch.arange(x0.shape[1]) % cfg.block_size
    rows = torch.tensor(patterns)[:, None]
    revealed = (rows >> bit) & 1 == 1                                     # (R, L)
    xt = torch.where((scored & ~revealed) | pad, cfg.mask_id, x0)
    out = []
    for lo in range(0, len(patterns), batch_size):
        xt_ = xt[lo:lo + batch_size].to(device)
        logits = model(xt_, x0.to(device).expand_as(xt_))                 # (b, L, V)
        lp = bd3lm.subs_log_probs(logits, cfg.mask_id)
        target = x0.to(device).expand_as(xt_)[..., None]
        out.append(lp.gather(-1, target).squeeze(-1).double().cpu())
    return torch.cat(out)


def exact(model, x0, scored, pad, batch_size=16):
    """(log p, ELBO) of the scored tokens under first-hitting's law of each block: reveal a
    uniformly chosen masked position, draw its token from p_theta given the block so far, repeat.
    Summed over orders: p(S + {j}) += p(S) / (n - |S|) * p_theta(x_j | S revealed), from
    p(empty) = 1 to p(all n scored). The ELBO averages log p_theta over the orders instead of
    p_theta (Jensen): it is the NELBO's expectation over t in (0, 1] (loglinear)."""
    bs = model.config.block_size
    if bs > EXACT_MAX_BLOCK:
        raise ValueError(f'the exact estimator needs block_size <= {EXACT_MAX_BLOCK}, this model '
                         f'has {bs}; use estimator=bound')
    if model.config.time_conditioning:
        raise ValueError('the exact estimator needs a model without time conditioning (then '
                         'first-hitting\'s law does not depend on its clock); use estimator=bound')
    nb = x0.shape[1] // bs
    weights = 2 ** torch.arange(bs)
    M = (scored.view(nb, bs).long() * weights).sum(-1)        # (nb,) the scored positions, as bits
    n = scored.view(nb, bs).sum(-1)                                       # (nb,)
    patterns = _patterns(M.tolist(), bs)
    lp = _pattern_log_probs(model, x0, scored, pad, patterns, batch_size).view(-1, nb, bs)
    f = torch.full((nb, 2 ** bs), -math.inf, dtype=torch.float64)          # log p(T revealed first)
    f[:, 0] = 0
    elbo = torch.zeros(nb, dtype=torch.float64)
    for r, T in enumerate(patterns):
        size = bin(T).count('1')
        left = (n - size).clamp(min=1).double()                           # masked scored positions
        inside = (T & ~M) == 0                                            # T is a subset of M_b
        ways = torch.tensor([math.comb(int(k), size) for k in n], dtype=torch.float64)
        for j in range(bs):
            if T >> j & 1:
                continue
            ok = inside & ((M >> j) & 1 == 1)
            step = f[:, T] - left.log() + lp[r, :, j]
            grown = f[:, T | 1 << j]
            f[:, T | 1 << j] = torch.where(ok, torch.logaddexp(grown, step), grown)
            elbo += torch.where(ok, lp[r, :, j] / (ways * left), 0.0)
    return float(f[torch.arange(nb), M].sum()), float(elbo.sum())


@torch.no_grad()
def greedy_match(model, x0, scored, pad):
    """Whether greedy decoding reproduces the scored tokens: in every block, reveal the most
    confident masked scored position with its argmax token, as LLaDA checks is_greedy. Decoding can
    only match if every step reveals the true token, so the blocks run in parallel on the true
    earlier blocks and the check stops at the first miss: at most block_size passes."""
    cfg, device = model.config, next(model.parameters()).device
    x0, scored, pad = x0.to(device), scored.to(device), pad.to(device)
    nb, bs = x0.shape[1] // cfg.block_size, cfg.block_size
    todo = scored.clone()
    while todo.any():
        xt = torch.where(todo | pad, cfg.mask_id, x0)
        confidence, guess = bd3lm.subs_log_probs(model(xt, x0), cfg.mask_id).max(-1)   # (1, L)
        confidence = confidence.masked_fill(~todo, -math.inf).view(nb, bs)
        j = confidence.argmax(-1)                                 # (nb,) next position per block
        live = todo.view(nb, bs).any(-1)
        blocks = torch.arange(nb, device=device)
        if (guess.view(nb, bs)[blocks, j] != x0.view(nb, bs)[blocks, j])[live].any():
            return False
        todo.view(nb, bs)[blocks[live], j[live]] = False
    return True

# -----------------------------------------------------------------------------
# The lm-eval model


def _seed(*parts):
    # A stable 63-bit seed from text (Python's hash() changes between runs).
    digest = hashlib.sha256('\0'.join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], 'big') >> 1


@register_model('bd3lm')
class BD3LMEval(TemplateLM):
    def __init__(self, init_from, estimator='bound', samples=32, seed=0, device='cpu',
                 batch_size=16, rule=None, knob=None, max_gen_toks=256, max_batch_size=None):
        super().__init__()
        if estimator not in ESTIMATORS:
            raise ValueError(f'estimator must be one of {ESTIMATORS}, got {estimator!r}')
        if not isinstance(samples, int) or samples < 1:
            raise ValueError(f'samples must be a positive integer, got {samples!r}')
        self._device = torch.device(device)
        if isinstance(init_from, bd3lm.BD3LM):
            self.model = init_from.to(self._device)
        else:
            self.model = bd3lm.BD3LM.from_pretrained(init_from, device=str(self._device))
        self.model.eval()
        self.config = self.model.config
        if estimator != 'bound' and self.config.block_size > EXACT_MAX_BLOCK:
            raise ValueError(f'estimator={estimator} needs block_size <= {EXACT_MAX_BLOCK}, the '
                             f'model has {self.config.block_size}; use estimator=bound')
        self.tokenizer = get_tokenizer(self.model)
        self.estimator, self.samples, self.seed = estimator, samples, seed
        self.batch_size = 16 if batch_size in (None, 'auto') else int(batch_size)
        self.rule, self.knob, self.max_gen_toks = rule, knob, max_gen_toks

    @property
    def eot_token_id(self):
        return self.config.eos_id

    @property
    def prefix_token_id(self):
        return self.config.bos_id

    @property
    def max_length(self):
        return self.config.model_length

    @property
    def tokenizer_name(self):
        return self.config.tokenizer

    def tok_encode(self, string, add_special_tokens=None, **kwargs):
        return list(self.tokenizer.encode(string))

    def score(self, ids, n_cont, key):
        """(log p of the last n_cont tokens of ids given the others, is_greedy). key seeds the
        bound's noise: requests with the same key share it. A continuation too long for one window is
        summed over windows (see windows())."""
        ll, greedy = 0.0, True
        for i, (lo, hi, k) in enumerate(windows(len(ids), n_cont, self.config.model_length)):
            part, part_greedy = self._score_window(ids[lo:hi], k, key if i == 0 else (key, i))
            ll, greedy = ll + part, greedy and part_greedy
        return ll, greedy

    def _score_window(self, ids, n_cont, key):
        cfg = self.config
        if n_cont == 0:
            return 0.0, True
        x0, scored, pad = layout(ids, n_cont, cfg.block_size, cfg.model_length, cfg.eos_id)
        if self.estimator == 'bound':
            g = torch.Generator().manual_seed(_seed(self.seed, key))
            t, xt = bound_noise(x0, scored, pad, cfg.mask_id, cfg.block_size, self.samples, g,
                                cfg.model_length)
            ll = float(bound(self.model, x0, scored, t, xt, self.batch_size).mean())
        else:
            log_p, elbo = exact(self.model, x0, scored, pad, self.batch_size)
            ll = log_p if self.estimator == 'exact' else elbo
        return ll, greedy_match(self.model, x0, scored, pad)

    def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
        out = []
        for (context, continuation), ctx, cont in tqdm(requests, disable=disable_tqdm, desc='ll'):
            # TemplateLM puts the prefix token in an empty context itself; else BOS comes first.
            ids = ([self.config.bos_id] if context else []) + list(ctx) + list(cont)
            result = self.score(ids, len(cont), key=context)
            self.cache_hook.add_partial('loglikelihood', (context, continuation), result)
            out.append(result)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        # lm-eval's disjoint rolling windows of model_length tokens: the first is BOS + model_length - 1
        # scored tokens, each full one after it is the last token before it + model_length - 1 scored
        # tokens, and the last one keeps as much true context as fits (17 tokens at model_length 16:
        # (context, scored) = (1, 15) then (14, 2)). Every token is scored once, after its true preceding
        # tokens.
        out = []
        for (text,) in tqdm([r.args for r in requests], disable=disable_tqdm, desc='rolling'):
            windows = get_rolling_token_windows(self.tok_encode(text), self.config.bos_id,
                                                self.max_length - 1, 1)
            ll = 0.0
            for i, (ctx, cont) in enumerate(map(make_disjoint_window, windows)):
                ll += self.score(ctx + cont, len(cont), key=(text, i))[0]
            self.cache_hook.add_partial('loglikelihood_rolling', (text,), ll)
            out.append(ll)
        return out

    def generate_until(self, requests, disable_tqdm=False):
        out = []
        args = [r.args for r in requests]
        for context, gen_kwargs in tqdm(args, disable=disable_tqdm, desc='gen'):
            text = self._generate(context, dict(gen_kwargs))
            self.cache_hook.add_partial('generate_until', (context, gen_kwargs), text)
            out.append(text)
        return out

    def _generate(self, context, kw):
        until = kw.pop('until', None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(kw.pop('max_gen_toks', self.max_gen_toks))
        sample = kw.pop('do_sample', False)
        temperature = float(kw.pop('temperature', 1.0 if sample else 0.0))
        extra = {}  # the rule and its knob are passed only when asked for
        rule, knob = kw.pop('rule', self.rule), kw.pop('knob', self.knob)
        if rule is not None:
            if rule not in engine.rules():
                raise ValueError(f'unknown rule {rule!r}; choose one of {sorted(engine.rules())}')
            extra['rule'] = rule
        if knob is not None:
            extra['knob'] = knob
        # Leave room for the answer inside the context when the prompt is long.
        prompt = [self.config.bos_id] + self.tok_encode(context)
        prompt = prompt[-max(self.max_length - max_new, 1):]
        g = torch.Generator(device=self._device).manual_seed(_seed(self.seed, context))
        idx = torch.tensor([prompt], device=self._device)
        x = engine.generate(self.model, idx, max_new, temperature=temperature, generator=g, stop_at_eos=True,
                                top_p=float(kw.pop('top_p', 1.0)), **extra)
        new = x[0, len(prompt):].tolist()
        new = new[:new.index(self.config.eos_id)] if self.config.eos_id in new else new
        text = self.tokenizer.completion(prompt, new)
        for stop in until:
            text = text.split(stop)[0] if stop else text
        return text


if __name__ == '__main__':
    from lm_eval.__main__ import cli_evaluate
    cli_evaluate()
