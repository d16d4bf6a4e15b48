"""Sampling tokens/s of this port's sampler against the official bd3lms one: same weights, same machine,
same run, alternating (after one warm-up of each).

    python benchmarks/official_sampler.py --official=PATH/TO/bd3lms    # needs lightning, hydra-core, omegaconf, torchmetrics, einops
    python benchmarks/official_sampler.py --official=PATH/TO/bd3lms --model_length=1024    # the released models' context
    python benchmarks/official_sampler.py --official=PATH/TO/bd3lms --official_kv_cache=0  # its config's default

Official: Diffusion._semi_ar_sampler (diffusion.py) with sampling.first_hitting and sampling.kv_cache,
nucleus_p=1, backbone models/dit.py DIT with attn_backend='sdpa' (the paper's gen-PPL script loads the
released weights through algo.backbone=hf_dit, models/hf: the same network in another file, not timed here). Ours: bd3lm.generate (first-hitting,
KV cache). Both generate the full context (BOS + model_length - 1 tokens), batch 1, float32, one CPU
thread. Random weights (the zero-initialised adaLN and output layer perturbed), checked equal on one
training pass and one inference pass. "passes" counts every transformer pass (calls of the first layer):
the official sampler also runs one cache-writing pass per finished block; ours writes a finished block
within the next block's first call.

Workarounds in the official code (the sampler's arithmetic is untouched): dataloader, metrics and utils
are stubbed in sys.modules (metrics downloads a GPT-2 tokenizer, utils needs timm; Diffusion only keeps a
Metrics object, here inert); DIT.reset_kv_cache() takes no argument while the sampler passes one, and
allocates on CUDA in bfloat16: replaced by the same (batch, 1024, 3 * hidden) cache on the CPU in float32;
diffusion.tqdm is a pass-through; the tokenizer is a stand-in (no mask token: mask = vocab_size, BOS =
EOS = vocab_size - 1).
"""
import argparse
import os
import sys
import time
import types
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
import bd3lm  # noqa: E402
from bd3lm_tools import checkpoints  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument('--official', required=True, help='the bd3lms repository root')
for name, default in (('n_layers', 4), ('hidden_dim', 256), ('n_heads', 4), ('cond_dim', 128), ('model_length', 256),
                      ('block_size', 4), ('turns', 3), ('seed', 0)):
    p.add_argument(f'--{name}', type=int, default=default)
p.add_argument('--vocab_size', type=int, default=2048, help='tokens, not counting the mask')
p.add_argument('--num_steps', type=int, default=5000, help='official T: first-hitting ends each block by its masks')
p.add_argument('--official_kv_cache', type=int, default=1,
               help="the official sampling.kv_cache: 1 as the paper's gen-PPL script sets it, 0 its config default")
args = p.parse_args()
torch.set_num_threads(1)
warnings.filterwarnings('ignore', 'CUDA is not available')   # the official autocast('cuda') blocks

sys.path.insert(0, os.path.abspath(args.official))
for name in ('dataloader', 'utils', 'metrics'):
    sys.modules[name] = types.ModuleType(name)
sys.modules['metrics'].Metrics = lambda config: types.SimpleNamespace(to=lambda *a, **k: None)
from omegaconf import OmegaConf  # noqa: E402
import diffusion  # noqa: E402
from models import dit  # noqa: E402

diffusion.tqdm = lambda it, *a, **k: it


def reset_kv_cache(self, eval_batch_size=1):
    for block in self.blocks:
        block.kv_cache, block.cache_idx = torch.zeros(eval_batch_size, self.max_seqlen, 3 * self.config.model.hidden_size), 0


dit.DIT.reset_kv_cache = reset_kv_cache
V, L, bs = args.vocab_size, args.model_length, args.block_size
config = OmegaConf.create({   # the fields Diffusion, DIT and the sampler read (configs/config.yaml, algo/bd3lm.yaml)
    'mode': 'sample_eval', 'block_size': bs, 'noise': {'type': 'loglinear'},
    'algo': {'name': 'bd3lm', 'backbone': 'dit', 'parameterization': 'subs', 'time_conditioning': False, 'T': 0,
             'causal_attention': False, 'ignore_bos': True, 'cross_attn': True, 'var_min': True, 'sampler': 'semi_ar',
             'mdlm_loss_scale': False},
    'model': {'length': L, 'hidden_size': args.hidden_dim, 'cond_dim': args.cond_dim, 'n_blocks': args.n_layers,
              'n_heads': args.n_heads, 'dropout': 0.0, 'tie_word_embeddings': False, 'attn_backend': 'sdpa'},
    'loader': {'batch_size': 1, 'eval_batch_size': 1},
    'training': {'ema': 0, 'antithetic_sampling': True, 'sampling_eps_min': 1e-3, 'sampling_eps_max': 1.0},
    'sampling': {'first_hitting': True, 'kv_cache': True, 'nucleus_p': 1.0, 'var_length': False},
})
tokenizer = types.SimpleNamespace(vocab_size=V, bos_token_id=V - 1, eos_token_id=V - 1, mask_token=None,
                                  pad_token_id=None, batch_decode=lambda x, **k: [str(r) for r in x.tolist()])

torch.manual_seed(args.seed)
official = diffusion.Diffusion(config, tokenizer).eval()
with torch.no_grad():
    for name, param in official.backbone.named_parameters():
        if 'adaLN_modulation' in name or 'output_layer.linear' in name:   # zero at init
            param.normal_(0, 0.05)
ours = checkpoints.build(bd3lm.BD3LMConfig(block_size=bs, vocab_size=V + 1, model_length=L,
                                           hidden_dim=args.hidden_dim, cond_dim=args.cond_dim,
                                           n_layers=args.n_layers, n_heads=args.n_heads, dropout=0.0),
                         official.state_dict(), 'cpu', 'the official Diffusion state_dict')
mask, bos = V, V - 1

# Same weights: SUBS log-probs at the masked positions (mask column excluded), training and inference pass.
g = torch.Generator().manual_seed(args.seed)
x0 = torch.randint(0, V, (1, L), generator=g)
x0[:, 0] = bos
xt = x0.masked_fill(torch.rand(1, L, generator=g) < 0.5, mask)
xs = torch.cat([x0[:, :L - bs], xt[:, L - bs:]], 1)
sigma = torch.zeros(1, 1)
with torch.no_grad():
    config.sampling.kv_cache = False          # the uncached inference pass (no cache allocated yet)
    diffs = []
    for ref, mine, x in ((official(torch.cat([xt, x0], 1), sigma), ours(xt, x0), xt),
                         (official(xs, sigma, sample_mode=True), ours(xs), xs)):
        at = x[0] == mask
        diffs.append((ref[0, at, :V] - bd3lm.subs_log_probs(mine, mask)[0, at, :V]).abs().max().item())
    config.sampling.kv_cache = bool(args.official_kv_cache)
print(f'same weights: max |log-prob difference| training pass {diffs[0]:.1e}, inference pass {diffs[1]:.1e}')
if max(diffs) > 1e-4:
    sys.exit(f'the two models disagree by {max(diffs):.1e} > 1e-4: the weights did not load the same way')

passes, retries = {'official': 0, 'ours': 0}, 0      # transformer passes: calls of the first layer
official.backbone.blocks[0].register_forward_hook(lambda *a: passes.__setitem__('official', passes['official'] + 1))
ours.blocks[0].register_forward_hook(lambda *a: passes.__setitem__('ours', passes['ours'] + 1))


def run_official(seed):
    global retries
    torch.manual_seed(seed)
    np.random.seed(seed)
    for _ in range(10):
        x, nfe = official._semi_ar_sampler(n_samples=1, num_steps=args.num_steps, num_strides=L // bs, seqlen=L)
        if x is not None:
            assert x.shape == (1, L) and not (x == mask).any()
            return x.shape[1] - 1, nfe
        retries += 1                          # its entropy stop fired: the caller samples again
    sys.exit('the official sampler stopped (entropy < 4) 10 times in a row')


def run_ours(seed):
    out, stats = ours.generate(torch.full((1, 1), bos), L - 1, generator=torch.Generator().manual_seed(seed),
                               return_stats=True)
    assert out.shape == (1, L) and not (out == mask).any()
    return out.shape[1] - 1, stats['nfe']


def timed(side, fn, seed):
    passes[side] = 0
    wall, cpu = time.perf_counter(), time.process_time()
    tokens, nfe = fn(seed)
    return dict(tokens=tokens, wall=time.perf_counter() - wall, cpu=time.process_time() - cpu, nfe=nfe,
                passes=passes[side])


def row(side, r):
    print(f'{side:9s} {r["tokens"]:7d} {r["wall"]:8.2f} {r["cpu"]:7.2f} {r["tokens"] / r["wall"]:8.1f} '
          f'{r["nfe"]:6d} {r["passes"]:7d} {r["passes"] / r["tokens"]:7.3f}')


print(f'{args.n_layers} layers x {args.hidden_dim}, {args.n_heads} heads, vocab {V}+1, context {L}, blocks of {bs}, '
      f'batch 1, float32, 1 thread, torch {torch.__version__}; official KV cache {"on" if args.official_kv_cache else "off"}')
header = f'{"":9s} {"tokens":>7s} {"wall s":>8s} {"cpu s":>7s} {"tok/s":>8s} {"calls":>6s} {"passes":>7s} {"pass/tok":>7s}'
sides = {'official': run_official, 'ours': run_ours}
for side, fn in sides.items():     # warm-up
    timed(side, fn, args.seed + 999)
total = {side: [] for side in sides}
for turn in range(args.turns):     # alternating, each turn's order the other way round
    print(f'turn {turn + 1}\n{header}')
    for side in list(sides)[::1 if turn % 2 == 0 else -1]:
        total[side].append(timed(side, sides[side], args.seed + turn))
        row(side, total[side][-1])
print(f'all {args.turns} turns\n{header}')
sums = {side: {k: sum(r[k] for r in rs) for k in rs[0]} for side, rs in total.items()}
for side, s in sums.items():
    row(side, s)
rate = {side: (s['tokens'] / s['wall'], s['tokens'] / s['cpu']) for side, s in sums.items()}
print(f'ours / official tokens/s: {rate["ours"][0] / rate["official"][0]:.2f}x (wall), '
      f'{rate["ours"][1] / rate["official"][1]:.2f}x (cpu); official entropy-stop retries: {retries}')
