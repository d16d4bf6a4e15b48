"""Sampling speed: tokens/s and model calls (NFEs) for block sizes 4 and 16, KV cache on and off, and
the number of denoising steps per block, all on the same machine in one run.

    python benchmarks/sample_speed.py                     # CPU: 4 layers x 256 wide, context 1024
    python benchmarks/sample_speed.py --device=cuda --n_layers=12 --hidden_dim=768 --n_heads=12 \
        --dtype=bfloat16 --batch_sizes=1,32               # the released configuration on a GPU

Random weights: speed does not depend on what the weights are (first-hitting makes exactly one model
call per token whatever the model predicts).
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
import bd3lm  # noqa: E402
from bd3lm_tools import engine  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument('--n_layers', type=int, default=4)
p.add_argument('--hidden_dim', type=int, default=256)
p.add_argument('--n_heads', type=int, default=4)
p.add_argument('--model_length', type=int, default=1024)
p.add_argument('--new_tokens', type=int, default=1024)
p.add_argument('--batch_sizes', default='1')
p.add_argument('--device', default='cpu')
p.add_argument('--dtype', default='float32')
p.add_argument('--compile', type=int, default=0, help='1: engine.compile_sampler (the cached call as one graph)')
p.add_argument('--compile_mode', default='default', help="torch.compile's mode ('reduce-overhead': CUDA graphs)")
p.add_argument('--skip_uncached', type=int, default=0)
p.add_argument('--block_sizes', default='4,16')
p.add_argument('--step_sweep', type=int, default=1)
args = p.parse_args()


def run(block_size, batch_size, kv_cache, steps):
    torch.manual_seed(0)
    config = bd3lm.BD3LMConfig(block_size=block_size, model_length=args.model_length, hidden_dim=args.hidden_dim,
                               cond_dim=128, n_layers=args.n_layers, n_heads=args.n_heads)
    model = bd3lm.BD3LM(config).to(args.device, getattr(torch, args.dtype)).eval()
    if args.compile:
        engine.compile_sampler(mode=args.compile_mode)     # the cached call as one graph (rules that do not draft)
    idx = torch.full((batch_size, 1), config.bos_id, device=args.device)
    gen = lambda n: engine.generate(model, idx, n, rule='steps' if steps else 'first_hitting', knob=steps, kv_cache=kv_cache,
                                   return_stats=True,
                                   generator=torch.Generator(args.device).manual_seed(0))
    gen(2 * block_size)  # warm-up (allocation, compilation)
    if args.device.startswith('cuda'):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    _, stats = gen(args.new_tokens - 1)
    if args.device.startswith('cuda'):
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return batch_size * (args.new_tokens - 1) / dt, stats['nfe'], stats['nfe'] / dt


print(f'{args.n_layers} layers x {args.hidden_dim} wide, context {args.model_length}, {args.new_tokens} tokens '
      f'(BOS + {args.new_tokens - 1} new), {args.device} {args.dtype}, torch {torch.__version__}, '
      f'{torch.get_num_threads()} threads')
print(f'{"block":>5} {"batch":>5} {"steps/block":>12} {"kv cache":>8} {"NFEs":>6} {"tokens/s":>10} {"calls/s":>8}')
for batch_size in [int(b) for b in args.batch_sizes.split(',')]:
    for block_size in [int(b) for b in args.block_sizes.split(',')]:
        cached = None
        for kv_cache in (True, False):
            if not kv_cache and args.skip_uncached:
                continue
            tps, nfe, cps = run(block_size, batch_size, kv_cache, None)
            cached = cached or tps
            extra = '' if kv_cache else f'   cache speed-up {cached / tps:.1f}x'
            print(f'{block_size:5d} {batch_size:5d} {"first-hit":>12} {str(kv_cache):>8} {nfe:6d} {tps:10.1f} {cps:8.1f}{extra}')
        for steps in [s for s in (16, 8, 4, 2, 1) if s <= block_size and args.step_sweep]:
            tps, nfe, cps = run(block_size, batch_size, True, steps)
            print(f'{block_size:5d} {batch_size:5d} {steps:12d} {"True":>8} {nfe:6d} {tps:10.1f} {cps:8.1f}')
