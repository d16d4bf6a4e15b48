"""
The speed/quality frontier of the unmasking rules: model calls per generated token against generative
perplexity and unigram entropy, on the same samples (seeds) for every rule.

    python benchmarks/sampling_frontier.py               # CPU, offline; trains both models the first time (~1 h)
    python benchmarks/sampling_frontier.py --judge=gpt2-large    # any Hugging Face causal LM as the judge
    python benchmarks/sampling_frontier.py --only=speculative    # rerun those rows into an earlier run's json

The first run trains, on the embedded corpus (Python's documentation), a BD3-LM (4 x 128, L = 128, blocks
of 16, 2,000 iterations, ~8x the demo) and an independent judge: a block-size-1 model of this project
trained with another seed, which after its first evaluation trains at t = 1 (the AR loss) and scores a
sample's exact NLL. Both are cached in --out_dir and reused. Then, for each rule and knob, --samples
unconditional samples of --tokens tokens are drawn with the same per-sample seeds and measured:
  calls/token   model calls (NFEs) each sample made (what it pays alone), per generated token
  tokens/s      batch 1, the cached sampler, on --speed_samples of the samples
  gen PPL       under the judge: the mean of per-sample exp(mean NLL) (EOS not scored), and token-weighted
  entropy       unigram entropy of each sample's generated tokens, averaged
Writes --out_dir/frontier.json; notebooks/sampling.ipynb plots it.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
sys.path.insert(0, ROOT)
import bd3lm  # noqa: E402
from bd3lm_tools import engine  # noqa: E402
from bd3lm_tools.tokenizer import get_tokenizer  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument('--out_dir', default='out-frontier')
p.add_argument('--judge', default=None, help='a Hugging Face causal LM (name or folder); default: the trained judge')
p.add_argument('--samples', type=int, default=24)
p.add_argument('--tokens', type=int, default=127, help='generated tokens per sample (after BOS)')
p.add_argument('--speed_samples', type=int, default=3)
p.add_argument('--top_p', type=float, default=1.0)
p.add_argument('--temperature', type=float, default=1.0)
p.add_argument('--max_iters', type=int, default=2000, help='training iterations of each model, if trained here')
p.add_argument('--only', default='', help="rerun only the rules whose names contain this (e.g. 'speculative'), "
               "replacing their rows in --out_dir/frontier.json, which must come from the same settings")
args = p.parse_args()

# --- the two models: trained once, then reused ---------------------------------------------------------
TRAIN = ['--max_iters={it}', '--lr_decay_iters={it}', '--warmup_iters=100', '--eval_interval=500', '--log_interval=50',
         '--max_minutes=0', '--num_samples=0']
MODELS = {'model': ['--block_size=16', '--seed=1'], 'judge': ['--block_size=1', '--seed=2']}
for name, flags in MODELS.items():
    folder = os.path.join(args.out_dir, name)
    if not os.path.exists(os.path.join(folder, 'final.json')):
        print(f'training {folder} (cached for later runs) ...', flush=True)
        subprocess.run([sys.executable, 'train.py', f'--out_dir={folder}', *flags,
                        *[f.format(it=args.max_iters) for f in TRAIN]], cwd=ROOT, check=True)
model = bd3lm.BD3LM.from_pretrained(os.path.join(args.out_dir, 'model')).eval()
enc = get_tokenizer(model)
final = {name: json.load(open(os.path.join(args.out_dir, name, 'final.json'))) for name in MODELS}

# --- the judge -------------------------------------------------------------------------------------------
if args.judge is None:
    judge = bd3lm.BD3LM.from_pretrained(os.path.join(args.out_dir, 'judge')).eval()
    assert judge.config.block_size == 1

    @torch.no_grad()
    def token_nlls(rows):
        """Exact NLL of each generated token under the AR-like judge: its NELBO at t = 1 (all masked, weight 1)."""
        x = torch.tensor([[judge.config.bos_id] + row for row in rows])
        per_token = judge.nelbo(x, interval=(1.0, 1.0), reduction='none')[:, 1:]
        return [(per_token[i], torch.tensor(row) != judge.config.eos_id) for i, row in enumerate(rows)]
    judge_name = f'{args.out_dir}/judge (block size 1, exact NLL)'
else:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    judge_tok = AutoTokenizer.from_pretrained(args.judge)
    judge_lm = AutoModelForCausalLM.from_pretrained(args.judge).eval()

    @torch.no_grad()
    def token_nlls(rows):
        """The samples re-tokenized by the judge, its BOS first (EOS decoded as text: context, never scored)."""
        out = []
        for row in rows:
            text = enc.decode(row, keep_special=True)
            ids = torch.tensor([judge_tok.bos_token_id or judge_tok.eos_token_id] + judge_tok.encode(text))
            log_p = judge_lm(ids[None]).logits[0, :-1].float().log_softmax(-1)
            out.append((-log_p.gather(-1, ids[1:, None]).squeeze(-1), ids[1:] != judge_tok.eos_token_id))
        return out
    judge_name = args.judge

# --- the rules ---------------------------------------------------------------------------------------------
bs = model.config.block_size
RULES = [('first-hitting', {})]
RULES += [(f'steps={K}', {'rule': 'steps', 'knob': K}) for K in (8, 4, 2, 1)]
RULES += [(f'threshold={tau}, {order}', {'rule': 'threshold', 'knob': tau, 'order': order})
          for order in ('uniform', 'confidence') for tau in (0.9, 0.7, 0.5, 0.3, 0.1)]
# gamma up to 64 nats: a small model's positions often carry more than 4 nats each, so a narrow sweep
# never leaves one token per call
RULES += [(f'entropy_bound={gamma}, {order}', {'rule': 'entropy_bound', 'knob': gamma, 'order': order})
          for order in ('entropy', 'uniform') for gamma in (0.5, 2.0, 8.0, 16.0, 32.0, 64.0)]
RULES += [(f'tokens_per_call={k}', {'rule': 'tokens_per_call', 'knob': k}) for k in (2, 4, 8)]
# lossless: first-hitting's law (uniform order) or lowest-entropy-first's, several tokens per call. Not the
# confidence order: its target is a law over (position, token) pairs, block_size^2 x vocabulary floats per
# row (speculative.pick_law): one evaluation for 12 rows at GPT-2's vocabulary takes ~60 s on a 2-core CPU,
# and a call drafting k reveals needs up to 2k + 1. benchmarks/known_law.py measures that order.
RULES += [(f'speculative={k}, {order}', {'rule': 'speculative', 'knob': k, 'order': order})
          for order in ('uniform', 'entropy') for k in (2, 4, 16)]
RULES += [(f'speculative_wide=16, {order}', {'rule': 'speculative_wide', 'knob': 16, 'order': order})
          for order in ('uniform', 'entropy')]

previous = []
if args.only:
    path = os.path.join(args.out_dir, 'frontier.json')
    if not os.path.exists(path):
        sys.exit(f'--only={args.only!r} replaces rows of {path}, which does not exist: run once without --only first')
    old = json.load(open(path))
    differ = {k: (old['settings'].get(k), v) for k, v in vars(args).items()
              if k != 'only' and old['settings'].get(k) != v}
    if differ:
        sys.exit(f'--only: {path} was made with other settings (old, now): {differ}; pass the same ones')
    previous = old['results']
    RULES = [(name, kwargs) for name, kwargs in RULES if args.only in name]
    if not RULES:
        sys.exit(f'--only={args.only!r} matches no rule')


def generate(kwargs, seeds):
    idx = torch.full((len(seeds), 1), model.config.bos_id)
    return engine.generate(model, idx, args.tokens, generator=[torch.Generator().manual_seed(s) for s in seeds],
                          top_p=args.top_p, temperature=args.temperature, return_stats=True, **kwargs)


torch.manual_seed(0)
results = []
print(f'model: {args.out_dir}/model, val NELBO {final["model"]["val_nelbo"]:.3f} (ppl <= {final["model"]["val_ppl"]:.0f}); '
      f'judge: {judge_name}; {args.samples} samples x {args.tokens} tokens, top_p {args.top_p}, temperature '
      f'{args.temperature}, torch threads {torch.get_num_threads()}', flush=True)
print(f'{"rule":<32} {"calls/token":>11} {"tokens/call":>11} {"rows x tok":>10} {"tokens/s":>9} {"gen PPL":>8} '
      f'{"(tok-wtd)":>9} {"entropy":>8}')
for name, kwargs in RULES:
    seeds = list(range(args.samples))
    with torch.no_grad():
        out, stats = generate(kwargs, seeds)                      # one batch; row_nfe = each sample's own calls
        rows = out[:, 1:].tolist()
        t0 = time.perf_counter()
        speed_tokens = 0
        for s in seeds[:args.speed_samples]:                      # batch 1: what one user sees
            speed_tokens += int(generate(kwargs, [s])[1]['lengths'][0]) - 1
        tokens_per_s = speed_tokens / (time.perf_counter() - t0)
    scored = token_nlls(rows)
    per_sample = [math.exp(float(nll[keep].double().mean())) for nll, keep in scored]
    total = sum(float(nll[keep].double().sum()) for nll, keep in scored)
    count = sum(int(keep.sum()) for _, keep in scored)
    calls = [int(n) / args.tokens for n in stats['row_nfe']]
    compute = float(stats['rows_x_tokens'].double().sum()) / (len(seeds) * args.tokens)   # block rows x tokens
    result = {'rule': name, 'kwargs': kwargs, 'calls_per_token': sum(calls) / len(calls), 'compute_per_token': compute,
              'calls_per_token_per_sample': calls, 'tokens_per_s': tokens_per_s,
              'gen_ppl_mean': sum(per_sample) / len(per_sample), 'gen_ppl': math.exp(total / count),
              'entropy': sum(bd3lm.unigram_entropy(torch.tensor(r)) for r in rows) / len(rows),
              'example': enc.decode(rows[0])[:300]}
    results.append(result)
    print(f'{name:<32} {result["calls_per_token"]:11.3f} {1 / result["calls_per_token"]:11.2f} {compute:10.2f} '
          f'{tokens_per_s:9.1f} '
          f'{result["gen_ppl_mean"]:8.1f} {result["gen_ppl"]:9.1f} {result["entropy"]:8.3f}', flush=True)

# --- the targets, stated from the numbers ------------------------------------------------------------------
rerun = {r['rule']: r for r in results}
results = [rerun.pop(r['rule'], r) for r in previous] + list(rerun.values()) if previous else results
base = results[0]
adaptive = [r for r in results if r['kwargs'].get('rule') in ('threshold', 'entropy_bound', 'tokens_per_call',
                                                               'speculative')]
close = [r for r in adaptive if r['calls_per_token'] <= 0.5 * base['calls_per_token']
         and r['gen_ppl_mean'] <= 1.1 * base['gen_ppl_mean'] and abs(r['entropy'] - base['entropy']) <= 0.1]
print(f'\nfirst-hitting: gen PPL {base["gen_ppl_mean"]:.1f}, entropy {base["entropy"]:.3f}, 1 call per token')
if close:
    best = min(close, key=lambda r: r['calls_per_token'])
    print(f'target 1 met: {best["rule"]} makes {best["calls_per_token"]:.3f} calls per token with gen PPL '
          f'{best["gen_ppl_mean"]:.1f} and entropy {best["entropy"]:.3f}')
else:
    print('target 1 not met: no adaptive setting reaches half of first-hitting\'s calls with gen PPL within 10% and '
          'entropy within 0.1 nats')
for r in (r for r in results if r['kwargs'].get('rule') == 'steps'):
    rivals = [a for a in adaptive if a['calls_per_token'] <= r['calls_per_token'] * 1.05
              and abs(a['entropy'] - r['entropy']) <= 0.1]
    best = min(rivals, key=lambda a: a['gen_ppl_mean']) if rivals else None
    verdict = (f'best adaptive at <= its calls and entropy within 0.1: {best["rule"]} gen PPL {best["gen_ppl_mean"]:.1f}'
               if best else 'no adaptive setting as fast at similar entropy')
    print(f'{r["rule"]} ({r["calls_per_token"]:.3f} calls/token, gen PPL {r["gen_ppl_mean"]:.1f}, entropy '
          f'{r["entropy"]:.3f}): {verdict}')


# --- the decoding order: which position each call reveals, for one prompt --------------------------------
def decoding_order(kwargs, prompt='The Python interpreter', n_blocks=4, seed=0):
    """For the first n_blocks generated blocks: the call (counted within its block, from 1) that revealed
    each position (0 for prompt tokens), and the tokens."""
    idx = torch.tensor([[model.config.bos_id] + enc.encode(prompt)])
    step, reveals, blocks = engine.denoise_step, [], []

    def recording(model_, xb, masked, *rest):                 # engine.denoise_step, watched
        before = masked[0].clone()
        called = step(model_, xb, masked, *rest)
        reveals.append(before & ~masked[0])
        return called

    def on_block(x, end):
        blocks.append(list(reveals))
        reveals.clear()
    engine.denoise_step = recording
    try:
        out = engine.generate(model, idx, n_blocks * bs - idx.shape[1] % bs, generator=torch.Generator().manual_seed(seed),
                             top_p=args.top_p, temperature=args.temperature, on_block=on_block, **kwargs)
    finally:
        engine.denoise_step = step
    first = idx.shape[1] // bs * bs
    order = [[0] * bs for _ in blocks]
    for b, calls in enumerate(blocks):
        for c, mask in enumerate(calls, start=1):
            for j in mask.nonzero().flatten().tolist():
                order[b][j] = c
    tokens = [[enc.decode([t]) for t in out[0, first + b * bs:first + (b + 1) * bs].tolist()] for b in range(len(blocks))]
    return {'prompt': prompt, 'calls': order, 'tokens': tokens, 'first_position': first}


ORDER_RULES = [('first-hitting', {}), ('threshold=0.5, uniform', {'rule': 'threshold', 'knob': 0.5, 'order': 'uniform'}),
               ('threshold=0.5, confidence', {'rule': 'threshold', 'knob': 0.5, 'order': 'confidence'}),
               ('entropy_bound=1.0, entropy', {'rule': 'entropy_bound', 'knob': 1.0, 'order': 'entropy'}),
               ('tokens_per_call=4', {'rule': 'tokens_per_call', 'knob': 4}),
               ('speculative=4, uniform', {'rule': 'speculative', 'knob': 4})]
orders = {name: decoding_order(kwargs) for name, kwargs in ORDER_RULES}
with open(os.path.join(args.out_dir, 'frontier.json'), 'w') as f:
    json.dump({'model': final['model'], 'judge': judge_name, 'judge_final': final['judge'] if args.judge is None else None,
               'settings': vars(args), 'results': results, 'decoding_order': orders}, f, indent=2)
print(f'wrote {args.out_dir}/frontier.json')
