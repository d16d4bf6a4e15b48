"""
serve.py under real traffic: different prompts, different lengths, requests arriving while others run.

    python benchmarks/serve_speed.py                  # random 4 x 256 model, GPT-2 vocabulary, CPU, ~5 min

Starts serve.py on a free local port with a random-weight model and measures, in one run:
  1. identical prompts: c clients send the same prompt at once, against the same c requests one at a time
     (the old benchmark, kept for comparison);
  2. mixed: 8 clients with 8 different prompts (2 to 23 words) and max_tokens 48 to 96, at once, against
     the same 8 one at a time;
  3. arrivals: requests from the mixed set arriving as a Poisson process at a few rates, given as fractions
     of the rate a one-at-a-time server could just keep up with (1 / mean lone latency): per-request
     latency p50/p99 and time to the first streamed block, against a lone request's.
Tokens are the completion tokens the server reports. Everything runs on this machine's loopback.
"""
import argparse
import concurrent.futures
import http.client
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
import bd3lm  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument('--n_layers', type=int, default=4)
p.add_argument('--hidden_dim', type=int, default=256)
p.add_argument('--block_size', type=int, default=16)
p.add_argument('--identical', default='1,8', help='client counts for the identical-prompt case')
p.add_argument('--rates', default='0.5,1.0,1.5', help='arrival rates, as fractions of the one-at-a-time capacity')
p.add_argument('--arrivals', type=int, default=24, help='requests per arrival rate')
p.add_argument('--extra', default='{}', help='extra request fields as JSON, e.g. \'{"threshold": 0.5}\'')
args = p.parse_args()
extra = json.loads(args.extra)

PROMPTS = ['Hello there', 'The history of the city begins with',
           'In a small village at the edge of the forest, an old woman kept a garden',
           'Write a short note to a friend about the weekend', 'Q: What is the capital of France? A:',
           'The experiment failed because the temperature of the sample rose above the expected range, and the team',
           'Once upon a time', 'Dear customer, we are writing to let you know that your order has shipped and will arrive']
MAX_TOKENS = [48, 96, 64, 80, 56, 72, 88, 60]

folder = tempfile.mkdtemp()
torch.manual_seed(0)
bd3lm.BD3LM(bd3lm.BD3LMConfig(block_size=args.block_size, model_length=1024, hidden_dim=args.hidden_dim, cond_dim=64,
                              n_layers=args.n_layers, n_heads=4)).save_pretrained(folder)
with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
root = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
server = subprocess.Popen([sys.executable, 'serve.py', f'--init_from={folder}', f'--port={port}', '--max_pending=256'],
                          cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def request(prompt, max_tokens, seed):
    """One streamed completion: (completion tokens, seconds to the first text chunk, total seconds)."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection('127.0.0.1', port, timeout=1200)
    conn.request('POST', '/v1/completions', json.dumps({'prompt': prompt, 'max_tokens': max_tokens, 'seed': seed,
                                                        'stream': True, 'stream_options': {'include_usage': True},
                                                        **extra}), {'Content-Type': 'application/json'})
    response, first, tokens = conn.getresponse(), None, 0
    for line in response:
        if not line.startswith(b'data: {'):
            continue
        event = json.loads(line[6:])
        if first is None and event['choices'] and event['choices'][0]['text']:
            first = time.perf_counter() - t0
        if event.get('usage'):
            tokens = event['usage']['completion_tokens']
    return tokens, first, time.perf_counter() - t0


def throughput(jobs, at_once):
    t0 = time.perf_counter()
    if at_once:
        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
            results = list(pool.map(lambda job: request(*job), jobs))
    else:
        results = [request(*job) for job in jobs]
    return sum(r[0] for r in results) / (time.perf_counter() - t0)


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


try:
    for _ in range(240):
        try:
            request('warm up', 4, 0)
            break
        except OSError:
            time.sleep(0.5)
    print(f'model: {args.n_layers} layers x {args.hidden_dim}, blocks of {args.block_size}, GPT-2 vocabulary, random '
          f'weights; rule {extra or "first-hitting"}; torch threads {torch.get_num_threads()}', flush=True)

    print('\n1. identical prompts (64 new tokens each)')
    print(f'{"clients":>7} {"at once tok/s":>14} {"one at a time tok/s":>20} {"ratio":>6}')
    for c in [int(x) for x in args.identical.split(',')]:
        jobs = [('The benchmark prompt', 64, seed) for seed in range(1, c + 1)]
        together, alone = throughput(jobs, True), throughput(jobs, False)
        print(f'{c:7d} {together:14.1f} {alone:20.1f} {together / alone:5.2f}x', flush=True)

    print('\n2. mixed: 8 different prompts (2-23 words), max_tokens 48-96')
    jobs = [(prompt, n, seed) for seed, (prompt, n) in enumerate(zip(PROMPTS, MAX_TOKENS), start=1)]
    together, alone = throughput(jobs, True), throughput(jobs, False)
    print(f'{"clients":>7} {"at once tok/s":>14} {"one at a time tok/s":>20} {"ratio":>6}')
    print(f'{8:7d} {together:14.1f} {alone:20.1f} {together / alone:5.2f}x', flush=True)

    print('\n3. arrivals: the mixed requests, Poisson arrivals')
    lone = [request(prompt, n, seed) for prompt, n, seed in jobs]
    capacity = len(lone) / sum(r[2] for r in lone)                 # requests/s a one-at-a-time server can serve
    lone_latency = statistics.mean(r[2] for r in lone)
    print(f'lone request: latency mean {lone_latency:.2f} s, first block {statistics.mean(r[1] for r in lone):.2f} s; '
          f'one-at-a-time capacity {capacity:.2f} requests/s')
    print(f'{"rate":>10} {"req/s":>6} {"tok/s":>7} {"p50 latency":>12} {"p99 latency":>12} {"p99/lone":>9} '
          f'{"p50 first block":>16} {"p99 first block":>16}')
    for fraction in [float(x) for x in args.rates.split(',')]:
        rate, rng, results, threads = fraction * capacity, random.Random(0), [], []
        t0 = time.perf_counter()
        arrival = 0.0
        for i in range(args.arrivals):
            arrival += rng.expovariate(rate)
            time.sleep(max(0.0, t0 + arrival - time.perf_counter()))
            prompt, n, _ = jobs[i % len(jobs)]
            thread = threading.Thread(target=lambda p=prompt, n=n, s=100 + i: results.append(request(p, n, s)))
            thread.start()
            threads.append(thread)
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - t0
        latency, first = [r[2] for r in results], [r[1] for r in results]
        print(f'{fraction:9.2f}x {rate:6.2f} {sum(r[0] for r in results) / wall:7.1f} {pct(latency, 0.5):11.2f}s '
              f'{pct(latency, 0.99):11.2f}s {pct(latency, 0.99) / lone_latency:8.2f}x {pct(first, 0.5):15.2f}s '
              f'{pct(first, 0.99):15.2f}s', flush=True)
finally:
    server.kill()
