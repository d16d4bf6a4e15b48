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

p = argparse.ArgumentParser()
p.add_argument('--tokens', type=int, default=512)
p.add_argument('--block_size', type=int, default=16)
p.add_argument('--repeats', type=int, default=3)
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


# The whole sampler: every call of a first-hitting run with the KV cache (one call per token, plus one
# cache commit per block).
idx = torch.full((1, 1), config.bos_id)
_, stats = model.generate(idx, args.tokens, return_stats=True)
total = best_of(lambda: model.generate(idx, args.tokens))
calls = stats['forward_passes']


@torch.no_grad()
def bare():
    # The same passes with nothing around them: the block through the cached transformer, and one
    # position through the vocabulary projection (what first-hitting needs), cycling through the ring.
    cache = bd3lm.KVCache(config.n_layers, 1, config.n_heads, config.model_length, config.hidden_dim // config.n_heads,
                          bs, 'cpu', torch.float32)
    x = torch.randint(0, 999, (1, bs))
    c = model.cond(None, 1)
    n_blocks = -(-(args.tokens + 1) // bs)
    per_block = calls // n_blocks
    for b in range(n_blocks):
        positions = torch.arange(b * bs, (b + 1) * bs)
        for _ in range(per_block):
            h = model.hidden(x, c, positions, cache)
            model.output_layer(h[:, 0], c)
        cache.commit()


bare_time = best_of(bare)
print(f'{config.n_layers} layers x {config.hidden_dim}, vocab {config.vocab_size}, blocks of {bs}, {args.tokens} tokens, '
      f'{calls} forward passes, torch threads {torch.get_num_threads()}')
print(f'sampler: {1e6 * total / calls:8.1f} us per call')
print(f'bare:    {1e6 * bare_time / calls:8.1f} us per call')
print(f'host overhead: {1e6 * (total - bare_time) / calls:8.1f} us per call ({(total - bare_time) / total:.0%} of the sampler\'s time)')
