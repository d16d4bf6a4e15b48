"""How many noise samples does harness.py's bound need before a multiple-choice ranking stops changing?
For a trained model and multiple-choice questions cut from the validation documents of the embedded
corpus (the true next tokens against the same span of other documents), this reports, per number of
samples S: the spread of one request's estimate over seeds, how often the chosen answer agrees with the
exact ELBO's choice (the bound's expectation) and with the exact log p's choice, with and without common
random numbers across the choices; then the time per request of each estimator; then lm-eval itself on
three local tasks (multiple choice, rolling perplexity, generation), offline.

    python train.py --block_size=4 --out_dir=/tmp/bd3lm-bs4         # or any --init_from
    python benchmarks/harness_samples.py --init_from=/tmp/bd3lm-bs4
"""
import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
from bd3lm_tools import harness  # noqa: E402
import prepare  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument('--init_from', required=True)
p.add_argument('--questions', type=int, default=20)
p.add_argument('--choices', type=int, default=4)
p.add_argument('--context_tokens', type=int, default=40)
p.add_argument('--answer_tokens', type=int, default=8)
p.add_argument('--samples', default='1,2,4,8,16,32,64')
p.add_argument('--repeats', type=int, default=5)
p.add_argument('--device', default='cpu')
p.add_argument('--lm_eval', type=int, default=1, help='also run lm-eval on three local tasks')
args = p.parse_args()
torch.set_grad_enabled(False)

lm = harness.BD3LMEval(init_from=args.init_from, device=args.device, batch_size=64)
cfg, tok = lm.config, lm.tokenizer
need = args.context_tokens + args.answer_tokens
docs = [ids for name, text in prepare.python_docs() if prepare.is_val(name, 0.05)
        for ids in [tok.encode(text)] if len(ids) >= need][:args.questions * args.choices]
# Question q: the context of document q, the true answer its next tokens, the distractors the same span
# of the next documents (so every choice is fluent text of the same length).
questions = []
for q in range(len(docs) // args.choices):
    group = docs[q * args.choices:(q + 1) * args.choices]
    context = [cfg.bos_id] + group[0][:args.context_tokens]
    questions.append((context, [d[args.context_tokens:need] for d in group]))
print(f'{len(questions)} questions x {args.choices} choices, {args.context_tokens} context + '
      f'{args.answer_tokens} answer tokens; block_size {cfg.block_size}, device {args.device}')


def estimate(context, answer, samples, seed, key):
    lm.estimator, lm.samples, lm.seed = 'bound', samples, seed
    x0, scored, pad = harness.layout(context + answer, len(answer), cfg.block_size, cfg.model_length, cfg.eos_id)
    g = torch.Generator().manual_seed(harness._seed(seed, key))
    t, xt = harness.bound_noise(x0, scored, pad, cfg.mask_id, cfg.block_size, samples, g, cfg.model_length)
    return float(harness.bound(lm.model, x0, scored, t, xt, lm.batch_size).mean())


# --- references: the exact ELBO and log p (block_size <= 8), else the bound with many samples -------
exact = cfg.block_size <= harness.EXACT_MAX_BLOCK
ref_elbo, ref_logp = [], []
for context, answers in questions:
    rows = []
    for a in answers:
        x0, scored, pad = harness.layout(context + a, len(a), cfg.block_size, cfg.model_length, cfg.eos_id)
        rows.append(harness.exact(lm.model, x0, scored, pad, 64) if exact else
                    (estimate(context, a, 1024, 0, 'ref'),) * 2)
    ref_logp.append(torch.tensor([r[0] for r in rows]))
    ref_elbo.append(torch.tensor([r[1] for r in rows]))
right = sum(int(r.argmax() == 0) for r in ref_logp) / len(questions)
print(f'reference ({"exact DP" if exact else "bound, 1024 samples"}): accuracy {right:.2f} by log p, '
      f'{sum(int(r.argmax() == 0) for r in ref_elbo) / len(questions):.2f} by the ELBO; '
      f'mean gap log p - ELBO {float(torch.cat(ref_logp).mean() - torch.cat(ref_elbo).mean()):.3f} nats')

# --- the bound against the number of samples ------------------------------------------------------
print(f'\n{"S":>4} {"std (nats)":>11} {"agree ELBO":>11} {"agree log p":>12} {"no CRN":>8} {"stable":>7}')
for S in [int(s) for s in args.samples.split(',')]:
    spread, agree_elbo, agree_logp, agree_indep, stable = [], 0, 0, 0, 0
    for qi, (context, answers) in enumerate(questions):
        picks, runs = [], []
        for r in range(args.repeats):
            crn = torch.tensor([estimate(context, a, S, r, str(context)) for a in answers])
            indep = torch.tensor([estimate(context, a, S, r, str(context + a)) for a in answers])
            runs.append(crn)
            picks.append(int(crn.argmax()))
            agree_elbo += picks[-1] == int(ref_elbo[qi].argmax())
            agree_logp += picks[-1] == int(ref_logp[qi].argmax())
            agree_indep += int(indep.argmax()) == int(ref_elbo[qi].argmax())
        stable += len(set(picks)) == 1
        spread.append(torch.stack(runs).std(0))                 # (choices,) over the seeds
    n = len(questions) * args.repeats
    print(f'{S:>4} {float(torch.cat(spread).mean()):>11.3f} {agree_elbo / n:>11.2f} {agree_logp / n:>12.2f} '
          f'{agree_indep / n:>8.2f} {stable / len(questions):>7.2f}')

# --- time per request ---------------------------------------------------------------------------
context, answers = questions[0]
ids = context + answers[0]
print('\ntime per request (one question\'s first choice, after a warm-up):')
for estimator, S in [('bound', 8), ('bound', 32), ('bound', 128)] + ([('exact', 0)] if exact else []):
    lm.estimator, lm.samples = estimator, max(S, 1)
    lm.score(ids, len(answers[0]), 'warm-up')
    t0 = time.perf_counter()
    for i in range(3):
        lm.score(ids, len(answers[0]), str(i))
    what = f'{estimator}, {S} samples' if estimator == 'bound' else 'exact (log p and ELBO)'
    print(f'  {what:<24} {(time.perf_counter() - t0) / 3 * 1000:8.1f} ms (with the is_greedy check)')
x0, scored, pad = harness.layout(ids, len(answers[0]), cfg.block_size, cfg.model_length, cfg.eos_id)
t0 = time.perf_counter()
harness.greedy_match(lm.model, x0, scored, pad)
print(f'  {"is_greedy check alone":<24} {(time.perf_counter() - t0) * 1000:8.1f} ms')


# --- lm-eval on local tasks ---------------------------------------------------------------------
def local_tasks(folder):
    mc = [{'context': tok.decode(c[1:]), 'choices': [tok.decode(a) for a in answers], 'label': 0}
          for c, answers in questions]
    pages = [{'page': text} for name, text in prepare.python_docs() if prepare.is_val(name, 0.05)][:3]
    gen = [{'prompt': tok.decode(c[1:]), 'answer': tok.decode(answers[0])} for c, answers in questions[:4]]
    specs = {'pydocs_mc': (mc, 'multiple_choice', 'doc_to_text: "{{context}}"\ndoc_to_target: "{{label}}"\n'
                           'doc_to_choice: "{{choices}}"\nmetric_list:\n  - metric: acc\n'),
             'pydocs_ppl': (pages, 'loglikelihood_rolling', 'doc_to_text: ""\ndoc_to_target: "{{page}}"\n'
                            'metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n'),
             'pydocs_gen': (gen, 'generate_until', 'doc_to_text: "{{prompt}}"\ndoc_to_target: "{{answer}}"\n'
                            'generation_kwargs:\n  until: ["\\n\\n"]\n  max_gen_toks: 8\n  do_sample: false\n'
                            'metric_list:\n  - metric: exact_match\n')}
    for name, (rows, kind, body) in specs.items():
        with open(os.path.join(folder, name + '.jsonl'), 'w') as f:
            f.write(''.join(json.dumps(r) + '\n' for r in rows))
        with open(os.path.join(folder, name + '.yaml'), 'w') as f:
            f.write(f'task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: '
                    f'{os.path.join(folder, name + ".jsonl")}\ntest_split: test\noutput_type: {kind}\n{body}')
    return list(specs)


if args.lm_eval:
    os.environ.setdefault('HF_DATASETS_OFFLINE', '1')
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    import lm_eval
    from lm_eval.tasks import TaskManager
    folder = tempfile.mkdtemp()
    names = local_tasks(folder)
    manager = TaskManager(include_path=folder, include_defaults=False)
    print(f'\n{"task":<11} {"metric":<16} {"value":>9} {"estimator":<9} {"samples":>7} {"time (s)":>8}')
    runs = [('bound', 32, names)] + ([('exact', 0, names[:2])] if exact else [])
    for estimator, S, tasks in runs:
        for task in tasks:
            t0 = time.perf_counter()
            out = lm_eval.simple_evaluate(model='bd3lm', tasks=[task], task_manager=manager,
                                          model_args=dict(init_from=args.init_from, estimator=estimator,
                                                          samples=max(S, 1)),
                                          device=args.device, batch_size=64, verbosity='ERROR')
            seconds = time.perf_counter() - t0
            for key, value in out['results'][task].items():
                if isinstance(value, float) and '_stderr' not in key:
                    print(f'{task:<11} {key.split(",")[0]:<16} {value:>9.3f} {estimator:<9} '
                          f'{S if estimator == "bound" else "-":>7} {seconds:>8.1f}')
