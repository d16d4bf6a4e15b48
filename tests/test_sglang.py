"""BD3-LM served by SGLang through the plugin bd3lm_tools/sglang_plugin.py (docs/sglang.md).

Runs in SGLang's own environment (.ci/sglang.sh builds it: `pip install -e ".[sglang]"`); skipped where sglang is
not installed (the main test run). On a machine without CUDA, SGLang's kernel package cannot load (libcuda.so.1):
the servers here get a stand-in `sgl_kernel` (written below) whose every function raises if called; nothing else
is stubbed. One server, shared by the module, serves a tiny random BD3-LM (GPT-2 vocabulary, its law put on a few
tokens so that a chi-square test can see it) on 127.0.0.1, with SGLang's CPU settings:
  (a) every model pass SGLang ran equals bd3lm's logits for the same tokens (float32, <= 1e-5);
  (b) greedy tokens_per_call and one-step `steps` give bd3lm.generate's tokens through /v1/completions and the
      openai client, for prompts of several lengths (partial blocks, ends inside a block), also concurrently;
  (c) first-hitting at temperature 1 samples the exact law of a block (chi-square);
  (d) bad models and settings fail at launch (a block size SGLang cannot page with the chunk size asked, a missing
      mask id, an unknown rule, a changed block size), bad requests with a 400, each with a clear message.
"""
import concurrent.futures
import glob
import importlib.metadata
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request

import pytest
import torch

if importlib.util.find_spec('sglang') is None:
    pytest.skip('sglang is not installed here; .ci/sglang.sh builds its environment apart and runs this file',
                allow_module_level=True)

import bd3lm  # noqa: E402
from bd3lm_tools import sglang_plugin  # noqa: E402
from bd3lm_tools.tokenizer import gpt2_encoding  # noqa: E402

BS, LENGTH = 4, 64
LIVE = torch.tensor([11, 198, 262, 290, 318, 257, 286, 13])   # the tokens the test model puts its law on
START_TIMEOUT_S = 400
CPU_FLAGS = ['--device', 'cpu', '--attention-backend', 'torch_native', '--sampling-backend', 'pytorch',
             '--disable-cuda-graph', '--mem-fraction-static', '0.05', '--max-total-tokens', '4096',
             '--skip-server-warmup', '--sleep-on-idle']

# A stand-in for sgl_kernel (SGLang's CUDA kernels), for CPU machines only: every name exists, every call raises.
KERNEL_STAND_IN = '''
"""Test-only stand-in for sgl_kernel on a machine without CUDA: every name exists; calling one raises."""
import importlib.abc, importlib.machinery, sys, types


class _Missing:
    def __init__(self, name):
        self.name = name

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f'{self.name} was called, but sgl_kernel is a CPU test stand-in: no kernel runs here')

    def __getattr__(self, attr):
        if attr.startswith('__'):
            raise AttributeError(attr)
        return _Missing(f'{self.name}.{attr}')


def _getattr(prefix):
    def get(name):
        if name.startswith('__'):
            raise AttributeError(name)
        return _Missing(f'{prefix}.{name}')
    return get


__getattr__ = _getattr('sgl_kernel')


class _Submodules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname.startswith('sgl_kernel.'):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__, module.__getattr__ = [], _getattr(spec.name)
        return module

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _Submodules())
'''


def needs_stand_in():
    """True when the real sgl_kernel cannot load here (no CUDA driver)."""
    probe = subprocess.run([sys.executable, '-c', 'import sgl_kernel'], capture_output=True, text=True)
    return probe.returncode != 0


def server_env(tmp, trace=None):
    env = dict(os.environ, SGLANG_USE_CPU_ENGINE='1', BD3LM_CACHE=str(tmp / 'cache'), HF_HUB_OFFLINE='1',
               TRANSFORMERS_OFFLINE='1')
    if needs_stand_in():
        folder = tmp / 'cpu_stand_in' / 'sgl_kernel'
        folder.mkdir(parents=True, exist_ok=True)
        (folder / '__init__.py').write_text(KERNEL_STAND_IN)
        env['PYTHONPATH'] = os.pathsep.join([str(folder.parent)] + [p for p in [env.get('PYTHONPATH')] if p])
    if trace is not None:
        env['BD3LM_SGLANG_TRACE'] = str(trace)
    return env


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def launch(model_dir, env, log, *extra, port=None):
    port = port or free_port()
    cmd = [sys.executable, '-m', 'sglang.launch_server', '--model-path', str(model_dir), '--host', '127.0.0.1',
           '--port', str(port), *CPU_FLAGS, *extra]
    proc = subprocess.Popen(cmd, env=env, stdout=open(log, 'w'), stderr=subprocess.STDOUT, start_new_session=True)
    return proc, port


def stop(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)      # the server's own process group (start_new_session)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_until_up(proc, port, log, timeout=START_TIMEOUT_S):
    start = time.time()
    while time.time() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f'the SGLang server exited ({proc.returncode}):\n' + tail(log))
        try:
            with urllib.request.urlopen(f'http://127.0.0.1:{port}/health', timeout=5) as r:
                if r.status == 200:
                    return time.time() - start
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError(f'the SGLang server did not answer /health in {timeout} s:\n' + tail(log))


def tail(log, n=40):
    lines = [line for line in open(log, errors='replace').read().splitlines() if 'server_args=' not in line]
    return '\n'.join(lines[-n:])


def make_model(folder, seed=0, live=LIVE, **overrides):
    """A tiny BD3-LM with random weights (GPT-2 vocabulary), whose output puts its mass on `live` tokens
    (every other logit is lowered by 60): the law of a block is then over few outcomes."""
    fields = dict(block_size=BS, vocab_size=50258, model_length=LENGTH, hidden_dim=32, cond_dim=16, n_layers=2,
                  n_heads=4)
    fields.update(overrides)
    torch.manual_seed(seed)
    model = bd3lm.BD3LM(bd3lm.BD3LMConfig(**fields))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
        if live is not None:
            model.output_layer.linear.bias -= 60.0
            model.output_layer.linear.bias[live] += 60.0
    model.eval().save_pretrained(folder)
    return model


@pytest.fixture(scope='module')
def served(tmp_path_factory):
    """One SGLang server for the module: the test model, first-hitting by default, up to 64 requests at once."""
    tmp = tmp_path_factory.mktemp('sglang')
    model = make_model(tmp / 'model')
    trace = tmp / 'trace'              # the plugin saves each pass there while the folder exists
    log = tmp / 'server.log'
    proc, port = launch(tmp / 'model', server_env(tmp, trace), log, '--max-running-requests', '64')
    try:
        started = wait_until_up(proc, port, log)
        print(f'\nSGLang server up in {started:.0f} s')
        yield {'model': model, 'port': port, 'trace': trace, 'log': log, 'tmp': tmp}
    finally:
        stop(proc)


def post(port, path, body, timeout=600):
    req = urllib.request.Request(f'http://127.0.0.1:{port}{path}', data=json.dumps(body).encode(),
                                 headers={'Content-Type': 'application/json'})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b'{}')


def client(served):
    import openai
    return openai.OpenAI(base_url=f'http://127.0.0.1:{served["port"]}/v1', api_key='none', max_retries=0)


def complete(served, prompt, n, **custom):
    """One completion through the openai client: (prompt ids as SGLang saw them, the new token ids)."""
    extra = {'return_token_ids': True, 'ignore_eos': True}
    if custom:
        extra['custom_params'] = custom
    out = client(served).completions.create(model='bd3lm', prompt=prompt, max_tokens=n, temperature=0,
                                            extra_body=extra)
    choice = out.choices[0]
    return choice.model_extra['prompt_token_ids'], choice.model_extra['token_ids']


def prompt_ids(length, seed):
    g = torch.Generator().manual_seed(seed)
    return [50256] + LIVE[torch.randint(len(LIVE), (length - 1,), generator=g)].tolist()


def test_the_plugin_is_registered_under_sglangs_entry_point_group():
    eps = importlib.metadata.entry_points(group='sglang.srt.plugins')
    assert any(ep.value == 'bd3lm_tools.sglang_plugin:register' and ep.load() is sglang_plugin.register
               for ep in eps), list(eps)


# --- (a) the model: SGLang's passes against bd3lm's logits ----------------------------------------------------

def test_every_pass_sglang_runs_equals_bd3lms_logits(served):
    model, live, done = served['model'], served['trace'], served['trace'].with_suffix('.done')
    keep = torch.ones(model.config.vocab_size, dtype=torch.bool)
    keep[model.config.mask_id] = False
    checked = 0
    for i, (length, n) in enumerate([(3, 6), (9, 7), (4, 4)]):   # a partial block, two blocks + 1, a whole one
        shutil.rmtree(done, ignore_errors=True)
        live.mkdir()
        ids = prompt_ids(length, seed=10 + i)
        try:
            seen, new = complete(served, ids, n, rule='tokens_per_call', knob=2)
        finally:
            os.rename(live, done)                                 # no more passes saved
        assert seen == ids
        tokens = ids + new
        for path in sorted(glob.glob(str(done / '*.pt'))):       # this request's passes, one block each
            record = torch.load(path)
            ids_, positions, logits = record['input_ids'], record['positions'].long(), record['logits']
            lo = int(positions[0])
            assert len(ids_) == BS and positions.tolist() == list(range(lo, lo + BS)) and lo % BS == 0
            x = torch.tensor(tokens[:lo] + ids_.tolist())[None]   # the clean blocks before it, then the block
            with torch.no_grad():
                want = model(x)[0, -BS:].float()
            assert torch.isinf(logits[:, model.config.mask_id]).all()     # the mask is never proposed
            err = (logits[:, keep] - want[:, keep]).abs().max().item()
            assert err <= 1e-5, (path, err)
            checked += 1
    assert checked >= 10


# --- (b) deterministic settings: bd3lm.generate's tokens ------------------------------------------------------

CASES = [(1, 8), (3, 5), (4, 4), (6, 7), (9, 3), (13, 11)]     # (prompt length, max_tokens): partial blocks


def expected(model, ids, n, rule, knob):
    out = bd3lm.generate(model, torch.tensor([ids]), n, rule=rule, knob=knob, temperature=0)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize('rule,knob', [('tokens_per_call', 2), ('steps', 1), ('tokens_per_call', 1),
                                       ('threshold', 0.5), ('entropy_bound', 0.5)])
def test_greedy_rules_give_bd3lm_generates_tokens_through_the_openai_client(served, rule, knob):
    for i, (length, n) in enumerate(CASES):
        ids = prompt_ids(length, seed=100 + i)
        seen, new = complete(served, ids, n, rule=rule, knob=knob)
        assert seen == ids
        assert new == expected(served['model'], ids, n, rule, knob), (rule, knob, length, n)


def test_a_text_prompt_is_tokenized_as_bd3lms_gpt2_with_bos_first(served):
    text = 'Once upon a time, there was'
    seen, new = complete(served, text, 6, rule='tokens_per_call', knob=2)
    assert seen == [50256] + gpt2_encoding().encode(text)
    assert new == expected(served['model'], seen, 6, 'tokens_per_call', 2)


def test_concurrent_requests_of_different_lengths_each_get_their_own_tokens(served):
    cases = [(length, n, prompt_ids(length, seed=200 + i)) for i, (length, n) in enumerate(CASES)]
    with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
        got = list(pool.map(lambda c: complete(served, c[2], c[1], rule='tokens_per_call', knob=2), cases))
    for (length, n, ids), (seen, new) in zip(cases, got):
        assert seen == ids
        assert new == expected(served['model'], ids, n, 'tokens_per_call', 2), (length, n)


def test_a_seeded_request_draws_the_same_tokens_alone_or_beside_others(served):
    ids = prompt_ids(5, seed=300)

    def sample(seed):
        out = client(served).completions.create(model='bd3lm', prompt=ids, max_tokens=9, temperature=1.0, seed=seed,
                                                extra_body={'return_token_ids': True, 'ignore_eos': True})
        return out.choices[0].model_extra['token_ids']
    alone = sample(1)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        together = list(pool.map(sample, [1, 2, 1, 3]))
    assert together[0] == together[2] == alone
    assert len({tuple(t) for t in together}) > 1


# --- (c) first-hitting samples the model's exact law ----------------------------------------------------------

def exact_block_law(model, prompt, positions):
    """The exact law of first-hitting (a uniformly random order, each token from p_theta given the revealed
    ones) over `positions` of the block after `prompt`: {tuple of tokens: probability}, over LIVE tokens."""
    bs, mask = model.config.block_size, model.config.mask_id
    total = -(-(len(prompt) + len(positions)) // bs) * bs

    def probs(revealed):
        x = torch.full((1, total), mask)
        x[0, :len(prompt)] = torch.tensor(prompt)
        for pos, tok in revealed.items():
            x[0, pos] = tok
        with torch.no_grad():
            return bd3lm.subs_log_probs(model(x), mask)[0].double().exp()

    def law(revealed):
        rest = [p for p in positions if p not in revealed]
        if not rest:
            return {tuple(revealed[p] for p in positions): 1.0}
        out, p = {}, probs(revealed)
        for pos in rest:                                   # the next position: uniform among the masked ones
            for tok in LIVE.tolist():
                for k, v in law({**revealed, pos: tok}).items():
                    out[k] = out.get(k, 0.0) + v * float(p[pos, tok]) / len(rest)
        return out
    return law({})


def test_first_hitting_at_temperature_1_samples_the_exact_block_law(served):
    model = served['model']
    prompt = prompt_ids(6, seed=7)                          # block 0 cached, block 1 holds 2 prompt tokens + 2 new
    law = exact_block_law(model, prompt, [6, 7])
    assert abs(sum(law.values()) - 1) < 1e-6
    N = 1600
    status, out = post(served['port'], '/generate', {'input_ids': [prompt] * N, 'sampling_params': {
        'temperature': 1.0, 'max_new_tokens': 2, 'ignore_eos': True}})
    assert status == 200, out
    counts = {}
    for o in out:
        key = tuple(o['output_ids'])
        counts[key] = counts.get(key, 0) + 1
    assert set(counts) <= set(law), set(counts) - set(law)
    # bins with an expected count under 5 pooled into one
    small = [k for k, p in law.items() if p * N < 5]
    big = [k for k, p in law.items() if p * N >= 5]
    obs = [counts.get(k, 0) for k in big] + [sum(counts.get(k, 0) for k in small)]
    exp = [law[k] * N for k in big] + [sum(law[k] for k in small) * N]
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp) if e > 0)
    p_value = float(torch.special.gammaincc(torch.tensor((len(obs) - 1) / 2), torch.tensor(stat / 2)))  # chi2 sf
    assert p_value > 1e-3, (stat, len(obs), p_value)


# --- (d) errors: at launch, and per request -------------------------------------------------------------------

def test_a_request_past_model_length_is_refused_with_the_reason(served):
    status, out = post(served['port'], '/v1/completions', {'model': 'bd3lm', 'prompt': prompt_ids(10, 1),
                                                           'max_tokens': LENGTH, 'temperature': 0})
    assert status == 400 and 'context length' in json.dumps(out), out


@pytest.mark.parametrize('body,words', [
    ({'top_k': 5}, 'top_k=5 is not supported'),
    ({'custom_params': {'rule': 'no_such_rule'}}, 'rule must be one of'),
    ({'custom_params': {'rule': 'speculative', 'knob': 2}}, 'drafts'),
    ({'custom_params': {'rule': 'tokens_per_call', 'knob': 0}}, 'knob'),
])
def test_a_bad_request_gets_a_400_that_says_why(served, body, words):
    status, out = post(served['port'], '/v1/completions', {'model': 'bd3lm', 'prompt': prompt_ids(3, 1),
                                                           'max_tokens': 4, **body})
    assert status == 400 and words in json.dumps(out), out


def launch_error(tmp, model_dir, *extra):
    """Launch a server that must fail: its log."""
    log = tmp / f'launch{time.time_ns()}.log'
    proc, _ = launch(model_dir, server_env(tmp), log, *extra)
    try:
        proc.wait(START_TIMEOUT_S)
    finally:
        stop(proc)
    assert proc.returncode != 0
    return open(log, errors='replace').read()


# What `python -m sglang.launch_server ARGS` does before it starts anything (launch_server.py's main, then
# run_server's resolve_once): the plugins, the arguments, their resolution. One process answers each case.
RESOLVE = textwrap.dedent('''
    import json, sys
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import prepare_server_args
    load_plugins()
    for argv in json.loads(sys.argv[1]):
        try:
            prepare_server_args(argv).resolve_once()
            print('RESOLVED', flush=True)
        except Exception as e:
            print('ERROR', type(e).__name__, e, flush=True)
        print('@@@', flush=True)
''')


def test_bad_models_and_settings_fail_at_launch_with_a_clear_error(tmp_path):
    model = tmp_path / 'model'
    make_model(model)
    # the command line itself: an unknown rule stops the server before it starts anything
    bad_rule = tmp_path / 'rule.yaml'
    bad_rule.write_text('rule: no_such_rule\n')
    log = launch_error(tmp_path, model, '--dllm-algorithm-config', str(bad_rule))
    assert 'rule must be one of' in log, log[-3000:]
    # the same launch steps, one process for the other cases
    no_mask = tmp_path / 'no_mask'
    make_model(no_mask, vocab_size=300, live=None)
    config = json.load(open(no_mask / 'config.json'))
    del config['mask_id']
    json.dump(config, open(no_mask / 'config.json', 'w'))
    odd = tmp_path / 'block3'               # blocks of 3: SGLang's pages are blocks, its prefill chunks 4096 tokens
    make_model(odd, block_size=3, model_length=48)
    block = tmp_path / 'block.yaml'
    block.write_text('block_size: 8\n')
    cases = [((odd, '--chunked-prefill-size', '4096'), 'must hold whole blocks'),
             ((no_mask, '--skip-tokenizer-init'), 'names no mask_id'),
             ((model, '--dllm-algorithm-config', str(block)), 'its block size cannot change'),
             ((model, '--dllm-algorithm', 'LowConfidence'), 'is a BD3-LM'),
             ((model, '--max-total-tokens', '6'), 'cannot page two blocks')]
    argv = [['--model-path', str(m), '--host', '127.0.0.1', *CPU_FLAGS, *extra] for (m, *extra), _ in cases]  # last flag wins
    out = subprocess.run([sys.executable, '-c', RESOLVE, json.dumps(argv)], env=server_env(tmp_path),
                         capture_output=True, text=True, timeout=START_TIMEOUT_S)
    answers = [a for a in out.stdout.split('@@@') if a.strip()]
    assert len(answers) == len(cases), out.stdout[-2000:] + out.stderr[-3000:]
    for (_, words), answer in zip(cases, answers):
        assert answer.strip().startswith('ERROR') and words in answer, answer
