"""
The engine against the textbook sampler and an older checkout's sampler, in one sitting: each turn runs in
its own process (each checkout imports its own bd3lm), old and new alternating, and prints sampling
tokens/s at the paper's CPU benchmark size (4 layers x 256 wide, GPT-2's vocabulary, context 1024, blocks
of 4, batch 1, first-hitting, the KV cache) and the time per model call at toy size (2 layers x 32 wide,
vocabulary 37), where the sampler's own host work is nearly all of it.

    python benchmarks/split_speed.py --old=/path/to/an/older/checkout --rounds=3
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

p = argparse.ArgumentParser()
p.add_argument('--old', default=None, help='an older checkout (its bd3lm.generate is its sampler)')
p.add_argument('--rounds', type=int, default=3)
p.add_argument('--tokens', type=int, default=256)
p.add_argument('--repeats', type=int, default=3, help='timed runs per turn (the fastest counts)')
p.add_argument('--turn', default=None, help=argparse.SUPPRESS)     # internal: one measurement
args = p.parse_args()

if args.turn:
    sampler, root = args.turn.split(':', 1)
    sys.path.insert(0, root)
    import torch
    import bd3lm
    generate = bd3lm.generate
    if sampler == 'engine':
        from bd3lm_tools import engine
        generate = engine.generate
    result = {}
    for size, shape in (('gpt2 vocab, 4 x 256', dict(n_layers=4, hidden_dim=256, n_heads=4, vocab_size=50258,
                                                     cond_dim=128, model_length=1024)),
                        ('toy', dict(n_layers=2, hidden_dim=32, n_heads=4, vocab_size=37, cond_dim=16,
                                     model_length=1024))):
        torch.manual_seed(0)
        model = bd3lm.BD3LM(bd3lm.BD3LMConfig(block_size=4, **shape)).eval()
        idx = torch.full((1, 1), model.config.bos_id)
        generate(model, idx, 16, generator=torch.Generator().manual_seed(0))                 # warm-up
        dt = math.inf
        for _ in range(args.repeats):                   # the best of a few: the machine's noise only adds
            t0 = time.perf_counter()
            generate(model, idx, args.tokens, generator=torch.Generator().manual_seed(1))
            dt = min(dt, time.perf_counter() - t0)
        result[size] = {'tokens/s': args.tokens / dt, 'ms/call': 1e3 * dt / args.tokens}    # one call per token
    print(json.dumps(result))
    sys.exit(0)

here = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
turns = [('engine', here), ('textbook', here)] + ([('old', os.path.abspath(args.old))] if args.old else [])
runs = {name: [] for name, _ in turns}
for r in range(args.rounds):
    for name, root in (turns if r % 2 == 0 else turns[::-1]):
        out = subprocess.run([sys.executable, __file__, f'--turn={name if name != "old" else "textbook"}:{root}',
                              f'--tokens={args.tokens}', f'--repeats={args.repeats}'], capture_output=True, text=True, check=True)
        runs[name].append(json.loads(out.stdout))
import torch  # noqa: E402  (only to report the thread count)
print(f'{args.rounds} rounds, {args.tokens} tokens per run (best of {args.repeats}), first-hitting, blocks of 4, batch 1, '
      f'{torch.get_num_threads()} threads; medians')
for size in runs['engine'][0]:
    line = {name: statistics.median(run[size]['tokens/s'] for run in runs[name]) for name in runs}
    calls = {name: statistics.median(run[size]['ms/call'] for run in runs[name]) for name in runs}
    print(f'  {size}: ' + ', '.join(f'{n} {line[n]:.1f} tokens/s ({calls[n]:.2f} ms/call)' for n in runs)
          + (f'; engine / old {line["engine"] / line["old"]:.3f}' if 'old' in runs else ''))
