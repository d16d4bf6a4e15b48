"""Every model call is one forward pass: a finished block's keys are written by the next block's first call,
and a prompt's complete blocks by one prefill pass. Checked against the obvious way (one pass per block)."""
import pytest
import torch

import bd3lm
from bd3lm_tools import engine
from conftest import random_model


@pytest.mark.parametrize('block_size', [1, 2, 4, 8, 16])
@pytest.mark.parametrize('P', [1, 5, 16])
def test_forward_passes_equal_model_calls_plus_one_prefill(block_size, P):
    model = random_model(block_size=block_size, model_length=16)
    idx = torch.randint(0, 36, (2, P), generator=torch.Generator().manual_seed(0))
    new = 16 - P if block_size == 16 else 37             # MDLM-like: one context in all
    if new == 0:
        pytest.skip('an MDLM-like model cannot continue a full context')
    _, stats = engine.generate(model, idx, new, generator=torch.Generator().manual_seed(1), return_stats=True)
    assert stats['nfe'] == new                            # first-hitting: one call per token
    assert stats['forward_passes'] == stats['nfe'] + (P >= block_size)


def per_block_prefill(model, cache, x):
    # The obvious way, one pass per block: each block attends to the cache and itself, then stays.
    bs = model.config.block_size
    for lo in range(0, x.shape[1], bs):
        positions = cache.plan([lo] * x.shape[0])
        model.transformer(x[:, lo:lo + bs], positions, model.cond(None, x.shape[0]), cache.attend)


@pytest.mark.parametrize('T', [8, 16, 44])               # inside the window, a full window, past it (a ring)
def test_one_pass_prefill_equals_one_pass_per_block(T):
    model = random_model(block_size=4, model_length=16).double()
    x = torch.randint(0, 36, (2, T), generator=torch.Generator().manual_seed(0))
    one, many = engine.KVCache(model, 3, 'cpu'), engine.KVCache(model, 2, 'cpu')
    engine.prefill(model, one, x, row=1)                   # rows 1..2 of a 3-row cache (engine.py's admission)
    per_block_prefill(model, many, x)
    kept = torch.arange(max(0, T - 16), T) % 16           # the ring's positions that hold the last window
    for a, b in ((one.k, many.k), (one.v, many.v)):
        torch.testing.assert_close(a[:, 1:, :, kept], b[:, :, :, kept], rtol=1e-10, atol=1e-10)
    assert not one.k[:, 0].any()                          # row 0 untouched


@pytest.mark.parametrize('time_conditioning', [False, True])
@pytest.mark.parametrize('m', [1, 3])
def test_writing_the_finished_block_in_the_next_call_equals_a_separate_pass(time_conditioning, m):
    # Block 5 finished; block 6 starts, past the window (the ring has wrapped: block 6 lives where block 2,
    # which block 5 still sees, lives now). One pass writing block 5 (at t = 0) and denoising block 6 (and
    # its verify rows) gives the hidden states of two passes: block 5 alone into the cache, then block 6.
    model = random_model(block_size=4, model_length=16, time_conditioning=time_conditioning).double()
    B, bs, M = 2, 4, model.config.mask_id
    x = torch.randint(0, 36, (B, 24), generator=torch.Generator().manual_seed(0))
    versions = torch.full((B, m, bs), M)
    versions[:, 1:, 0] = 5                                # verify rows: drafts written in
    t = (versions == M).sum(-1).flatten() / bs
    c = model.cond(t, B * m)
    fused, apart = engine.KVCache(model, B, 'cpu'), engine.KVCache(model, B, 'cpu')
    engine.prefill(model, fused, x[:, :20])
    h_fused = engine.block_pass(model, x, [24] * B, fused, (list(range(B)), x[:, 20:24]))(versions, c)
    engine.prefill(model, apart, x[:, :20])
    engine.block_pass(model, x, [20] * B, apart)(x[:, None, 20:24], model.cond(torch.zeros(B), B))
    h_apart = engine.block_pass(model, x, [24] * B, apart)(versions, c)
    torch.testing.assert_close(h_fused, h_apart, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fused.k[:, :, :, 4:8], apart.k[:, :, :, 4:8], rtol=1e-10, atol=1e-10)


def test_rows_at_different_blocks_in_one_pass_equal_each_row_alone():
    # engine.py's pass: rows at different blocks, some writing their finished block in the same call.
    model = random_model(block_size=4, model_length=16).double()
    x = torch.randint(0, 36, (3, 40), generator=torch.Generator().manual_seed(0))
    starts = [4, 20, 36]                                  # row 2 is past the window: its ring has wrapped
    cache = engine.KVCache(model, 3, 'cpu')
    engine.prefill(model, cache, x[:1, :4], row=0)         # row 0's prefix is in the cache;
    engine.prefill(model, cache, x[1:2, :16], row=1)       # rows 1 and 2 write their last block in the pass
    engine.prefill(model, cache, x[2:3, :32], row=2)
    finished = ([1, 2], torch.stack([x[1, 16:20], x[2, 32:36]]))
    blocks = torch.stack([x[r, s:s + 4] for r, s in enumerate(starts)])[:, None]
    h = engine.block_pass(model, x, starts, cache, finished)(blocks, model.cond(None, 3))
    for r, s in enumerate(starts):
        alone = model.hidden(x[r:r + 1, :s + 4], model.cond(None, 1))[0, -4:]
        torch.testing.assert_close(h[r, 0], alone, rtol=1e-9, atol=1e-9)
