"""
The samplers against each other in one sitting: the engine (bd3lm_tools/engine.py), the textbook
(bd3lm.generate), optionally the engine's compiled call and an older checkout's sampler. Each turn runs in
its own process (each checkout imports its own bd3lm), the order alternating between rounds. Per turn, at two
sizes, first-hitting with the KV cache, blocks of 4, batch 1, BOS then N tokens:
  - tokens/s and ms per token, the fastest of --repeats runs after a warm-up run (noise only adds);
  - torch operators dispatched per token, counted: the work, repeatable on a busy machine (not for the
    compiled call). The engine makes one model pass per token here; the textbook 1.25 (a pass per block
    to write the finished block into its cache);
  - a hash of the tokens: every sampler must give the same ones.
Sizes: 4 layers x 256 wide with GPT-2's vocabulary and context 1024, and a toy model (2 x 32, vocabulary 37)
where the sampler's own host work is nearly all of a call.

    OMP_NUM_THREADS=1 python benchmarks/sampler_speed.py --rounds=3
    OMP_NUM_THREADS=1 python benchmarks/sampler_speed.py --old=/path/to/older/checkout --compile=1
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
p.add_argument('--old', default=None, help='an older checkout: its engine if it has one, else its bd3lm.generate')
p.add_argument('--compile', type=int, default=0, help='1: also the engine with its compiled call')
p.add_argument('--rounds', type=int, default=3)
p.add_argument('--tokens', type=int, default=256)
p.add_argument('--repeats', type=int, default=3, help='timed runs per turn (the fastest counts)')
p.add_argument('--turn', default=None, help=argparse.SUPPRESS)     # internal: one measurement
args = p.parse_args()

SIZES = {'4 x 256, GPT-2 vocabulary': dict(n_layers=4, hidden_dim=256, n_heads=4, vocab_size=50258, cond_dim=128),
         'toy 2 x 32, vocabulary 37': dict(n_layers=2, hidden_dim=32, n_heads=4, vocab_size=37, cond_dim=16)}


def measure(sampler, root):
    sys.path.insert(0, root)
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    import bd3lm
    if os.path.isdir(os.path.join(root, 'bd3lm_tools')):
        from bd3lm_tools import engine
        assert os.path.dirname(os.path.abspath(engine.__file__)) == os.path.join(root, 'bd3lm_tools')
    else:                                               # a checkout before the split: one sampler
        engine = bd3lm
    assert os.path.dirname(os.path.abspath(bd3lm.__file__)) == root, 'measure the checkout asked for'
    generate = bd3lm.generate if sampler == 'textbook' else engine.generate
    if sampler == 'compiled':
        engine.compile_sampler()

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    result = {}
    for size, shape in SIZES.items():
        torch.manual_seed(0)
        model = bd3lm.BD3LM(bd3lm.BD3LMConfig(block_size=4, model_length=1024, dropout=0.0, **shape)).eval()
        idx = torch.full((1, 1), model.config.bos_id)
        run = lambda: generate(model, idx, args.tokens, generator=torch.Generator().manual_seed(1))  # noqa: E731
        out = run()                                     # warm-up (and compilation)
        dt = math.inf
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            run()
            dt = min(dt, time.perf_counter() - t0)
        Count.n = 0
        if sampler != 'compiled':                       # (a dispatch mode turns compilation off: not counted)
            with Count():
                run()
        result[size] = {'tokens/s': args.tokens / dt, 'ms/token': 1e3 * dt / args.tokens,
                        'ops/token': Count.n / args.tokens if Count.n else math.nan,
                        'tokens': hash(tuple(out.flatten().tolist())), 'threads': torch.get_num_threads()}
    return result


if args.turn:
    print(json.dumps(measure(*args.turn.split(':', 1))))
    sys.exit(0)

here = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
turns = [('engine', 'engine', here), ('textbook', 'textbook', here)]
turns += [('compiled', 'compiled', here)] if args.compile else []
turns += [('old', 'engine', os.path.abspath(args.old))] if args.old else []
runs = {name: [] for name, _, _ in turns}
for r in range(args.rounds):
    for name, sampler, root in (turns if r % 2 == 0 else turns[::-1]):
        out = subprocess.run([sys.executable, __file__, f'--turn={sampler}:{root}', f'--tokens={args.tokens}',
                              f'--repeats={args.repeats}'], capture_output=True, text=True)
        if out.returncode:
            sys.exit(f'the {name} turn failed:\n{out.stderr[-2000:]}')
        runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))

print(f'{args.rounds} rounds, BOS + {args.tokens} tokens per run (fastest of {args.repeats}), first-hitting, KV cache, '
      f'blocks of 4, batch 1, {runs["engine"][0][next(iter(SIZES))]["threads"]} torch threads; medians over rounds')
for size in SIZES:
    med = {name: {k: statistics.median(run[size][k] for run in runs[name]) for k in ('tokens/s', 'ms/token', 'ops/token')}
           for name in runs}
    same = len({run[size]['tokens'] for name in runs for run in runs[name]}) == 1
    print(f'  {size}: {"the same tokens from every sampler" if same else "THE SAMPLERS GAVE DIFFERENT TOKENS"}')
    for name in runs:
        ratio = f'   engine / {name} {med["engine"]["tokens/s"] / med[name]["tokens/s"]:.3f}x' if name != 'engine' else ''
        print(f'    {name:9s} {med[name]["tokens/s"]:8.1f} tokens/s {med[name]["ms/token"]:7.2f} ms/token '
              f'{med[name]["ops/token"]:7.1f} torch ops/token{ratio}')
