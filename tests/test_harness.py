"""harness.py: the model inside lm-evaluation-harness. The exact DP against brute force over orders (on the
sampler's own inference pass), the bound against the exact values, the bound against the project's
NELBO, and three tiny offline tasks run end to end through lm_eval.simple_evaluate, twice."""
import itertools
import json
import math
import os

import pytest
import torch

import bd3lm

pytest.importorskip('lm_eval')
os.environ.setdefault('HF_DATASETS_OFFLINE', '1')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
from bd3lm_tools import engine, harness  # noqa: E402  (harness registers 'bd3lm')
from conftest import random_model  # noqa: E402


def tiny_model(seed=0, **overrides):
    """conftest's tiny random model, with a wider spread of weights (more peaked conditionals)."""
    return random_model(seed, std=0.3, **overrides)


def request(model, n=11, n_cont=6, seed=0):
    # 11 tokens in blocks of 4: the continuation (positions 5..10) shares block 1 with context and ends
    # one short of block 2's end, so both the kept-clean context and the padding are exercised.
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size - 2, (n,), generator=g).tolist()
    return harness.layout(ids, n_cont, model.config.block_size, model.config.model_length, model.config.eos_id)


@torch.no_grad()
def brute_force(model, x0, scored, pad):
    """log p and ELBO by enumerating every order of every block, each state scored with the inference
    pass model(x) on the clean blocks before it (the sampler's view, not the training pass)."""
    cfg, bs = model.config, model.config.block_size
    log_p = elbo = 0.0
    for b in range(x0.shape[1] // bs):
        lo = b * bs
        todo = [j for j in range(bs) if scored[0, lo + j]]
        if not todo:
            continue
        states = {}   # log p_theta at each revealed subset, computed once

        def log_probs(revealed):
            if revealed not in states:
                x = x0[:, :lo + bs].clone()
                hidden = [j for j in range(bs) if (scored[0, lo + j] and j not in revealed) or pad[0, lo + j]]
                x[0, [lo + j for j in hidden]] = cfg.mask_id
                states[revealed] = bd3lm.subs_log_probs(model(x), cfg.mask_id)[0, lo:].double()
            return states[revealed]

        per_order = []
        for order in itertools.permutations(todo):
            total = 0.0
            for i, j in enumerate(order):
                total += float(log_probs(frozenset(order[:i]))[j, x0[0, lo + j]])
            per_order.append(total)
        per_order = torch.tensor(per_order, dtype=torch.float64)
        log_p += float(per_order.logsumexp(0) - math.log(len(per_order)))
        elbo += float(per_order.mean())
    return log_p, elbo


def test_exact_dp_equals_enumeration_over_orders():
    model = tiny_model()
    for seed, (n, n_cont) in enumerate([(11, 6), (16, 15), (7, 2)]):
        x0, scored, pad = request(model, n, n_cont, seed)
        log_p, elbo = harness.exact(model, x0, scored, pad, batch_size=4)
        want_log_p, want_elbo = brute_force(model, x0, scored, pad)
        assert log_p == pytest.approx(want_log_p, abs=1e-4)
        assert elbo == pytest.approx(want_elbo, abs=1e-4)
        assert elbo <= log_p + 1e-9  # Jensen, over the orders


def test_exact_refuses_large_blocks():
    model = tiny_model(block_size=16)
    x0, scored, pad = request(model, 16, 4)
    with pytest.raises(ValueError, match='block_size <= 8'):
        harness.exact(model, x0, scored, pad)


def test_bound_is_below_exact_log_prob():
    # The bound's expectation is the ELBO over t in [EPS, 1] (within EPS of the exact ELBO), which is <=
    # log p. Per-draw spread over sqrt(S) overstates the error of stratified draws, so 5 of them is safe.
    model = tiny_model(seed=1)
    x0, scored, pad = request(model, 16, 12, seed=3)
    log_p, elbo = harness.exact(model, x0, scored, pad)
    t, xt = harness.bound_noise(x0, scored, pad, model.config.mask_id, 4, 400, torch.Generator().manual_seed(0))
    draws = harness.bound(model, x0, scored, t, xt, batch_size=200)
    mean, err = float(draws.mean()), float(draws.std()) / math.sqrt(len(draws))
    assert mean <= log_p + 5 * err
    assert abs(mean - elbo) <= 5 * err + 0.01 * abs(elbo)


@pytest.fixture(scope='module')
def gpt2_model_dir(tmp_path_factory):
    """A tiny random model with the GPT-2 vocabulary (the tokenizer works offline), saved as a folder."""
    folder = tmp_path_factory.mktemp('bd3lm_tiny_gpt2')
    tiny_model(seed=2, vocab_size=50258, model_length=64).save_pretrained(str(folder))
    return str(folder)


def test_loglikelihood_is_the_projects_conditional_nelbo(gpt2_model_dir):
    lm = harness.BD3LMEval(init_from=gpt2_model_dir, samples=6, seed=5)
    model, cfg = lm.model, lm.config
    context, continuation = 'The capital of France is', ' Paris, of course.'
    (got, _), = lm.loglikelihood([FakeRequest((context, continuation))], disable_tqdm=True)
    # The same tokens, the same noise: BOS + context, then the continuation, split as lm-eval does.
    ctx = lm.tokenizer.encode(context)
    cont = lm.tokenizer.encode(context + continuation)[len(ctx):]
    ids = [cfg.bos_id] + ctx + cont
    x0, scored, pad = harness.layout(ids, len(cont), cfg.block_size, cfg.model_length, cfg.eos_id)
    g = torch.Generator().manual_seed(harness._seed(5, context))
    t, xt = harness.bound_noise(x0, scored, pad, cfg.mask_id, cfg.block_size, 6, g, cfg.model_length)
    assert (xt[:, :1 + len(ctx)] == x0[:, :1 + len(ctx)]).all()   # the context stays clean
    with torch.no_grad():
        terms = model.nelbo(x0.expand_as(xt), t=t, xt=xt, reduction="none")
    assert got == pytest.approx(-float(terms[:, len(ids) - len(cont):len(ids)].sum()) / 6, rel=1e-5)
    # deterministic per seed; another seed draws other noise
    assert lm.loglikelihood([FakeRequest((context, continuation))], disable_tqdm=True)[0][0] == got
    other = harness.BD3LMEval(init_from=model, samples=6, seed=6)
    assert other.loglikelihood([FakeRequest((context, continuation))], disable_tqdm=True)[0][0] != got


def test_a_continuation_longer_than_the_window_is_scored_in_full():
    # model_length 16: BOS + 3 context + 20 continuation tokens do not fit one window. Every continuation
    # token is scored, in loglikelihood_rolling's windows of the whole text: ids[0:16] scores its last 12,
    # ids[8:24] its last 8. (Once, the text was cut to its last 16 tokens: 15 of the 20 were scored.)
    model = tiny_model(vocab_size=50258)
    lm = harness.BD3LMEval(init_from=model, estimator='exact')
    g = torch.Generator().manual_seed(0)
    ctx, cont = torch.randint(0, 50256, (3,), generator=g).tolist(), torch.randint(0, 50256, (20,), generator=g).tolist()
    ids = [model.config.bos_id] + ctx + cont

    def piece(window, n_cont):
        x0, scored, pad = harness.layout(window, n_cont, 4, 16, model.config.eos_id)
        return harness.exact(model, x0, scored, pad)[0]
    (got, _), (fits, _) = lm._loglikelihood_tokens([(('c', 'x'), ctx, cont), (('c', 'x'), ctx + cont[:5], cont[5:])],
                                                   disable_tqdm=True)
    assert got == pytest.approx(piece(ids[:16], 12) + piece(ids[8:], 8), abs=1e-6)
    assert fits == pytest.approx(piece(ids[8:], 15), abs=1e-6)     # 15 fit beside one token: one window, as before
    with pytest.raises(ValueError, match='model_length'):          # layout itself never drops a scored token
        harness.layout(ids, 20, 4, 16, model.config.eos_id)


class FakeRequest:
    def __init__(self, args):
        self.args = args


def write_tasks(folder):
    """Three offline tasks over local JSONL files: multiple choice, rolling perplexity, generation."""
    mc = [{'question': 'Two plus two is', 'choices': [' four', ' five', ' blue'], 'label': 0},
          {'question': 'The sky is', 'choices': [' blue', ' loud'], 'label': 0},
          {'question': 'Cats say', 'choices': [' meow', ' moo', ' quack'], 'label': 0}]
    text = [{'page': 'Block diffusion interpolates between autoregressive and diffusion language models. '
                     'It generates text block by block, each block by discrete denoising. ' * 2},
            {'page': 'A short document.'}]
    gen = [{'prompt': 'Question: what is two plus two?\nAnswer:', 'answer': ' four'},
           {'prompt': 'Name a colour:', 'answer': ' blue'}]
    tasks = {
        'bd3lm_tiny_mc': (mc, 'output_type: multiple_choice\ndoc_to_text: "{{question}}"\n'
                              'doc_to_target: "{{label}}"\ndoc_to_choice: "{{choices}}"\n'
                              'metric_list:\n  - metric: acc\n  - metric: acc_norm\n'),
        'bd3lm_tiny_rolling': (text, 'output_type: loglikelihood_rolling\ndoc_to_text: ""\n'
                                     'doc_to_target: "{{page}}"\nmetric_list:\n  - metric: word_perplexity\n'
                                     '  - metric: byte_perplexity\n  - metric: bits_per_byte\n'),
        'bd3lm_tiny_gen': (gen, 'output_type: generate_until\ndoc_to_text: "{{prompt}}"\n'
                                'doc_to_target: "{{answer}}"\ngeneration_kwargs:\n  until: ["\\n"]\n'
                                '  max_gen_toks: 8\n  do_sample: false\n'
                                'metric_list:\n  - metric: exact_match\n'),
    }
    for name, (rows, body) in tasks.items():
        data = os.path.join(folder, f'{name}.jsonl')
        with open(data, 'w') as f:
            f.write(''.join(json.dumps(r) + '\n' for r in rows))
        with open(os.path.join(folder, f'{name}.yaml'), 'w') as f:
            f.write(f'task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n'
                    f'test_split: test\n{body}metadata:\n  version: 1.0\n')
    return list(tasks)


@pytest.fixture(scope='module')
def tasks(tmp_path_factory):
    from lm_eval.tasks import TaskManager
    folder = str(tmp_path_factory.mktemp('tasks'))
    names = write_tasks(folder)
    return names, TaskManager(include_path=folder, include_defaults=False)   # no index of lm-eval's own


@pytest.mark.parametrize('estimator', ['bound', 'exact'])
def test_tasks_run_offline_through_simple_evaluate_twice(gpt2_model_dir, tasks, estimator):
    import lm_eval
    names, manager = tasks
    if estimator == 'exact':
        names = names[:1]   # the estimator only changes the multiple-choice numbers here

    def run():
        out = lm_eval.simple_evaluate(model='bd3lm', tasks=names, task_manager=manager,
                                      model_args=f'init_from={gpt2_model_dir},estimator={estimator},samples=4',
                                      batch_size=8, device='cpu', log_samples=False)
        return {task: {k: v for k, v in metrics.items() if k != 'alias'} for task, metrics in
                out['results'].items()}

    first, second = run(), run()
    assert first == second
    assert 0 <= first['bd3lm_tiny_mc']['acc,none'] <= 1
    if estimator == 'bound':
        assert math.isfinite(first['bd3lm_tiny_rolling']['word_perplexity,none'])
        assert first['bd3lm_tiny_rolling']['word_perplexity,none'] > 1
        assert 'exact_match,none' in first['bd3lm_tiny_gen']


def test_generate_until_honours_until_and_max_gen_toks(gpt2_model_dir, monkeypatch):
    lm = harness.BD3LMEval(init_from=gpt2_model_dir)
    asked = []
    generate = engine.generate                          # what the harness samples with
    monkeypatch.setattr(engine, 'generate', lambda model, idx, n, **kw: asked.append(n) or generate(model, idx, n, **kw))
    free, = lm.generate_until([FakeRequest(('Once upon a time', {'max_gen_toks': 12}))], disable_tqdm=True)
    assert asked == [12] and free
    stop = free[len(free) // 2]
    cut, = lm.generate_until([FakeRequest(('Once upon a time', {'max_gen_toks': 12, 'until': [stop]}))],
                             disable_tqdm=True)
    assert stop not in cut and free.startswith(cut)    # the same seed, cut at the stop string
