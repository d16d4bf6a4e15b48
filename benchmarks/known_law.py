"""
The unmasking rules on a language whose law is known, so that every sample is scored exactly.

    python benchmarks/known_law.py                 # CPU, offline; trains the model the first time
    python benchmarks/known_law.py --samples=32    # fewer samples per rule: quicker, noisier

The language is a sparse Markov chain over n_words made-up words ('zorblick'): a share of the states
(frac_deterministic) has a single successor, the others `branching` successors with random
probabilities, so its entropy rate (the stationary law times each state's entropy) is exact. It is
written as text in its own WordPiece vocabulary (one word = one token), then prepare.py and train.py
take it like any corpus; the model is cached in out_dir and reused. Every setting of RULES then draws
the same samples (the same per-row seeds) from BOS, and each is scored under the true law:
  calls/token   model calls each sample made (row_nfe: what it pays alone), per generated token
  rows x tok    rows x tokens the calls ran, per generated token (where generate reports it)
  tok/s         batch 1, on speed_samples of the samples
  NLL           nats per word transition under the law, mixed with `smooth` uniform mass so that an
                impossible transition costs a finite -log(smooth / n_words) (11.8 nats by default)
  H_hat         plug-in conditional entropy of the sampled transitions (their empirical counts)
  KL_hat        NLL - H_hat: the sampled transition law against the true one, each word weighted by
                how often the samples visit it
  impossible    transitions that the law gives probability 0
Exact samples of the chain, as many and as long, give the noise floor of these figures. Only
transitions between consecutive words are scored: a [CLS] (end of document) restarts the chain.
Writes out_json (default out_dir/known_law.json).
"""
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
from bd3lm_tools import engine  # noqa: E402
from bd3lm_tools import speculative  # noqa: E402

# -----------------------------------------------------------------------------
# the language
seed = 0
n_words = 128
frac_deterministic = 0.5    # share of states with a single successor
branching = 5               # successors of the other states, probabilities ~ Dirichlet(1)
n_docs = 2000               # documents of the corpus, each a chain started from the stationary law
doc_words = 500
# the model (trained once into out_dir/model, then reused)
out_dir = 'out-known-law'
max_iters = 900
max_minutes = 8.0           # training stops here if max_iters is not reached first
# sampling and scoring
samples = 96                # samples per rule, the same seeds for every rule
tokens = 127                # generated tokens per sample (after BOS)
speed_samples = 3           # batch-1 timing on this many of them
temperature = 1.0
top_p = 1.0
smooth = 1e-3               # uniform mass mixed into the law: impossible transitions score finitely
out_json = ''
only = ''                   # run only the RULES whose names contain this ('' = all)
wide_candidates = 0         # candidates per reveal of speculative_wide (0: speculative.WIDE_CANDIDATES)
# -----------------------------------------------------------------------------

# Every setting drawn and scored: (name, rule, knob, order); order None is the rule's own default.
RULES = [
    ('first-hitting', 'first_hitting', None, None),
    ('steps=8', 'steps', 8, None),
    ('steps=4', 'steps', 4, None),
    ('threshold=0.9, confidence', 'threshold', 0.9, 'confidence'),
    ('threshold=0.7, confidence', 'threshold', 0.7, 'confidence'),
    ('threshold=0.7, uniform', 'threshold', 0.7, 'uniform'),
    ('entropy_bound=0, entropy', 'entropy_bound', 0.0, 'entropy'),
    ('entropy_bound=0.5, entropy', 'entropy_bound', 0.5, 'entropy'),
    ('entropy_bound=2, entropy', 'entropy_bound', 2.0, 'entropy'),
    ('tokens_per_call=2', 'tokens_per_call', 2, None),
    ('speculative k=2', 'speculative', 2, None),
    ('speculative k=4', 'speculative', 4, None),
    ('speculative k=16', 'speculative', 16, None),
    ('speculative k=16, entropy', 'speculative', 16, 'entropy'),
    ('tokens_per_call=1, conf', 'tokens_per_call', 1, 'confidence'),
    ('speculative k=16, conf', 'speculative', 16, 'confidence'),
    # several candidates per reveal (speculative.WIDE_CANDIDATES): more verify rows, fewer calls; in the
    # deterministic orders a round rarely keeps more than 3 drafts, so k = 3 costs few rows for the same calls
    ('spec_wide k=4', 'speculative_wide', 4, None),
    ('spec_wide k=16', 'speculative_wide', 16, None),
    ('spec_wide k=3, entropy', 'speculative_wide', 3, 'entropy'),
    ('spec_wide k=16, entropy', 'speculative_wide', 16, 'entropy'),
    ('spec_wide k=3, conf', 'speculative_wide', 3, 'confidence'),
    ('spec_wide k=16, conf', 'speculative_wide', 16, 'confidence'),
]
SPECIALS = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]']   # BERT's, ids 0-4; the words follow


# --- the chain -----------------------------------------------------------------------------------

def make_chain(seed, n_words, frac_deterministic, branching):
    """(n_words, n_words) transition matrix. Every state's first successor is the next state on one
    random cycle through all states, so the chain is irreducible and its stationary law unique."""
    rng = np.random.default_rng(seed)
    cycle = rng.permutation(n_words)
    nxt = np.empty(n_words, dtype=np.int64)
    nxt[cycle] = np.roll(cycle, -1)
    deterministic = np.zeros(n_words, dtype=bool)
    deterministic[rng.choice(n_words, round(frac_deterministic * n_words), replace=False)] = True
    P = np.zeros((n_words, n_words))
    for i in range(n_words):
        if deterministic[i]:
            P[i, nxt[i]] = 1.0
            continue
        others = rng.choice(np.delete(np.arange(n_words), nxt[i]), branching - 1, replace=False)
        P[i, np.r_[nxt[i], others]] = rng.dirichlet(np.ones(branching))
    return P


def stationary(P):
    # pi P = pi and sum(pi) = 1: one equation of the singular system replaced by the normalisation.
    n = len(P)
    A = P.T - np.eye(n)
    A[-1] = 1.0
    b = np.zeros(n)
    b[-1] = 1.0
    return np.linalg.solve(A, b)


def entropy_rate(P):
    """Nats per token of the stationary chain: sum_i pi_i H(P[i])."""
    row_entropy = -(P * np.log(np.where(P > 0, P, 1.0))).sum(-1)
    return float(stationary(P) @ row_entropy)


def sample_chain(P, n_rows, length, rng):
    """(n_rows, length) word indices, each row a chain started from the stationary law."""
    cdf = P.cumsum(-1)
    x = np.empty((n_rows, length), dtype=np.int64)
    x[:, 0] = rng.choice(len(P), n_rows, p=stationary(P))
    for t in range(1, length):
        u = rng.random(n_rows)[:, None]
        x[:, t] = np.minimum((cdf[x[:, t - 1]] <= u).sum(-1), len(P) - 1)   # the first cdf > u
    return x


def make_words(n, rng):
    """n distinct made-up lowercase words of two or three syllables."""
    consonants, vowels = list('bcdfghjklmnprstvz'), list('aeiou')
    words = set()
    while len(words) < n:
        words.add(''.join(rng.choice(consonants) + rng.choice(vowels) +
                          (rng.choice(consonants) if rng.random() < 0.3 else '')
                          for _ in range(rng.integers(2, 4))))
    return sorted(words)


# --- scoring -------------------------------------------------------------------------------------

def transitions(rows):
    """(a, b) pairs of consecutive words in each row: lists of word indices, where -1 (anything not a
    word) is a break after which the chain restarts."""
    return [(a, b) for row in rows for a, b in zip(row[:-1], row[1:]) if a >= 0 and b >= 0]


def score(pairs, P, smooth=1e-3):
    """The figures of a set of transitions under the law P: NLL (nats per transition, the law mixed
    with smooth / n uniform mass), the plug-in conditional entropy H_hat, KL_hat = NLL - H_hat (an
    empirical conditional KL, >= 0) and the share of impossible transitions."""
    n = len(P)
    counts = np.zeros((n, n))
    np.add.at(counts, tuple(np.array(pairs).T), 1)
    N = counts.sum()
    nll = -(counts * np.log((1 - smooth) * P + smooth / n)).sum() / N
    p_hat = counts / np.maximum(counts.sum(-1, keepdims=True), 1)
    h_hat = -(counts * np.log(np.where(counts > 0, p_hat, 1.0))).sum() / N
    return {'transitions': int(N), 'nll': float(nll), 'h_hat': float(h_hat),
            'kl_hat': float(nll - h_hat), 'impossible': float(counts[P == 0].sum() / N)}


# --- the corpus and the model --------------------------------------------------------------------

def write_corpus(folder, P, words, rng):
    """corpus.txt (documents separated by blank lines, 16 words a line) and vocab.txt (BERT's
    format: one token a line, in id order)."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, 'corpus.txt'), 'w') as f:
        for doc in sample_chain(P, n_docs, doc_words, rng):
            lines = [' '.join(words[i] for i in doc[j:j + 16]) for j in range(0, doc_words, 16)]
            f.write('\n'.join(lines) + '\n\n')
    with open(os.path.join(folder, 'vocab.txt'), 'w') as f:
        f.write(''.join(token + '\n' for token in SPECIALS + words))


def train_model(law_dir, model_dir):
    data_dir = os.path.join(law_dir, 'data')
    subprocess.run([sys.executable, 'prepare.py', f'--input={law_dir}/corpus.txt', '--name=known_law',
                    f'--tokenizer={law_dir}/vocab.txt', f'--data_dir={data_dir}'], cwd=ROOT, check=True)
    subprocess.run([sys.executable, 'train.py', f'--out_dir={model_dir}', f'--data_dir={data_dir}',
                    '--dataset=known_law', '--n_layers=4', '--hidden_dim=128', '--n_heads=4',
                    '--block_size=16', '--model_length=128', f'--max_iters={max_iters}',
                    f'--lr_decay_iters={max_iters}', '--warmup_iters=50', '--eval_interval=300',
                    '--log_interval=100', f'--max_minutes={max_minutes}', '--num_samples=0'],
                   cwd=ROOT, check=True)


# --- sampling ------------------------------------------------------------------------------------

def generate(model, n_rows, first_seed, rule, knob, order):
    """The same rows (per-row seeds) under any rule of bd3lm.RULES."""
    idx = torch.full((n_rows, 1), model.config.bos_id)
    kwargs = dict(generator=[torch.Generator().manual_seed(first_seed + i) for i in range(n_rows)],
                  temperature=temperature, top_p=top_p, return_stats=True)
    return engine.generate(model, idx, tokens, rule=rule, knob=knob, order=order, **kwargs)


def compute_per_token(stats, n_rows):
    """Rows x tokens that the calls ran, per generated token."""
    return float(stats['rows_x_tokens'].double().sum()) / (n_rows * tokens)


def run_rule(model, rule, knob, order, P):
    with torch.no_grad():
        out, stats = generate(model, samples, 0, rule, knob, order)
        t0 = time.perf_counter()
        for i in range(speed_samples):                              # batch 1: what one user sees
            generate(model, 1, i, rule, knob, order)
        seconds = time.perf_counter() - t0
    word = {len(SPECIALS) + i: i for i in range(n_words)}           # token id -> word index
    rows = [[word.get(i, -1) for i in row] for row in out[:, 1:].tolist()]
    result = score(transitions(rows), P, smooth)
    result.update(calls_per_token=float(stats['row_nfe'].double().mean()) / tokens,
                  compute_per_token=compute_per_token(stats, samples),
                  tokens_per_s=speed_samples * tokens / seconds if speed_samples else math.nan,
                  breaks=sum(w < 0 for row in rows for w in row) / (samples * tokens))
    return result


def print_row(name, r):
    calls = f'{r["calls_per_token"]:.3f}' if 'calls_per_token' in r else '-'
    compute = '-' if r.get('compute_per_token') is None else f'{r["compute_per_token"]:.2f}'
    speed = f'{r["tokens_per_s"]:.0f}' if 'tokens_per_s' in r else '-'
    print(f'{name:<28} {calls:>11} {compute:>10} {speed:>6} {r["nll"]:7.3f} {r["h_hat"]:7.3f} '
          f'{r["kl_hat"]:7.3f} {100 * r["impossible"]:10.1f}%', flush=True)


def main():
    law = {'seed': seed, 'n_words': n_words, 'frac_deterministic': frac_deterministic,
           'branching': branching, 'n_docs': n_docs, 'doc_words': doc_words}
    P = make_chain(seed, n_words, frac_deterministic, branching)
    words = make_words(n_words, np.random.default_rng(seed + 1))
    H = entropy_rate(P)
    print(f'the law: {n_words} words, {frac_deterministic:.0%} deterministic, {branching} successors '
          f'otherwise (seed {seed}); entropy rate {H:.4f} nats/token')

    law_path, model_dir = os.path.join(out_dir, 'law.json'), os.path.join(out_dir, 'model')
    if os.path.exists(law_path) and json.load(open(law_path)) != law:
        raise SystemExit(f'{out_dir} holds a model of another law ({law_path}); pass another --out_dir')
    if not os.path.exists(os.path.join(model_dir, 'final.json')):
        print(f'writing the corpus and training {model_dir} (cached for later runs) ...', flush=True)
        write_corpus(out_dir, P, words, np.random.default_rng(seed))
        with open(law_path, 'w') as f:
            json.dump(law, f)
        train_model(os.path.abspath(out_dir), os.path.abspath(model_dir))
    model = bd3lm.BD3LM.from_pretrained(model_dir).eval()
    final = json.load(open(os.path.join(model_dir, 'final.json')))
    with open(os.path.join(model_dir, 'vocab.txt')) as f:
        if f.read().split() != SPECIALS + words:
            raise SystemExit(f'{model_dir} was trained on another vocabulary than this law writes')

    print(f'model: {model_dir}, val NELBO {final["val_nelbo"]:.3f} after {final["iter"]} iterations; '
          f'{samples} samples x {tokens} tokens per rule, temperature {temperature}, top_p {top_p}, '
          f'{torch.get_num_threads()} torch threads; NLL, H_hat, KL_hat in nats per transition')
    if final['iter'] < max_iters:  # a busy or slow machine: the figures are those of a weaker model
        print(f'note: training stopped at max_minutes, after {final["iter"]} of {max_iters} iterations; '
              f'for the full model delete {model_dir} and rerun with --max_minutes=0')
    print(f'{"rule":<28} {"calls/token":>11} {"rows x tok":>10} {"tok/s":>6} {"NLL":>7} {"H_hat":>7} '
          f'{"KL_hat":>7} {"impossible":>11}')
    exact_rows = sample_chain(P, samples, tokens, np.random.default_rng(seed + 2))
    exact = score(transitions(exact_rows), P, smooth)
    print_row('exact samples (noise floor)', exact)
    if wide_candidates:         # e.g. --wide_candidates=2: the rule as it was before four
        bd3lm.RULES['speculative_wide'] = speculative.speculative_rule(wide_candidates)
    available = bd3lm.RULES
    results = []
    for name, rule, knob, order in RULES:
        if only not in name:
            continue
        if rule not in available:
            print(f'{name:<28} skipped: bd3lm has no rule {rule!r}')
            continue
        result = run_rule(model, rule, knob, order, P)
        results.append({'name': name, 'rule': rule, 'knob': knob, 'order': order, **result})
        print_row(name, result)

    path = out_json or os.path.join(out_dir, 'known_law.json')
    settings = {'samples': samples, 'tokens': tokens, 'temperature': temperature, 'top_p': top_p,
                'smooth': smooth, 'torch_threads': torch.get_num_threads()}
    with open(path, 'w') as f:
        json.dump({'law': law, 'entropy_rate': H, 'model': final, 'settings': settings,
                   'exact': exact, 'results': results}, f, indent=2)
    print(f'wrote {path}')


if __name__ == '__main__':
    exec(open(os.path.join(ROOT, 'configurator.py')).read())
    main()
