"""serve.py and engine.py under the faults that careless and hostile clients cause: the server never hangs,
never dies silently, answers every request and frees what it held."""
import concurrent.futures
import http.client
import importlib
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from http.server import ThreadingHTTPServer

import pytest
import torch

import bd3lm
from bd3lm_tools import engine
from conftest import random_model
from bd3lm_tools.tokenizer import get_tokenizer

ROOT = os.path.join(os.path.dirname(__file__), '..')
BOS, POISON = 50256, 666        # a prompt holding POISON makes every model call over it raise


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def request(port, method, path, body=None, timeout=60):
    conn = http.client.HTTPConnection('127.0.0.1', port, timeout=timeout)
    data = None if body is None else body if isinstance(body, bytes) else json.dumps(body)
    conn.request(method, path, body=data, headers={'Content-Type': 'application/json'})
    r = conn.getresponse()
    return r.status, r.read()


def post(port, body, timeout=60):
    status, data = request(port, 'POST', '/v1/completions', body, timeout)
    return status, json.loads(data)


def events(port, body):
    # A streaming request's SSE payloads, in order.
    status, data = request(port, 'POST', '/v1/completions', {**body, 'stream': True})
    assert status == 200
    return [line[6:] for line in data.decode().split('\n') if line.startswith('data: ')]


def health(port):
    status, data = request(port, 'GET', '/health', timeout=10)
    return status, json.loads(data)


def wait_for(port, ok, within=2.0):
    # /health as soon as ok(it) holds (or when time is up, for the caller's assert to show)
    t0 = time.time()
    while not ok(h := health(port)[1]) and time.time() - t0 < within:
        time.sleep(0.02)
    return h


def settled(port, within=2.0):
    # /health once no row runs or waits (the engine publishes it after the step where the last row left)
    return wait_for(port, lambda h: h['running'] == 0 and h['waiting'] == 0, within)


def open_request(port, body):
    # Send a request and keep the connection open without reading: a client that only waits.
    data = json.dumps(body).encode()
    sock = socket.create_connection(('127.0.0.1', port), timeout=30)
    sock.sendall(b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n'
                 b'Content-Length: %d\r\n\r\n' % len(data) + data)
    return sock


def wait_running(port, n, within=10.0):
    h = wait_for(port, lambda h: h['running'] >= n, within)
    assert h['running'] >= n, h


# --- serve.py in this process, over a model that fails on demand ----------------------------------------

def poisoned(model):
    real = model.transformer

    def transformer(x, *args, **kwargs):
        if bool((x == POISON).any()):
            raise RuntimeError('poisoned block')
        return real(x, *args, **kwargs)
    model.transformer = transformer     # every pass (engine.prefill, engine.block_pass) runs model.transformer
    return model


@pytest.fixture(scope='module')
def app():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, 'argv', ['serve.py'])       # serve.py reads its settings from the command line
        serve = importlib.import_module('serve')
    model = poisoned(random_model(vocab_size=50258, block_size=4, model_length=32, hidden_dim=32, n_heads=2))
    serve.model, serve.tokenizer, serve.device, serve.model_name, serve.started = \
        model, get_tokenizer(model), 'cpu', 'm', 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)        # a tiny model's calls: far faster on a busy CPU without OpenMP's barriers
    serve.engine = engine.Engine(model, 'cpu', serve.max_batch, 0.005)
    server = ThreadingHTTPServer(('127.0.0.1', 0), serve.Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield serve, server.server_address[1]
    server.shutdown()
    torch.set_num_threads(threads)


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(app):
    serve, port = app
    long = {'prompt': 'long', 'max_tokens': 300, 'seed': 1}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        # an uncached row runs in its own model calls: a failure in the cached batch's call leaves it be
        survivor = pool.submit(events, port, {**long, 'kv_cache': False})
        wait_running(port, 1)
        status, answer = post(port, {'prompt': [BOS, 1, 2, 3, 4, POISON], 'max_tokens': 8, 'n': 2})
        assert status == 500 and 'poisoned block' in answer['error']['message'], answer
        assert answer['error']['type'] == 'server_error'
        failed = events(port, {'prompt': [POISON], 'max_tokens': 8, 'kv_cache': False})
        assert len(failed) == 1 and 'poisoned block' in json.loads(failed[0])['error']['message']
        assert post(port, {'prompt': 'after', 'max_tokens': 8})[0] == 200
        done = survivor.result(timeout=120)
    assert done[-1] == '[DONE]' and json.loads(done[-2])['choices'][0]['finish_reason'] == 'length'
    assert settled(port)['running'] == 0 and health(port)[0] == 200


class Crash(BaseException):
    pass


class Row(engine.Row):
    def fail(self, message):
        super().fail(message)
        self.error = message


def test_a_stopped_engine_says_so_and_refuses_at_once(app):
    serve, port = app
    eng = engine.Engine(serve.model, 'cpu', 4, 0.0)
    real = eng.loop_once

    def once_then_crash():          # a turn of the engine (the row joins and steps), then it breaks
        real()
        raise Crash('the engine thread broke')
    eng.loop_once = once_then_crash
    row = Row([BOS, 1, 2], 500, torch.Generator().manual_seed(0))
    eng.submit([row])
    t0 = time.time()
    while eng.alive and time.time() - t0 < 10:
        time.sleep(0.01)
    assert not eng.alive and eng.snapshot['alive'] is False and 'Crash' in eng.snapshot['error']
    assert row.cancelled and 'the engine thread broke' in row.error         # its row was answered
    with pytest.raises(engine.EngineStopped):
        eng.submit([Row([BOS], 4, torch.Generator())])
    running, serve.engine = serve.engine, eng
    try:
        status, h = health(port)
        assert status == 503 and h['status'] == 'engine stopped' and 'Crash' in h['error']
        t0 = time.time()
        status, answer = post(port, {'prompt': 'anyone?', 'max_tokens': 4})
        assert status == 503 and answer['error']['type'] == 'engine_stopped' and time.time() - t0 < 1
    finally:
        serve.engine = running
    assert health(port)[0] == 200


# --- serve.py as a process ------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def server(tmp_path_factory):
    # model_length=512, 64 wide: a KV cache per (rule, steps) lane would be 4 MB each, 160 MB for 40 of them
    folder = tmp_path_factory.mktemp('model')
    model = random_model(vocab_size=50258, block_size=4, model_length=512, hidden_dim=64, n_heads=2)
    model.save_pretrained(folder)
    port, log = free_port(), open(folder / 'serve.log', 'w')     # a pipe nobody reads would fill and block it
    proc = subprocess.Popen([sys.executable, 'serve.py', f'--init_from={folder}', f'--port={port}',
                             '--max_batch=8', '--max_pending=16', '--max_tokens_limit=4000',
                             '--max_steps=1000000000000000',
                             '--read_timeout_s=2'], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log)
    for _ in range(120):
        try:
            health(port)
            break
        except OSError:
            time.sleep(0.25)
    else:
        proc.kill()
        raise RuntimeError((folder / 'serve.log').read_text())
    yield port, proc.pid
    proc.kill()
    log.close()


def rss_mb(pid):
    with open(f'/proc/{pid}/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith('VmRSS')) / 1024


def test_memory_stays_bounded_over_distinct_step_counts(server):
    port, pid = server
    run = lambda k: post(port, {'prompt': f'steps {k}', 'max_tokens': 4, 'steps': k, 'n': 2})[0]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert set(pool.map(run, range(41, 49))) == {200}                  # warm-up
        before = rss_mb(pid)
        assert set(pool.map(run, range(1, 41))) == {200}                   # 40 distinct step counts
    assert rss_mb(pid) - before < 50, (before, rss_mb(pid))


def test_huge_steps_cost_at_most_a_block_of_calls_per_block(server):
    port, _ = server
    for body in ({'steps': 10 ** 15}, {'rule': 'steps', 'knob': 10 ** 15}):
        calls = settled(port)['model_calls']
        status, answer = post(port, {'prompt': 'x', 'max_tokens': 40, 'seed': 3, **body}, timeout=30)
        assert status == 200 and answer['choices'][0]['finish_reason'] == 'length'
        # 10 blocks, each: at most block_size denoising calls and the call that writes it into the cache
        assert settled(port)['model_calls'] - calls <= 10 * (4 + 1)
    for field, body in (('steps', {'steps': 10 ** 15 + 1}), ('knob', {'rule': 'steps', 'knob': 10 ** 30})):
        status, answer = post(port, {'prompt': 'x', **body})
        assert status == 400 and answer['error']['param'] == field
        assert '1,000,000,000,000,000' in answer['error']['message']                  # the limit, said


def test_uncached_requests_run_in_turn_stop_and_end_with_their_client(server):
    port, _ = server
    long = {'prompt': 'long', 'max_tokens': 4000, 'kv_cache': False, 'stream': True}
    with open_request(port, long) as sock:
        first = b''
        while b'data: ' not in first:                # its first block is out: it is running
            first += sock.recv(4096) or pytest.fail(first.decode())
        t0 = time.time()
        assert post(port, {'prompt': 'meanwhile', 'max_tokens': 16}, timeout=10)[0] == 200
        assert time.time() - t0 < 5 and wait_for(port, lambda h: h['running'] == 1)['running'] == 1
    assert settled(port)['running'] == 0                                   # its client left: it ended
    full = post(port, {'prompt': 'A', 'max_tokens': 40, 'seed': 5})[1]['choices'][0]['text']
    stop = full[10:13]
    calls = settled(port)['model_calls']
    body = {'prompt': 'A', 'max_tokens': 4000, 'seed': 5, 'stop': stop, 'kv_cache': False}
    status, answer = post(port, body)
    assert status == 200 and answer['choices'][0]['text'] == full[:full.index(stop)]
    assert answer['choices'][0]['finish_reason'] == 'stop' and settled(port)['model_calls'] - calls < 100
    # usage counts the tokens returned, not those the stop string cut off
    assert answer['usage']['completion_tokens'] == len(get_tokenizer().encode(answer['choices'][0]['text']))


@pytest.mark.parametrize('body', [{'n': 4}, {'kv_cache': False}, {'stream': True, 'n': 2}])
def test_clients_that_leave_end_their_rows(server, body):
    port, _ = server
    with open_request(port, {'prompt': 'bye', 'max_tokens': 4000, **body}):
        wait_running(port, body.get('n', 1))
        time.sleep(0.3)
    t0 = time.time()
    assert settled(port, within=2)['running'] == 0 and time.time() - t0 < 2


def test_a_body_that_trickles_in_gets_408_in_time(server):
    # a byte every 0.25 s never lets one read wait --read_timeout_s=2; the whole body has that long
    port, _ = server
    t0 = time.time()
    with socket.create_connection(('127.0.0.1', port), timeout=30) as sock:
        sock.sendall(b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{')
        while not select.select([sock], [], [], 0.25)[0] and time.time() - t0 < 20:
            sock.sendall(b' ')
        answer = sock.recv(4096)
    assert answer.startswith(b'HTTP/1.1 408') and time.time() - t0 < 5


def test_seeds_and_knobs(server):
    port, _ = server
    texts = lambda seed: {c['text'] for c in post(port, {'prompt': 'S', 'max_tokens': 8, 'seed': seed,
                                                         'n': 4})[1]['choices']}
    one, two = texts(1), texts(2)
    assert len(one) == len(two) == 4 and not one & two
    assert post(port, {'prompt': 'S', 'max_tokens': 4, 'seed': 2 ** 63 - 1})[0] == 200
    for field, value in (('seed', 2 ** 63), ('seed', -1), ('seed', 2 ** 64 + 5), ('tokens_per_call', 1e30),
                         ('tokens_per_call', 0), ('threshold', 1.5), ('entropy_bound', -1), ('steps', 0),
                         ('temperature', 3), ('top_p', 1.5)):
        status, answer = post(port, {'prompt': 'S', field: value})
        assert status == 400 and answer['error']['param'] == field, answer
        assert 'Overflow' not in answer['error']['message']
    status, answer = post(port, {'prompt': 'S', 'rule': 'threshold', 'knob': -0.1})
    assert status == 400 and answer['error']['param'] == 'knob'
    # more tokens per call than a block holds reveals the whole block, as block_size does
    text = lambda k: post(port, {'prompt': 'S', 'max_tokens': 12, 'seed': 4, 'tokens_per_call': k})[1]
    assert text(4)['choices'][0]['text'] == text(10 ** 30)['choices'][0]['text']
    status, answer = post(port, b'[' * 100000 + b']' * 100000)               # nested past the parser's depth
    assert status == 400 and 'not valid JSON' in answer['error']['message']


def test_health_under_load_and_token_id_prompts(server):
    port, _ = server
    bodies = [{'prompt': f'load {i} ' * i, 'max_tokens': 100 + 20 * i, 'seed': i, 'stream': i % 2 == 1,
               'kv_cache': i != 3} for i in range(8)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(request, port, 'POST', '/v1/completions', b) for b in bodies]
        seen = []
        while not all(f.done() for f in futures):
            status, h = health(port)
            assert status == 200 and {'running', 'waiting', 'model_calls', 'alive'} <= set(h), h
            seen.append(h)
            time.sleep(0.01)
        assert [f.result()[0] for f in futures] == [200] * 8, [f.result() for f in futures]
    calls = [h['model_calls'] for h in seen]
    assert calls == sorted(calls) and max(h['running'] + h['waiting'] for h in seen) > 1, seen
    # a token-id prompt that starts with BOS gets no second one
    ids = get_tokenizer().encode('Token ids')
    with_bos = post(port, {'prompt': [BOS] + ids, 'max_tokens': 8, 'seed': 2})[1]
    without = post(port, {'prompt': ids, 'max_tokens': 8, 'seed': 2})[1]
    assert with_bos['usage']['prompt_tokens'] == len(ids) + 1 == without['usage']['prompt_tokens']
    assert with_bos['choices'][0]['text'] == without['choices'][0]['text'], (with_bos, without)
    assert settled(port)['running'] == 0


@pytest.fixture(scope='module')
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp('tiny')
    random_model(vocab_size=50258, block_size=4, model_length=16, hidden_dim=16, cond_dim=8, n_layers=1,
                 n_heads=2).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize('args,message', [
    (['--batch_wait_ms=-5'], '--batch_wait_ms=-5: must be a number of milliseconds in [0, 60000]'),
    (['--batch_wait_ms=1000000000'], '--batch_wait_ms=1000000000: must be a number of milliseconds in [0, 60000]'),
    (['--max_steps=-1'], '--max_steps=-1: must be a positive integer'),
    (['--max_batch=0'], '--max_batch=0: must be a positive integer'),
    (['--read_timeout_s=1e300'], '--read_timeout_s=1e+300: must be a number of seconds in (0, 86400]'),
    (['--port=70000'], '--port=70000: must be an integer in [1, 65535]'),
    (['--host=no.such.host.invalid'], '--host=no.such.host.invalid: '),
    (['--device=gpu'], '--device=gpu: '),
    (['--device=mps'], '--device=mps: '),
])
def test_serve_py_refuses_bad_settings_at_start_in_one_line(tiny_folder, args, message):
    # Once, --batch_wait_ms=-5 started, and the first request stopped the engine for good (time.sleep(-0.005));
    # --max_steps=-1 was accepted; --port=70000, an unknown host or device ended in a traceback.
    if args == ['--device=mps'] and torch.backends.mps.is_available():
        pytest.skip('this machine has MPS')
    try:
        out = subprocess.run([sys.executable, 'serve.py', f'--init_from={tiny_folder}', f'--port={free_port()}', *args],
                             cwd=ROOT, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail(f'serve.py {" ".join(args)} started serving')
    lines = out.stderr.strip().splitlines()
    assert out.returncode in (1, 2) and 'Traceback' not in out.stderr and lines[-1].startswith(message), out.stderr


def test_a_prompt_that_starts_with_bos_counts_it_once(monkeypatch):
    # An MDLM-like model (block_size == model_length == 16): [BOS, 1, 2, 3] + 12 new tokens is 16, which fits;
    # once, parse_request counted a second BOS for it and refused.
    monkeypatch.setattr(sys, 'argv', ['serve.py'])       # serve.py reads its settings from the command line
    serve = importlib.import_module('serve')
    monkeypatch.setattr(serve, 'tokenizer', get_tokenizer(), raising=False)
    cfg = bd3lm.BD3LMConfig(vocab_size=50258, block_size=16, model_length=16, hidden_dim=16, cond_dim=8,
                            n_layers=1, n_heads=2)
    r = serve.parse_request({'prompt': [BOS, 1, 2, 3], 'max_tokens': 12}, serve.tokenizer, cfg)
    assert r['prompts'] == [[BOS, 1, 2, 3]]
    assert serve.parse_request({'prompt': [1, 2, 3], 'max_tokens': 12}, serve.tokenizer, cfg)['prompts'] == [[BOS, 1, 2, 3]]
    for prompt in ([BOS, 1, 2, 3], [1, 2, 3]):          # one token more does not fit, BOS or not
        with pytest.raises(serve.RequestError, match='lower max_tokens'):
            serve.parse_request({'prompt': prompt, 'max_tokens': 13}, serve.tokenizer, cfg)


def test_a_row_rejected_at_admission_changes_nothing():
    # A row whose settings the sampler refuses must leave the running rows as they were: once, admission
    # appended it before checking, and the next step failed every row (or ran it with another's settings).
    model = random_model(block_size=4, model_length=16)
    seed = lambda: torch.Generator().manual_seed(0)
    alone = lambda n, **kw: engine.generate(model, torch.tensor([[35, 1, 2]]), n, generator=[seed()], **kw)[0, 3:].tolist()
    # the engine: a tempered row is running when a row with an out-of-range knob arrives
    eng = engine.Engine(model, 'cpu', 4, 0.0)
    good, bad = Row([35, 1, 2], 400, seed(), temperature=0.7), Row([35, 4], 20, seed(), rule='threshold', knob=2.0)
    eng.submit([good])
    t0 = time.time()
    while not good.tokens and time.time() - t0 < 30:
        time.sleep(0.001)
    eng.submit([bad])
    while eng.snapshot['running'] + eng.snapshot['waiting'] and time.time() - t0 < 60:
        time.sleep(0.01)
    assert bad.cancelled and "rule 'threshold' needs a knob" in bad.error
    assert not good.cancelled and good.tokens == alone(400, temperature=0.7)
    # a batch: beside an untempered first-hitting row, the refused row must not run with its settings
    batch = engine.Batch(model, 'cpu', engine.KVCache(model, 2, 'cpu'))
    good = Row([35, 1, 2], 30, seed())
    batch.admit(good)
    batch.step()
    with pytest.raises(ValueError, match="rule 'threshold' needs a knob"):
        batch.admit(Row([35, 4], 20, seed(), rule='threshold', knob=2.0))
    assert batch.rows == [good] and batch.xb.shape[0] == 1 and batch.sampling.knob.shape == (1,)
    while batch.rows:
        batch.step()
    assert good.tokens == alone(30)
