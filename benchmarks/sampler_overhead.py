"""
The sampler's host overhead per model call: microseconds a first-hitting call costs beyond the bare
forward pass it makes (Python bookkeeping, random draws, stop checks), for a tiny model where the
forward itself is cheap, so the overhead shows.

    python benchmarks/sampler_overhead.py
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
import bd3lm  # noqa: E402
from bd3lm_tools import engine  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument('--tokens', type=int, default=512)
p.add_argument('--block_size', type=int, default=16)
p.add_argument('--repeats', type=int, default=3)
p.add_argument('--profile', type=int, default=0, help='1: also the operators per call by the function that runs them')
args = p.parse_args()

torch.manual_seed(0)
config = bd3lm.BD3LMConfig(block_size=args.block_size, vocab_size=1000, model_length=128, hidden_dim=64, cond_dim=32,
                           n_layers=2, n_heads=2, dropout=0.0)
model = bd3lm.BD3LM(config).eval()
bs = config.block_size


def best_of(fn):
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


# The whole sampler: every call of a first-hitting run with the KV cache (one call per token; with this
# checkout's sampler a call is one pass, where older ones added a cache-write pass per block).
idx = torch.full((1, 1), config.bos_id)
_, stats = engine.generate(model, idx, args.tokens, return_stats=True)
total = best_of(lambda: engine.generate(model, idx, args.tokens))
calls = stats['forward_passes']
fused = calls == stats['nfe']                 # the finished block rides along with the next call


@torch.no_grad()
def bare():
    # The same passes with nothing around them: the block through the cached transformer (the first call of
    # a block also carrying the finished block before it, where the sampler does that), and one position
    # through the vocabulary projection (what first-hitting needs).
    n_blocks = -(-(args.tokens + 1) // bs)
    x = torch.randint(0, 999, (1, bs))
    c = model.cond(None, 1)
    if hasattr(bd3lm, 'block_pass') and fused:
        cache = engine.KVCache(model, 1, 'cpu')
        for b in range(n_blocks):
            for i in range(calls // n_blocks):
                finished = ([0], x) if b and not i else None
                h = engine.block_pass(model, None, [b * bs], cache, finished)(x[:, None], c)
                model.output_layer(h[:, 0, 0], c)
        return
    # an older checkout's sampler (a separate cache-write pass per block), for old-against-new runs
    cache = engine.KVCache(config.n_layers, 1, config.n_heads, config.model_length, config.hidden_dim // config.n_heads,
                          bs, 'cpu', torch.float32)
    for b in range(n_blocks):
        positions = torch.arange(b * bs, (b + 1) * bs)
        for _ in range(calls // n_blocks):
            h = model.hidden(x, c, positions, cache)
            model.output_layer(h[:, 0], c)
        cache.commit()


bare_time = best_of(bare)
print(f'{config.n_layers} layers x {config.hidden_dim}, vocab {config.vocab_size}, blocks of {bs}, {args.tokens} tokens, '
      f'{calls} forward passes, torch threads {torch.get_num_threads()}')
print(f'sampler: {1e6 * total / calls:8.1f} us per call')
print(f'bare:    {1e6 * bare_time / calls:8.1f} us per call')
print(f'host overhead: {1e6 * (total - bare_time) / calls:8.1f} us per call ({(total - bare_time) / total:.0%} of the sampler\'s time)')

# The same, counted instead of timed (repeatable on a busy machine): the torch operators each call
# dispatches, in the sampler and in the bare passes; the difference is the sampler's own work.
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402


class Count(TorchDispatchMode):
    n, where = 0, None            # where: {call path: operators}, when profiling

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        Count.n += 1
        if Count.where is not None:
            Count.where[call_path()] = Count.where.get(call_path(), 0) + 1
        return func(*args, **(kwargs or {}))


def call_path(depth=4):
    # The sampler's functions on the stack below generate, outermost first (bd3lm.py and speculative.py;
    # the model's layers count as 'transformer' or 'output layer'): e.g. 'denoise_step > fill > law'.
    names, frame = [], sys._getframe(2)
    while frame is not None and frame.f_code.co_name != 'generate':
        if os.path.basename(frame.f_code.co_filename) in ('bd3lm.py', 'speculative.py'):
            names.append(frame.f_code.co_name)
        frame = frame.f_back
    names = names[::-1]
    model_at = [i for i, n in enumerate(names) if n in ('transformer', 'forward')]
    if model_at:                # the model's own work: its transformer, or the output layer alone
        return ' > '.join(names[:model_at[0]][:depth] + ['transformer' if names[model_at[0]] == 'transformer'
                                                         else 'output layer'])
    return ' > '.join(names[:depth]) or 'generate'


def ops(fn):
    Count.n = 0
    with Count():
        fn()
    return Count.n


with torch.no_grad():
    sampler_ops, bare_ops = ops(lambda: engine.generate(model, idx, args.tokens)), ops(bare)
print(f'torch operators per call: sampler {sampler_ops / calls:.1f}, bare {bare_ops / calls:.1f}, '
      f'the sampler\'s own {(sampler_ops - bare_ops) / calls:.1f}')

if args.profile:
    Count.where = {}
    with torch.no_grad():
        ops(lambda: engine.generate(model, idx, args.tokens))
    print('operators per call by where they run:')
    for path, n in sorted(Count.where.items(), key=lambda kv: -kv[1]):
        print(f'  {n / calls:7.2f}  {path}')
