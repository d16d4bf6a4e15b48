"""
Block diffusion language model (BD3-LM), all of it in this single file.

Arriola et al., "Block Diffusion: Interpolating Between Autoregressive and Diffusion Language
Models", ICLR 2025 (arXiv 2503.09573). A sequence of L tokens is cut into blocks of `block_size`.
Blocks are produced left to right; inside a block, tokens come out of masked discrete diffusion.
block_size = 1 is autoregressive-like, block_size = L is MDLM.

Read top to bottom:
  1. layers         the DiT-style transformer pieces (rotary attention, adaLN blocks)
  2. config, model  BD3LMConfig and BD3LM; the training pass sees cat([xt, x0]) (length 2L)
  3. masks          the block-diffusion attention mask and the block-causal mask
  4. noise          schedules, clipped intervals, the forward (masking) process
  5. loss           the NELBO with the SUBS parameterization, and the clipped-schedule search
  6. sampler        block-by-block generation with an exact KV cache
  7. loading        from_pretrained / save_pretrained (the file formats live in checkpoints.py,
                    the tokenizers in tokenizer.py)
"""

import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# 1. Layers

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


class KVCache:
    """Keys and values of finished clean blocks, one buffer per layer, preallocated once.

    Each row's buffer holds `window` = model_length positions as a ring of window // block_size slots.
    The block being denoised writes its keys into the slot the row's next finished block will occupy;
    once the ring is full that slot is the oldest block, which is exactly the block that leaves the
    sliding window. So attention is over the row's valid slots, and nothing is ever copied. Keys are
    stored with rotary already applied at absolute positions. Rows keep their own count of finished
    blocks, so rows at different places in their text (a server's requests) share one cache; when the
    counts differ, the rows' unfilled slots are masked out.
    """

    def __init__(self, n_layers, batch_size, n_heads, window, head_dim, block_size, device, dtype):
        shape = (n_layers, batch_size, n_heads, window, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.block_size = block_size
        self.n_slots = window // block_size
        self.n_committed = torch.zeros(batch_size, dtype=torch.long)  # finished blocks written, per row (on the host)

    def commit(self, rows=None):
        """The block just passed through the model (clean) is now part of the prefix of `rows` (a (B,) bool;
        default: every row)."""
        self.n_committed[slice(None) if rows is None else rows.cpu()] += 1

    def rows(self, start, stop):
        """The cache of rows start..stop-1, sharing this one's storage and counts (a server's batch is the
        first rows of a cache allocated once; a joining request prefills its own row)."""
        view = object.__new__(KVCache)
        view.__dict__.update(self.__dict__)
        view.k, view.v = self.k[:, start:stop], self.v[:, start:stop]
        view.n_committed = self.n_committed[start:stop]
        return view

    def plan(self, device):
        """Where each row's block goes in this pass and what it may attend to, worked out once per pass on
        the host (plain ints when rows agree, so a compiled pass sees constants, not data-dependent values)."""
        bs, counts = self.block_size, self.n_committed.tolist()
        starts = [(n % self.n_slots) * bs for n in counts]
        valid = [min(n + 1, self.n_slots) * bs for n in counts]
        index = None if len(set(starts)) == 1 else (
            torch.tensor(starts, device=device)[:, None] + torch.arange(bs, device=device))          # (B, bs)
        mask = None if len(set(valid)) == 1 else (
            torch.arange(max(valid), device=device) < torch.tensor(valid, device=device)[:, None])
        self._plan = starts[0], max(valid), index, None if mask is None else mask[:, None, None, :]

    def update(self, layer, k, v):
        """Write this block's keys and values (B, H, bs, head_dim) into each row's slot (as planned for this
        pass); return the keys and values to attend to and a (B, 1, 1, n) mask, or None when every row has
        the same valid slots."""
        start, n_valid, index, mask = self._plan
        if index is None:
            self.k[layer, :, :, start:start + self.block_size] = k
            self.v[layer, :, :, start:start + self.block_size] = v
        else:
            rows = torch.arange(k.shape[0], device=k.device)[:, None]
            self.k[layer][rows, :, index] = k.transpose(1, 2)     # (B, bs, H, head_dim) at each row's slot
            self.v[layer][rows, :, index] = v.transpose(1, 2)
        return self.k[layer, :, :, :n_valid], self.v[layer, :, :, :n_valid], mask


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
# 2. Config and model

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


class BD3LM(nn.Module):
    """The DiT backbone. Parameter names follow the released checkpoints (minus their 'backbone.')."""

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

    def forward(self, xt, x0=None, sigma=None):
        """model(xt, x0): vectorized training pass over cat([xt, x0]) under the block-diffusion mask;
        returns raw logits (B, L, V) for the xt half.
        model(x): inference pass over clean blocks followed by a (partly) masked last block, under the
        block-causal mask; returns raw logits (B, T, V).
        sigma: (B,) noise level, used only when config.time_conditioning."""
        self._check_tokens(xt, 'xt' if x0 is not None else 'x')
        if x0 is None:
            return self.output_layer(self._hidden(xt, sigma), self._cond(xt, sigma, per_token=True))
        self._check_tokens(x0, 'x0')
        if x0.shape != xt.shape:
            raise ValueError(f'xt and x0 must have the same shape, got {tuple(xt.shape)} and {tuple(x0.shape)}')
        h = self._hidden_train(xt, x0, sigma)
        return self.output_layer(h, self._cond(xt, sigma, per_token=True))

    def _cond(self, x, sigma, per_token=False):
        # adaLN conditioning vector c: (B, cond_dim), or (B, 1, cond_dim) to broadcast over positions.
        # Without time conditioning sigma is 0 for every sequence (the released models), so c is a
        # learned constant. None when the model has no adaLN.
        if not self.config.adaln:
            return None
        if sigma is None or not self.config.time_conditioning:
            sigma = torch.zeros(x.shape[0], device=x.device)
        c = F.silu(self.sigma_map(sigma))
        return c[:, None] if per_token else c

    def _hidden_train(self, xt, x0, sigma):
        # Both halves use positions 0..L-1: xt[i] and x0[i] are the same position of the same sequence.
        L = xt.shape[1]
        x = torch.cat([xt, x0], dim=1)                              # (B, 2L)
        positions = torch.arange(L, device=x.device).repeat(2)      # (2L,)
        h = self._run(x, positions, self._mask('train', L), self._cond(x, sigma, per_token=True))
        return h[:, :L]                                             # (B, L, D): only xt's states are scored

    def _hidden(self, x, sigma, positions=None, cache=None):
        # Inference pass. Without a cache: block-causal mask (banded to a sliding window of model_length
        # when the sequence is longer). With a cache: x is one block attending to the cached prefix.
        if positions is None:
            positions = torch.arange(x.shape[1], device=x.device)
        if cache is not None:
            cache.plan(x.device)
        mask = None if cache is not None else self._mask('infer', x.shape[1])
        return self._run(x, positions, mask, self._cond(x, sigma, per_token=True), cache)

    def _run(self, x, positions, mask, c, cache=None):
        h = self.vocab_embed(x)                                     # (B, T, D)
        rotary = self.rotary_emb(positions)
        attn = self._attention(mask)
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

    def _mask(self, kind, L):
        # Masks are built once and reused: (dense bool, FlexAttention BlockMask or None). The inference
        # mask of a shorter sequence is the top-left corner of a longer one, so with SDPA one mask serves
        # every length (the uncached sampler asks for a new length every block).
        device = self.vocab_embed.embedding.device
        bs, window = self.config.block_size, self.config.model_length
        sliceable = kind == 'infer' and self.attn_backend == 'sdpa'
        key = (kind, device) if sliceable else (kind, L, device, self.attn_backend)
        cached = self._masks.get(key)
        if cached is None or (sliceable and cached[0].shape[0] < L):
            if kind == 'train':
                mask_mod = lambda b, h, q, kv: block_diff_mask_mod(q, kv, L, bs)
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
        sigma = sigma_from_move_chance(move_chance[:, 0]) if self.config.time_conditioning else None
        h = self._hidden_train(xt, x0, sigma)                          # (B, L, D)
        # SUBS: unmasked tokens are copied, so they contribute exactly 0 and need no logits.
        masked = xt == self.config.mask_id
        masked[:, 0] = False
        c = self._cond(x0, sigma)
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

    # --- sampling --------------------------------------------------------------

    def generate(self, idx, max_new_tokens, **kwargs):
        """Generate block by block (Alg. 2); see generate() in the sampler section for the arguments."""
        return generate(self, idx, max_new_tokens, **kwargs)

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

SCHEDULES = ('loglinear', 'square', 'square_root', 'log', 'cosine')
EPS = 1e-3                    # the smallest noise level: the loglinear weight 1/t stays finite
FULL_INTERVAL = (EPS, 1.0)    # t ~ U[1e-3, 1]: the unclipped schedule, whose NELBO bounds the NLL


def noise_schedule(t, kind='loglinear', eps=EPS):
    """Returns (move_chance, weight): the probability 1 - alpha_t that a token is masked at time t, and
    the NELBO weight -alpha_t' / (1 - alpha_t) on a masked token's -log p (Eq. 10). Loglinear is the
    default: alpha_t = 1 - t, weight 1/t. The others are the paper's ablations (Table 7)."""
    if kind == 'loglinear':
        return t, 1 / t
    if kind in ('square', 'square_root'):
        power = 2.0 if kind == 'square' else 0.5
        move_chance = (t ** power).clamp(min=eps)
        return move_chance, power * t ** (power - 1) / move_chance
    if kind == 'log':
        move_chance = torch.log1p(t) / math.log(2)
        return move_chance, 1 / (move_chance * math.log(2) * (1 + t))
    if kind == 'cosine':
        move_chance = 1 - (1 - eps) * torch.cos(t * math.pi / 2)   # >= eps, so the weight stays finite
        return move_chance, (1 - eps) * torch.sin(t * math.pi / 2) * (math.pi / 2) / move_chance
    raise ValueError(f'unknown noise schedule {kind!r}; choose one of {SCHEDULES}')


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
# 5. Loss helpers and the clipped-schedule search

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
# 6. Sampler
#
# Alg. 2, block by block: a block starts fully masked (after any prompt tokens it holds) and is denoised
# by repeated model calls; after each call an unmasking rule says which masked positions to reveal, and
# they take the token proposed for them, never to change again. The finished block is then written to
# the KV cache with one more pass (not a denoising call, NFE), and the next block starts. Blocks are
# aligned at position 0: a prompt whose length is not a multiple of block_size fills the start of its
# last block. Past model_length tokens every block attends to a sliding window of the last model_length
# tokens (whole blocks); the uncached path runs the same banded mask, so cached and uncached generation
# agree token for token (in float64; see README for float32).
#
# The unmasking rules (one per generate call; their knobs may differ per row):
#   first-hitting   (default) one masked position per call, chosen uniformly (Zheng et al. 2024): the
#                   exact sampler of the model's law; each row's clock t <- t u^(1/n_masked) only matters
#                   for time-conditioned models. Only that position is projected to the vocabulary.
#   steps=K         K ancestral steps on the loglinear grid t = 1, 1 - 1/K, ..., 1/K (never t = 0): each
#                   masked token is revealed with probability 1 - s/t. A step that reveals nothing costs
#                   no call: the previous output is reused (exact without time conditioning).
#   threshold=tau   every masked position whose confidence exceeds tau, and at least one (Fast-dLLM).
#   entropy_bound=gamma  positions in order while their summed entropy stays <= gamma, at least one
#                   (the EB-sampler, Ben-Hamu et al. 2025).
#   tokens_per_call=k    the k most confident positions (LLaDA's low-confidence remasking).
# Confidence is the model's own probability p_theta(proposed token | xt) at that position (temperature 1,
# before nucleus), entropy that of p_theta there; the proposed token itself is drawn with the row's
# temperature and top_p. `order` says which position comes first: 'uniform' (a random one: with it,
# threshold=1 and entropy_bound=0 are first-hitting's law), 'confidence' (the most confident) or
# 'entropy' (the lowest entropy). A time-conditioned model is called with t = the block's masked
# fraction under the adaptive rules.

ORDERS = ('uniform', 'confidence', 'entropy')


def _top(priority, masked, n):
    """The n (B,) highest-priority masked positions of each row, as a (B, bs) bool."""
    rank = priority.masked_fill(~masked, -math.inf).argsort(-1, descending=True).argsort(-1)
    return masked & (rank < n[:, None])


# Each rule: (confidence, entropy, masked, priority, knob) -> which positions to reveal, (B, bs) bool.
# confidence, entropy: (B, bs) at every position; masked: (B, bs) still masked; priority: (B, bs) the
# order's ranking (higher first); knob: (B,) the row's tau / gamma / k. Rows with nothing masked reveal
# nothing; the others reveal at least one position.

def reveal_threshold(confidence, entropy, masked, priority, tau):
    return (masked & (confidence > tau[:, None])) | _top(priority, masked, torch.ones_like(tau, dtype=torch.long))


def reveal_entropy_bound(confidence, entropy, masked, priority, gamma):
    ranked = priority.masked_fill(~masked, -math.inf).argsort(-1, descending=True)
    spent = entropy.gather(-1, ranked).masked_fill(~masked.gather(-1, ranked), math.inf).cumsum(-1)
    return _top(priority, masked, (spent <= gamma[:, None]).sum(-1).clamp(min=1))


def reveal_most_confident(confidence, entropy, masked, priority, k):
    return _top(confidence, masked, k.long())


ADAPTIVE_RULES = {'threshold': reveal_threshold, 'entropy_bound': reveal_entropy_bound,
                  'tokens_per_call': reveal_most_confident}


NUCLEUS_RULES = ('standard', 'bd3lms')


def _nucleus(probs, top_p, rule='standard'):
    # 'standard': keep the smallest set of most likely tokens whose mass reaches top_p. 'bd3lms': keep the
    # tokens while the cumulative mass stays <= top_p, i.e. drop the token that crosses it (bd3lms'
    # _nucleus_sample). Both always keep the most likely token. top_p: a number, or a tensor
    # broadcastable to probs[..., :1] (one value per row).
    if bool((torch.as_tensor(top_p) >= 1.0).all()):
        return probs
    sorted_p, order = probs.sort(dim=-1, descending=True)
    mass, total = sorted_p.cumsum(-1), top_p * sorted_p.sum(-1, keepdim=True)
    keep_sorted = (mass - sorted_p) < total if rule == 'standard' else mass <= total
    keep_sorted[..., 0] = True
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    cut = probs * keep
    # rows with top_p = 1 keep their exact probabilities, whatever their batch mates ask for
    return torch.where(torch.as_tensor(top_p, device=probs.device) >= 1, probs, cut / cut.sum(-1, keepdim=True))


def _uniform(shape, generator, device, dtype=torch.float32, rows=None):
    """U[0, 1) draws of `shape` = (B, ...). generator: one torch.Generator for the whole batch, or a list
    of B, one per row, so that a row's draws never depend on which other rows share the batch (a server
    batches requests that each carry their own seed). With a list only `rows` (B,) bool draw; the other
    rows get zeros and their generators are not advanced."""
    if not isinstance(generator, (list, tuple)):
        return torch.rand(shape, generator=generator, device=device, dtype=dtype)
    out = torch.zeros(shape, device=device, dtype=dtype)
    for r in (range(shape[0]) if rows is None else rows.nonzero().flatten().tolist()):
        out[r] = torch.rand(shape[1:], generator=generator[r], device=device, dtype=dtype)
    return out


def _sample_categorical(probs, u):
    # Inverse-CDF sampling in float64 with given uniforms u (probs.shape[:-1] + (1,)): device-agnostic,
    # reproducible, and the caller decides whose generator draws them.
    cdf = probs.cumsum(-1)
    return torch.searchsorted(cdf, u * cdf[..., -1:]).clamp(max=probs.shape[-1] - 1).squeeze(-1)


def _unigram_entropy(tokens):
    _, counts = torch.unique(tokens, return_counts=True)
    p = counts.double() / counts.sum()
    return float(-(p * p.log()).sum())


def _per_row(name, value, B, dtype, device, check, what):
    """One value for every row, or one per row (a list or (B,) tensor) -> a (B,) tensor; one-line errors."""
    values = value.tolist() if isinstance(value, torch.Tensor) else value
    values = list(values) if isinstance(values, (list, tuple)) else [values]
    kinds = int if dtype == torch.long else (int, float)
    if len(values) not in (1, B) or not all(isinstance(v, kinds) and not isinstance(v, bool) for v in values):
        raise ValueError(f'{name} must be one value or one per row ({B} rows) of type {dtype}, got {value!r}')
    if not all(check(v) for v in values):
        raise ValueError(f'{name} must be {what}, got {value!r}')
    return torch.tensor(values, dtype=dtype, device=device).expand(B).clone()


class Sampling:
    """How one generate call samples, checked once: the unmasking rule with its per-row knob and order,
    and each row's temperature and top_p (what a row draws never depends on its batch mates)."""

    def __init__(self, B, device, steps=None, threshold=None, entropy_bound=None, tokens_per_call=None, order=None,
                 temperature=1.0, top_p=1.0, nucleus='standard'):
        chosen = [name for name, v in (('steps', steps), ('threshold', threshold), ('entropy_bound', entropy_bound),
                                       ('tokens_per_call', tokens_per_call)) if v is not None]
        if len(chosen) > 1:
            raise ValueError(f'choose one unmasking rule, got {" and ".join(chosen)}')
        self.rule = chosen[0] if chosen else 'first_hitting'
        if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps <= 0):
            raise ValueError(f'steps must be None (first-hitting) or a positive integer, got {steps!r}')
        self.steps = steps
        knob = {'threshold': (threshold, torch.float64, lambda v: 0 <= v <= 1, 'in [0, 1] (a probability)'),
                'entropy_bound': (entropy_bound, torch.float64, lambda v: 0 <= v < math.inf, 'a number >= 0 (nats)'),
                'tokens_per_call': (tokens_per_call, torch.long, lambda v: v >= 1, 'an integer >= 1')}.get(self.rule)
        self.knob = None if knob is None else _per_row(self.rule, knob[0], B, knob[1], device, *knob[2:])
        if order is not None and self.rule not in ('threshold', 'entropy_bound'):
            raise ValueError(f'order applies to threshold and entropy_bound, not to {self.rule}')
        self.order = order or {'entropy_bound': 'entropy', 'tokens_per_call': 'confidence'}.get(self.rule, 'uniform')
        if self.order not in ORDERS:
            raise ValueError(f'order must be one of {ORDERS}, got {order!r}')
        self.temperature = _per_row('temperature', temperature, B, torch.float64, device, lambda v: v >= 0, '>= 0 (0 = greedy)')
        self.top_p = _per_row('top_p', top_p, B, torch.float64, device, lambda v: 0 < v <= 1, 'in (0, 1]')
        if nucleus not in NUCLEUS_RULES:
            raise ValueError(f'nucleus must be one of {NUCLEUS_RULES}, got {nucleus!r}')
        self.nucleus = nucleus
        # Decided once, not per model call: which of temperature, greedy rows and nucleus are in play.
        self.greedy = self.temperature == 0
        self.any_greedy, self.any_scaled = bool(self.greedy.any()), bool((self.temperature != 1).any())
        self.any_nucleus = bool((self.top_p < 1).any())

    def probs(self, logits, rows):
        """The distribution a token is drawn from at each position, float64 (..., V): the row's temperature
        (0 = greedy) and nucleus. logits: (N, ..., V) with the mask already at -inf; rows: (N,) their rows."""
        shape = (-1,) + (1,) * (logits.dim() - 1)
        if self.any_scaled:
            temperature = self.temperature[rows]
            logits = logits / torch.where(temperature == 0, 1.0, temperature).view(shape)
        probs = logits.softmax(-1)
        if self.any_greedy:  # temperature 0: all mass on the most likely token
            one_hot = F.one_hot(logits.argmax(-1), logits.shape[-1]).double()
            probs = torch.where(self.greedy[rows].view(shape), one_hot, probs)
        return _nucleus(probs, self.top_p[rows].view(shape), self.nucleus) if self.any_nucleus else probs


class BlockState:
    """Where each row stands in its current block: masked positions still to generate, the clock t,
    and, for steps=K, the step reached and the last model output (reused while nothing changes)."""

    def __init__(self, active):
        B = active.shape[0]
        self.active = active                                              # (B, bs) bool
        self.t = torch.ones(B, dtype=torch.float64, device=active.device)
        self.step = torch.zeros(B, dtype=torch.long, device=active.device)
        self.stale = torch.ones(B, dtype=torch.bool, device=active.device)  # steps=K: needs a fresh output
        self.probs = None


def denoise_step(model, xb, state, sampling, hidden, generator, row_nfe):
    """One denoising call for a batch of blocks: hidden(t) runs the model on the blocks at noise level t (B,)
    and returns their hidden states (B, bs, D); the rule's call proposes tokens and says which to reveal.
    xb: (B, bs) tokens of the blocks, updated in place, as is state. Returns whether the model was called
    (one NFE); row_nfe (B,) counts each row's own calls, what the row would pay alone."""
    call = {'first_hitting': _first_hitting_call, 'steps': _ancestral_call}.get(sampling.rule, _adaptive_call)
    drawing = state.active.any(-1)
    reveal, proposal, paid = call(model, xb, state, sampling, hidden, generator, drawing)
    row_nfe += paid
    xb.copy_(torch.where(reveal, proposal, xb))
    state.active &= ~reveal
    return paid is drawing or bool(paid.any())  # only steps=K may skip the call (no host sync otherwise)


def _logits(model, xb, h, t, rows):
    # p_theta's logits (N, ..., V) in float64 at hidden states h (N, ..., D) that belong to `rows` (N,),
    # the mask token excluded (SUBS).
    c = model._cond(xb, sigma_from_move_chance(t.float()) if model.config.time_conditioning else None)
    if c is not None:
        c = c[rows][:, None] if h.dim() == 3 else c[rows]
    logits = model.output_layer(h, c).double()
    logits[..., model.config.mask_id] = -math.inf
    return logits


def _first_hitting_call(model, xb, state, sampling, hidden, generator, drawing):
    # The position is chosen before the call (uniformly), so only it is projected to the vocabulary.
    B, bs = xb.shape
    rows = torch.arange(B, device=xb.device)
    n = state.active.sum(-1)
    u = _uniform((B,), generator, xb.device, torch.float64, drawing)
    state.t = torch.where(drawing, state.t * u ** (1 / n.clamp(min=1)), state.t)
    j = _uniform((B, bs), generator, xb.device, rows=drawing).masked_fill(~state.active, -1).argmax(-1)
    probs = sampling.probs(_logits(model, xb, hidden(state.t)[rows, j], state.t, rows), rows)   # (B, V)
    token = _sample_categorical(probs, _uniform((B, 1), generator, xb.device, torch.float64, drawing))
    reveal = torch.zeros_like(state.active)
    reveal[rows, j] = state.active[rows, j]
    return reveal, token[:, None].expand(B, bs), drawing


def _ancestral_call(model, xb, state, sampling, hidden, generator, drawing):
    # Step i of K: from t = 1 - i/K to s = 1 - (i+1)/K, each masked token revealed with probability 1 - s/t.
    # A row whose block did not change since its last call reuses that output (no call for it).
    B, bs = xb.shape
    rows = torch.arange(B, device=xb.device)
    t, s = 1 - state.step.double() / sampling.steps, 1 - (state.step + 1).double() / sampling.steps
    need = drawing & (state.stale | model.config.time_conditioning)
    if need.any():
        fresh = sampling.probs(_logits(model, xb, hidden(t), t, rows), rows)                     # (B, bs, V)
        state.probs = fresh if state.probs is None else torch.where(need[:, None, None], fresh, state.probs)
    reveal = state.active & (_uniform((B, bs), generator, xb.device, torch.float64, drawing) < (1 - s / t)[:, None])
    proposal = _sample_categorical(state.probs, _uniform((B, bs, 1), generator, xb.device, torch.float64, drawing))
    state.step += drawing
    state.stale = torch.where(drawing, reveal.any(-1), state.stale)
    return reveal, proposal, need


def _adaptive_call(model, xb, state, sampling, hidden, generator, drawing):
    # Propose a token at every masked position with the row's law, score the model's confidence in it and
    # its entropy there, and let the rule (ADAPTIVE_RULES) choose. Only masked positions are projected.
    B, bs = xb.shape
    state.t = state.active.sum(-1).double() / bs                          # the masked fraction
    where = state.active.nonzero(as_tuple=True)
    logits = _logits(model, xb, hidden(state.t)[where], state.t, where[0])                        # (N, V)
    u = _uniform((B, bs, 1), generator, xb.device, torch.float64, drawing)[where]
    token = _sample_categorical(sampling.probs(logits, where[0]), u)                              # (N,)
    log_p = logits.log_softmax(-1)
    confidence = torch.zeros(B, bs, dtype=torch.float64, device=xb.device)
    entropy = torch.zeros_like(confidence)
    confidence[where] = log_p.gather(-1, token[:, None]).squeeze(-1).exp()
    entropy[where] = -(log_p.exp() * log_p.nan_to_num(neginf=0.0)).sum(-1)
    priority = {'uniform': lambda: _uniform((B, bs), generator, xb.device, torch.float64, drawing),
                'confidence': lambda: confidence, 'entropy': lambda: -entropy}[sampling.order]()
    reveal = ADAPTIVE_RULES[sampling.rule](confidence, entropy, state.active, priority, sampling.knob)
    proposal = torch.zeros_like(xb)
    proposal[where] = token
    return reveal, proposal, drawing


@torch.no_grad()
def prefill(model, x, cache):
    """Write the complete blocks of x (B, T) into the cache as clean prefix, one pass per block; returns the
    number of passes. Only a time-conditioned model reads the noise level of a clean block (adaLN modulates
    every position); it gets the clean end of the schedule. Without time conditioning (the released
    models) cached and uncached sampling agree exactly."""
    bs = model.config.block_size
    clean = torch.full((x.shape[0],), EPS, device=x.device)
    sigma = sigma_from_move_chance(clean) if model.config.time_conditioning else None
    for lo in range(0, x.shape[1] // bs * bs, bs):
        model._hidden(x[:, lo:lo + bs], sigma, torch.arange(lo, lo + bs, device=x.device), cache)
        cache.commit()
    return x.shape[1] // bs


@torch.no_grad()
def generate(model, idx, max_new_tokens, steps=None, top_p=1.0, kv_cache=True, generator=None,
             stop_at_eos=False, stop_entropy=None, eos_id=None, on_block=None, return_stats=False,
             temperature=1.0, threshold=None, entropy_bound=None, tokens_per_call=None, order=None,
             nucleus='standard'):
    """idx: (B, P) prompt ids (P >= 1, usually starting with BOS). Returns (B, P + max(max_new_tokens)).

    The unmasking rule: first-hitting (default), steps=K, threshold=tau, entropy_bound=gamma or
    tokens_per_call=k (at most one), with `order` for the adaptive ones; see the sampler section above.
    max_new_tokens, top_p, temperature, and the knob tau / gamma / k: one value, or one per row (a list
    or (B,) tensor), so that requests with different settings can share a batch. temperature divides
    the logits (0 = greedy); top_p: nucleus sampling (nucleus='bd3lms' drops the token that crosses top_p,
    as bd3lms does). generator: a torch.Generator, or a list of B (one
    per row; see _uniform). stop_at_eos: a row stops after the first EOS it generates. stop_entropy:
    bd3lms' variable-length rule (the paper uses 4): checked after each block once a row holds more than 256
    tokens; when the unigram entropy of its last 256 tokens is below this, the row stops and those 256
    degenerate tokens are dropped (never the prompt; if an EOS came in the same block, this cut wins, as in
    bd3lms). Rows
    stop independently; positions after a row's end are filled with eos_id (default: config.eos_id).
    on_block(x, end): called after each finished block with the tokens so far (streaming).
    return_stats: also return {'nfe': model calls for the batch, 'row_nfe': (B,) each row's own calls
    (what it would pay alone), 'forward_passes': all passes (cache writes too), 'lengths': (B,)}."""
    cfg = model.config
    bs, window, mask_id = cfg.block_size, cfg.model_length, cfg.mask_id
    eos_id = cfg.eos_id if eos_id is None else eos_id
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.shape[1] == 0:
        raise ValueError(f'idx must be a (B, P) tensor of prompt ids with P >= 1 (start it with the model\'s '
                         f'BOS, config.bos_id = {cfg.bos_id})')
    B, P = idx.shape
    device = model.vocab_embed.embedding.device
    sampling = Sampling(B, device, steps, threshold, entropy_bound, tokens_per_call, order, temperature, top_p, nucleus)
    new_tokens = _per_row('max_new_tokens', max_new_tokens, B, torch.long, device, lambda v: v > 0,
                          'a positive integer (or one per row)')
    if isinstance(generator, (list, tuple)) and len(generator) != B:
        raise ValueError(f'a list of generators needs one per row: {len(generator)} for {B} rows')
    if int(idx.min()) < 0 or int(idx.max()) >= cfg.vocab_size:
        raise ValueError(f'prompt ids must lie in [0, {cfg.vocab_size - 1}]')
    if (idx == mask_id).any():
        raise ValueError(f'the prompt contains the mask id {mask_id}; prompts must be clean tokens')
    total = P + int(new_tokens.max())
    if bs == window and total > window:
        # With one block per context, a block past the context would see no earlier block at all. bd3lms
        # continues MDLM with an overlapping stride instead; that is a different sampler, not offered here.
        raise ValueError(f'this model is MDLM-like (block_size = model_length = {window}), so it generates at '
                         f'most {window} tokens including the prompt ({P} + {total - P} asked); '
                         f'lower max_new_tokens, or use a BD3-LM with smaller blocks for longer text')

    n_blocks = -(-total // bs)
    x = torch.full((B, n_blocks * bs), mask_id, dtype=torch.long, device=device)
    x[:, :P] = idx.to(device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    lengths = P + new_tokens                                                  # (B,) each row's end
    stats = {'nfe': 0, 'forward_passes': 0, 'row_nfe': torch.zeros(B, dtype=torch.long, device=device)}
    cache = None
    if kv_cache:
        cache = KVCache(cfg.n_layers, B, cfg.n_heads, window, cfg.hidden_dim // cfg.n_heads, bs, device,
                        model.vocab_embed.embedding.dtype)
    # Receptive field of a block under the banded mask: n_layers windows back. The uncached path runs
    # only that suffix, which is exact and keeps long uncached generation affordable.
    reach = cfg.n_layers * (window - bs)

    def hidden(lo, t):
        # Hidden states (B, bs, D) of the block starting at lo at noise level t (B,); with the cache this
        # also writes the block's keys into it.
        stats['forward_passes'] += 1
        sigma = sigma_from_move_chance(t.float()) if cfg.time_conditioning else None
        if cache is not None:
            return model._hidden(x[:, lo:lo + bs], sigma, torch.arange(lo, lo + bs, device=device), cache)
        start = max(0, lo - reach)
        return model._hidden(x[:, start:lo + bs], sigma, torch.arange(start, lo + bs, device=device))[:, -bs:]

    clean_t = torch.full((B,), EPS, device=device)
    if cache is not None:                                     # the prompt's complete blocks enter the cache
        stats['forward_passes'] += prefill(model, idx.to(device), cache)
    for b in range(P // bs, n_blocks):                        # Alg. 2: blocks left to right
        lo = b * bs
        block = x[:, lo:lo + bs]                                                 # a view: updated in place
        pos = torch.arange(lo, lo + bs, device=device)
        state = BlockState((block == mask_id) & (pos < lengths[:, None]) & ~done[:, None])
        while state.active.any():                             # denoise the block, one model call at a time
            stats['nfe'] += denoise_step(model, block, state, sampling, lambda t: hidden(lo, t), generator,
                                         stats['row_nfe'])
        if cache is not None:                                 # the finished block joins the clean prefix
            hidden(lo, clean_t)
            cache.commit()
        end = min(lo + bs, total)
        _apply_stops(x, done, lengths, P, end, stop_at_eos, stop_entropy, eos_id)
        if on_block is not None:
            on_block(x[:, :end], end)
        if done.all():
            break
    x = x[:, :total]
    x[x == mask_id] = eos_id  # only possible in rows that stopped early
    stats['lengths'] = lengths
    return (x, stats) if return_stats else x


def _apply_stops(x, done, lengths, P, end, stop_at_eos, stop_entropy, eos_id):
    for r in range(x.shape[0]):
        if done[r]:
            continue
        cut = None
        if stop_at_eos:
            generated = (x[r, P:end] == eos_id).nonzero()
            if len(generated):
                cut = P + int(generated[0]) + 1
        if stop_entropy is not None and end > 256 and _unigram_entropy(x[r, end - 256:end]) < stop_entropy:
            cut = max(P, end - 256)  # as bd3lms: drop the low-entropy window (it overrides an EOS cut)
        if cut is not None:
            done[r] = True
            lengths[r] = cut
            x[r, cut:] = eos_id
