"""
The paper's central claim at CPU scale: the same small model, trained with the same budget, at
block_size 1, 4, 16 and model_length (MDLM). For each, this script reports the validation NELBO as
perplexity, the variance of the NELBO estimate on [1e-3, 1] and on the best clipped interval, and the
sampling cost (model calls and tokens/s). Results go to a JSON file that the notebook plots.

    python notebooks/interpolation.py                          # the full run (~15 min on 2 CPU cores)
    python notebooks/interpolation.py --iters=20 --out=/tmp/r.json   # a quick version (the notebook's)
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
sys.path.insert(0, ROOT)
import bd3lm  # noqa: E402
import prepare  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument('--iters', type=int, default=400)
p.add_argument('--model_length', type=int, default=64)
p.add_argument('--block_sizes', default='1,4,16,64')
p.add_argument('--eval_batches', type=int, default=20)
p.add_argument('--sample_tokens', type=int, default=128)
p.add_argument('--out', default=os.path.join(ROOT, 'notebooks', 'interpolation_results.json'))
p.add_argument('--work_dir', default=os.path.join(ROOT, 'out-interpolation'))
args = p.parse_args()

L = args.model_length
model_args = ['--n_blocks=2', '--n_heads=4', '--hidden_dim=128', '--cond_dim=64', f'--model_length={L}',
              '--batch_size=16', f'--max_iters={args.iters}', f'--lr_decay_iters={args.iters}',
              f'--warmup_iters={max(1, args.iters // 10)}', f'--eval_interval={args.iters}', '--eval_iters=2',
              '--clip_search=False', '--num_samples=0', '--max_minutes=0', '--log_interval=1000']


def val_batches(n, batch_size=16):
    # The same held-out sequences for every block size. train.py has prepared the corpus by now.
    data = os.path.join(ROOT, 'data', 'python_docs')
    val = np.memmap(os.path.join(data, 'val.bin'), dtype=np.uint16, mode='r')
    g = torch.Generator().manual_seed(0)
    return [prepare.sample_windows(val, batch_size, L, prepare.read_meta(data), g) for _ in range(n)]


results = []
for bs in [int(b) for b in args.block_sizes.split(',')]:
    out_dir = os.path.join(args.work_dir, f'block{bs}')
    t0 = time.time()
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'train.py'), *model_args, f'--block_size={bs}',
                           f'--out_dir={out_dir}'], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(proc.stderr[-2000:])
    train_minutes = (time.time() - t0) / 60
    model = bd3lm.BD3LM.from_pretrained(out_dir)
    batches = val_batches(args.eval_batches)
    noise = torch.Generator().manual_seed(1)
    with torch.no_grad():
        # Block size 1: t = 1 masks every token, the NELBO is then the exact AR likelihood (the paper's NLL).
        interval = (1.0, 1.0) if bs == 1 else (1e-3, 1.0)
        nelbo = float(np.mean([model.nelbo(x, interval=interval, generator=noise).item() for x in batches]))
        var_full = bd3lm.nelbo_variance(model, batches, (1e-3, 1.0), generator=noise)
        if bs > 1:
            best, variances = bd3lm.search_clip_interval(model, batches[:5], widths=(0.25, 0.5, 0.75), delta=0.05,
                                                         generator=noise)
            var_clipped = bd3lm.nelbo_variance(model, batches, best, generator=noise)
        else:
            best, var_clipped = (1.0, 1.0), bd3lm.nelbo_variance(model, batches, (1.0, 1.0), generator=noise)
    t1 = time.time()
    _, stats = model.generate(torch.full((1, 1), model.config.bos_id), args.sample_tokens, return_stats=True,
                              generator=torch.Generator().manual_seed(0))
    sample_s = time.time() - t1
    _, stats4 = model.generate(torch.full((1, 1), model.config.bos_id), args.sample_tokens, steps=1, return_stats=True,
                               generator=torch.Generator().manual_seed(0))
    row = {'block_size': bs, 'label': 'MDLM' if bs == L else ('AR-like' if bs == 1 else f'BD3-LM {bs}'),
           'val_nelbo': nelbo, 'val_ppl': math.exp(nelbo), 'var_full': var_full, 'clip_interval': list(best),
           'var_clipped': var_clipped, 'nfe_first_hitting': stats['nfe'], 'tokens_per_s': args.sample_tokens / sample_s,
           'nfe_one_step_per_block': stats4['nfe'], 'train_minutes': train_minutes}
    results.append(row)
    print(json.dumps(row))

meta = {'command': 'python notebooks/interpolation.py ' + ' '.join(sys.argv[1:]), 'iters': args.iters,
        'model': '2 layers x 128 wide, L=%d, batch 16, embedded corpus' % L, 'torch': torch.__version__,
        'threads': torch.get_num_threads()}
os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
with open(args.out, 'w') as f:
    json.dump({'meta': meta, 'results': results}, f, indent=2)
print(f'wrote {args.out}')
