"""Training throughput: forward + backward + AdamW through model.nelbo, in tokens/s.

    python benchmarks/train_speed.py                       # 4 layers x 256 wide, L=256, batch 8, GPT-2 vocab
    python benchmarks/train_speed.py --official=PATH        # also time the official bd3lms backbone
    python benchmarks/train_speed.py --compile=1            # eager vs torch.compile, in one run
    python benchmarks/train_speed.py --device=cuda --n_layers=12 --hidden_dim=768 --n_heads=12 --model_length=1024 \
        --batch_size=16 --dtype=bfloat16 --compile=1        # GPU: FlexAttention vs SDPA, eager vs compiled, MFU

--official points at a folder holding bd3lms' models/hf/{modeling,configuration}_bd3lm.py (needs
transformers and einops). Its objective is the official one: the backbone projects all 2L positions of
cat([xt, x0]) to the vocabulary, keeps the xt half, applies SUBS and weights -log p by 1/t.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
import bd3lm  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument('--n_layers', type=int, default=4)
p.add_argument('--hidden_dim', type=int, default=256)
p.add_argument('--n_heads', type=int, default=4)
p.add_argument('--model_length', type=int, default=256)
p.add_argument('--block_size', type=int, default=16)
p.add_argument('--batch_size', type=int, default=8)
p.add_argument('--steps', type=int, default=6)
p.add_argument('--device', default='cpu')
p.add_argument('--dtype', default='float32')
p.add_argument('--compile', type=int, default=0)
p.add_argument('--official', default=None)
args = p.parse_args()

config = bd3lm.BD3LMConfig(block_size=args.block_size, model_length=args.model_length, hidden_dim=args.hidden_dim,
                           cond_dim=128, n_layers=args.n_layers, n_heads=args.n_heads, dropout=0.0)
B, L = args.batch_size, args.model_length
autocast = torch.autocast(args.device.split(':')[0], dtype=getattr(torch, args.dtype),
                          enabled=args.dtype != 'float32')
x0 = torch.randint(0, 50257, (B, L), device=args.device)
x0[:, 0] = config.bos_id


def time_steps(loss_fn, params):
    opt = torch.optim.AdamW(params, lr=1e-4)
    times = []
    for i in range(args.steps + 2):        # the first two steps are warm-up (allocation, compilation)
        if args.device.startswith('cuda'):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with autocast:
            loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if args.device.startswith('cuda'):
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    times.sort()
    return B * L / times[len(times) // 2]   # median step


def ours(backend, compiled):
    # As train.py: t and xt drawn eagerly, the loss compiled as one graph (fullgraph: a break is an error).
    torch.manual_seed(0)
    model = bd3lm.BD3LM(config).to(args.device).use_flex_attention(backend == 'flex').train()
    model.nelbo(x0[:1])                                  # builds the cached mask outside the compiled graph
    step = lambda x0, t, xt: model.nelbo(x0, t=t, xt=xt)
    step = torch.compile(step, fullgraph=True) if compiled else step

    def loss():
        t, xt = model.forward_process(x0)
        return step(x0, t, xt)
    return time_steps(loss, model.parameters())


def mfu(tokens_per_second):
    # The same count as train.py: 6 flops per layer parameter per token of the 2L pass, attention counted
    # dense, half of the positions projected to the vocabulary; against an H100's dense bf16 peak.
    n_layer_params = sum(p.numel() for p in bd3lm.BD3LM(config).blocks.parameters())
    flops = 6 * n_layer_params * 2 + 12 * config.n_layers * config.hidden_dim * 2 * L
    flops += 6 * config.vocab_size * config.hidden_dim * 0.5
    return tokens_per_second * flops / 989e12


def official():
    import importlib
    folder = os.path.abspath(args.official)
    sys.path.insert(0, os.path.dirname(folder))          # the folder is a package (relative imports)
    package = os.path.basename(folder)
    Official = importlib.import_module(f'{package}.modeling_bd3lm').BD3LM
    OfficialConfig = importlib.import_module(f'{package}.configuration_bd3lm').BD3LMConfig
    torch.manual_seed(0)
    model = Official(OfficialConfig(attn_backend='sdpa', block_size=config.block_size, model_length=L,
                                    hidden_dim=config.hidden_dim, cond_dim=config.cond_dim, n_blocks=config.n_layers,
                                    n_heads=config.n_heads, dropout=0.0, vocab_size=config.vocab_size)).to(args.device).train()
    mask_id = config.mask_id

    def loss():
        t = bd3lm.sample_t(B, L // config.block_size, device=args.device).repeat_interleave(config.block_size, 1)
        xt = bd3lm.q_xt(x0, t, mask_id, config.block_size)
        logits = model(input_ids=torch.cat([xt, x0], 1), timesteps=torch.zeros(B, device=args.device), return_dict=False)
        logits[:, :, mask_id] += -1e6
        logits = logits - logits.logsumexp(-1, keepdim=True)
        unmasked = xt != mask_id
        logits[unmasked] = -1e6
        logits[unmasked, xt[unmasked]] = 0
        log_p = logits.gather(-1, x0[..., None]).squeeze(-1)
        return (-log_p / t)[:, 1:].mean()
    return time_steps(loss, model.parameters())


print(f'{config.n_layers} layers x {config.hidden_dim} wide, L={L}, batch {B}, vocab {config.vocab_size}, '
      f'{args.device} {args.dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads')
results = {'bd3lm.py (SDPA)': ours('sdpa', False)}
if args.compile:
    results['bd3lm.py (SDPA, compiled)'] = ours('sdpa', True)
if args.device.startswith('cuda'):  # FlexAttention has no backward on CPU
    results['bd3lm.py (FlexAttention)'] = ours('flex', False)
    if args.compile:
        results['bd3lm.py (FlexAttention, compiled)'] = ours('flex', True)
if args.official:
    results['official bd3lms backbone (SDPA)'] = official()
base = results.get('official bd3lms backbone (SDPA)', results['bd3lm.py (SDPA)'])
for name, tps in results.items():
    extra = f'   MFU {100 * mfu(tps):.1f}% (H100 bf16 peak)' if args.device.startswith('cuda') else ''
    print(f'{name:36s} {tps:10.0f} tokens/s   {tps / base:5.2f}x{extra}')
