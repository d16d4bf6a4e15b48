"""
Block diffusion language model (BD3-LM): the method, all of it in this single file.

Arriola et al., "Block Diffusion: Interpolating Between Autoregressive and Diffusion Language
Models", ICLR 2025 (arXiv 2503.09573). A sequence of L tokens is cut into blocks of `block_size`.
Blocks are produced left to right; inside a block, tokens come out of masked discrete diffusion.
block_size = 1 is autoregressive-like, block_size = L is MDLM.

Read top to bottom:
  1. config         BD3LMConfig: the model's shape and special tokens
  2. layers         the DiT-style transformer pieces (rotary attention, adaLN blocks)
  3. masks          the block-diffusion training mask and the block-causal inference mask
  4. noise          schedules, clipped intervals, the forward (masking) process
  5. model          BD3LM: the training pass over cat([xt, x0]) (length 2L), the inference pass, the NELBO
  6. search         the clipped ("data-driven") schedule: the interval that minimises the NELBO's variance
  7. sampler        Alg. 2: block by block with an exact KV cache; unmasking rules registered in RULES
Beside it: checkpoints.py (file formats), tokenizer.py (GPT-2 BPE, BERT WordPiece), engine.py (the
per-row batching that serve.py runs).
"""

import functools
import math
from dataclasses import dataclass, fields
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# 1. Config

@dataclass
class BD3LMConfig:
    """Model shape and special tokens, with the field names of the released config.json."""
    block_size: int = 16
    vocab_size: int = 50258        # GPT-2's 50257 tokens + 1 mask token
    model_length: int = 1024       # training context L (and the sliding window when sampling)
    hidden_dim: int = 768
    cond_dim: int = 128
    n_layers: int = 12             # transformer layers (config.json calls it n_blocks)
    n_heads: int = 12
    dropout: float = 0.1
    adaln: bool = True
    time_conditioning: bool = False
    # The special tokens and the tokenizer belong to the model. Defaults: the released GPT-2 convention,
    # where the tokenizer's last token is <|endoftext|> (BOS = EOS = 50256) and the mask token is appended
    # after it (50257). A BERT WordPiece model (LM1B) has its own [MASK]/[CLS]/[SEP] inside the vocabulary.
    tokenizer: str = 'gpt2'        # 'gpt2' (tiktoken BPE) or 'wordpiece' (uncased; vocab.txt beside the weights)
    mask_id: int = None            # default: vocab_size - 1
    bos_id: int = None             # default: vocab_size - 2
    eos_id: int = None             # default: vocab_size - 2

    TOKENIZERS = ('gpt2', 'wordpiece')

    def __post_init__(self):
        problems = []
        for f in fields(self):  # strict types: "false" is not False, 50257.0 is not a token id
            value = getattr(self, f.name)
            if value is None and f.name.endswith('_id'):
                continue
            ok = {int: lambda v: isinstance(v, int) and not isinstance(v, bool),
                  float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
                  bool: lambda v: isinstance(v, bool), str: lambda v: isinstance(v, str)}[f.type](value)
            if not ok:
                problems.append(f'{f.name} must be a {f.type.__name__}, got {value!r} ({type(value).__name__})')
        if problems:
            raise ValueError('invalid BD3LMConfig: ' + '; '.join(problems))
        for name in ('block_size', 'vocab_size', 'model_length', 'hidden_dim', 'cond_dim', 'n_layers', 'n_heads'):
            if getattr(self, name) <= 0:
                problems.append(f'{name} must be a positive integer, got {getattr(self, name)!r}')
        if not problems:
            if self.mask_id is None:
                self.mask_id = self.vocab_size - 1
            for name in ('bos_id', 'eos_id'):
                if getattr(self, name) is None:
                    setattr(self, name, max(self.vocab_size - 2, 0))
            if self.model_length % self.block_size:
                problems.append(f'model_length={self.model_length} is not a multiple of block_size={self.block_size}; '
                                f'choose a block_size that divides it')
            if self.hidden_dim % self.n_heads or (self.hidden_dim // self.n_heads) % 2:
                problems.append(f'hidden_dim={self.hidden_dim} must split into n_heads={self.n_heads} heads of even size')
            for name in ('mask_id', 'bos_id', 'eos_id'):
                if not 0 <= getattr(self, name) < self.vocab_size:
                    problems.append(f'{name}={getattr(self, name)} must be a token id below vocab_size={self.vocab_size}')
        if not 0 <= self.dropout < 1:
            problems.append(f'dropout must be in [0, 1), got {self.dropout}')
        if self.tokenizer not in self.TOKENIZERS:
            problems.append(f'tokenizer must be one of {self.TOKENIZERS}, got {self.tokenizer!r}')
        if problems:
            raise ValueError('invalid BD3LMConfig: ' + '; '.join(problems))


# -----------------------------------------------------------------------------
# 2. Layers

class LayerNorm(nn.Module):
    """Bias-free LayerNorm, computed in float32 whatever the input dtype."""

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.layer_norm(x.float(), (x.shape[-1],)).type_as(x) * self.weight


class Rotary(nn.Module):
    """Rotary position embedding (GPT-NeoX 'rotate half' layout) for q and k."""

    def __init__(self, head_dim, base=10_000):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))
        self.register_buffer('inv_freq', inv_freq)  # kept: the released checkpoints store it

    def forward(self, positions):
        # positions: (T,) absolute integer positions, or (B, T): each row its own (a server's rows sit at
        # different places in their texts). Angles in float64 so that positions far beyond the training
        # context (long generation) keep their precision.
        angles = positions.double()[..., None] * self.inv_freq.double()   # (..., T, head_dim/2)
        angles = torch.cat([angles, angles], dim=-1)                        # (..., T, head_dim)
        return angles.cos().float(), angles.sin().float()


def apply_rotary(x, cos, sin):
    # x: (B, H, T, D); cos/sin: (T, D), or (B, T, D) for per-row positions
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of the noise level sigma followed by an MLP (as in DiT)."""

    def __init__(self, cond_dim, frequency_dim=256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(
            nn.Linear(frequency_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, sigma):
        # sigma: (B,) -> (B, cond_dim)
        half = self.frequency_dim // 2
        freqs = torch.exp(-math.log(10_000) * torch.arange(half, device=sigma.device) / half)
        args = sigma.float()[:, None] * freqs[None]
        embedding = torch.cat([args.cos(), args.sin()], dim=-1)          # float32, then the MLP's dtype
        return self.mlp(embedding.to(self.mlp[0].weight.dtype))


class EmbeddingLayer(nn.Module):
    def __init__(self, dim, vocab_size):
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(vocab_size, dim))
        nn.init.kaiming_uniform_(self.embedding, a=math.sqrt(5))

    def forward(self, x):
        return self.embedding[x]


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class DDiTBlock(nn.Module):
    """Transformer block: packed-qkv rotary attention and a GELU-tanh MLP, both adaLN-modulated."""

    def __init__(self, dim, n_heads, cond_dim, dropout, adaln, mlp_ratio=4):
        super().__init__()
        self.n_heads = n_heads
        self.norm1 = LayerNorm(dim)
        self.attn_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_out = nn.Linear(dim, dim, bias=False)
        self.norm2 = LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim), nn.GELU(approximate='tanh'), nn.Linear(mlp_ratio * dim, dim))
        self.dropout = nn.Dropout(dropout)
        self.adaln = adaln
        if adaln:
            self.adaLN_modulation = nn.Linear(cond_dim, 6 * dim)

    def forward(self, x, c, rotary, attn, layer=0, cache=None):
        # x: (B, T, D); c: (B, 1, cond_dim) or None; rotary: (cos, sin), each (T, head_dim)
        if self.adaln:
            shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)
            h = modulate(self.norm1(x), shift1, scale1)
        else:
            gate1 = gate2 = 1.0
            h = self.norm1(x)
        B, T, D = h.shape
        qkv = self.attn_qkv(h).view(B, T, 3, self.n_heads, D // self.n_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, T, head_dim)
        q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if cache is not None:
            # Write this block's keys into its ring slot and attend to every valid slot: all cached blocks
            # are clean, earlier and within the window, so no block mask is needed.
            k, v, valid = cache.update(layer, k, v)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=valid)
        else:
            y = attn(q, k, v)                               # (B, H, T, head_dim)
        y = y.transpose(1, 2).reshape(B, T, D)
        x = x + gate1 * self.dropout(self.attn_out(y))
        h = self.norm2(x)
        if self.adaln:
            h = modulate(h, shift2, scale2)
        return x + gate2 * self.dropout(self.mlp(h))


class DDiTFinalLayer(nn.Module):
    def __init__(self, dim, vocab_size, cond_dim, adaln):
        super().__init__()
        self.norm_final = LayerNorm(dim)
        self.linear = nn.Linear(dim, vocab_size)
        self.adaln = adaln
        if adaln:
            self.adaLN_modulation = nn.Linear(cond_dim, 2 * dim)

    def forward(self, x, c):
        # x: (..., D), c broadcastable to (..., cond_dim)
        x = self.norm_final(x)
        if self.adaln:
            shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
            x = modulate(x, shift, scale)
        return self.linear(x)

# -----------------------------------------------------------------------------
# 3. Masks

def block_diff_mask_mod(q, kv, L, block_size):
    """The block-diffusion training mask (Sec. 3.2, Fig. 2) over cat([xt, x0]) of length 2L.
    True = may attend. With b(i) the block index of position i within its half:
      M_BD  block-diagonal:        xt -> xt   when b(q) == b(kv)  (a noisy block sees itself)
      M_OBC offset block-causal:   xt -> x0   when b(q) >  b(kv)  (and the clean blocks before it)
      M_BC  block-causal:          x0 -> x0   when b(q) >= b(kv)  (clean blocks, as in AR decoding)
    Clean tokens never look at noisy ones."""
    q_clean, kv_clean = q >= L, kv >= L
    q_block = torch.where(q_clean, q - L, q) // block_size
    kv_block = torch.where(kv_clean, kv - L, kv) // block_size
    block_diagonal = (q_block == kv_block) & ~q_clean & ~kv_clean
    offset_block_causal = (q_block > kv_block) & ~q_clean & kv_clean
    block_causal = (q_block >= kv_block) & q_clean & kv_clean
    return block_diagonal | offset_block_causal | block_causal


def block_causal_mask_mod(q, kv, block_size, window):
    """The inference mask: each block sees itself and earlier blocks, at most `window` tokens in all
    (the sliding window used past the training context; blocks are aligned at position 0)."""
    q_block, kv_block = q // block_size, kv // block_size
    return (q_block >= kv_block) & (q_block - kv_block < window // block_size)


def block_diff_mask(L, block_size, device=None):
    """(2L, 2L) boolean block-diffusion mask; see block_diff_mask_mod."""
    idx = torch.arange(2 * L, device=device)
    return block_diff_mask_mod(idx[:, None], idx[None, :], L, block_size)


def block_causal_mask(T, block_size, window=None, device=None):
    """(T, T) boolean block-causal mask, banded to `window` tokens if given."""
    idx = torch.arange(T, device=device)
    return block_causal_mask_mod(idx[:, None], idx[None, :], block_size, window or T + block_size)

# -----------------------------------------------------------------------------
# 4. Noise: schedules, clipped intervals, the forward process

EPS = 1e-3                    # the smallest noise level: the loglinear weight 1/t stays finite
FULL_INTERVAL = (EPS, 1.0)    # t ~ U[1e-3, 1]: the unclipped schedule, whose NELBO bounds the NLL

# A schedule maps t (B, L) to (move_chance, weight): the probability 1 - alpha_t that a token is masked at
# time t, and the NELBO weight -alpha_t' / (1 - alpha_t) on a masked token's -log p (Eq. 10). Register a
# new one in SCHEDULES; model.nelbo(schedule=...) and train.py --noise_schedule then take it by name.


def loglinear(t):             # alpha_t = 1 - t: the paper's default, weight 1/t
    return t, 1 / t


def power(p):                 # alpha_t = 1 - t^p (the paper's 'square' and 'square_root' ablations, Table 7)
    def schedule(t):
        move_chance = (t ** p).clamp(min=EPS)
        return move_chance, p * t ** (p - 1) / move_chance
    return schedule


def log_schedule(t):          # 1 - alpha_t = log2(1 + t)
    move_chance = torch.log1p(t) / math.log(2)
    return move_chance, 1 / (move_chance * math.log(2) * (1 + t))


def cosine(t):                # 1 - alpha_t = 1 - (1 - eps) cos(pi t / 2) >= eps, so the weight stays finite
    move_chance = 1 - (1 - EPS) * torch.cos(t * math.pi / 2)
    return move_chance, (1 - EPS) * torch.sin(t * math.pi / 2) * (math.pi / 2) / move_chance


SCHEDULES = {'loglinear': loglinear, 'square': power(2.0), 'square_root': power(0.5), 'log': log_schedule,
             'cosine': cosine}


def noise_schedule(t, kind='loglinear'):
    """(move_chance, weight) of the schedule named `kind` at noise levels t."""
    if kind not in SCHEDULES:
        raise ValueError(f'unknown noise schedule {kind!r}; choose one of {list(SCHEDULES)} (bd3lm.SCHEDULES)')
    return SCHEDULES[kind](t)


def sigma_from_move_chance(p, eps=EPS):
    """Total noise sigma = -log(1 - p), capped at the loglinear schedule's maximum -log(eps)."""
    return torch.minimum(-torch.log1p(-p), torch.tensor(-math.log(eps), device=p.device))


def sample_t(batch_size, n_blocks, beta=EPS, omega=1.0, antithetic=True, device=None, generator=None):
    """One noise level per block, t ~ U[beta, omega] (Sec. 5.2). Antithetic: the B * n_blocks draws are
    stratified over [0, 1) (one uniform in each of B * n_blocks equal bins), lowering the variance."""
    if not 0 < beta <= omega <= 1:
        raise ValueError(f'the noise interval must satisfy 0 < beta <= omega <= 1, got [{beta}, {omega}]')
    u = torch.rand(batch_size, n_blocks, device=device, generator=generator)
    if antithetic:
        n = batch_size * n_blocks
        u = (u / n + torch.arange(n, device=device).view(batch_size, n_blocks) / n) % 1
    return beta + (omega - beta) * u


def q_xt(x0, move_chance, mask_id, block_size, interval=None, generator=None, max_tries=100):
    """The forward process: each token independently becomes mask_id with probability move_chance.
    Position 0 (BOS) is never masked.

    interval=(beta, omega): the paper's resampling, so that every block's masked fraction lies in
    [beta, omega]. As in bd3lms, a bound at the end of the schedule (beta = 1e-3 or omega = 1) is not
    enforced: with [1e-3, omega] only blocks with too many masks are redrawn, so a block may stay clean.
    Offending blocks are redrawn at most max_tries times; blocks still out of range after that get a
    random subset of tokens masked/unmasked to the nearest reachable count, so the loop always ends. An
    interval with no reachable count for this block size is an error."""
    u = torch.rand(x0.shape, device=x0.device, generator=generator)
    masked = u <= move_chance
    if interval is not None and block_size > 1:
        beta, omega = interval
        lo = 0 if beta <= EPS else math.ceil(beta * block_size - 1e-9)
        hi = block_size if omega >= 1 else math.floor(omega * block_size + 1e-9)
        if lo > hi:
            raise ValueError(f'no block of {block_size} tokens can have a masked fraction in [{beta}, {omega}]; '
                             f'widen the interval or turn resampling off')
        B, L = x0.shape
        for _ in range(max_tries):
            counts = masked.view(B, -1, block_size).sum(-1)
            bad = ((counts < lo) | (counts > hi)).repeat_interleave(block_size, dim=1)
            if not bad.any():
                break
            u = torch.rand(x0.shape, device=x0.device, generator=generator)
            masked = torch.where(bad, u <= move_chance, masked)
        else:
            masked = _force_mask_count(masked.view(B, -1, block_size), lo, hi, generator).view(B, L)
    masked[:, 0] = False
    return torch.where(masked, mask_id, x0)


def _force_mask_count(masked, lo, hi, generator):
    # Per block, keep the k = clamp(count, lo, hi) positions ranked first by random priority, putting
    # already-masked positions first so that in-range blocks are unchanged.
    k = masked.sum(-1, keepdim=True).clamp(lo, hi)
    priority = torch.rand(masked.shape, device=masked.device, generator=generator) + masked.float()
    rank = priority.argsort(-1, descending=True).argsort(-1)
    return rank < k

# -----------------------------------------------------------------------------
# 5. The model: two passes and the NELBO

class BD3LM(nn.Module):
    """The DiT backbone. Parameter names follow the released checkpoints (minus their 'backbone.')."""

    # The training pass's attention mask, as a function of (query, key) positions in cat([xt, x0]): a fork
    # that tries another mask replaces it here (README, "Modify it").
    train_mask_mod = staticmethod(block_diff_mask_mod)

    def __init__(self, config):
        super().__init__()
        self.config = config
        c = config
        self.vocab_embed = EmbeddingLayer(c.hidden_dim, c.vocab_size)
        if c.adaln:
            self.sigma_map = TimestepEmbedder(c.cond_dim)
        self.rotary_emb = Rotary(c.hidden_dim // c.n_heads)
        self.blocks = nn.ModuleList(
            DDiTBlock(c.hidden_dim, c.n_heads, c.cond_dim, c.dropout, c.adaln) for _ in range(c.n_layers))
        self.output_layer = DDiTFinalLayer(c.hidden_dim, c.vocab_size, c.cond_dim, c.adaln)
        # The clipped noise interval [beta, omega] the model was trained with (Sec. 5.2); saved with it.
        self.register_buffer('sampling_eps_min', torch.tensor(1e-3))
        self.register_buffer('sampling_eps_max', torch.tensor(1.0))
        self.attn_backend = 'sdpa'  # or 'flex': FlexAttention, same numbers; see use_flex_attention()
        self._masks = {}
        self.vocab = None  # WordPiece models: the token strings in id order (saved as vocab.txt)

    def use_flex_attention(self, enabled=True):
        """Switch the masked passes to FlexAttention (block-sparse; compiled on CUDA, unfused on CPU)."""
        self.attn_backend = 'flex' if enabled else 'sdpa'
        return self

    # --- the two passes ----------------------------------------------------

    def forward(self, xt, x0=None, t=None):
        """model(xt, x0): vectorized training pass over cat([xt, x0]) under the block-diffusion mask;
        returns raw logits (B, L, V) for the xt half.
        model(x): inference pass over clean blocks followed by a (partly) masked last block, under the
        block-causal mask; returns raw logits (B, T, V).
        t: (B,) noise level, read only when config.time_conditioning."""
        self._check_tokens(xt, 'xt' if x0 is not None else 'x')
        c = self.cond(t, xt.shape[0])
        if x0 is None:
            return self.output_layer(self.hidden(xt, c), None if c is None else c[:, None])
        self._check_tokens(x0, 'x0')
        if x0.shape != xt.shape:
            raise ValueError(f'xt and x0 must have the same shape, got {tuple(xt.shape)} and {tuple(x0.shape)}')
        return self.output_layer(self.train_hidden(xt, x0, c), None if c is None else c[:, None])

    def cond(self, t, batch_size):
        """The adaLN conditioning c (B, cond_dim) for noise level t (B,), a move chance in [0, 1], or None
        when the model has no adaLN. Without time conditioning (the released models) t is ignored and c
        is a learned constant: the model is called at sigma = 0."""
        if not self.config.adaln:
            return None
        device = self.vocab_embed.embedding.device
        if t is None or not self.config.time_conditioning:
            sigma = torch.zeros(batch_size, device=device)
        else:
            sigma = sigma_from_move_chance(torch.as_tensor(t, device=device).float())
        return F.silu(self.sigma_map(sigma))

    def train_hidden(self, xt, x0, c):
        """Hidden states (B, L, D) of xt's half of the training pass. Both halves use positions
        0..L-1: xt[i] and x0[i] are the same position of the same sequence."""
        L = xt.shape[1]
        x = torch.cat([xt, x0], dim=1)                              # (B, 2L)
        positions = torch.arange(L, device=x.device).repeat(2)      # (2L,)
        return self.transformer(x, positions, self.attention_mask('train', L), c)[:, :L]

    def hidden(self, x, c, positions=None, cache=None):
        """Inference pass -> hidden states (B, T, D). Without a cache: the block-causal mask (banded to a
        sliding window of model_length when x is longer). With a cache: x is one block at `positions`
        ((T,), or (B, T) when rows sit at different places), attending to the cached prefix and itself;
        its keys and values are written into the cache slot of the rows' next block.
        x may also be (B, m, T): m versions of each row's block (a speculative round's verify rows), run as
        B * m rows that each attend to their row's prefix -> (B, m, T, D); c is then (B * m, cond_dim)."""
        if x.dim() == 3:
            B, m, T = x.shape
            if positions is not None and positions.dim() == 2:
                positions = positions.repeat_interleave(m, 0)
            cache = None if cache is None else Versions(cache, m)
            return self.hidden(x.flatten(0, 1), c, positions, cache).unflatten(0, (B, m))
        if positions is None:
            positions = torch.arange(x.shape[1], device=x.device)
        mask = None if cache is not None else self.attention_mask('infer', x.shape[1])
        return self.transformer(x, positions, mask, c, cache)

    def transformer(self, x, positions, mask, c, cache=None):
        """The transformer body: embedding, rotary, every layer (what sample.py --compile compiles)."""
        h = self.vocab_embed(x)                                     # (B, T, D)
        rotary = self.rotary_emb(positions)
        attn = self._attention(mask)
        c = None if c is None else c[:, None]                       # (B, 1, cond_dim): every position
        for i, block in enumerate(self.blocks):
            h = block(h, c, rotary, attn, layer=i, cache=cache)
        return h

    def _attention(self, mask):
        if mask is None:
            return F.scaled_dot_product_attention
        if self.attn_backend == 'flex':
            block_mask = mask[1]
            return lambda q, k, v: _flex_attention(q, k, v, block_mask=block_mask)
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask[0])

    def attention_mask(self, kind, L):
        """(dense bool mask, FlexAttention BlockMask or None) of the 'train' pass over 2L positions or the
        'infer' pass over L, from train_mask_mod / block_causal_mask_mod."""
        # Masks are built once and reused. The inference
        # mask of a shorter sequence is the top-left corner of a longer one, so with SDPA one mask serves
        # every length (the uncached sampler asks for a new length every block).
        device = self.vocab_embed.embedding.device
        bs, window = self.config.block_size, self.config.model_length
        sliceable = kind == 'infer' and self.attn_backend == 'sdpa'
        key = (kind, device) if sliceable else (kind, L, device, self.attn_backend)
        cached = self._masks.get(key)
        if cached is None or (sliceable and cached[0].shape[0] < L):
            if kind == 'train':
                mask_mod = lambda b, h, q, kv: self.train_mask_mod(q, kv, L, bs)
                n = 2 * L
            else:
                mask_mod = lambda b, h, q, kv: block_causal_mask_mod(q, kv, bs, window)
                n = max(L, window) if sliceable else L
            idx = torch.arange(n, device=device)
            dense = mask_mod(None, None, idx[:, None], idx[None, :])
            flex = None
            if self.attn_backend == 'flex':
                from torch.nn.attention.flex_attention import create_block_mask
                flex = create_block_mask(mask_mod, None, None, n, n, device=device)
            cached = self._masks[key] = (dense, flex)
        return (cached[0][:L, :L], None) if sliceable else cached

    def _check_tokens(self, x, name):
        if not isinstance(x, torch.Tensor) or x.dtype not in (torch.long, torch.int32, torch.int64) or x.dim() != 2:
            raise ValueError(f'{name} must be a 2-D integer tensor of token ids (B, L), got '
                             f'{getattr(x, "dtype", type(x))} with shape {tuple(getattr(x, "shape", ()))}')
        if x.shape[1] == 0 or x.shape[1] % self.config.block_size:
            raise ValueError(f'{name} has length {x.shape[1]}, which is not a positive multiple of '
                             f'block_size={self.config.block_size}; pad or crop it to whole blocks')
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(f'{name} holds token ids in [{lo}, {hi}], outside the vocabulary '
                             f'[0, {self.config.vocab_size - 1}]')

    # --- loss ----------------------------------------------------------------

    def nelbo(self, x0, t=None, xt=None, *, interval=None, schedule='loglinear', reduction='mean',
              antithetic=True, resample=False, generator=None):
        """The block diffusion NELBO (Eq. 8/10) in nats per token, SUBS parameterization.

        x0: (B, L) clean tokens; position 0 is never masked, never scored (BOS, or the first token of a
            plain chunk).
        t:  noise level, (B, L) constant within blocks, or (B, L // block_size); sampled if None,
            one per block from U[beta, omega] = interval. The default interval is the full [1e-3, 1], which
            makes the result a bound on the NLL; training passes its clipped interval (Sec. 5.2) explicitly,
            e.g. interval=model.clipped_interval(), whose estimate is lower-variance but biased.
        xt: (B, L) noisy tokens; sampled from q(xt | x0, t) if None.
        reduction: 'mean' -> scalar averaged over all positions but the first;
                   'none' -> (B, L) per-token terms (0 at unmasked positions and at position 0).
        Under torch.compile, pass t and xt (drawn eagerly with forward_process): random draws and the input
        checks, which read values on the host, stay outside the compiled graph.
        """
        eager = not torch.compiler.is_compiling()
        if eager:
            self._check_tokens(x0, 'x0')
            if (x0 == self.config.mask_id).any():
                raise ValueError(f'x0 contains the mask id {self.config.mask_id}: clean data must not hold the mask '
                                 f'token (prepare the data with this model\'s tokenizer)')
        B, L = x0.shape
        bs = self.config.block_size
        interval = FULL_INTERVAL if interval is None else interval
        if t is None:
            if xt is not None:
                raise ValueError('xt was given without its noise level t: pass both, or neither')
            t, xt = self.forward_process(x0, interval, schedule, antithetic, resample, generator)
        t = self._expand_t(t, B, L, check=eager)
        move_chance, weight = noise_schedule(t, schedule)
        if xt is None:
            xt = q_xt(x0, move_chance, self.config.mask_id, bs, interval if resample else None, generator=generator)
        elif eager:
            self._check_tokens(xt, 'xt')
            if xt.shape != x0.shape:
                raise ValueError(f'xt and x0 must have the same shape, got {tuple(xt.shape)} and {tuple(x0.shape)}')
        c = self.cond(move_chance[:, 0], B)                            # (B, cond_dim) or None
        h = self.train_hidden(xt, x0, c)                               # (B, L, D)
        # SUBS: unmasked tokens are copied, so they contribute exactly 0 and need no logits.
        masked = xt == self.config.mask_id
        masked[:, 0] = False
        if eager:
            # Only the masked positions (about a quarter of the 2L) go through the vocabulary projection.
            rows = masked.nonzero(as_tuple=True)
            logits = self.output_layer(h[rows], None if c is None else c[rows[0]])   # (N, V)
            nll = -subs_log_probs(logits, self.config.mask_id).gather(-1, x0[rows][:, None]).squeeze(-1)  # (N,)
            per_token = torch.zeros(B, L, device=x0.device, dtype=nll.dtype)
            per_token[rows] = weight[rows].to(nll.dtype) * nll
        else:
            # Compiled: the gather above has a data-dependent shape, which breaks the graph and recompiles
            # as the number of masked tokens changes. Project every position instead and zero the unmasked
            # ones: fixed shapes, one graph, the same numbers (the cost is measured in README).
            logits = self.output_layer(h, None if c is None else c[:, None])           # (B, L, V)
            nll = -subs_log_probs(logits, self.config.mask_id).gather(-1, x0[..., None]).squeeze(-1)
            per_token = torch.where(masked, weight.to(nll.dtype) * nll, torch.zeros_like(nll))
        if reduction == 'none':
            return per_token
        if reduction != 'mean':
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        return per_token[:, 1:].sum() / (B * (L - 1))

    def forward_process(self, x0, interval=None, schedule='loglinear', antithetic=True, resample=False,
                        generator=None):
        """Draw one noise level per block, t ~ U[interval], and xt ~ q(xt | x0, t): returns (t, xt), each
        (B, L). nelbo(x0) does this itself; a compiled training step calls it eagerly and passes t and xt."""
        B, L = x0.shape
        bs = self.config.block_size
        interval = FULL_INTERVAL if interval is None else interval
        t = sample_t(B, L // bs, *interval, antithetic=antithetic, device=x0.device, generator=generator)
        t = t.repeat_interleave(bs, dim=1)
        move_chance, _ = noise_schedule(t, schedule)
        return t, q_xt(x0, move_chance, self.config.mask_id, bs, interval if resample else None, generator=generator)

    def clipped_interval(self):
        """The clipped noise interval [beta, omega] the model trains with (saved with its weights)."""
        return float(self.sampling_eps_min), float(self.sampling_eps_max)

    def _expand_t(self, t, B, L, check=True):
        bs = self.config.block_size
        t = torch.as_tensor(t, dtype=torch.float32, device=self.sampling_eps_min.device)
        if t.shape == (B, L // bs) and bs > 1:
            t = t.repeat_interleave(bs, dim=1)
        if t.shape != (B, L):
            raise ValueError(f't must have shape (B, L)={B, L} or (B, L // block_size)={B, L // bs}, got {tuple(t.shape)}')
        if check and not ((t > 0) & (t <= 1)).all():  # also catches NaN
            raise ValueError('t must lie in (0, 1] (no NaN): the loss weight 1/t is infinite at t = 0')
        return t

    # --- loading and saving -------------------------------------------------------

    @classmethod
    def from_pretrained(cls, src, device='cpu'):
        """src: a folder with config.json + model.safetensors (released layout, or a train.py out_dir),
        a Hugging Face hub id such as 'kuleshov-group/bd3lm-owt-block_size16', or a bd3lms Lightning
        .ckpt (its EMA weights are used)."""
        import checkpoints
        return checkpoints.load(src, device, cls)

    def save_pretrained(self, out_dir):
        """Write config.json + model.safetensors in the released layout (keys prefixed 'backbone.')."""
        import checkpoints
        checkpoints.save(self, out_dir)


def _flex_attention(q, k, v, block_mask):
    from torch.nn.attention.flex_attention import flex_attention
    global _compiled_flex
    if q.is_cuda:  # compiled once; on CPU the unfused reference implementation is used
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        return _compiled_flex(q, k, v, block_mask=block_mask)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return flex_attention(q, k, v, block_mask=block_mask)


_compiled_flex = None

# -----------------------------------------------------------------------------
# 6. The clipped-schedule search

def subs_log_probs(logits, mask_id):
    """SUBS parameterization (Sahoo et al. 2024): the model never predicts the mask token; returns
    log p over the vocabulary in float32. (Carry-over of unmasked tokens is handled by the caller.)"""
    logits = logits.float()
    logits[..., mask_id] = -float('inf')
    return logits.log_softmax(dim=-1)


@torch.no_grad()
def nelbo_variance(model, batches, interval, schedule='loglinear', resample=False, generator=None):
    """Variance of the per-block NELBO estimate when t ~ U[interval], measured with the estimator training
    uses (pass resample=True when training resamples). For each batch, the per-token NELBO terms are
    averaged within each block and the variance is taken over all (sequence, block) estimates; the result
    is the mean over batches (the quantity Sec. 5.2 minimises)."""
    bs = model.config.block_size
    variances = []
    for x0 in batches:
        per_token = model.nelbo(x0, interval=interval, schedule=schedule, resample=resample, reduction='none',
                                generator=generator)
        variances.append(per_token.view(x0.shape[0], -1, bs).mean(-1).var().item())
    return sum(variances) / len(variances)


def clip_intervals(widths, delta=0.05, eps=EPS):
    """Candidate intervals [beta, beta + w] for each width w, beta on a grid of step delta (Sec. 5.2).
    The full interval [eps, 1] is always a candidate."""
    intervals = [(eps, 1.0)]
    for w in widths:
        for i in range(int(round((1 - w) / delta)) + 1):
            start = round(i * delta, 6)
            interval = (max(start, eps), min(round(start + w, 6), 1.0))
            if interval not in intervals:
                intervals.append(interval)
    return intervals


def search_clip_interval(model, batches, widths=(0.25, 0.5, 0.75), delta=0.05, schedule='loglinear',
                         resample=False, generator=None):
    """The data-driven clipped schedule: among candidate intervals, pick the [beta, omega] that
    minimises the variance of the NELBO estimate on `batches`. Returns (best, {interval: variance}).
    Block size 1 has two candidates, as in bd3lms: the full interval and t = 1, where every token is
    masked with weight 1, i.e. the exact autoregressive loss (zero noise variance), so AR-like models
    train as AR models once the search has run."""
    if not batches:
        raise ValueError('the clipped-schedule search needs at least one batch of validation data')
    candidates = [FULL_INTERVAL, (1.0, 1.0)] if model.config.block_size == 1 else clip_intervals(widths, delta)
    variances = {iv: nelbo_variance(model, batches, iv, schedule, resample, generator) for iv in candidates}
    return min(variances, key=variances.get), variances

# -----------------------------------------------------------------------------
# 7. Sampler (Alg. 2)
#
# Block by block: a block starts fully masked (after any prompt tokens it holds) and is denoised by
# repeated model calls; after each call an unmasking rule says which masked positions to reveal, and they
# take the token proposed for them, never to change again. The finished block is then written to the KV
# cache with one more pass (a cache write, not a denoising call), and the next block starts. Blocks are
# aligned at position 0: a prompt whose length is not a multiple of block_size fills the start of its last
# block. Past model_length tokens every block attends to a sliding window of the last model_length tokens
# (whole blocks); the uncached path runs the same banded mask, so cached and uncached generation agree.

class KVCache:
    """Keys and values of the finished clean blocks, one buffer per layer, preallocated once.

    The buffer holds `window` = model_length positions as a ring of window // block_size slots. The block
    being denoised writes its keys into the slot the next finished block will occupy; once the ring is full
    that slot is the oldest block, which is exactly the block that leaves the sliding window. So attention
    is over the valid slots and nothing is ever copied. Keys are stored with rotary applied at absolute
    positions. Every row of the batch is at the same block (engine.py keeps a cache whose rows are not).

    The model calls update() once per layer; commit() says that the block just passed in is clean."""

    def __init__(self, n_layers, batch_size, n_heads, window, head_dim, block_size, device, dtype):
        shape = (n_layers, batch_size, n_heads, window, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.block_size, self.n_slots = block_size, window // block_size
        self.n_committed = 0                       # finished blocks written so far

    def commit(self):
        self.n_committed += 1

    def update(self, layer, k, v):
        """Write this block's keys and values (B, H, bs, head_dim) into its slot; return the keys and
        values to attend to, and an attention mask (None: every slot returned is valid)."""
        start = (self.n_committed % self.n_slots) * self.block_size
        n_valid = min(self.n_committed + 1, self.n_slots) * self.block_size
        self.k[layer, :, :, start:start + self.block_size] = k
        self.v[layer, :, :, start:start + self.block_size] = v
        return self.k[layer, :, :, :n_valid], self.v[layer, :, :, :n_valid], None


class Versions:
    """A cache seen by m versions of each row's block (rows r * m + j) in one pass: each version attends to
    the row's cached prefix and to itself. The wrapped cache (KVCache, or engine.RowCache) takes one version
    at a time and its keys are copied out; version 0, the block as it is, is written last and stays in the
    slot (which only the commit pass's clean keys need to fill)."""

    def __init__(self, cache, m):
        self.cache, self.m = cache, m

    def update(self, layer, k, v):
        k, v = k.unflatten(0, (-1, self.m)), v.unflatten(0, (-1, self.m))      # (B, m, H, bs, head_dim)
        keys, values = [], []
        for j in reversed(range(self.m)):
            kj, vj, valid = self.cache.update(layer, k[:, j], v[:, j])
            keys.insert(0, kj.clone())
            values.insert(0, vj.clone())
        valid = None if valid is None else valid.repeat_interleave(self.m, 0)
        return torch.stack(keys, 1).flatten(0, 1), torch.stack(values, 1).flatten(0, 1), valid

# --- Unmasking rules ------------------------------------------------------------
#
# A rule is a function rule(p, knob) -> reveal: p is the call's Proposal (below), knob (B,) the row's
# setting, reveal a (B, bs) bool of the masked positions to reveal. Register it in RULES; generate,
# sample.py --rule and serve.py's "rule" field then take it by name. Optional attributes: `rule.knob`,
# the knob's (low, high) range (an int low means an integer knob; None: the rule takes no knob), and
# `rule.order`, the order it ranks positions in (p.priority) and falls back to; the default is
# 'confidence'. The sampler, not the rule, guarantees progress: a row whose rule reveals nothing reveals
# its first masked position in that order.

ORDERS = ('uniform', 'confidence', 'entropy')


def first(priority, masked, n):
    """The n (B,) highest-priority masked positions of each row, as a (B, bs) bool."""
    rank = priority.masked_fill(~masked, -math.inf).argsort(-1, descending=True).argsort(-1)
    n = torch.as_tensor(n, device=masked.device).clamp(max=masked.shape[-1]).long()   # a knob of 1e30 too
    return masked & (rank < n.view(-1, 1))


def first_hitting(p, knob):
    # One masked position per call, uniformly at random (Zheng et al. 2024): p.uniform is a random order of
    # the block drawn once per block. The exact sampler of the model's own law; NFE = tokens.
    j = p.uniform.masked_fill(~p.masked, -1).argmax(-1, keepdim=True)
    return p.masked & torch.zeros_like(p.masked).scatter_(-1, j, True)


def steps(p, K):
    # K ancestral steps on the loglinear grid t = 1, 1 - 1/K, ..., 1/K: a masked token is revealed at step i
    # with probability 1/(K - i), i.e. each position's reveal step is uniform over the K steps, independent
    # of the others. Drawn once per block as floor(u K); a call jumps to the next step that reveals anything,
    # so a block costs at most block_size calls whatever K is (steps that reveal nothing change nothing).
    step = (p.uniform * K[:, None]).floor()
    return p.masked & (step == step.masked_fill(~p.masked, math.inf).amin(-1, keepdim=True))


def threshold(p, tau):
    # Fast-dLLM (Wu et al. 2025): every masked position whose confidence is >= tau; if none is, the most
    # confident one (the sampler's fallback).
    return p.masked & (p.confidence >= tau[:, None])


def entropy_bound(p, gamma):
    # The EB-sampler (Ben-Hamu et al. 2025): the longest prefix of the masked positions in order (lowest
    # entropy first) whose entropies sum to at most gamma plus the largest of them: sum H - max H <= gamma.
    ranked = p.priority.masked_fill(~p.masked, -math.inf).argsort(-1, descending=True)
    h = p.entropy.gather(-1, ranked).masked_fill(~p.masked.gather(-1, ranked), math.inf)
    n = (h.cumsum(-1) - h.cummax(-1).values <= gamma[:, None]).sum(-1)
    return first(p.priority, p.masked, n)


def tokens_per_call(p, k):
    # LLaDA's low-confidence remasking: the k most confident masked positions (first k in the order).
    return first(p.priority, p.masked, k)


first_hitting.knob, first_hitting.order = None, 'uniform'   # never stuck: the order is only nominal
steps.knob, steps.order = (1, math.inf), 'uniform'
threshold.knob = (0.0, 1.0)
entropy_bound.knob, entropy_bound.order = (0.0, math.inf), 'entropy'
tokens_per_call.knob = (1, math.inf)
RULES = {'first_hitting': first_hitting, 'steps': steps, 'threshold': threshold,
         'entropy_bound': entropy_bound, 'tokens_per_call': tokens_per_call}

# --- Speculative sampling: several exact tokens per call ---------------------------
#
# First-hitting's law (positions in a uniformly random order drawn once per block, each token from p_theta
# given what is revealed) costs one call per token, but the calls can be checked ahead: speculative
# sampling (Leviathan et al. 2023; for any-order models ASSD, Guo & Ermon 2025). A round drafts the next
# n <= k positions in the order, tokens from q = the previous round's output (stale, which is allowed: any
# q keeps the law exact), and runs in one call the n + 1 verify rows v_j = the block with the first j
# drafts written in. Draft j is kept with probability min(1, p/q), p = p_theta(. | v_j) at its position
# (temperature and top_p apply to both); the first one rejected is redrawn from (p - q)+, and when all are
# kept v_n gives one more token: 1..n + 1 tokens per call, each drawn from first-hitting's law. With
# order='entropy' it is the lowest-entropy-first law (entropy_bound, gamma = 0) made parallel: a round
# also stops where the position v_j's lowest entropy picks is not the drafted one.

def speculative(p, k):
    v = getattr(p, 'verify', None)        # the round's drafts and verify rows (draft_rows)
    if v is None:                         # no place to keep drafts (denoise_step without drafts): one token
        return first(p.priority, p.masked, 1)
    G, bs = p.masked.shape
    rows = torch.arange(G, device=p.masked.device)
    masked, alive = p.masked.clone(), p.masked.any(-1)
    tokens = torch.zeros(G, bs, dtype=torch.long, device=rows.device)
    ends = torch.zeros(G, dtype=torch.long, device=rows.device)   # the verify row each row's round ends in
    for j in range(v.h.shape[1]):
        pj = p if j == 0 else p.version(v.h[:, j], None if v.c is None else v.c[:, j], masked & alive[:, None])
        at = first(pj.priority, masked & alive[:, None], 1).double().argmax(-1)     # (G,) the order's pick
        r = alive.nonzero().flatten()
        target = pj.law((r, at[r]))                                                # (N, V) p at the pick
        d, q = v.tokens[r, j], v.q[r, j]                                           # (N,), (N, V)
        drafted = (j < v.n[r]) & (at[r] == v.pos[r, j])
        p_d, q_d = target.gather(-1, d[:, None])[:, 0], q.gather(-1, d[:, None])[:, 0]
        keep = drafted & (v.u_accept[r, at[r]] * q_d < p_d)                 # probability min(1, p/q)
        residual = torch.where(drafted[:, None], (target - q).clamp(min=0), target)
        tokens[r, at[r]] = torch.where(keep, d, sample_categorical(residual, p._u[r, at[r]]))
        masked[r, at[r]] = False
        ends[r] = j
        alive[r] = keep
    p.tokens, p.source = tokens, v.h[rows, ends]         # the last valid verify row drafts the next round
    return p.masked & ~masked


speculative.knob, speculative.order, speculative.orders = (0, math.inf), 'uniform', ('uniform', 'entropy')
speculative.drafts = True
RULES['speculative'] = speculative


def draft_rows(model, xb, masked, uniform, sampling, c, drafts, generator):
    """A round's drafts and verify rows for the speculative rows. drafts (B, bs, D): the hidden states of
    each row's last kept verify row, the draft source (zeros: none yet in this block). Returns the rows x
    (B, m, bs), their conditioning c (B * m, cond_dim) or None, and for each row: n (B,) drafts at
    positions pos (B, m) in the order, their tokens (B, m) and laws q (B, m, V) (column j < n), and the
    accept draws u_accept (B, bs); m = 1 for all when no row drafts yet; None when no row speculates."""
    B, bs = masked.shape
    V, device = model.config.vocab_size, xb.device
    n = torch.zeros(B, dtype=torch.long, device=device)
    speculating = [(order, slice(None) if rows is None else rows)
                   for (name, order), rows in sampling.groups.items() if getattr(RULES[name], 'drafts', False)]
    if not speculating:
        return None                   # no row drafts: one version of each block, as for any rule
    for _, idx in speculating:        # at most k drafts, and at least one position left for the last row
        k = sampling.knob[idx].long().clamp(max=bs)
        n[idx] = torch.minimum(k, masked[idx].sum(-1) - 1).clamp(min=0) * drafts[idx].flatten(1).any(-1)
    m = int(n.max()) + 1
    pos, tokens = (torch.zeros(B, m, dtype=torch.long, device=device) for _ in range(2))
    q = torch.zeros(B, m, V, dtype=torch.float64, device=device)
    u_accept = torch.zeros(B, bs, dtype=torch.float64, device=device)
    if m == 1:
        return SimpleNamespace(x=xb[:, None], c=c, pos=pos, tokens=tokens, q=q, n=n, u_accept=u_accept)
    u_draft, u_accept = rand((B, 2, bs), generator, device, n > 0).unbind(1)
    for order, idx in speculating:
        rows = torch.arange(B, device=device)[idx]
        # The source's own order picks the drafted positions (its entropies for order='entropy').
        src = Proposal(model, drafts[idx], None if c is None else c[idx], masked[idx] & (n[idx] > 0)[:, None],
                       uniform[idx], u_draft[idx], sampling, rows, order)
        ranked = src.priority.masked_fill(~src.masked, -math.inf).argsort(-1, descending=True)[:, :m]
        pos[idx] = ranked
        r, j = (torch.arange(m, device=device) < n[idx, None]).nonzero(as_tuple=True)
        q_idx = torch.zeros(len(rows), m, V, dtype=torch.float64, device=device)
        q_idx[r, j] = src.law((r, ranked[r, j]))
        q[idx] = q_idx
    r, j = (torch.arange(m, device=device) < n[:, None]).nonzero(as_tuple=True)
    tokens[r, j] = sample_categorical(q[r, j], u_draft[r, pos[r, j]])
    x = xb[:, None].repeat(1, m, 1)                         # v_j: the block with drafts 0..j-1 written in
    for i in range(1, m):
        x[:, i] = x[:, i - 1]
        r = (n >= i).nonzero().flatten()
        x[r, i, pos[r, i - 1]] = tokens[r, i - 1]
    revealed = torch.minimum(torch.arange(m, device=device), n[:, None])             # (B, m)
    c = model.cond(((masked.sum(-1, keepdim=True) - revealed) / bs).flatten(), B * m)
    return SimpleNamespace(x=x, c=c, pos=pos, tokens=tokens, q=q, n=n, u_accept=u_accept)

# --- Drawing tokens ----------------------------------------------------------

NUCLEUS_RULES = ('standard', 'bd3lms')


def nucleus(probs, top_p, rule='standard'):
    """Nucleus filtering of probs (..., V). 'standard': keep the smallest set of most likely tokens whose
    mass reaches top_p. 'bd3lms': keep tokens while the cumulative mass stays <= top_p, i.e. drop the token
    that crosses it (bd3lms' rule). Both keep the most likely token. top_p: a number, or a tensor
    broadcastable to probs[..., :1] (one value per row); rows with top_p = 1 are returned unchanged."""
    if bool((torch.as_tensor(top_p) >= 1.0).all()):
        return probs
    sorted_p, order = probs.sort(dim=-1, descending=True)
    mass, total = sorted_p.cumsum(-1), top_p * sorted_p.sum(-1, keepdim=True)
    keep_sorted = (mass - sorted_p) < total if rule == 'standard' else mass <= total
    keep_sorted[..., 0] = True
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    cut = probs * keep
    return torch.where(torch.as_tensor(top_p, device=probs.device) >= 1, probs, cut / cut.sum(-1, keepdim=True))


def rand(shape, generator, device, rows=None):
    """U[0, 1) float64 draws of `shape` = (B, ...). generator: one torch.Generator for the batch, or a list
    of B, one per row, so that a row's draws never depend on which other rows share the batch (a server
    batches requests that each carry a seed). With a list only `rows` (B,) bool draw; the others get
    zeros and their generators do not advance."""
    if not isinstance(generator, (list, tuple)):
        return torch.rand(shape, generator=generator, device=device, dtype=torch.float64)
    out = torch.zeros(shape, device=device, dtype=torch.float64)
    for r in (range(shape[0]) if rows is None else rows.nonzero().flatten().tolist()):
        out[r] = torch.rand(shape[1:], generator=generator[r], device=device, dtype=torch.float64)
    return out


def sample_categorical(probs, u):
    """Inverse-CDF draws from probs (..., V) with uniforms u (...): reproducible on any device."""
    cdf = probs.cumsum(-1)
    return torch.searchsorted(cdf, u[..., None] * cdf[..., -1:]).clamp(max=probs.shape[-1] - 1).squeeze(-1)


def unigram_entropy(tokens):
    """Entropy (nats) of the token frequencies in `tokens`: bd3lms' degeneracy measure."""
    _, counts = torch.unique(torch.as_tensor(tokens), return_counts=True)
    p = counts.double() / counts.sum()
    return float(-(p * p.log()).sum())


def per_row(name, value, B, device, dtype=torch.float64, ok=lambda v: True, what=''):
    """One value for every row, or one per row (a list or (B,) tensor) -> a (B,) tensor; one-line errors."""
    values = value.tolist() if isinstance(value, torch.Tensor) else value
    values = list(values) if isinstance(values, (list, tuple)) else [values]
    kinds = int if dtype == torch.long else (int, float)
    if len(values) not in (1, B) or not all(isinstance(v, kinds) and not isinstance(v, bool) for v in values):
        raise ValueError(f'{name} must be one value or one per row ({B} rows) of type {dtype}, got {value!r}')
    if not all(ok(v) for v in values):
        raise ValueError(f'{name} must be {what}, got {value!r}')
    return torch.tensor(values, dtype=dtype, device=device).expand(B).clone()


class Sampling:
    """How one generate call samples, checked once: each row's unmasking rule, knob and order, temperature
    and top_p (what a row draws never depends on its batch mates). rule/order: a name, or one per row."""

    def __init__(self, B, device, rule='first_hitting', knob=None, order=None, temperature=1.0, top_p=1.0,
                 nucleus='standard'):
        names = [rule] * B if isinstance(rule, str) else list(rule)
        orders = [order] * B if order is None or isinstance(order, str) else list(order)
        knobs = [knob] * B if not isinstance(knob, (list, tuple, torch.Tensor)) else list(knob)
        if not len(names) == len(orders) == len(knobs) == B:
            raise ValueError(f'rule, knob and order take one value or one per row ({B} rows)')
        self.groups = {}                        # (rule, order) -> the rows that use them
        for r, (name, o, k) in enumerate(zip(names, orders, knobs)):
            fn = RULES.get(name)
            if fn is None:
                raise ValueError(f'rule must be one of {sorted(RULES)} (bd3lm.RULES), got {name!r}')
            o = o or getattr(fn, 'order', 'confidence')
            if o not in getattr(fn, 'orders', ORDERS):
                raise ValueError(f'order must be one of {getattr(fn, "orders", ORDERS)} for rule {name!r}, got {o!r}')
            knobs[r] = check_knob(name, k)
            self.groups.setdefault((name, o), []).append(r)
        self.knob = torch.tensor(knobs, dtype=torch.float64, device=device)
        self.groups = {key: None if len(rows) == B else torch.tensor(rows, device=device)
                       for key, rows in self.groups.items()}
        self.temperature = per_row('temperature', temperature, B, device, ok=lambda v: v >= 0, what='>= 0 (0 = greedy)')
        self.top_p = per_row('top_p', top_p, B, device, ok=lambda v: 0 < v <= 1, what='in (0, 1]')
        if nucleus not in NUCLEUS_RULES:
            raise ValueError(f'nucleus must be one of {NUCLEUS_RULES}, got {nucleus!r}')
        self.nucleus = nucleus
        # Decided once, not per model call: which of temperature, greedy rows and nucleus are in play.
        self.greedy = self.temperature == 0
        self.any_greedy, self.any_scaled = bool(self.greedy.any()), bool((self.temperature != 1).any())
        self.any_nucleus = bool((self.top_p < 1).any())

    def probs(self, logits, rows):
        """The law a token is drawn from, float64 (N, V): the row's temperature (0 = greedy) and nucleus.
        logits: (N, V) float64 with the mask at -inf; rows: (N,) their rows."""
        if self.any_scaled:
            temperature = self.temperature[rows]
            logits = logits / torch.where(temperature == 0, 1.0, temperature)[:, None]
        probs = logits.softmax(-1)
        if self.any_greedy:  # temperature 0: all mass on the most likely token
            one_hot = F.one_hot(logits.argmax(-1), logits.shape[-1]).double()
            probs = torch.where(self.greedy[rows][:, None], one_hot, probs)
        return nucleus(probs, self.top_p[rows][:, None], self.nucleus) if self.any_nucleus else probs


def check_knob(rule, knob):
    """The knob of `rule` as a float (0.0 where none is given to a rule that may go without); a one-line
    error when it is out of the rule's range."""
    spec = getattr(RULES[rule], 'knob', ...)
    if spec is None or (spec is ... and knob is None):
        if knob is not None:
            raise ValueError(f'knob: rule {rule!r} takes no knob, got {knob!r}')
        return 0.0
    low, high = (-math.inf, math.inf) if spec is ... else spec
    integer = isinstance(low, int)
    ok = isinstance(knob, int if integer else (int, float)) and not isinstance(knob, bool) and low <= knob <= high
    if not ok:                                   # NaN fails low <= knob too
        raise ValueError(f'knob: rule {rule!r} needs a knob that is {"an integer" if integer else "a number"} in '
                         f'[{low}, {high}], got {knob!r}')
    return float(knob)


class Proposal:
    """What one model call proposes for a batch of blocks: the fields an unmasking rule reads.

      masked      (B, bs) bool     positions still masked
      uniform     (B, bs)          i.i.d. U[0, 1), drawn once per block: a uniformly random order
      probs       (B, bs, V)       p_theta at each position (temperature 1, before nucleus; float64)
      confidence  (B, bs)          p_theta of the token proposed there (drawn with the row's temperature/top_p)
      entropy     (B, bs)          entropy of p_theta there
      priority    (B, bs)          the call's order as a score, higher first

    The last four are computed on first use, at masked positions only: a rule that reads none of them
    (first-hitting) projects only the positions it reveals to the vocabulary."""

    def __init__(self, model, h, c, masked, uniform, u_token, sampling, rows, order):
        self.masked, self.uniform, self.order = masked, uniform, order
        self._model, self._h, self._c, self._u, self._sampling, self._rows = model, h, c, u_token, sampling, rows

    def _logits(self, where):
        # p_theta's logits (N, V) in float64 at the positions `where`, the mask token excluded (SUBS)
        c = None if self._c is None else self._c[where[0]]
        logits = self._model.output_layer(self._h[where], c).double()
        logits[:, self._model.config.mask_id] = -math.inf
        return logits

    def law(self, where, logits=None):
        """The law (N, V) a token is drawn from at `where`: the row's temperature and top_p, float64."""
        logits = self._logits(where) if logits is None else logits
        return self._sampling.probs(logits, self._rows[where[0]])

    def version(self, h, c, masked):
        """The proposal of another version of these blocks (a speculative verify row): same rows, order
        and draws, hidden states h (B, bs, D), still masked where `masked`."""
        return Proposal(self._model, h, c, masked, self.uniform, self._u, self._sampling, self._rows, self.order)

    def _draw(self, where, logits):
        # the proposed tokens (N,) at `where`, each from its own uniform, with the row's temperature/top_p
        return sample_categorical(self.law(where, logits), self._u[where])

    @functools.cached_property
    def _at_masked(self):
        where = self.masked.nonzero(as_tuple=True)
        logits = self._logits(where)
        return where, logits, self._draw(where, logits), logits.log_softmax(-1)

    def _full(self, values, fill=0.0):
        out = torch.full(self.masked.shape, fill, dtype=values.dtype, device=values.device)
        out[self._at_masked[0]] = values
        return out

    @functools.cached_property
    def probs(self):
        where, _, _, log_p = self._at_masked
        out = torch.zeros(self.masked.shape + log_p.shape[-1:], dtype=log_p.dtype, device=log_p.device)
        out[where] = log_p.exp()
        return out

    @functools.cached_property
    def tokens(self):
        return self._full(self._at_masked[2], 0)

    @functools.cached_property
    def confidence(self):
        _, _, token, log_p = self._at_masked
        return self._full(log_p.gather(-1, token[:, None]).squeeze(-1).exp())

    @functools.cached_property
    def entropy(self):
        log_p = self._at_masked[3]
        return self._full(-(log_p.exp() * log_p.nan_to_num(neginf=0.0)).sum(-1))

    @functools.cached_property
    def priority(self):
        return {'uniform': lambda: self.uniform, 'confidence': lambda: self.confidence,
                'entropy': lambda: -self.entropy}[self.order]()

    def tokens_at(self, reveal):
        """The proposed tokens (B, bs), valid where `reveal`: all of them if a rule already drew them, else
        only the revealed positions are projected (the same tokens: each position has its own uniform)."""
        if 'tokens' in self.__dict__ or '_at_masked' in self.__dict__:
            return self.tokens
        where = reveal.nonzero(as_tuple=True)
        out = torch.zeros(reveal.shape, dtype=torch.long, device=reveal.device)
        out[where] = self._draw(where, self._logits(where))
        return out


def denoise_step(model, xb, masked, uniform, sampling, hidden, generator, drafts=None):
    """One denoising call for a batch of blocks (Alg. 2, inner loop): run the model, let each row's rule
    choose what to reveal, write the proposed tokens there. xb (B, bs) tokens and masked (B, bs) are
    updated in place; uniform (B, bs) is the block's random order. hidden(xb, c) runs the model on the
    blocks (with or without a cache) -> (B, bs, D), or on (B, m, bs) versions of them -> (B, m, bs, D).
    drafts (B, bs, D): the speculative rows' draft sources, kept between calls (zeros at a block's start;
    None: they draft nothing). Returns (B,) the rows each row ran (0: it did not draw; 1 + its drafts)."""
    B = xb.shape[0]
    drawing = masked.any(-1)
    # A time-conditioned model is told the masked fraction of its block.
    c = model.cond(masked.sum(-1) / masked.shape[-1], B)
    u_token = rand(masked.shape, generator, xb.device, drawing)                      # (B, bs)
    v = None if drafts is None else draft_rows(model, xb, masked, uniform, sampling, c, drafts, generator)
    m = 1 if v is None else v.x.shape[1]
    h = hidden(xb, c)[:, None] if m == 1 else hidden(v.x, v.c)                       # (B, m, bs, D)
    reveal = torch.zeros_like(masked)
    for (name, order), rows in sampling.groups.items():
        idx = slice(None) if rows is None else rows
        all_rows = torch.arange(B, device=xb.device)[idx]
        p = Proposal(model, h[idx, 0], None if c is None else c[idx], masked[idx], uniform[idx], u_token[idx],
                     sampling, all_rows, order)
        if v is not None and getattr(RULES[name], 'drafts', False):
            p.verify = SimpleNamespace(h=h[idx], c=None if v.c is None else v.c.view(B, m, -1)[idx],
                                       **{f: getattr(v, f)[idx] for f in ('pos', 'tokens', 'q', 'n', 'u_accept')})
        r = RULES[name](p, sampling.knob[idx]) & p.masked
        # The sampler guarantees progress: a row that revealed nothing reveals its first in the order.
        r |= first(p.priority, p.masked, (~r.any(-1) & p.masked.any(-1)).long())
        reveal[idx] = r
        xb[idx] = torch.where(r, p.tokens_at(r), xb[idx])
        if hasattr(p, 'source'):
            drafts[idx] = p.source.to(drafts.dtype)
    masked &= ~reveal
    return drawing.long() * (1 if v is None else 1 + v.n)


@torch.no_grad()
def prefill(model, x, cache):
    """Write the complete blocks of x (B, T) into the cache as clean prefix, one pass per block."""
    bs = model.config.block_size
    c = model.cond(torch.zeros(x.shape[0]), x.shape[0])         # clean: t = 0
    for lo in range(0, x.shape[1] // bs * bs, bs):
        model.hidden(x[:, lo:lo + bs], c, torch.arange(lo, lo + bs, device=x.device), cache)
        cache.commit()
    return x.shape[1] // bs


def block_pass(model, x, lo, cache):
    """hidden(xb, c) for the block of x (B, T) at lo: one cached pass, or, without a cache, the pass over
    the block's receptive field under the banded mask (n_layers windows back: exact, and affordable for
    long uncached generation)."""
    bs, window, device = model.config.block_size, model.config.model_length, x.device
    if cache is not None:
        return lambda xb, c: model.hidden(xb, c, torch.arange(lo, lo + bs, device=device), cache)
    start = max(0, lo - model.config.n_layers * (window - bs))

    def uncached(xb, c):                 # xb (B, bs), or (B, m, bs) versions of the block
        head = x[:, start:lo] if xb.dim() == 2 else x[:, None, start:lo].expand(-1, xb.shape[1], -1)
        return model.hidden(torch.cat([head, xb], -1), c, torch.arange(start, lo + bs, device=device))[..., -bs:, :]
    return uncached


@torch.no_grad()
def generate(model, idx, max_new_tokens, rule='first_hitting', knob=None, order=None, temperature=1.0, top_p=1.0,
             nucleus='standard', kv_cache=True, generator=None, stop_at_eos=False, stop_entropy=None, eos_id=None,
             on_block=None, return_stats=False):
    """idx: (B, P) prompt ids (P >= 1, usually starting with BOS). Returns (B, P + max(max_new_tokens)).

    rule: the unmasking rule's name in RULES ('first_hitting', 'steps', 'threshold', 'entropy_bound',
    'tokens_per_call', or one you register), knob its setting (K, tau, gamma, k), order the order it
    ranks positions in ('uniform', 'confidence', 'entropy'; default the rule's own). Each of rule, knob,
    order, max_new_tokens, temperature and top_p: one value, or one per row (a list or (B,) tensor).
    temperature divides the logits (0 = greedy); top_p: nucleus sampling (nucleus='bd3lms' drops the token
    that crosses top_p, as bd3lms does). generator: a torch.Generator, or a list of B (one per row; see
    rand). stop_at_eos: a row stops after the first EOS it generates. stop_entropy: bd3lms' variable-length
    rule (the paper uses 4): checked after each block once a row holds more than 256 tokens; when the
    unigram entropy of its last 256 tokens is below this, the row stops and those 256 tokens are dropped
    (never the prompt). Rows stop independently; positions after a row's end hold eos_id (default
    config.eos_id). on_block(x, end): called after each finished block with the tokens so far.
    return_stats: also return {'nfe': model calls for the batch, 'row_nfe': (B,) each row's own calls
    (what it would pay alone), 'rows_x_tokens': (B,) the block rows x tokens its calls ran (a speculative
    call runs 1 + drafts rows), 'forward_passes': all passes (cache writes too), 'lengths': (B,)}."""
    cfg = model.config
    bs, window, mask_id = cfg.block_size, cfg.model_length, cfg.mask_id
    eos_id = cfg.eos_id if eos_id is None else eos_id
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.shape[1] == 0:
        raise ValueError(f'idx must be a (B, P) tensor of prompt ids with P >= 1 (start it with the model\'s '
                         f'BOS, config.bos_id = {cfg.bos_id})')
    B, P = idx.shape
    device = model.vocab_embed.embedding.device
    sampling = Sampling(B, device, rule, knob, order, temperature, top_p, nucleus)
    new_tokens = per_row('max_new_tokens', max_new_tokens, B, device, torch.long, lambda v: v > 0,
                         'a positive integer (or one per row)')
    if isinstance(generator, (list, tuple)) and len(generator) != B:
        raise ValueError(f'a list of generators needs one per row: {len(generator)} for {B} rows')
    if int(idx.min()) < 0 or int(idx.max()) >= cfg.vocab_size:
        raise ValueError(f'prompt ids must lie in [0, {cfg.vocab_size - 1}]')
    if (idx == mask_id).any():
        raise ValueError(f'the prompt contains the mask id {mask_id}; prompts must be clean tokens')
    total = P + int(new_tokens.max())
    if bs == window and total > window:
        # With one block per context, a block past the context would see no earlier block at all.
        raise ValueError(f'this model is MDLM-like (block_size = model_length = {window}), so it generates at '
                         f'most {window} tokens including the prompt ({P} + {total - P} asked); '
                         f'lower max_new_tokens, or use a BD3-LM with smaller blocks for longer text')

    n_blocks = -(-total // bs)
    x = torch.full((B, n_blocks * bs), mask_id, dtype=torch.long, device=device)
    x[:, :P] = idx.to(device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    lengths = P + new_tokens                                                  # (B,) each row's end
    stats = {'nfe': 0, 'forward_passes': 0, 'row_nfe': torch.zeros(B, dtype=torch.long, device=device),
             'rows_x_tokens': torch.zeros(B, dtype=torch.long, device=device)}
    drafts = None                                                           # speculative rows' draft sources
    if any(getattr(RULES[name], 'drafts', False) for name, _ in sampling.groups):
        drafts = torch.zeros(B, bs, cfg.hidden_dim, device=device, dtype=model.vocab_embed.embedding.dtype)
    cache = None
    if kv_cache:
        cache = KVCache(cfg.n_layers, B, cfg.n_heads, window, cfg.hidden_dim // cfg.n_heads, bs, device,
                        model.vocab_embed.embedding.dtype)
        stats['forward_passes'] += prefill(model, idx.to(device), cache)   # the prompt's complete blocks
    clean = torch.zeros(B, device=device)
    for lo in range(P // bs * bs, n_blocks * bs, bs):                      # Alg. 2: blocks left to right
        xb = x[:, lo:lo + bs]                                                # a view: updated in place
        masked = (xb == mask_id) & (torch.arange(lo, lo + bs, device=device) < lengths[:, None]) & ~done[:, None]
        u_block = rand(masked.shape, generator, device, masked.any(-1))    # the block's random order
        hidden = block_pass(model, x, lo, cache)
        if drafts is not None:
            drafts.zero_()
        while masked.any():                                  # denoise the block, one model call at a time
            rows = denoise_step(model, xb, masked, u_block, sampling, hidden, generator, drafts)
            stats['row_nfe'] += rows > 0
            stats['rows_x_tokens'] += rows * bs
            stats['nfe'] += 1
        if cache is not None:                                # the finished block joins the clean prefix
            hidden(xb, model.cond(clean, B))
            cache.commit()
        end = min(lo + bs, total)
        apply_stops(x, done, lengths, P, end, stop_at_eos, stop_entropy, eos_id)
        if on_block is not None:
            on_block(x[:, :end], end)
        if done.all():
            break
    stats['forward_passes'] += stats['nfe'] + (cache.n_committed - P // bs if cache is not None else 0)
    x = x[:, :total]
    x[x == mask_id] = eos_id  # only possible in rows that stopped early
    stats['lengths'] = lengths
    return (x, stats) if return_stats else x


BD3LM.generate = generate   # model.generate(idx, max_new_tokens, ...): the same function


def apply_stops(x, done, lengths, P, end, stop_at_eos, stop_entropy, eos_id):
    """After a block: rows that generated an EOS (stop_at_eos) or whose last 256 tokens are degenerate
    (unigram entropy below stop_entropy; the window is dropped, and this cut wins over an EOS) stop."""
    for r in range(x.shape[0]):
        if done[r]:
            continue
        cut = None
        if stop_at_eos:
            generated = (x[r, P:end] == eos_id).nonzero()
            if len(generated):
                cut = P + int(generated[0]) + 1
        if stop_entropy is not None and end > 256 and unigram_entropy(x[r, end - 256:end]) < stop_entropy:
            cut = max(P, end - 256)
        if cut is not None:
            done[r] = True
            lengths[r] = cut
            x[r, cut:] = eos_id
