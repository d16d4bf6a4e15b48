"""
Throughput of serve.py under concurrent clients against the same requests sent one at a time.

    python benchmarks/serve_speed.py                      # small random model, CPU, 64 new tokens per request

Starts serve.py on a free local port with a random-weight model (GPT-2 vocabulary), then for each
concurrency c sends c requests at once, and the same c requests one after another, and prints the
generated tokens/s of both and their ratio.
"""
import argparse
import concurrent.futures
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
import bd3lm  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument('--concurrency', default='1,4,8,16')
p.add_argument('--max_tokens', type=int, default=64)
p.add_argument('--n_blocks', type=int, default=4)
p.add_argument('--hidden_dim', type=int, default=256)
p.add_argument('--block_size', type=int, default=16)
p.add_argument('--steps', type=int, default=None, help='denoising steps per block (default: first-hitting)')
args = p.parse_args()

folder = tempfile.mkdtemp()
torch.manual_seed(0)
bd3lm.BD3LM(bd3lm.BD3LMConfig(block_size=args.block_size, model_length=1024, hidden_dim=args.hidden_dim, cond_dim=64,
                              n_blocks=args.n_blocks, n_heads=4)).save_pretrained(folder)
with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
root = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
server = subprocess.Popen([sys.executable, 'serve.py', f'--init_from={folder}', f'--port={port}'], cwd=root,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def request(seed):
    conn = http.client.HTTPConnection('127.0.0.1', port, timeout=600)
    conn.request('POST', '/v1/completions', json.dumps({'prompt': 'The benchmark prompt', 'max_tokens': args.max_tokens,
                                                        'seed': seed, 'steps': args.steps}),
                 {'Content-Type': 'application/json'})
    answer = json.loads(conn.getresponse().read())
    return answer['usage']['completion_tokens']


try:
    for _ in range(120):
        try:
            request(0)
            break
        except OSError:
            time.sleep(0.5)
    print(f'model: {args.n_blocks} layers x {args.hidden_dim}, blocks of {args.block_size}, GPT-2 vocabulary; '
          f'{args.max_tokens} new tokens per request, steps={args.steps}, torch threads {torch.get_num_threads()}')
    print(f'{"clients":>7} {"concurrent tok/s":>17} {"sequential tok/s":>17} {"ratio":>6}')
    for c in [int(x) for x in args.concurrency.split(',')]:
        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(c) as pool:
            tokens = sum(pool.map(request, range(1, c + 1)))
        concurrent_tps = tokens / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        tokens = sum(request(seed) for seed in range(1, c + 1))
        sequential_tps = tokens / (time.perf_counter() - t0)
        print(f'{c:7d} {concurrent_tps:17.1f} {sequential_tps:17.1f} {concurrent_tps / sequential_tps:5.2f}x', flush=True)
finally:
    server.kill()
