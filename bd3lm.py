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
  7. sampler        Alg. 2, plainly: block by block over a KV cache; unmasking rules registered in RULES
  8. checks         every sampler argument checked once, before anything runs
Beside it, bd3lm_tools/ holds the library: the fast sampler and serving engine, speculative decoding, file formats,
tokenizers, the lm-eval model and the SGLang plugin.
"""

import functools
import math
import warnings
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
        """Fill in the default special tokens and check every field; one ValueError lists every problem.
        Types are strict: "false" is not False, 50257.0 is not a token id."""
        problems = []
        for f in fields(self):
            v = getattr(self, f.name)
            kind = (int, float) if f.type is float else f.type          # an int is a float, a bool is no number
            ok = isinstance(v, kind) and (f.type is bool or not isinstance(v, bool))
            if not (ok or v is None and f.name.endswith('_id')):
                article = 'an' if f.type is int else 'a'
                problems.append(f'{f.name} must be {article} {f.type.__name__}, got {v!r} ({type(v).__name__})')
        if not problems:
            sizes = ('block_size', 'vocab_size', 'model_length', 'hidden_dim', 'cond_dim', 'n_layers', 'n_heads')
            problems = [f'{name} must be a positive integer, got {getattr(self, name)}'
                        for name in sizes if getattr(self, name) <= 0]
        if not problems:
            self.mask_id = self.vocab_size - 1 if self.mask_id is None else self.mask_id
            self.bos_id = max(self.vocab_size - 2, 0) if self.bos_id is None else self.bos_id
            self.eos_id = max(self.vocab_size - 2, 0) if self.eos_id is None else self.eos_id
            if self.model_length % self.block_size:
                problems.append(f'model_length={self.model_length} is not a multiple of block_size={self.block_size}; '
                                f'choose a block_size that divides it')
            if self.hidden_dim % self.n_heads or (self.hidden_dim // self.n_heads) % 2:
                problems.append(f'hidden_dim={self.hidden_dim} must split into {self.n_heads} heads of even size')
            problems += [f'{name}={getattr(self, name)} must be a token id below vocab_size={self.vocab_size}'
                         for name in ('mask_id', 'bos_id', 'eos_id') if not 0 <= getattr(self, name) < self.vocab_size]
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
        # positions: (T,), or (B, T) one row each (a server's rows sit at different places in their texts).
        # Angles in float64: positions far beyond the training context keep their precision.
        angles = positions.double()[..., None] * self.inv_freq.double()   # (..., T, head_dim/2)
        angles = torch.cat([angles, angles], dim=-1)                        # (..., T, head_dim)
        return angles.cos().float(), angles.sin().float()


def apply_rotary(x, cos, sin):
    # x: (B, H, T, D); cos/sin: (T, D), or (B, T, D) for per-row positions
    cos, sin = (cos[:, None], sin[:, None]) if cos.dim() == 3 else (cos, sin)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of the noise level sigma followed by an MLP (as in DiT)."""

    def __init__(self, cond_dim, frequency_dim=256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

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

    def forward(self, x, mod, rotary, attn):
        # x: (B, T, D); mod: self.adaLN_modulation(c), (B, 1, 6 D), or None; rotary: (cos, sin), each (T, head_dim)
        # or (B, T, head_dim); attn(q, k, v) -> (B, H, T, head_dim): the attention (masked SDPA, a KV cache's, SGLang's)
        if self.adaln:
            shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=-1)
            h = modulate(self.norm1(x), shift1, scale1)
        else:
            gate1 = gate2 = 1.0
            h = self.norm1(x)
        B, T, D = h.shape
        qkv = self.attn_qkv(h).view(B, T, 3, self.n_heads, D // self.n_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, T, head_dim)
        q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        y = attn(q, k, v).transpose(1, 2).reshape(B, T, D)
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
# time t, and the NELBO weight -alpha_t' / (1 - alpha_t) on a masked token's -log p (Eq. 10). Registered in
# SCHEDULES, it is a name for model.nelbo(schedule=...) and train.py --noise_schedule.

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
    """The forward process: each token but position 0 (BOS) becomes mask_id with probability move_chance.
    interval=(beta, omega) resamples blocks until each block's masked fraction lies in [beta, omega] (Sec. 5.2;
    a bound at the end of the schedule, beta = 1e-3 or omega = 1, is not enforced). After max_tries redraws, a
    block still out of range keeps a random subset of the nearest reachable count, so the loop always ends."""
    u = torch.rand(x0.shape, device=x0.device, generator=generator)
    masked = u <= move_chance
    if interval is not None and block_size > 1:
        (beta, omega), (B, L) = interval, x0.shape
        lo = 0 if beta <= EPS else math.ceil(beta * block_size - 1e-9)
        hi = block_size if omega >= 1 else math.floor(omega * block_size + 1e-9)
        if lo > hi:
            raise ValueError(f'no block of {block_size} tokens can have a masked fraction in [{beta}, {omega}]; '
                             f'widen the interval or turn resampling off')
        for _ in range(max_tries):
            counts = masked.view(B, -1, block_size).sum(-1)
            bad = ((counts < lo) | (counts > hi)).repeat_interleave(block_size, dim=1)
            if not bad.any():
                break
            u = torch.rand(x0.shape, device=x0.device, generator=generator)
            masked = torch.where(bad, u <= move_chance, masked)
        else:   # keep the k = clamp(count, lo, hi) first positions in a random order, the masked ones first
            masked = masked.view(B, -1, block_size)
            priority = torch.rand(masked.shape, device=x0.device, generator=generator) + masked.float()
            rank = priority.argsort(-1, descending=True).argsort(-1)
            masked = (rank < masked.sum(-1, keepdim=True).clamp(lo, hi)).view(B, L)
    masked[:, 0] = False
    return torch.where(masked, mask_id, x0)

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
        self.vocab = None  # WordPiece models: the token strings in id order (saved as vocab.txt)

    def use_flex_attention(self, enabled=True):
        """Switch the masked passes to FlexAttention (block-sparse; compiled on CUDA, unfused on CPU)."""
        self.attn_backend = 'flex' if enabled else 'sdpa'
        return self

    # --- the two passes ----------------------------------------------------

    def forward(self, xt, x0=None, t=None):
        """model(xt, x0): the training pass over cat([xt, x0]) under the block-diffusion mask -> logits (B, L, V)
        of the xt half. model(x): the inference pass, clean blocks then a (partly) masked one, under the
        block-causal mask -> logits (B, T, V). t: (B,) move chance 1 - alpha_t (= t, loglinear), read only with
        time_conditioning."""
        self._check_tokens(xt, 'xt' if x0 is not None else 'x')
        c = self.cond(t, xt.shape[0])
        if x0 is not None:
            self._check_tokens(x0, 'x0', like=xt)
        h = self.hidden(xt, c) if x0 is None else self.train_hidden(xt, x0, c)
        return self.output_layer(h, None if c is None else c[:, None])

    def cond(self, t, batch_size):
        """The adaLN conditioning c (B, cond_dim) for noise level t (B,), a move chance in [0, 1], or None
        when the model has no adaLN. Without time conditioning (the released models) t is ignored and c
        is a learned constant: the model is called at sigma = 0."""
        if not self.config.adaln:
            return None
        device = self.sampling_eps_min.device
        if t is None or not self.config.time_conditioning:
            return F.silu(self.sigma_map(torch.zeros(batch_size, device=device)))
        return F.silu(self.sigma_map(sigma_from_move_chance(torch.as_tensor(t, device=device).float())))

    def modulations(self, c):
        """Each layer's adaLN shifts, scales and gates of c (B, cond_dim): a list of (B, 1, 6 D), or of None."""
        return [None if c is None else block.adaLN_modulation(c[:, None]) for block in self.blocks]

    def train_hidden(self, xt, x0, c):
        """Hidden states (B, L, D) of xt's half of the training pass. Both halves take positions 0..L-1:
        xt[i] and x0[i] are the same position of the same sequence."""
        L = xt.shape[1]
        x = torch.cat([xt, x0], dim=1)                              # (B, 2L)
        positions = torch.arange(L, device=x.device).repeat(2)      # (2L,)
        return self.transformer(x, positions, c, self.masked_attention(self.attention_mask('train', L)))[:, :L]

    def hidden(self, x, c, positions=None):
        """The inference pass without a cache -> hidden states (B, T, D): x (B, T) under the block-causal mask,
        banded to a window of model_length (the cached pass: KVCache, section 7)."""
        if positions is None:
            positions = torch.arange(x.shape[1], device=x.device)
        return self.transformer(x, positions, c, self.masked_attention(self.attention_mask('infer', x.shape[1])))

    def transformer(self, x, positions, c, attend, mods=None):
        """The transformer body, which every pass runs: embedding, rotary at `positions` ((T,), or (B, T) one
        row each), every layer. attend(layer, q, k, v) -> (B, H, T, head_dim) is each layer's attention: a
        masked SDPA (masked_attention), a KV cache's, or a server's paged attention. mods: the layers'
        modulations of c, where the caller computed them already (modulations)."""
        h = self.vocab_embed(x)                                     # (B, T, D)
        rotary = self.rotary_emb(positions)
        for i, (block, mod) in enumerate(zip(self.blocks, self.modulations(c) if mods is None else mods)):
            h = block(h, mod, rotary, functools.partial(attend, i))
        return h

    def masked_attention(self, mask):
        """attend(layer, q, k, v) under mask = (dense bool mask, FlexAttention BlockMask or None)."""
        if self.attn_backend == 'flex':
            return lambda layer, q, k, v: flex_attention(q, k, v, block_mask=mask[1])
        return lambda layer, q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask[0])

    def attention_mask(self, kind, L):
        """(dense bool mask, FlexAttention BlockMask or None) of the 'train' pass over 2L positions
        (train_mask_mod) or the 'infer' pass over L (block_causal_mask_mod)."""
        cfg, device, flex = self.config, self.vocab_embed.embedding.device, self.attn_backend == 'flex'
        if kind == 'train':
            return build_masks(self.train_mask_mod, L, cfg.block_size, cfg.model_length, device, flex)
        # A shorter sequence's inference mask is the top-left corner of a longer one's: with SDPA one mask per
        # power of 2 serves every length (FlexAttention's BlockMask is built for its exact length).
        n = L if flex else max(cfg.model_length, 1 << (L - 1).bit_length())
        dense, block_mask = build_masks(None, n, cfg.block_size, cfg.model_length, device, flex)
        return dense[:L, :L], block_mask

    def _check_tokens(self, x, name, like=None):
        if not isinstance(x, torch.Tensor) or x.dtype not in (torch.int32, torch.int64) or x.dim() != 2:
            raise ValueError(f'{name} must be a 2-D integer tensor of token ids (B, L), got '
                             f'{getattr(x, "dtype", type(x))} with shape {tuple(getattr(x, "shape", ()))}')
        if like is not None and x.shape != like.shape:
            raise ValueError(f'xt and x0 must have the same shape, got {tuple(like.shape)} and {tuple(x.shape)}')
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
        x0: (B, L) clean tokens; position 0 (BOS) is never masked, never scored.
        t:  noise level, (B, L) constant within blocks, or (B, L // block_size). If None, one per block
            from U[interval]: by default the full [1e-3, 1], a bound on the NLL; training passes its clipped
            interval (Sec. 5.2), model.clipped_interval(), lower-variance but biased.
        xt: (B, L) noisy tokens; drawn from q(xt | x0, t) if None.
        reduction: 'mean' (over all positions but the first) or 'none' ((B, L) per-token terms).
        Under torch.compile pass t and xt (forward_process): draws and input checks stay outside the graph."""
        if reduction not in ('mean', 'none'):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        eager = not torch.compiler.is_compiling()
        if eager:
            self._check_tokens(x0, 'x0')
            if (x0 == self.config.mask_id).any():
                raise ValueError(f'x0 contains the mask id {self.config.mask_id}: clean data must not hold the mask '
                                 f'token (prepare the data with this model\'s tokenizer)')
            if xt is not None:
                self._check_tokens(xt, 'xt', like=x0)
        if t is None and xt is not None:
            raise ValueError('xt was given without its noise level t: pass both, or neither')
        B, L = x0.shape
        interval = FULL_INTERVAL if interval is None else interval
        if t is None:
            t, xt = self.forward_process(x0, interval, schedule, antithetic, resample, generator)
        t = self._expand_t(t, B, L, check=eager)
        move_chance, weight = noise_schedule(t, schedule)
        if xt is None:
            xt = q_xt(x0, move_chance, self.config.mask_id, self.config.block_size, interval if resample else None,
                      generator=generator)
        c = self.cond(move_chance[:, 0], B)                            # (B, cond_dim) or None
        h = self.train_hidden(xt, x0, c)                               # (B, L, D)
        # SUBS: unmasked tokens are copied, so they contribute exactly 0 and need no logits.
        masked = xt == self.config.mask_id
        masked[:, 0] = False
        if eager:   # only the masked positions (about a quarter of the 2L) go through the vocabulary projection
            rows = masked.nonzero(as_tuple=True)
            logits = self.output_layer(h[rows], None if c is None else c[rows[0]])   # (N, V)
            nll = -subs_log_probs(logits, self.config.mask_id).gather(-1, x0[rows][:, None]).squeeze(-1)  # (N,)
            per_token = torch.zeros(B, L, device=x0.device, dtype=nll.dtype)
            per_token[rows] = weight[rows].to(nll.dtype) * nll
        else:       # compiled: every position, the unmasked ones zeroed: fixed shapes, one graph, same numbers
            logits = self.output_layer(h, None if c is None else c[:, None])           # (B, L, V)
            nll = -subs_log_probs(logits, self.config.mask_id).gather(-1, x0[..., None]).squeeze(-1)
            per_token = torch.where(masked, weight.to(nll.dtype) * nll, torch.zeros_like(nll))
        return per_token if reduction == 'none' else per_token[:, 1:].sum() / (B * (L - 1))

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
        if t.shape == (B, L // bs):
            t = t.repeat_interleave(bs, dim=1)
        if t.shape != (B, L):
            raise ValueError(f't must have shape (B, L) = {B, L} or (B, L // block_size) = {B, L // bs}, '
                             f'got {tuple(t.shape)}')
        if check and not ((t > 0) & (t <= 1)).all():  # also catches NaN
            raise ValueError('t must lie in (0, 1] (no NaN): the loss weight 1/t is infinite at t = 0')
        return t

    # --- loading and saving -------------------------------------------------------

    @classmethod
    def from_pretrained(cls, src, device='cpu'):
        """src: a folder with config.json + model.safetensors (released layout, or a train.py out_dir),
        a Hugging Face hub id such as 'kuleshov-group/bd3lm-owt-block_size16', or a bd3lms Lightning
        .ckpt (its EMA weights are used)."""
        from bd3lm_tools import checkpoints
        return checkpoints.load(src, device, cls)

    def save_pretrained(self, out_dir):
        """Write config.json + model.safetensors in the released layout (keys prefixed 'backbone.')."""
        from bd3lm_tools import checkpoints
        checkpoints.save(self, out_dir)


def subs_log_probs(logits, mask_id):
    """SUBS parameterization (Sahoo et al. 2024): the model never predicts the mask token; returns
    log p over the vocabulary in float32. (Carry-over of unmasked tokens is handled by the caller.)"""
    logits = logits.float()
    logits[..., mask_id] = -float('inf')
    return logits.log_softmax(dim=-1)


@functools.lru_cache(maxsize=16)   # masks depend on shapes only: built once, reused by every step
def build_masks(train_mask_mod, L, block_size, window, device, flex):
    """(dense, BlockMask or None): the training mask over 2L positions (train_mask_mod given), or (None) the
    inference mask over L."""
    if train_mask_mod is None:
        n, mask_mod = L, lambda b, h, q, kv: block_causal_mask_mod(q, kv, block_size, window)
    else:
        n, mask_mod = 2 * L, lambda b, h, q, kv: train_mask_mod(q, kv, L, block_size)
    idx = torch.arange(n, device=device)
    dense = mask_mod(None, None, idx[:, None], idx[None, :])
    if not flex:
        return dense, None
    from torch.nn.attention.flex_attention import create_block_mask
    return dense, create_block_mask(mask_mod, None, None, n, n, device=device)


def flex_attention(q, k, v, block_mask):
    """FlexAttention: compiled on CUDA (once), the unfused reference implementation on CPU."""
    from torch.nn.attention.flex_attention import flex_attention as flex
    if q.is_cuda:
        return compiled_flex_attention()(q, k, v, block_mask=block_mask)
    with warnings.catch_warnings():       # "called without torch.compile": on CPU that is the point
        warnings.simplefilter('ignore')
        return flex(q, k, v, block_mask=block_mask)


@functools.cache
def compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention as flex
    return torch.compile(flex, dynamic=False)

# -----------------------------------------------------------------------------
# 6. The clipped-schedule search

@torch.no_grad()
def nelbo_variance(model, batches, interval, schedule='loglinear', resample=False, generator=None):
    """The quantity Sec. 5.2 minimises: the variance, over all (sequence, block) pairs, of the per-block NELBO
    estimate with t ~ U[interval] (resample=True if training resamples), averaged over batches."""
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
    """The data-driven clipped schedule: the candidate [beta, omega] that minimises the variance of the NELBO
    estimate on `batches`. Returns (best, {interval: variance}). Block size 1 has two candidates: the full
    interval and t = 1, where every token is masked with weight 1: the exact autoregressive loss, with no
    noise variance, so AR-like models train as AR models once the search has run."""
    if not batches:
        raise ValueError('the clipped-schedule search needs at least one batch of validation data')
    candidates = [FULL_INTERVAL, (1.0, 1.0)] if model.config.block_size == 1 else clip_intervals(widths, delta)
    variances = {iv: nelbo_variance(model, batches, iv, schedule, resample, generator) for iv in candidates}
    return min(variances, key=variances.get), variances

# -----------------------------------------------------------------------------
# 7. Sampler (Alg. 2)
#
# Blocks left to right, at multiples of block_size from position 0. A block starts masked (but for prompt
# tokens it holds); each model call runs it over the clean prefix and proposes a token at every masked
# position; an unmasking rule reveals some, never to change again. The finished block goes into the KV cache
# at t = 0. Past model_length a block sees the last model_length tokens. (With time conditioning the uncached
# call conditions the prefix on the block's t; the released models have none.) bd3lm_tools/engine.py gives
# the same tokens faster: one pass per call, a ring cache, a compiled call, per-row settings, speculative
# decoding, continuous batching.

@torch.no_grad()
def generate(model, idx, max_new_tokens, rule='first_hitting', knob=None, order=None, temperature=1.0,
             top_p=1.0, nucleus='standard', kv_cache=True, generator=None, stop_at_eos=False,
             stop_entropy=None, eos_id=None, on_block=None):
    """idx (B, P): prompt ids, starting with config.bos_id -> (B, P + max_new_tokens) ids (docs/sampling.md).
    rule: a name in RULES, knob its setting, order how it ranks positions (default: the rule's own);
    temperature (0 = greedy), top_p (nucleus='bd3lms' drops the token crossing top_p); one setting for the
    batch. stop_at_eos / stop_entropy end a row early, filled with eos_id (apply_stops). on_block(x, end) is
    called after each block with the tokens so far."""
    s = check_generate(model.config, idx, max_new_tokens, rule, knob, order, temperature, top_p, nucleus,
                       generator, stop_entropy, eos_id)
    bs, mask_id, (B, P) = model.config.block_size, model.config.mask_id, idx.shape
    total, device = P + s.new, model.vocab_embed.embedding.device
    s.knob = torch.full((B,), s.knob, dtype=torch.float64, device=device)     # rules take a knob per row
    x = torch.full((B, -(-total // bs) * bs), mask_id, dtype=torch.long, device=device)
    x[:, :P] = idx
    lengths, done = torch.full((B,), total, device=device), torch.zeros(B, dtype=torch.bool, device=device)
    cache = KVCache(model) if kv_cache else None
    if cache is not None and P >= bs:
        cache.write(model, x[:, :P // bs * bs], 0)                   # the prompt's complete blocks
    for lo in range(P // bs * bs, total, bs):                        # Alg. 2: blocks left to right
        masked = (x[:, lo:lo + bs] == mask_id) & (torch.arange(lo, lo + bs, device=device) < total) & ~done[:, None]
        if not masked.any():
            break
        x[:, lo:lo + bs] = denoise_block(model, x, lo, masked, cache, s, generator)
        end = min(lo + bs, total)
        apply_stops(x, done, lengths, P, end, stop_at_eos, stop_entropy, s.eos_id)
        if on_block is not None:
            on_block(x[:, :end], end)
        if done.all():
            break
        if cache is not None:
            cache.write(model, x[:, lo:lo + bs], lo)                 # the finished block, clean: t = 0
    x = x[:, :total]
    x[x == mask_id] = s.eos_id                                       # past a row's own end
    return x


BD3LM.generate = generate   # model.generate(idx, max_new_tokens, ...): the same function


def denoise_block(model, x, lo, masked, cache, s, generator):
    """Alg. 2's inner loop: denoise the block at lo..lo + block_size of x (B, T), masked (B, bs) where it is
    still masked, one model call at a time until nothing is; returns its tokens (B, bs)."""
    xb = x[:, lo:lo + model.config.block_size].clone()
    uniform = torch.rand(masked.shape, generator=generator, device=x.device, dtype=torch.float64)  # random order
    while masked.any():
        u = torch.rand(masked.shape, generator=generator, device=x.device, dtype=torch.float64)   # this call's draws
        p = Proposal(block_logits(model, x, xb, lo, masked, cache), masked, uniform, u, s)
        reveal = s.rule(p, s.knob) & masked
        reveal |= p.leading & ~reveal.any(-1, keepdim=True)         # progress: a row that revealed nothing
        xb = torch.where(reveal, p.tokens, xb)
        masked = masked & ~reveal
    return xb


def block_logits(model, x, xb, lo, masked, cache):
    """One model call: logits (B, bs, V) of the noisy block xb at positions lo.. given the clean prefix of x,
    from the KV cache, or without one from the prefix's tokens (its receptive field: n_layers windows)."""
    cfg, bs = model.config, model.config.block_size
    c = model.cond(masked.sum(-1) / bs, len(xb))                     # t: the block's masked fraction (if used)
    if cache is not None:
        h = model.transformer(xb, torch.arange(lo, lo + bs, device=x.device), c, cache.attend)
    else:
        start = max(0, lo - cfg.n_layers * (cfg.model_length - bs))
        positions = torch.arange(start, lo + bs, device=x.device)
        h = model.hidden(torch.cat([x[:, start:lo], xb], 1), c, positions)[:, -bs:]
    return model.output_layer(h, None if c is None else c[:, None])


class KVCache:
    """The keys and values of the clean prefix, per layer (B, H, T, head_dim): the last model_length -
    block_size positions, all that a block may see (the sliding window). Grows by concatenation."""

    def __init__(self, model):
        self.k, self.v = [None] * model.config.n_layers, [None] * model.config.n_layers
        self.keep = model.config.model_length - model.config.block_size

    def attend(self, layer, q, k, v, mask=None, store=False):
        """Attention of new positions to the cached prefix and to each other (all of them: a noisy block sees
        itself both ways; or under mask). store=True: the new keys join the cache."""
        if self.k[layer] is not None:
            k, v = torch.cat([self.k[layer], k], 2), torch.cat([self.v[layer], v], 2)
        if store:
            start = max(k.shape[2] - self.keep, 0)                  # the window: what later blocks may see
            self.k[layer], self.v[layer] = k[:, :, start:], v[:, :, start:]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def write(self, model, x, lo):
        """Run clean blocks x (B, T) at positions lo.. at t = 0 and keep their keys: each block sees the blocks
        before it in the window (block_causal_mask_mod over absolute positions)."""
        n = 0 if self.k[0] is None else self.k[0].shape[2]
        positions = torch.arange(lo, lo + x.shape[1], device=x.device)
        kv_positions = torch.arange(lo - n, lo + x.shape[1], device=x.device)     # the cached prefix, then x
        mask = block_causal_mask_mod(positions[:, None], kv_positions[None], model.config.block_size,
                                     model.config.model_length)
        model.transformer(x, positions, model.cond(None, len(x)), functools.partial(self.attend, mask=mask, store=True))


class Proposal:
    """What one model call proposes for a batch of blocks: all an unmasking rule reads. (B, bs) unless noted.
      masked      bool      positions still masked
      uniform               U[0, 1), drawn once per block: a uniformly random order of its positions
      probs       (B, bs, V) p_theta at temperature 1, float64 (the mask token excluded: SUBS)
      law         (B, bs, V) what tokens are drawn from: p_theta at the temperature (0: all mass on the
                            most likely token), then nucleus filtering to top_p
      tokens                the token proposed at each position, drawn from law with this call's uniforms
      confidence, entropy   probs of the proposed token; the entropy of probs
      priority              the call's order (order=, default the rule's) as a score, higher first: uniform,
                            confidence, or -entropy (lowest entropy first)
      leading     bool      the first masked position in that order
    The engine computes the same fields only where a rule reads them (docs/sampling.md)."""

    def __init__(self, logits, masked, uniform, u, s):
        logits = logits.double()
        logits[..., s.mask_id] = -math.inf
        log_p = logits.log_softmax(-1)
        self.masked, self.uniform, self.probs = masked, uniform, log_p.exp()
        if s.temperature == 0:                                    # greedy: all mass on the most likely token
            self.law = F.one_hot(logits.argmax(-1), logits.shape[-1]).double()
        else:
            self.law = (logits / s.temperature).softmax(-1)
        if s.top_p < 1:
            self.law = nucleus(self.law, s.top_p, s.nucleus)
        self.tokens = sample_categorical(self.law, u)
        self.confidence = self.probs.gather(-1, self.tokens[..., None]).squeeze(-1)
        self.entropy = -(self.probs * log_p.nan_to_num(neginf=0.0)).sum(-1)
        self.priority = {'uniform': uniform, 'confidence': self.confidence, 'entropy': -self.entropy}[s.order]
        top = self.priority.masked_fill(~masked, -math.inf).argmax(-1, keepdim=True)
        self.leading = masked & torch.zeros_like(masked).scatter_(-1, top, True)      # first masked in the order

# --- Unmasking rules ------------------------------------------------------------
#
# rule(p, knob) -> reveal: p the call's Proposal, knob (B,) float64 the rows' setting, reveal (B, bs) bool the
# masked positions to reveal (their tokens: p.tokens). A row that reveals nothing reveals p.leading. Register
# a rule in RULES; optional attributes: rule.knob = (low, high), its range (an int low: integer knobs; None:
# the rule takes no knob), rule.order (its default order), rule.orders (the orders it accepts).


def first_hitting(p, knob):
    # One masked position per call, uniformly at random (Zheng et al. 2024): the first in the block's random
    # order. The exact sampler of the model's own law, one call per token.
    return p.leading


def steps(p, K):
    # K ancestral steps on the loglinear grid t = 1, 1 - 1/K, ..., 1/K: each position's reveal step is uniform
    # over the K steps, independently, drawn once per block as floor(u K); a call jumps to the next step that
    # reveals anything (steps that reveal nothing change nothing), so a block costs at most block_size calls.
    step = (p.uniform * K[:, None]).floor()
    return p.masked & (step == step.masked_fill(~p.masked, math.inf).amin(-1, keepdim=True))


def threshold(p, tau):
    # Fast-dLLM (Wu et al. 2025): every masked position whose confidence is >= tau (none: p.leading, by default
    # the most confident).
    return p.masked & (p.confidence >= tau[:, None])


def entropy_bound(p, gamma):
    # The EB-sampler (Ben-Hamu et al. 2025): the longest prefix of the masked positions in the order (by default
    # lowest entropy first) whose entropies sum to at most gamma plus the largest of them: sum H - max H <= gamma.
    ranked = p.priority.masked_fill(~p.masked, -math.inf).argsort(-1, descending=True)
    h = p.entropy.gather(-1, ranked).masked_fill(~p.masked.gather(-1, ranked), math.inf)
    return first(p.priority, p.masked, (h.cumsum(-1) - h.cummax(-1).values <= gamma[:, None]).sum(-1))


def tokens_per_call(p, k):
    # LLaDA's low-confidence remasking: the k most confident masked positions (the first k in the order).
    return first(p.priority, p.masked, k)


def first(priority, masked, n):
    """The n (B,) highest-priority masked positions of each row, as a (B, bs) bool."""
    rank = priority.masked_fill(~masked, -math.inf).argsort(-1, descending=True).argsort(-1)
    n = torch.as_tensor(n, device=masked.device).clamp(max=masked.shape[-1]).long()   # a knob of 1e30 too
    return masked & (rank < n.view(-1, 1))


first_hitting.knob, first_hitting.order, first_hitting.orders = None, 'uniform', ('uniform',)
steps.knob, steps.order = (1, math.inf), 'uniform'
threshold.knob = (0.0, 1.0)
entropy_bound.knob, entropy_bound.order = (0.0, math.inf), 'entropy'
tokens_per_call.knob = (1, math.inf)
RULES = {'first_hitting': first_hitting, 'steps': steps, 'threshold': threshold,
         'entropy_bound': entropy_bound, 'tokens_per_call': tokens_per_call}
ORDERS = ('uniform', 'confidence', 'entropy')

# --- Drawing tokens and stopping ------------------------------------------------


def nucleus(probs, top_p, rule='standard'):
    """Nucleus filtering of probs (..., V) to top_p (a number, or a tensor broadcastable to probs[..., :1]).
    'standard': keep the smallest set of most likely tokens whose mass reaches top_p; 'bd3lms': keep tokens
    while the cumulative mass stays <= top_p (drop the one crossing it). Both keep the most likely token."""
    sorted_p, order = probs.sort(dim=-1, descending=True)
    mass, total = sorted_p.cumsum(-1), top_p * sorted_p.sum(-1, keepdim=True)
    keep_sorted = (mass - sorted_p) < total if rule == 'standard' else mass <= total
    keep_sorted[..., 0] = True
    cut = probs * torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return cut / cut.sum(-1, keepdim=True)


def sample_categorical(probs, u):
    """Inverse-CDF draws from probs (..., V) with uniforms u (...): reproducible on any device."""
    cdf = probs.cumsum(-1)
    return (cdf < u[..., None] * cdf[..., -1:]).sum(-1)      # the first token whose cdf reaches u * total


def apply_stops(x, done, lengths, P, end, stop_at_eos, stop_entropy, eos_id):
    """After a block, up to `end`: with stop_at_eos a row ends after its first EOS; with stop_entropy
    (bd3lms' rule) a row past 256 tokens whose last 256 have a unigram entropy below it ends without them
    (this cut wins over an EOS): its length is cut, its tail set to eos_id. done: ended, or at its length."""
    if not stop_at_eos and stop_entropy is None:                # no stop rule: a row ends at its length
        done |= lengths <= end
        return
    for r in (~done).nonzero().flatten().tolist():
        row_end = min(end, int(lengths[r]))                     # a row is checked up to its own end
        eos = (x[r, P:row_end] == eos_id).nonzero() if stop_at_eos else []
        cut = P + int(eos[0]) + 1 if len(eos) else None
        if stop_entropy is not None and row_end > 256 and unigram_entropy(x[r, row_end - 256:row_end]) < stop_entropy:
            cut = max(P, row_end - 256)
        if cut is not None:
            lengths[r] = cut
            x[r, cut:] = eos_id
        done[r] = cut is not None or row_end == lengths[r]    # stopped, or at its length


def unigram_entropy(tokens):
    """Entropy (nats) of the token frequencies in `tokens`: bd3lms' degeneracy measure."""
    _, counts = torch.unique(torch.as_tensor(tokens), return_counts=True)
    p = counts.double() / counts.sum()
    return float(-(p * p.log()).sum())

# -----------------------------------------------------------------------------
# 8. Checks: every argument of generate checked before anything runs, each with a one-line error

def check_generate(config, idx, max_new_tokens, rule='first_hitting', knob=None, order=None, temperature=1.0,
                   top_p=1.0, nucleus='standard', generator=None, stop_entropy=None, eos_id=None, rules=None):
    """generate's arguments, for a model of this config -> its settings: rule (the function), order, knob,
    temperature, top_p, nucleus, and with a config mask_id, eos_id, new (max_new_tokens). config None: the
    settings alone (a script checks its flags before it loads a model). A 0-d tensor counts as the number it
    holds. rules: the registry to look rule up in (default RULES; the engine adds its drafting rules)."""
    cfg, rules = config, RULES if rules is None else rules
    scalar = lambda v: v.item() if isinstance(v, torch.Tensor) and v.dim() == 0 else v
    number = lambda v, kind=(int, float): isinstance(v, kind) and not isinstance(v, bool) and math.isfinite(v)
    fn = rules.get(rule) if isinstance(rule, str) else None
    if fn is None:
        raise ValueError(f'rule must be one of {sorted(rules)}, got {rule!r}')
    order = order or getattr(fn, 'order', 'confidence')
    if order not in getattr(fn, 'orders', ORDERS):
        raise ValueError(f'order must be one of {getattr(fn, "orders", ORDERS)} for rule {rule!r}, got {order!r}')
    knob = scalar(knob)
    spec = getattr(fn, 'knob', None if knob is None else (-math.inf, math.inf))   # no range declared: any number
    if spec is None:
        if knob is not None:
            raise ValueError(f'knob: rule {rule!r} takes no knob, got {knob!r}')
        knob = 0.0
    else:
        low, high = spec
        integer = isinstance(low, int)
        if not ((number(knob, int if integer else (int, float)) or (knob == math.inf and not integer))
                and low <= knob <= high):
            raise ValueError(f'knob: rule {rule!r} needs a knob that is {"an integer" if integer else "a number"} '
                             f'in [{low}, {high}], got {knob!r}')
    temperature, top_p = scalar(temperature), scalar(top_p)
    if not (number(temperature) and (temperature == 0 or temperature >= 1e-6)):
        raise ValueError(f'temperature must be 0 (greedy) or a finite number >= 1e-6, got {temperature!r}')
    if not (number(top_p) and 0 < top_p <= 1):
        raise ValueError(f'top_p must be a number in (0, 1], got {top_p!r}')
    if nucleus not in ('standard', 'bd3lms'):
        raise ValueError(f"nucleus must be one of ('standard', 'bd3lms'), got {nucleus!r}")
    stop_entropy = scalar(stop_entropy)
    if stop_entropy is not None and not number(stop_entropy):
        raise ValueError(f'stop_entropy must be a number (nats; the paper uses 4) or None, got {stop_entropy!r}')
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f'generator must be a torch.Generator or None, got {type(generator).__name__}')
    s = SimpleNamespace(rule=fn, order=order, knob=float(knob), temperature=float(temperature), top_p=float(top_p),
                        nucleus=nucleus)
    if cfg is None:
        return s
    if not (isinstance(idx, torch.Tensor) and idx.dim() == 2 and idx.numel() > 0 and not idx.is_floating_point()
            and not idx.is_complex() and idx.dtype != torch.bool):
        raise ValueError(f"idx must be a (B, P) integer tensor of prompt ids with B, P >= 1 (start it with the "
                         f"model's BOS, config.bos_id = {cfg.bos_id}), got {getattr(idx, 'dtype', type(idx))} of "
                         f"shape {tuple(getattr(idx, 'shape', ()))}")
    if int(idx.min()) < 0 or int(idx.max()) >= cfg.vocab_size or (idx == cfg.mask_id).any():
        raise ValueError(f'prompt ids must lie in [0, {cfg.vocab_size - 1}] and not be the mask id {cfg.mask_id}')
    new, P = scalar(max_new_tokens), idx.shape[1]
    if not (number(new, int) and new > 0):
        raise ValueError(f'max_new_tokens must be a positive integer, got {max_new_tokens!r}')
    if cfg.block_size == cfg.model_length and P + new > cfg.model_length:
        raise ValueError(f'this model is MDLM-like (block_size = model_length = {cfg.model_length}): it generates at '
                         f'most {cfg.model_length} tokens with the prompt ({P} + {new} asked); lower '
                         f'max_new_tokens, or use a BD3-LM with smaller blocks for longer text')
    eos_id = cfg.eos_id if eos_id is None else scalar(eos_id)
    if not (number(eos_id, int) and 0 <= eos_id < cfg.vocab_size and eos_id != cfg.mask_id):
        raise ValueError(f'eos_id must be a token id in [0, {cfg.vocab_size - 1}] other than the mask id '
                         f'{cfg.mask_id}, got {eos_id!r}')
    s.mask_id, s.eos_id, s.new = cfg.mask_id, eos_id, new
    return s
