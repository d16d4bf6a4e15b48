"""bd3lm.py against slow, obvious implementations and the paper's definitions."""
import copy
import math

import pytest
import torch

import bd3lm
from bd3lm_tools import engine
from bd3lm_tools import checkpoints
from bd3lm_tools import tokenizer
from bd3lm_tools.tokenizer import get_tokenizer
from conftest import random_model, random_tokens

CONFIGS = [dict(block_size=1), dict(block_size=4), dict(block_size=8), dict(block_size=16),  # 16 = context
           dict(block_size=2, n_heads=2, hidden_dim=48, vocab_size=11),
           dict(block_size=4, adaln=False), dict(block_size=4, time_conditioning=True)]


def slow_block_diff_mask(L, bs):
    mask = torch.zeros(2 * L, 2 * L, dtype=torch.bool)
    for q in range(2 * L):
        for kv in range(2 * L):
            q_noisy, kv_noisy = q < L, kv < L
            qb, kb = (q % L) // bs, (kv % L) // bs
            if q_noisy and kv_noisy:
                mask[q, kv] = qb == kb                      # a noisy block sees only itself...
            elif q_noisy and not kv_noisy:
                mask[q, kv] = kb < qb                       # ...and the clean blocks before it
            elif not q_noisy and not kv_noisy:
                mask[q, kv] = kb <= qb                      # clean blocks are block-causal
    return mask


@pytest.mark.parametrize('L,bs', [(8, 1), (8, 2), (12, 4), (16, 16)])
def test_block_diff_mask_matches_loop(L, bs):
    assert torch.equal(bd3lm.block_diff_mask(L, bs), slow_block_diff_mask(L, bs))


def test_block_causal_mask_matches_loop():
    T, bs, window = 24, 4, 12
    slow = torch.tensor([[kv // bs <= q // bs and (q // bs - kv // bs) * bs < window for kv in range(T)]
                         for q in range(T)])
    assert torch.equal(bd3lm.block_causal_mask(T, bs, window), slow)
    # the inference mask is the clean-clean quadrant of the training mask
    assert torch.equal(bd3lm.block_causal_mask(12, 4), bd3lm.block_diff_mask(12, 4)[12:, 12:])



def test_the_models_masks_are_right_at_every_length_and_few_are_kept():
    # The inference mask of length T is cut from one kept per power of 2: each cut must be the mask of T (banded
    # past model_length), and sweeping many lengths (an uncached sampler's growing prefix) keeps few masks.
    model = random_model(block_size=4, model_length=16)
    bd3lm.build_masks.cache_clear()
    for T in range(4, 200, 4):
        dense, _ = model.attention_mask('infer', T)
        assert torch.equal(dense, bd3lm.block_causal_mask(T, 4, 16)), T
    assert bd3lm.build_masks.cache_info().currsize <= 5
    assert torch.equal(model.attention_mask('train', 16)[0], bd3lm.block_diff_mask(16, 4))

@pytest.mark.parametrize('overrides', CONFIGS)
def test_vectorized_training_pass_equals_blockwise_definition(overrides):
    model = random_model(**overrides)
    bs, L = model.config.block_size, model.config.model_length
    x0 = random_tokens(model)
    xt = torch.where(torch.rand(x0.shape, generator=torch.Generator().manual_seed(1)) < 0.5, model.config.mask_id, x0)
    with torch.no_grad():
        fast = model(xt, x0)                                              # (B, L, V)
        for b in range(L // bs):
            seq = torch.cat([x0[:, :b * bs], xt[:, b * bs:(b + 1) * bs]], dim=1)
            slow = model(seq)[:, -bs:]                                   # the inference pass
            torch.testing.assert_close(fast[:, b * bs:(b + 1) * bs], slow, atol=2e-5, rtol=1e-5)


def slow_nelbo(model, x0, xt, t):
    """Per-token NELBO straight from the definition: full logits, SUBS by hand, weight 1/t."""
    logits = model(xt, x0).double()
    B, L = x0.shape
    out = torch.zeros(B, L, dtype=torch.float64)
    for b in range(B):
        for i in range(1, L):
            if xt[b, i] != model.config.mask_id:
                continue  # SUBS: an unmasked token is copied, log p = 0
            z = logits[b, i].clone()
            z[model.config.mask_id] = -math.inf
            out[b, i] = -(z[x0[b, i]] - torch.logsumexp(z, 0)) / t[b, i]
    return out


@pytest.mark.parametrize('overrides', [dict(block_size=4), dict(block_size=16), dict(block_size=1)])
def test_nelbo_matches_slow_loop(overrides):
    model = random_model(**overrides)
    x0 = random_tokens(model)
    B, L = x0.shape
    g = torch.Generator().manual_seed(3)
    t = bd3lm.sample_t(B, L // model.config.block_size, generator=g).repeat_interleave(model.config.block_size, 1)
    xt = bd3lm.q_xt(x0, t, model.config.mask_id, model.config.block_size, generator=g)
    with torch.no_grad():
        slow = slow_nelbo(model, x0, xt, t)
        fast = model.nelbo(x0, t=t, xt=xt, reduction='none')
        torch.testing.assert_close(fast.double(), slow, atol=1e-4, rtol=1e-5)
        assert model.nelbo(x0, t=t, xt=xt).item() == pytest.approx(slow[:, 1:].mean().item(), rel=1e-5)
        # t may also be given per block
        per_block = t[:, ::model.config.block_size]
        assert torch.equal(model.nelbo(x0, t=per_block, xt=xt, reduction='none'), fast)


def test_nelbo_samples_t_and_xt_and_backpropagates():
    model = random_model().train()
    x0 = random_tokens(model)
    loss = model.nelbo(x0, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert math.isfinite(loss.item()) and loss.item() > 0
    assert model.blocks[0].attn_qkv.weight.grad.abs().sum() > 0


def test_flex_attention_gives_the_same_numbers():
    model = random_model(block_size=4)
    x0 = random_tokens(model)
    xt = torch.where(torch.rand(x0.shape, generator=torch.Generator().manual_seed(1)) < 0.5, model.config.mask_id, x0)
    with torch.no_grad():
        sdpa_train, sdpa_infer = model(xt, x0), model(x0)
        model.use_flex_attention()
        flex_train, flex_infer = model(xt, x0), model(x0)
    torch.testing.assert_close(flex_train, sdpa_train, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flex_infer, sdpa_infer, atol=1e-5, rtol=1e-5)

# --- noise schedules and the forward process -----------------------------------------------------

@pytest.mark.parametrize('kind', bd3lm.SCHEDULES)
def test_schedule_weight_is_rate_over_move_chance(kind):
    # The NELBO weight is -alpha'_t / (1 - alpha_t) = d(move_chance)/dt / move_chance (Eq. 10).
    t = torch.linspace(0.1, 0.99, 50, dtype=torch.float64, requires_grad=True)
    move_chance, weight = bd3lm.noise_schedule(t, kind)
    rate, = torch.autograd.grad(move_chance.sum(), t)
    assert ((move_chance > 0) & (move_chance <= 1)).all()
    torch.testing.assert_close(weight.detach(), (rate / move_chance).detach(), rtol=1e-9, atol=0)
    if kind == 'loglinear':
        assert torch.equal(move_chance, t) and torch.allclose(weight, 1 / t)


def test_unknown_schedule_is_a_clear_error():
    with pytest.raises(ValueError, match='unknown noise schedule'):
        bd3lm.noise_schedule(torch.tensor([0.5]), 'linear')


def test_antithetic_t_is_stratified_and_clipped():
    B, n_blocks, beta, omega = 4, 8, 0.3, 0.8
    t = bd3lm.sample_t(B, n_blocks, beta, omega, generator=torch.Generator().manual_seed(0))
    assert t.shape == (B, n_blocks) and (t >= beta).all() and (t <= omega).all()
    bins = ((t - beta) / (omega - beta) * B * n_blocks).floor().long().flatten()
    assert sorted(bins.tolist()) == list(range(B * n_blocks))   # one draw in each of the B*n_blocks bins


def test_q_xt_masks_at_rate_t_and_never_bos():
    x0 = torch.randint(0, 10, (64, 256), generator=torch.Generator().manual_seed(0))
    t = torch.full(x0.shape, 0.3)
    xt = bd3lm.q_xt(x0, t, 10, 4, generator=torch.Generator().manual_seed(1))
    assert (xt[:, 0] == x0[:, 0]).all()
    assert ((xt == x0) | (xt == 10)).all()
    assert (xt[:, 1:] == 10).float().mean().item() == pytest.approx(0.3, abs=0.01)


def test_q_xt_resampling_keeps_every_block_inside_the_interval():
    x0 = torch.randint(0, 10, (32, 64), generator=torch.Generator().manual_seed(0))
    bs, beta, omega = 8, 0.45, 0.55
    t = bd3lm.sample_t(32, 64 // bs, beta, omega, generator=torch.Generator().manual_seed(2)).repeat_interleave(bs, 1)
    xt = bd3lm.q_xt(x0, t, 10, bs, interval=(beta, omega), generator=torch.Generator().manual_seed(3), max_tries=3)
    frac = (xt == 10).view(32, -1, bs).float().mean(-1)
    frac[:, 0] = 0.5  # block 0 holds BOS, which is never masked
    assert ((frac >= beta) & (frac <= omega)).all()


def test_q_xt_unreachable_interval_is_a_clear_error():
    x0 = torch.zeros(2, 8, dtype=torch.long)
    with pytest.raises(ValueError, match='no block of 4 tokens'):
        bd3lm.q_xt(x0, torch.full((2, 8), 0.4), 10, 4, interval=(0.3, 0.45))

# --- bad input ------------------------------------------------------------------------------------

def test_bad_inputs_give_clear_errors():
    model = random_model()
    x0 = random_tokens(model)
    with pytest.raises(ValueError, match='not a positive multiple of block_size=4'):
        model(x0[:, :6])
    with pytest.raises(ValueError, match='outside the vocabulary'):
        model(x0 + 100)
    with pytest.raises(ValueError, match='same shape'):
        model(x0[:2], x0)
    with pytest.raises(ValueError, match='integer tensor'):
        model(x0.float())
    with pytest.raises(ValueError, match='t must have shape'):
        model.nelbo(x0, t=torch.rand(3, 5))
    with pytest.raises(ValueError, match=r't must lie in \(0, 1\]'):
        model.nelbo(x0, t=torch.zeros(3, 16))
    with pytest.raises(ValueError, match='not a multiple of block_size'):
        bd3lm.BD3LMConfig(block_size=5, model_length=16)
    with pytest.raises(ValueError, match='unknown config keys'):
        checkpoints.config_from_json({'block_size': 4, 'hidden_size': 3})


def test_checkpoint_that_does_not_fit_lists_the_problem(tmp_path):
    random_model(hidden_dim=32).save_pretrained(tmp_path)
    cfg = (tmp_path / 'config.json').read_text().replace('"hidden_dim": 32', '"hidden_dim": 64')
    (tmp_path / 'config.json').write_text(cfg)
    with pytest.raises(ValueError, match='shape mismatches'):
        bd3lm.BD3LM.from_pretrained(tmp_path)


def test_missing_keys_are_listed(tmp_path):
    from safetensors.torch import load_file, save_file
    random_model().save_pretrained(tmp_path)
    sd = load_file(tmp_path / 'model.safetensors')
    del sd['backbone.blocks.1.attn_out.weight']
    save_file(sd, tmp_path / 'model.safetensors')
    with pytest.raises(ValueError, match=r"missing keys: \['blocks.1.attn_out.weight'\]"):
        bd3lm.BD3LM.from_pretrained(tmp_path)


class _Exploit:
    def __reduce__(self):
        import os
        return (os.system, ('echo pwned > /tmp/bd3lm-pwned',))


def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path):
    import os
    path = tmp_path / 'evil.ckpt'
    torch.save({'state_dict': {}, 'hyper_parameters': {'config': _Exploit()}}, path)
    if os.path.exists('/tmp/bd3lm-pwned'):
        os.remove('/tmp/bd3lm-pwned')
    with pytest.raises(ValueError, match=r'refusing to load .*system'):
        bd3lm.BD3LM.from_pretrained(path)
    assert not os.path.exists('/tmp/bd3lm-pwned')


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match='config.json'):
        bd3lm.BD3LM.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match='does not exist'):
        bd3lm.BD3LM.from_pretrained(str(tmp_path / 'nope.ckpt'))

# --- tokenizer ------------------------------------------------------------------------------------

def test_tokenizer_is_gpt2_offline():
    enc = get_tokenizer()
    assert enc.tiktoken.n_vocab == 50257 and enc.tiktoken.eot_token == tokenizer.EOS_ID == tokenizer.BOS_ID == 50256
    assert (enc.bos_id, enc.eos_id, enc.mask_id) == (50256, 50256, 50257)
    ids = enc.encode('Hello world, block diffusion!')
    assert ids[:2] == [15496, 995]                      # GPT-2's ids for 'Hello', ' world'
    assert enc.decode(ids) == 'Hello world, block diffusion!'
    assert enc.encode('<|endoftext|>') == [50256]
    assert enc.decode([50256] + ids + [50256, 50257]) == 'Hello world, block diffusion!'  # specials dropped


def test_a_generation_computes_the_constant_modulation_once():
    """The engine, first-hitting with the cache at blocks of 4: the layer modulation of the constant c once per
    generation, and again only in each block's first call, whose pass also carries the finished block."""
    model = random_model().eval()
    calls = []
    model.blocks[0].adaLN_modulation.register_forward_hook(lambda *args: calls.append(1))
    out, stats = engine.generate(model, torch.full((1, 1), model.config.bos_id), 15, return_stats=True)
    assert stats['nfe'] == 15 and len(calls) == 1 + 3          # blocks 2, 3 and 4 carry a finished block


def test_a_call_under_autocast_leaves_nothing_for_the_calls_after_it():
    """A no-grad call under bfloat16 autocast (train.py's evaluation) must leave nothing (no bfloat16 conditioning
    or masks) that the float32 calls after it (sampling) would use."""
    model = random_model().eval()
    twin = copy.deepcopy(model)                     # the same weights, never called under autocast
    x = random_tokens(model)
    x[:, -3:] = model.config.mask_id
    with torch.no_grad():
        with torch.autocast('cpu', dtype=torch.bfloat16):
            model(x)                                # the first no-grad call at this batch size
        after = model(x)
        assert after.dtype == torch.float32 and after.equal(twin(x))
