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
  8. checks         every sampler setting checked once, before anything runs
Beside it: speculative.py (lossless speculative decoding, the rules that draft), checkpoints.py (file
formats), tokenizer.py (GPT-2 BPE, BERT WordPiece), engine.py (the per-row batching that serve.py runs).
"""

import math
from dataclasses import dataclass, fields

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
        self.validate()

    def validate(self):
        """Check every field (strict types, ranges, special tokens inside the vocabulary) and fill in the
        default special tokens; one ValueError that lists every problem."""
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

    def forward(self, x, mod, rotary, attn, layer=0, cache=None):
        # x: (B, T, D); mod: self.adaLN_modulation(c), (B, 1, 6 D), or None; rotary: (cos, sin), each (T, head_dim)
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
        if cache is not None:
            # The cache writes what it planned (KVCache.plan) and returns the keys this pass attends to, with
            # a mask where rows see different parts of their ring (None: every key returned is valid).
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
        self._masks, self._constant_c = {}, (None, {})
        self._cond_weights = [p for n, p in self.named_parameters() if 'sigma_map' in n or 'adaLN' in n]  # see cond
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
        device = self.sampling_eps_min.device
        if t is not None and self.config.time_conditioning:
            return F.silu(self.sigma_map(sigma_from_move_chance(torch.as_tensor(t, device=device).float())))
        if torch.is_grad_enabled() or torch.compiler.is_compiling() or torch.is_autocast_enabled(device.type):
            return F.silu(self.sigma_map(torch.zeros(batch_size, device=device)))
        # Without gradients or autocast (sampling asks every call) the constant and its modulations are made once
        # per batch size and version of the weights: an optimizer step, load_state_dict, .to(), makes them anew.
        key = tuple((p.data_ptr(), p._version, p.dtype) for p in self._cond_weights)
        if self._constant_c[0] != key:
            self._constant_c = key, {}
        if batch_size not in self._constant_c[1]:
            c = F.silu(self.sigma_map(torch.zeros(batch_size, device=device)))
            self._constant_c[1][batch_size] = c, [block.adaLN_modulation(c[:, None]) for block in self.blocks]
        return self._constant_c[1][batch_size][0]

    def train_hidden(self, xt, x0, c):
        """Hidden states (B, L, D) of xt's half of the training pass. Both halves use positions
        0..L-1: xt[i] and x0[i] are the same position of the same sequence."""
        L = xt.shape[1]
        x = torch.cat([xt, x0], dim=1)                              # (B, 2L)
        positions = torch.arange(L, device=x.device).repeat(2)      # (2L,)
        return self.transformer(x, positions, self.attention_mask('train', L), c)[:, :L]

    def hidden(self, x, c, positions=None):
        """Inference pass without a cache -> hidden states (B, T, D): x (B, T) under the block-causal mask,
        banded to a sliding window of model_length when x is longer. (The cached passes are in section 7:
        block_pass and prefill.)"""
        if positions is None:
            positions = torch.arange(x.shape[1], device=x.device)
        return self.transformer(x, positions, self.attention_mask('infer', x.shape[1]), c)

    def transformer(self, x, positions, mask, c, cache=None):
        """The transformer body: embedding, rotary, every layer (every pass, cached or not, runs it)."""
        h = self.vocab_embed(x)                                     # (B, T, D)
        rotary = self.rotary_emb(positions)
        attn = self._attention(mask)
        constant, mods = (None, None) if torch.compiler.is_compiling() else self._constant_c[1].get(len(h), (None, None))
        if c is None or c is not constant:          # each layer's adaLN shifts, scales, gates (cond's when constant)
            mods = [None if c is None else block.adaLN_modulation(c[:, None]) for block in self.blocks]
        for i, (block, mod) in enumerate(zip(self.blocks, mods)):
            h = block(h, mod, rotary, attn, layer=i, cache=cache)
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
        # Masks are built once and reused. The inference mask of a shorter sequence is the top-left corner of
        # a longer one, so with SDPA one mask serves every length (the uncached sampler asks for a new one).
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


def subs_log_probs(logits, mask_id):
    """SUBS parameterization (Sahoo et al. 2024): the model never predicts the mask token; returns
    log p over the vocabulary in float32. (Carry-over of unmasked tokens is handled by the caller.)"""
    logits = logits.float()
    logits[..., mask_id] = -float('inf')
    return logits.log_softmax(dim=-1)


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
# Block by block, left to right: a block starts masked (after any prompt tokens it holds) and is denoised
# by model calls; after each call an unmasking rule says which masked positions reveal their proposed
# token, never to change again. One forward pass per call: a block's first call also writes the finished
# block into the KV cache (at t = 0), and one pass writes a prompt's complete blocks. Blocks are aligned at
# 0; past model_length every block sees a sliding window of the last model_length tokens, cached or not.
# Read top-down: generate (the blocks) -> denoise_step (one call) -> Proposal (what a call proposes; law,
# what a token is drawn from) -> the rules -> the KV cache and its passes -> drawing. Checks: section 8.

@torch.no_grad()
def generate(model, idx, max_new_tokens, rule='first_hitting', knob=None, order=None, temperature=1.0, top_p=1.0,
             nucleus='standard', kv_cache=True, generator=None, stop_at_eos=False, stop_entropy=None, eos_id=None,
             on_block=None, return_stats=False):
    """idx: (B, P) prompt ids (P >= 1, usually BOS first) -> (B, P + max(max_new_tokens)). docs/sampling.md.

    rule: an unmasking rule's name in RULES, knob its setting, order the order it ranks positions in
    ('uniform', 'confidence', 'entropy'; default the rule's own). rule, knob, order, max_new_tokens,
    temperature (0 = greedy) and top_p (nucleus; nucleus='bd3lms' drops the token that crosses it): one
    value, or one per row. generator: a torch.Generator, or a list of one per row (see rand).
    stop_at_eos, stop_entropy: where a row ends early (apply_stops; the paper uses stop_entropy=4); ended
    rows hold eos_id (default config.eos_id). on_block(x, end): called after each block with the tokens so
    far. return_stats: also return {'nfe', 'row_nfe', 'rows_x_tokens', 'forward_passes', 'lengths'} (the
    batch's model calls; each row's own calls and the block rows x tokens they ran; nfe + 1 prefill pass)."""
    sampling, lengths, eos_id = check_generate(model, idx, max_new_tokens, rule, knob, order, temperature, top_p,
                                               nucleus, generator, eos_id)
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
    step = COMPILED_STEP if compiled else denoise_step
    for lo in range(P // bs * bs, x.shape[1], bs):    # Alg. 2: blocks left to right
        xb = x[:, lo:lo + bs]                         # a view: denoise_step updates it and masked in place
        masked = (xb == mask_id) & (torch.arange(lo, lo + bs, device=device) < lengths[:, None]) & ~done[:, None]
        if not masked.any():                          # every row has ended
            break
        uniform = rand(masked.shape, generator, device, masked)     # the block's random order
        while masked.any():                           # denoise the block, one model call at a time
            u_token = rand(masked.shape, generator, device, masked)  # this call's draws
            forward = block_pass(model, x, [lo] * B, cache, finished, static=compiled)
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


BD3LM.generate = generate   # model.generate(idx, max_new_tokens, ...): the same function


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
    c = model.cond(masked.sum(-1) / bs if model.config.time_conditioning else None, B)   # t: the masked fraction
    versions, c_versions, drafts, n_rows, ahead = xb[:, None], c, {}, 1, None
    if state is not None:                     # drafting rules only: their verify rows (speculative.py, imported last)
        versions, c_versions, drafts, n_rows, ahead = speculative.verify_rows(model, xb, masked, uniform, u_token,
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
      law(where)  (N, V)           the law a token is drawn from at positions `where`: the row's temperature
                                   and top_p applied to p_theta

    Computed on first use, at masked positions only (every position under torch.compile): first-hitting,
    which reads none, projects only the positions it reveals. Built from the hidden states (B, bs, D),
    u_token (each position's token uniform), c (the conditioning), the Sampling and its rows (None: all);
    a drafting rule also gets p.draft and p.versions (docs/sampling.md)."""

    def __init__(self, model, hidden, masked, uniform, u_token, sampling, rows, order, c=None):
        self.model, self.hidden, self.masked, self.uniform, self.u_token = model, hidden, masked, uniform, u_token
        self.sampling, self.rows, self.order, self.c = sampling, rows, order, c

    def law(self, where, logits=None):
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
        return nucleus(probs, s.top_p[rows][:, None], s.nucleus) if s.any_nucleus else probs

    def fill(self, reveal, xb):
        """A copy of the tokens xb (B, bs) with the proposed tokens written where `reveal`: each position's
        token is drawn from law() with its own uniform, so projecting only the revealed positions gives the
        same tokens as projecting all."""
        if '_at_masked' in self.__dict__ or torch.compiler.is_compiling():
            return torch.where(reveal, self._full(self._at_masked[2], 0), xb)
        where = reveal.nonzero(as_tuple=True)
        return xb.index_put(where, sample_categorical(self.law(where), self.u_token[where]))

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
        return where, logits.log_softmax(-1), sample_categorical(self.law(where, logits), self.u_token[where])

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

# --- Unmasking rules ------------------------------------------------------------
#
# A rule is a function rule(p, knob) -> reveal: p the call's Proposal, knob (B,) float64 the rows' setting,
# reveal (B, bs) bool the masked positions to reveal; the sampler draws their tokens from p.law, and a row
# that reveals nothing reveals its first masked position in the order (progress is the sampler's job).
# Register it in RULES (generate, sample.py --rule and serve.py then take it by name); its optional
# attributes (knob, order, orders, draft) are the rule contract in docs/sampling.md.

ORDERS = ('uniform', 'confidence', 'entropy')


def first_hitting(p, knob):
    # One masked position per call, uniformly at random (Zheng et al. 2024): the first in the block's random
    # order (p.uniform, drawn once per block). The exact sampler of the model's own law, one call per token.
    return p.leading


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
# speculative.py adds RULES['speculative'] when imported (at the end of this file).

# --- The KV cache and the passes that use it ---------------------------------------

class KVCache:
    """Keys and values of each row's clean blocks, one buffer per layer, preallocated once.

    Row r's buffer is a ring of `window` = model_length positions: position i lives at i % window. A block
    denoised alone writes its keys where it will live once clean (where the block leaving the sliding window
    was) and attends to the ring in place. A pass that also carries a finished block, verify rows or
    lookahead rows gives each pass row a copy of its ring instead, so the finished block still sees the
    oldest block of its window. Keys carry rotary at absolute positions; rows may sit at different blocks
    (engine.py). Before each pass plan() says which rows run where; update() then runs once per layer."""

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

    def update(self, layer, k, v):
        """Write the pass's keys and values (P, H, bs, head_dim) as planned; return the keys and values to
        attend to and an attention mask (None: every key returned is valid)."""
        K, V = self.k[layer], self.v[layer]
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

    def move(self, src, dst):
        """Row src's keys now live in row dst (engine.py keeps its rows in the first slots)."""
        self.k[:, dst], self.v[:, dst] = self.k[:, src], self.v[:, src]


def block_pass(model, x, starts, cache, finished=None, static=False):
    """forward(versions, c, ahead=None) for the blocks at starts (B,) (host ints) of x (B, T): versions
    (B, m, bs) of each row's block (and verify rows) -> hidden states (B, m, bs, D); with ahead (B,) (a
    drafting rule's lookahead) row r also runs its next block, masked, after its version ahead[r] (-1:
    none), returned as version m (zeros without). With a cache: one pass over the cached prefix, which also
    writes finished = (rows, tokens (K, bs)), those rows' blocks just before theirs, at t = 0; planned here
    (static: fixed shapes, for a compiled call). Without: the pass over the block's receptive field under
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
        tokens, cs = [versions.flatten(0, 1)], [c]      # c itself, no copy, where it is all: transformer knows it
        if rows:
            tokens, cs = tokens + [versions.new_full((len(rows), bs), mask_id)], cs + [c if c is None else c[after]]
        if finished is not None:
            tokens, cs = tokens + [finished[1]], cs + [c_clean]
        h = model.transformer(torch.cat(tokens), plan(m, (rows, after)) if m > 1 or rows else positions, None,
                              c if c is None or len(cs) == 1 else torch.cat(cs), cache)
        return attach(h[:B * m].unflatten(0, (B, m)), rows, h[B * m:B * m + len(rows)])
    return cached


COMPILED_STEP = None


def compile_sampler(**options):
    """Compile denoise_step for the cached calls of rules that do not draft: fullgraph, fixed shapes (one
    graph per block size and kind of call: a block's first call also carries the finished block), every
    position projected to the vocabulary. generate uses it from then on. options go to torch.compile:
    mode='reduce-overhead' captures CUDA graphs. compile_sampler(disable=True) goes back to eager."""
    global COMPILED_STEP
    COMPILED_STEP = None if options.pop('disable', False) else \
        torch.compile(denoise_step, fullgraph=True, dynamic=False, **options)


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
    cache._plan = 'prefill', row, start, keep, mask
    model.transformer(x[:, start:], torch.arange(start, T, device=x.device), None, model.cond(None, B), cache)


def apply_stops(x, done, lengths, P, end, stop_at_eos, stop_entropy, eos_id):
    """After a block, up to `end`: with stop_at_eos a row ends after its first EOS; with stop_entropy
    (bd3lms' rule) a row past 256 tokens whose last 256 have a unigram entropy below it ends without them
    (this cut wins over an EOS): its length is cut, its tail set to eos_id. done: ended, or at its length."""
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

# --- Drawing tokens ----------------------------------------------------------

NUCLEUS_RULES = ('standard', 'bd3lms')


def nucleus(probs, top_p, rule='standard'):
    """Nucleus filtering of probs (..., V). 'standard': keep the smallest set of most likely tokens whose
    mass reaches top_p. 'bd3lms': keep tokens while the cumulative mass stays <= top_p, i.e. drop the token
    that crosses it (bd3lms' rule). Both keep the most likely token. top_p: a number, or a tensor
    broadcastable to probs[..., :1] (one value per row); rows with top_p = 1 are returned unchanged."""
    if not torch.compiler.is_compiling() and bool((torch.as_tensor(top_p) >= 1.0).all()):
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
    batches requests that each carry a seed). With a list only the rows that are True somewhere in `rows`
    (B, ...) bool draw; the others get zeros and their generators do not advance."""
    if not isinstance(generator, (list, tuple)):
        return torch.rand(shape, generator=generator, device=device, dtype=torch.float64)
    out = torch.zeros(shape, device=device, dtype=torch.float64)
    rows = None if rows is None else rows.reshape(shape[0], -1).any(-1)
    for r in (range(shape[0]) if rows is None else rows.nonzero().flatten().tolist()):
        out[r] = torch.rand(shape[1:], generator=generator[r], device=device, dtype=torch.float64)
    return out


def sample_categorical(probs, u):
    """Inverse-CDF draws from probs (..., V) with uniforms u (...): reproducible on any device."""
    cdf = probs.cumsum(-1)
    return (cdf < u[..., None] * cdf[..., -1:]).sum(-1)      # the first token whose cdf reaches u * total


def unigram_entropy(tokens):
    """Entropy (nats) of the token frequencies in `tokens`: bd3lms' degeneracy measure."""
    _, counts = torch.unique(torch.as_tensor(tokens), return_counts=True)
    p = counts.double() / counts.sum()
    return float(-(p * p.log()).sum())

# -----------------------------------------------------------------------------
# 8. Argument checks: every sampler setting checked once, before anything runs, with one-line errors

class Sampling:
    """How a batch of rows samples: each row's unmasking rule, knob and order, temperature and top_p (what
    a row draws never depends on its batch mates). Each argument: one value, or one per row (B rows)."""

    def __init__(self, B, device, rule='first_hitting', knob=None, order=None, temperature=1.0, top_p=1.0,
                 nucleus='standard'):
        one_per_row = lambda v, many: list(v.tolist() if isinstance(v, torch.Tensor) else v) if isinstance(v, many) else [v] * B
        names, orders = one_per_row(rule, (list, tuple)), one_per_row(order, (list, tuple))
        knobs = one_per_row(knob, (list, tuple, torch.Tensor))
        if not len(names) == len(orders) == len(knobs) == B:
            raise ValueError(f'rule, knob and order take one value or one per row ({B} rows)')
        groups = {}                                          # (rule, order) -> the rows that use them
        for r, (name, o, k) in enumerate(zip(names, orders, knobs)):
            fn = RULES.get(name) if isinstance(name, str) else None
            if fn is None:
                raise ValueError(f'rule must be one of {sorted(RULES)} (bd3lm.RULES), got {name!r}')
            o = o or getattr(fn, 'order', 'confidence')
            if o not in getattr(fn, 'orders', ORDERS):
                raise ValueError(f'order must be one of {getattr(fn, "orders", ORDERS)} for rule {name!r}, got {o!r}')
            spec = getattr(fn, 'knob', ...)                  # ...: no range declared
            if spec is None or (spec is ... and k is None):
                if k is not None:
                    raise ValueError(f'knob: rule {name!r} takes no knob, got {k!r}')
                k = 0.0
            else:
                low, high = (-math.inf, math.inf) if spec is ... else spec
                integer = isinstance(low, int)
                if not (isinstance(k, int if integer else (int, float)) and not isinstance(k, bool) and low <= k <= high):
                    raise ValueError(f'knob: rule {name!r} needs a knob that is {"an integer" if integer else "a number"} '
                                     f'in [{low}, {high}], got {k!r}')             # NaN fails low <= k too
            knobs[r] = float(k)
            groups.setdefault((name, o), []).append(r)
        self.knob = torch.tensor(knobs, dtype=torch.float64, device=device)
        self.groups = {key: None if len(rows) == B else torch.tensor(rows, device=device) for key, rows in groups.items()}
        # (rule, order, its rows or None for all): what denoise_step loops over
        self.rules = [(RULES[name], o, rows) for (name, o), rows in self.groups.items()]
        self.drafting = any(hasattr(rule, 'draft') for rule, _, _ in self.rules)   # some row runs verify rows
        for name, value, ok, what in (('temperature', temperature, lambda v: v >= 0, '>= 0 (0 = greedy)'),
                                      ('top_p', top_p, lambda v: 0 < v <= 1, 'in (0, 1]')):
            values = one_per_row(value, (list, tuple, torch.Tensor))
            if len(values) != B or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                raise ValueError(f'{name} must be one number or one per row ({B} rows), got {value!r}')
            if not all(ok(v) for v in values):
                raise ValueError(f'{name} must be {what}, got {value!r}')
            setattr(self, name, torch.tensor(values, dtype=torch.float64, device=device))
        if nucleus not in NUCLEUS_RULES:
            raise ValueError(f'nucleus must be one of {NUCLEUS_RULES}, got {nucleus!r}')
        self.nucleus = nucleus
        # Decided once, not per model call: which of temperature, greedy rows and nucleus are in play.
        self.greedy = self.temperature == 0
        self.any_greedy, self.any_scaled = bool(self.greedy.any()), bool((self.temperature != 1).any())
        self.any_nucleus = bool((self.top_p < 1).any())


def check_generate(model, idx, max_new_tokens, rule, knob, order, temperature, top_p, nucleus, generator, eos_id):
    """generate's arguments checked: -> (Sampling, lengths (B,) each row's end, eos_id)."""
    cfg = model.config
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.shape[1] == 0 or idx.is_floating_point():
        raise ValueError(f'idx must be a (B, P) tensor of prompt ids with P >= 1 (start it with the model\'s '
                         f'BOS, config.bos_id = {cfg.bos_id})')
    B, P = idx.shape
    device = model.vocab_embed.embedding.device
    sampling = Sampling(B, device, rule, knob, order, temperature, top_p, nucleus)
    new = max_new_tokens.tolist() if isinstance(max_new_tokens, torch.Tensor) else max_new_tokens
    new = list(new) if isinstance(new, (list, tuple)) else [new] * B
    if len(new) != B or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in new):
        raise ValueError(f'max_new_tokens must be a positive integer, or one per row ({B} rows), got {max_new_tokens!r}')
    if isinstance(generator, (list, tuple)) and len(generator) != B:
        raise ValueError(f'a list of generators needs one per row: {len(generator)} for {B} rows')
    if int(idx.min()) < 0 or int(idx.max()) >= cfg.vocab_size:
        raise ValueError(f'prompt ids must lie in [0, {cfg.vocab_size - 1}]')
    if (idx == cfg.mask_id).any():
        raise ValueError(f'the prompt contains the mask id {cfg.mask_id}; prompts must be clean tokens')
    total = P + max(new)
    if cfg.block_size == cfg.model_length and total > cfg.model_length:
        # With one block per context, a block past the context would see no earlier block at all.
        raise ValueError(f'this model is MDLM-like (block_size = model_length = {cfg.model_length}), so it generates '
                         f'at most {cfg.model_length} tokens including the prompt ({P} + {total - P} asked); '
                         f'lower max_new_tokens, or use a BD3-LM with smaller blocks for longer text')
    lengths = torch.tensor([P + n for n in new], dtype=torch.long, device=device)
    return sampling, lengths, cfg.eos_id if eos_id is None else eos_id


import speculative  # noqa: E402,F401  (registers RULES['speculative']; it needs the names above)
