"""
CPU seconds for 511 tokens from a random 4 x 256 BD3-LM (GPT-2 vocabulary, context 1024) at batch 1, one
torch thread, best of 3, with the forward passes per token. Run it in two checkouts alternately to
compare samplers (CPU time, not wall time: another job on the machine moves it less):

    for i in 1 2 3; do for t in ../old .; do (cd $t && python benchmarks/batch1_cpu_time.py --block_size=4); done; done
    python benchmarks/batch1_cpu_time.py --compile=1      # the compiled cached call (engine.compile_sampler)
    python benchmarks/batch1_cpu_time.py --n_layers=2 --hidden_dim=64 --vocab_size=1000 --model_length=128   # toy
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.getcwd())
import bd3lm  # noqa: E402  (the checkout this runs in)
from bd3lm_tools import engine  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument('--block_size', type=int, default=16)
p.add_argument('--tokens', type=int, default=511)
p.add_argument('--compile', type=int, default=0)
p.add_argument('--n_layers', type=int, default=4)
p.add_argument('--hidden_dim', type=int, default=256)
p.add_argument('--vocab_size', type=int, default=50258)
p.add_argument('--model_length', type=int, default=1024)
args = p.parse_args()
torch.set_num_threads(1)
torch.manual_seed(0)
layers = 'n_layers' if 'n_layers' in bd3lm.BD3LMConfig.__dataclass_fields__ else 'n_blocks'   # older checkouts
config = bd3lm.BD3LMConfig(block_size=args.block_size, vocab_size=args.vocab_size, model_length=args.model_length,
                           hidden_dim=args.hidden_dim, cond_dim=128, n_heads=4, dropout=0.0, **{layers: args.n_layers})
model = bd3lm.BD3LM(config).eval()
if args.compile:
    engine.compile_sampler()
idx = torch.full((1, 1), config.bos_id)
engine.generate(model, idx, 2 * args.block_size + 1)                   # warm-up (and compilation)
times = []
for _ in range(3):
    t0 = time.process_time()
    _, stats = engine.generate(model, idx, args.tokens, generator=torch.Generator().manual_seed(0), return_stats=True)
    times.append(time.process_time() - t0)
print(f'{os.getcwd()}: {args.n_layers} x {args.hidden_dim}, vocabulary {args.vocab_size}, blocks of {args.block_size}{", compiled" if args.compile else ""}: {min(times):.3f} CPU s for '
      f'{args.tokens} tokens ({args.tokens / min(times):.1f} tokens per CPU s), '
      f'{stats["forward_passes"] / args.tokens:.3f} forward passes per token')
