"""
The paper's central claim at CPU scale: the same small model, trained with the same budget, at
block_size 1, 4, 8, 16 and model_length (MDLM), each with several training seeds. For each model this
script scores the whole validation split with the paper's likelihood protocol (`train.py --eval_only`,
several passes) and, for the first seed, the variance of the NELBO estimate on [1e-3, 1] and on the
best clipped interval, and the sampling cost. Results go to a JSON file that the notebook plots with
error bars over seeds.

    python notebooks/interpolation.py                          # the full run (~45 min on 2 CPU cores)
    python notebooks/interpolation.py --iters=8 --seeds=1 --out=/tmp/r.json   # a quick version (the notebook's)
    python notebooks/interpolation.py --block_sizes=1 --update      # rerun one row, keep the others in --out

Block size 1 trains as bd3lms trains it: the clipped-schedule search runs after its first evaluation (at a
tenth of the budget) and picks t = 1, the exact AR loss, for the rest of training. The other block sizes
train on the full interval [1e-3, 1] with no search, so that they differ in block size alone.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
sys.path.insert(0, ROOT)
import bd3lm  # noqa: E402
from bd3lm_tools import engine  # noqa: E402
import prepare  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument('--iters', type=int, default=300)
p.add_argument('--model_length', type=int, default=64)
p.add_argument('--block_sizes', default='1,4,8,16,64')
p.add_argument('--seeds', type=int, default=3, help='training seeds per block size')
p.add_argument('--eval_passes', type=int, default=3, help='passes over the validation split per model')
p.add_argument('--eval_batches', type=int, default=20, help='batches for the variance measurements')
p.add_argument('--sample_tokens', type=int, default=None, help='default model_length - 1 (what MDLM can write)')
p.add_argument('--out', default=os.path.join(ROOT, 'notebooks', 'interpolation_results.json'))
p.add_argument('--work_dir', default=os.path.join(ROOT, 'out-interpolation'))
p.add_argument('--update', action='store_true', help='replace only these block sizes\' rows in an existing --out')
args = p.parse_args()

L = args.model_length
args.sample_tokens = args.sample_tokens or L - 1
model_args = ['--n_layers=2', '--n_heads=4', '--hidden_dim=128', '--cond_dim=64', f'--model_length={L}',
              '--batch_size=16', f'--max_iters={args.iters}', f'--lr_decay_iters={args.iters}',
              f'--warmup_iters={max(1, args.iters // 10)}', f'--eval_interval={args.iters}', '--eval_iters=2',
              '--clip_search=False', '--num_samples=0', '--max_minutes=0', '--log_interval=1000']


def val_batches(n, batch_size=16):
    # The same held-out sequences for every block size. train.py has prepared the corpus by now.
    data = os.path.join(ROOT, 'data', 'python_docs')
    val = np.memmap(os.path.join(data, 'val.bin'), dtype=np.uint16, mode='r')
    g = torch.Generator().manual_seed(0)
    return [prepare.sample_windows(val, batch_size, L, prepare.read_meta(data), g) for _ in range(n)]


def run(*cmd):
    proc = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(proc.stderr[-2000:])


results = []
for bs in [int(b) for b in args.block_sizes.split(',')]:
    label = 'MDLM' if bs == L else ('AR-like' if bs == 1 else f'BD3-LM {bs}')
    for seed in range(args.seeds):
        out_dir = os.path.join(args.work_dir, f'block{bs}-seed{seed}')
        t0 = time.time()
        done = os.path.exists(os.path.join(out_dir, 'eval.json'))   # a rerun reuses finished models
        if not done:
            ar = ['--clip_search=True', f'--eval_interval={max(1, args.iters // 10)}'] if bs == 1 else []
            run(os.path.join(ROOT, 'train.py'), *model_args, *ar, f'--block_size={bs}', f'--out_dir={out_dir}',
                f'--seed={1337 + seed}')
        with open(os.path.join(out_dir, 'final.json')) as f:
            train_minutes = json.load(f)['minutes']
        if not done:  # the whole validation split, the paper's protocol (block size 1: exact NLL at t = 1)
            run(os.path.join(ROOT, 'train.py'), '--eval_only=True', f'--init_from={out_dir}', f'--out_dir={out_dir}',
                f'--eval_passes={args.eval_passes}', '--eval_batch_size=32')
        with open(os.path.join(out_dir, 'eval.json')) as f:
            ev = json.load(f)
        row = {'block_size': bs, 'label': label, 'seed': seed, 'val_nelbo': ev['nelbo'], 'val_ppl': ev['ppl'],
               'val_tokens': ev['tokens'], 'train_minutes': train_minutes}
        if seed == 0:  # the variance of the estimator and the sampling cost: one model per block size
            model = bd3lm.BD3LM.from_pretrained(out_dir)
            batches = val_batches(args.eval_batches)
            noise = torch.Generator().manual_seed(1)
            with torch.no_grad():
                var_full = bd3lm.nelbo_variance(model, batches, bd3lm.FULL_INTERVAL, generator=noise)
                if bs > 1:
                    best, _ = bd3lm.search_clip_interval(model, batches[:5], widths=(0.25, 0.5, 0.75), delta=0.05,
                                                         generator=noise)
                    var_clipped = bd3lm.nelbo_variance(model, batches, best, generator=noise)
                else:  # t = 1 masks every token: the exact AR likelihood
                    best, var_clipped = (1.0, 1.0), bd3lm.nelbo_variance(model, batches, (1.0, 1.0), generator=noise)
            t1 = time.time()
            _, stats = engine.generate(model, torch.full((1, 1), model.config.bos_id), args.sample_tokens, return_stats=True,
                                      generator=torch.Generator().manual_seed(0))
            sample_s = time.time() - t1
            _, stats1 = engine.generate(model, torch.full((1, 1), model.config.bos_id), args.sample_tokens, rule='steps', knob=1,
                                       return_stats=True, generator=torch.Generator().manual_seed(0))
            row.update({'var_full': var_full, 'clip_interval': list(best), 'var_clipped': var_clipped,
                        'nfe_first_hitting': stats['nfe'], 'tokens_per_s': args.sample_tokens / sample_s,
                        'nfe_one_step_per_block': stats1['nfe']})
        results.append(row)
        print(json.dumps(row), flush=True)

if args.update:  # the other block sizes' rows stay as they were
    with open(args.out) as f:
        kept = [r for r in json.load(f)['results'] if r['block_size'] not in {r['block_size'] for r in results}]
    results = sorted(kept + results, key=lambda r: (r['block_size'], r['seed']))
summary = []
for bs in dict.fromkeys(r['block_size'] for r in results):
    rows = [r for r in results if r['block_size'] == bs]
    ppl = [r['val_ppl'] for r in rows]
    summary.append({'block_size': bs, 'label': rows[0]['label'], 'seeds': len(rows), 'ppl_mean': float(np.mean(ppl)),
                    'ppl_std': float(np.std(ppl, ddof=1)) if len(ppl) > 1 else 0.0,
                    'nelbo_mean': float(np.mean([r['val_nelbo'] for r in rows]))})
    print(f"{rows[0]['label']:>10}: perplexity <= {summary[-1]['ppl_mean']:.1f} +- {summary[-1]['ppl_std']:.1f} "
          f"over {len(rows)} seeds")

meta = {'command': 'python notebooks/interpolation.py' + (' (then: ' + ' '.join(sys.argv[1:]) + ')' if args.update else
                                                            ' ' + ' '.join(sys.argv[1:])), 'iters': args.iters,
        'model': '2 layers x 128 wide, L=%d, batch 16, embedded corpus' % L, 'torch': torch.__version__,
        'threads': torch.get_num_threads(), 'seeds': args.seeds, 'eval_passes': args.eval_passes}
os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
with open(args.out, 'w') as f:
    json.dump({'meta': meta, 'results': results, 'summary': summary}, f, indent=2)
print(f'wrote {args.out}')
