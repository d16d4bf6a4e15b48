"""
serve.py soaked: ordinary traffic mixed with what careless and hostile clients send, for a few minutes.

    python benchmarks/serve_soak.py                      # random 4 x 128 model, context 256, CPU, ~3.5 min
    python benchmarks/serve_soak.py --minutes=1 --out=/tmp/soak.json

Starts serve.py on a free loopback port with a random-weight model. --clients ordinary clients loop over
prompts of different lengths (max_tokens 8-64, a third streamed, several unmasking rules, n = 1 or 2)
while one hostile client cycles through: clients that leave mid-generation (streaming or not), the
largest steps=K the server allows and distinct step counts, a K past the limit, long uncached
(kv_cache=false) requests that stop at a stop string or whose client leaves, bad seeds and knobs,
garbage bodies, a huge Content-Length and a body cut short; a slow-loris client keeps partial bodies
open until the server times them out. /health is polled throughout. After --warmup_s of this the
server's RSS is taken; after --minutes the traffic stops and the server must go back to 0 running rows.

Reports requests answered / sent (clients that leave on purpose are counted apart), statuses per kind,
p50/p99 latency of the ordinary requests, server RSS after warm-up and at the end, /health at the end,
and whether the bar holds: every request answered, ordinary ones all 200, end RSS within 10% of the
warm-up RSS, 0 running rows. Prints a table and writes --out (JSON). Loopback only; bounded by
--minutes and --max_requests.
"""
import argparse
import collections
import http.client
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
import bd3lm  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument('--minutes', type=float, default=3.0, help='how long the mixed traffic runs after warm-up')
p.add_argument('--warmup_s', type=float, default=20.0, help='mixed traffic before the first RSS reading')
p.add_argument('--clients', type=int, default=4, help='ordinary clients, each one request at a time')
p.add_argument('--max_requests', type=int, default=20_000, help='stop sending past this many requests')
p.add_argument('--n_layers', type=int, default=4)
p.add_argument('--hidden_dim', type=int, default=128)
p.add_argument('--model_length', type=int, default=256)
p.add_argument('--block_size', type=int, default=4)
p.add_argument('--max_batch', type=int, default=16)
p.add_argument('--max_steps', type=int, default=1_000_000, help="serve.py's --max_steps")
p.add_argument('--read_timeout_s', type=float, default=5.0, help="serve.py's --read_timeout_s")
p.add_argument('--out', default='out-soak/serve_soak.json')
args = p.parse_args()

PROMPTS = ['Hi', 'The history of the city begins with', 'Q: What is the capital of France? A:',
           'In a small village at the edge of the forest, an old woman kept a garden of herbs and',
           'Dear customer, we are writing to let you know that your order has shipped and will arrive',
           'Once upon a time', 'def fibonacci(n):', 'The experiment failed because the temperature rose']
RULES = [{}, {'threshold': 0.3}, {'steps': 2}, {'tokens_per_call': 2}, {'entropy_bound': 1.0}]

# --- the server ------------------------------------------------------------------------------------------

folder = tempfile.mkdtemp()
torch.manual_seed(0)
config = bd3lm.BD3LMConfig(block_size=args.block_size, model_length=args.model_length, cond_dim=64,
                           hidden_dim=args.hidden_dim, n_layers=args.n_layers, n_heads=4)
bd3lm.BD3LM(config).save_pretrained(folder)
with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
root = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
server = subprocess.Popen([sys.executable, 'serve.py', f'--init_from={folder}', f'--port={port}',
                           f'--max_batch={args.max_batch}', '--max_pending=64', '--max_tokens_limit=1024',
                           f'--max_steps={args.max_steps}', f'--read_timeout_s={args.read_timeout_s}'],
                          cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
results = []                    # one dict per request: kind, status ('left', 'no answer: ...'), seconds
health_errors = []
stop = threading.Event()


def rss_mb():
    with open(f'/proc/{server.pid}/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith('VmRSS')) / 1024


def health():
    conn = http.client.HTTPConnection('127.0.0.1', port, timeout=10)
    conn.request('GET', '/health')
    r = conn.getresponse()
    return r.status, json.loads(r.read())


def record(kind, send):
    """Run send() -> status; note its status (or why none came) and how long it took."""
    t0 = time.perf_counter()
    try:
        status = send()
    except (OSError, http.client.HTTPException, ValueError) as e:
        status = f'no answer: {type(e).__name__}'
    results.append({'kind': kind, 'status': status, 'seconds': time.perf_counter() - t0, 'end': time.time()})


def post(body, timeout=300):
    # One request read to its end (streamed or not): the status.
    conn = http.client.HTTPConnection('127.0.0.1', port, timeout=timeout)
    conn.request('POST', '/v1/completions', json.dumps(body), {'Content-Type': 'application/json'})
    r = conn.getresponse()
    r.read()
    return r.status


def raw(data, leave_after=None, timeout=60):
    """Send bytes as a misbehaving client would: the status of the answer, or 'left' when the client
    hangs up after leave_after seconds without reading."""
    with socket.create_connection(('127.0.0.1', port), timeout=timeout) as sock:
        sock.sendall(data)
        if leave_after is not None:
            time.sleep(leave_after)
            return 'left'
        answer = b''
        while b'\r\n' not in answer and (chunk := sock.recv(4096)):
            answer += chunk
        return int(answer.split()[1]) if answer.startswith(b'HTTP/') else f'no answer: {answer[:20]!r}'


HEAD = b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n'


def http_request(body):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return HEAD + b'Content-Type: application/json\r\nContent-Length: %d\r\n\r\n' % len(data) + data


# --- the clients -----------------------------------------------------------------------------------------

def ordinary(seed):
    rng = random.Random(seed)
    while not stop.is_set():
        body = {'prompt': rng.choice(PROMPTS), 'max_tokens': rng.randint(8, 64), 'n': rng.choice([1, 1, 2]),
                'seed': rng.randrange(2 ** 32), 'stream': rng.random() < 1 / 3, 'temperature': 0.9,
                **rng.choice(RULES)}
        record('ordinary', lambda: post(body))
        time.sleep(rng.uniform(0, 0.2))


def hostile_requests(rng):
    # (kind, send) pairs, one round of everything a careless or hostile client does
    long = {'prompt': 'a long one', 'max_tokens': 1024}
    leave = lambda body, after=None: raw(http_request({**long, **body}), after or rng.uniform(0.2, 2))
    K = args.max_steps
    return [
        ('leaves (waiting)', lambda: leave({})),
        ('leaves (stream)', lambda: leave({'stream': True})),
        ('leaves (n=4)', lambda: leave({'n': 4})),
        ('huge steps', lambda: post({'prompt': 'K', 'max_tokens': 32, 'steps': K})),
        ('distinct steps', lambda: post({'prompt': 'K', 'max_tokens': 8, 'steps': rng.randint(1, K)})),
        ('steps past limit', lambda: post({'prompt': 'K', 'steps': K + 1})),
        ('uncached + stop', lambda: post({'prompt': 'slow', 'max_tokens': 256, 'kv_cache': False,
                                          'stop': 'e'})),
        ('uncached, leaves', lambda: leave({'kv_cache': False}, after=2)),
        ('bad seed', lambda: post({'prompt': 'x', 'seed': rng.choice([2 ** 63, -1, 2 ** 64 + 1, 10 ** 30])})),
        ('bad knob', lambda: post({'prompt': 'x', **rng.choice([{'threshold': 1.5}, {'tokens_per_call': 1e30},
                                                                  {'entropy_bound': -1}, {'temperature': 5},
                                                                  {'rule': 'steps', 'knob': 0.5}])})),
        ('garbage body', lambda: raw(http_request(rng.choice([rng.randbytes(64), b'{"prompt": "x", ',
                                                                b'[' * 50_000, b'"x"'])))),
        ('huge length', lambda: raw(HEAD + b'Content-Length: 99999999999\r\n\r\n{')),
        ('short body', lambda: raw(HEAD + b'Content-Length: 100\r\n\r\n{"pr')),
    ]


def hostile(seed):
    rng = random.Random(seed)
    while not stop.is_set():
        for kind, send in hostile_requests(rng):
            if stop.is_set():
                break
            record(kind, send)
            time.sleep(rng.uniform(0.1, 0.5))


def slow_loris():
    # partial bodies held open: the server answers 408 after --read_timeout_s
    while not stop.is_set():
        data = HEAD + b'Content-Length: 500\r\n\r\n{"prompt": "sl'
        threads = [threading.Thread(target=record, args=('slow loris', lambda: raw(data))) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


def watch_health():
    while not stop.is_set():
        try:
            status, h = health()
            if status != 200 or not h.get('alive'):
                health_errors.append(h)
        except (OSError, ValueError) as e:
            health_errors.append(f'{type(e).__name__}: {e}')
        time.sleep(1)


# --- the run ---------------------------------------------------------------------------------------------

def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values else float('nan')


def settle(within=60):
    t0 = time.time()
    while time.time() - t0 < within:
        status, h = health()
        if h['running'] == 0 and h['waiting'] == 0:
            break
        time.sleep(0.2)
    return status, h


try:
    for _ in range(240):
        try:
            health()
            break
        except OSError:
            time.sleep(0.5)
    threads = [threading.Thread(target=ordinary, args=(i,)) for i in range(args.clients)]
    threads += [threading.Thread(target=f, args=a) for f, a in ((hostile, (1000,)), (slow_loris, ()),
                                                                 (watch_health, ()))]
    for t in threads:
        t.start()
    t0 = time.time()
    time.sleep(args.warmup_s)
    rss_start, sent_warmup = rss_mb(), len(results)
    deadline, rss_peak = time.time() + 60 * args.minutes, rss_start
    while time.time() < deadline and len(results) < args.max_requests:
        time.sleep(1)
        rss_peak = max(rss_peak, rss_mb())
    stop.set()
    for t in threads:
        t.join(timeout=600)
    wall = time.time() - t0
    end_status, end_health = settle()
    rss_end = rss_mb()
finally:
    stop.set()
    server.kill()

# --- the report ------------------------------------------------------------------------------------------

by_kind = collections.defaultdict(collections.Counter)
for r in results:
    by_kind[r['kind']][r['status']] += 1
answered = [r for r in results if isinstance(r['status'], int)]
left = [r for r in results if r['status'] == 'left']
unanswered = [r for r in results if not isinstance(r['status'], int) and r['status'] != 'left']
normal = [r for r in results if r['kind'] == 'ordinary']
latency = [r['seconds'] for r in normal if r['status'] == 200]
statuses = collections.Counter(r['status'] for r in answered)
ends = sorted(r['end'] for r in normal if r['status'] == 200)
gap = max((b - a for a, b in zip(ends, ends[1:])), default=float('nan'))     # served throughout?
bar = {'every request answered': not unanswered,
       'ordinary requests all 200': all(r['status'] == 200 for r in normal),
       'end RSS within 10% of warm-up RSS': abs(rss_end - rss_start) <= 0.1 * rss_start,
       '0 running rows at the end': end_health['running'] == 0 and end_health['waiting'] == 0,
       '/health always 200': not health_errors}

print(f'serve.py soak: {args.n_layers} layers x {args.hidden_dim}, context {args.model_length}, blocks of '
      f'{args.block_size}, max_batch {args.max_batch}; {args.clients} ordinary clients + hostile + slow '
      f'loris; {wall:.0f} s ({args.warmup_s:.0f} s warm-up); {os.cpu_count()} CPUs')
print(f'\n{"kind":<18} {"sent":>6}  statuses')
for kind, counts in by_kind.items():
    counts = sorted(counts.items(), key=str)
    print(f'{kind:<18} {sum(n for _, n in counts):6d}  ' + ', '.join(f'{s}: {n}' for s, n in counts))
print(f'\nrequests answered / sent: {len(answered)} / {len(results) - len(left)} '
      f'(+ {len(left)} clients that left on purpose)')
print('answers by status: ' + ', '.join(f'{s}: {n}' for s, n in sorted(statuses.items())))
print(f'ordinary requests: {len(normal)}, latency p50 {pct(latency, 0.5):.2f} s, '
      f'p99 {pct(latency, 0.99):.2f} s, max {max(latency, default=float("nan")):.2f} s; longest wait for any ordinary answer {gap:.2f} s')
print(f'server RSS: {rss_start:.0f} MB after warm-up, {rss_peak:.0f} MB peak, {rss_end:.0f} MB at the end '
      f'({100 * (rss_end - rss_start) / rss_start:+.1f}%)')
print(f'/health at the end: {end_status} {end_health}; /health errors during the run: {len(health_errors)}')
for name, ok in bar.items():
    print(f'  [{"ok" if ok else "FAIL"}] {name}')
os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
with open(args.out, 'w') as f:
    json.dump({'args': vars(args), 'wall_s': wall, 'sent_during_warmup': sent_warmup,
               'by_kind': {k: {str(s): n for s, n in c.items()} for k, c in by_kind.items()},
               'answered': len(answered), 'sent': len(results) - len(left), 'left_on_purpose': len(left),
               'statuses': {str(s): n for s, n in statuses.items()},
               'ordinary_latency_s': {'p50': pct(latency, 0.5), 'p99': pct(latency, 0.99),
                                      'max': max(latency, default=None), 'n': len(latency)},
               'longest_gap_between_ordinary_answers_s': gap,
               'rss_mb': {'after_warmup': rss_start, 'peak': rss_peak, 'end': rss_end},
               'health_end': end_health, 'health_errors': health_errors[:20], 'bar': bar}, f, indent=1)
print(f'wrote {args.out}')
