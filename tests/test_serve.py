"""serve.py, called with the official openai client: completions, n, seeds, streaming, stop, errors."""
import http.client
import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

import bd3lm
from bd3lm_tools.tokenizer import get_tokenizer
from conftest import check_engine_rows_equal_generate_alone, random_model

openai = pytest.importorskip('openai', reason='pip install -e ".[test]"')
ROOT = os.path.join(os.path.dirname(__file__), '..')


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp('model')
    random_model(vocab_size=50258, block_size=4, model_length=32, hidden_dim=32, n_heads=2).save_pretrained(folder)
    port = free_port()
    proc = subprocess.Popen([sys.executable, 'serve.py', f'--init_from={folder}', f'--port={port}', '--max_pending=8',
                             '--max_tokens_limit=200', '--max_batch=8', '--max_body_bytes=100000', '--read_timeout_s=2',
                             '--max_draft_mb=8'],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for _ in range(120):
        try:
            http.client.HTTPConnection('127.0.0.1', port, timeout=1).request('GET', '/health')
            break
        except OSError:
            time.sleep(0.25)
    else:
        proc.kill()
        raise RuntimeError(proc.stderr.read().decode())
    yield port, str(folder)
    proc.kill()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f'http://127.0.0.1:{server[0]}/v1', api_key='unused', max_retries=0, timeout=60)


def test_completion_and_models(client, server):
    r = client.completions.create(model='bd3lm', prompt='Once upon a time,', max_tokens=12, temperature=0.5, seed=1)
    assert r.object == 'text_completion' and len(r.choices) == 1
    assert r.choices[0].finish_reason in ('length', 'stop') and r.choices[0].text
    assert r.usage.prompt_tokens == 1 + len(get_tokenizer().encode('Once upon a time,'))
    assert 0 < r.usage.completion_tokens <= 12
    assert [m.id for m in client.models.list().data] == [server[1]]


def test_seed_reproduces_and_n_gives_distinct_choices(client):
    a = client.completions.create(model='m', prompt='Hello', max_tokens=16, seed=7, n=3)
    b = client.completions.create(model='m', prompt='Hello', max_tokens=16, seed=7, n=3)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert sorted(c.index for c in a.choices) == [0, 1, 2] and len({c.text for c in a.choices}) == 3
    c = client.completions.create(model='m', prompt='Hello', max_tokens=16, seed=8)
    assert c.choices[0].text != a.choices[0].text


def test_streamed_text_equals_the_non_streamed_text(client):
    full = client.completions.create(model='m', prompt='The café in Zürich', max_tokens=30, seed=3)
    chunks = list(client.completions.create(model='m', prompt='The café in Zürich', max_tokens=30, seed=3, stream=True))
    text = ''.join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text and '\ufffd' not in ''.join(c.choices[0].text for c in chunks if c.choices)
    assert len([c for c in chunks if c.choices and c.choices[0].text]) > 2     # one chunk per finished block
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_stop_ends_the_text_before_the_stop_string(client):
    full = client.completions.create(model='m', prompt='A', max_tokens=40, seed=5, temperature=0).choices[0].text
    stop = full[10:13]
    r = client.completions.create(model='m', prompt='A', max_tokens=40, seed=5, temperature=0, stop=[stop])
    assert r.choices[0].text == full[:full.index(stop)] and r.choices[0].finish_reason == 'stop'
    streamed = ''.join(c.choices[0].text for c in client.completions.create(
        model='m', prompt='A', max_tokens=40, seed=5, temperature=0, stop=stop, stream=True) if c.choices)
    assert streamed == r.choices[0].text


def test_token_id_prompts_and_extra_fields(client):
    ids = get_tokenizer().encode('Token ids')
    a = client.completions.create(model='m', prompt=ids, max_tokens=8, seed=2, extra_body={'steps': 2, 'kv_cache': False})
    b = client.completions.create(model='m', prompt='Token ids', max_tokens=8, seed=2, extra_body={'steps': 2})
    assert a.choices[0].text == b.choices[0].text            # cached == uncached, ids == text


def post(port, body):
    conn = http.client.HTTPConnection('127.0.0.1', port, timeout=30)
    conn.request('POST', '/v1/completions', body=body if isinstance(body, bytes) else json.dumps(body),
                 headers={'Content-Type': 'application/json'})
    r = conn.getresponse()
    return r.status, json.loads(r.read())


@pytest.mark.parametrize('body,param', [
    (b'{"prompt": "x", ', None),                                 # malformed JSON
    ({'prompt': 'x', 'max_tokens': -3}, 'max_tokens'),
    ({'prompt': 'x', 'max_tokens': 1000}, 'max_tokens'),         # above --max_tokens_limit
    ({'prompt': 'x', 'temperature': 'hot'}, 'temperature'),
    ({'prompt': 'x', 'n': 'two'}, 'n'),
    ({'prompt': 'x', 'stream': 'yes'}, 'stream'),
    ({'prompt': 'x', 'top_p': 0}, 'top_p'),
    ({'prompt': 'x', 'steps': 0}, 'steps'),
    ({'prompt': 'x', 'colour': 'red'}, 'colour'),                # unknown field
    ({'prompt': 'x', 'logprobs': 3}, 'logprobs'),                # not supported: said, not ignored
    ({'prompt': [1, 2, 99999]}, 'prompt'),                       # id out of range
    ({'prompt': [50257]}, 'prompt'),                             # the mask id
    ({'prompt': 'word ' * 5000}, 'prompt'),                      # longer than allowed
    ({'max_tokens': 4}, 'prompt'),
])
def test_bad_input_is_a_400_and_the_server_keeps_serving(server, client, body, param):
    status, answer = post(server[0], body)
    assert status == 400 and answer['error']['type'] == 'invalid_request_error' and answer['error']['param'] == param
    assert client.completions.create(model='m', prompt='still here', max_tokens=4, seed=0).choices[0].text


def test_a_full_queue_answers_503_at_once(server):
    # --max_batch=8 rows run, --max_pending=8 requests wait: in a burst of 24 long requests the overflow is
    # refused, not queued.
    import concurrent.futures
    body = {'prompt': 'busy', 'max_tokens': 200, 'steps': None}
    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        statuses = [f.result()[0] for f in [pool.submit(post, server[0], {**body, 'prompt': f'busy {i} ' * (i + 1)})
                                             for i in range(24)]]
    assert 503 in statuses and 200 in statuses and set(statuses) <= {200, 503}


# --- continuous batching: mixed prompt lengths, joining and leaving at block boundaries --------------------

PROMPTS = ['Hi', 'The weather today', 'Once upon a time, in a land far away,', 'A B C D E F G H I J K L',
           'Diffusion models write several tokens at once when they are sure of them', 'Why?',
           'One two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen',
           'The café in Zürich serves']


def health(port):
    conn = http.client.HTTPConnection('127.0.0.1', port, timeout=10)
    conn.request('GET', '/health')
    return json.loads(conn.getresponse().read())


def completion(client, i, stream=False, **extra):
    kwargs = dict(model='m', prompt=PROMPTS[i], max_tokens=14 + 5 * i, seed=100 + i, temperature=0.9, top_p=0.95)
    kwargs.update(extra)
    if stream:
        return ''.join(c.choices[0].text for c in client.completions.create(stream=True, **kwargs) if c.choices)
    return client.completions.create(**kwargs).choices[0].text


@pytest.mark.parametrize('extra', [{}, {'extra_body': {'threshold': 0.02}}, {'extra_body': {'steps': 2}}])
def test_concurrent_requests_with_different_prompt_lengths_match_their_lone_runs(client, server, extra):
    import concurrent.futures
    lengths = {len(get_tokenizer().encode(p)) for p in PROMPTS}
    assert len(lengths) == 8                                            # eight different prompt lengths
    alone = [completion(client, i, **extra) for i in range(8)]
    calls = health(server[0])['model_calls']
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda i: completion(client, i, **extra), range(8)))
    shared_calls = health(server[0])['model_calls'] - calls
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        streamed = list(pool.map(lambda i: completion(client, i, stream=True, **extra), range(8)))
    assert together == alone and streamed == alone
    # they really shared model calls: one lone request of the longest length alone needs more than a third of these
    assert shared_calls < 0.5 * sum(14 + 5 * i for i in range(8))


def test_requests_with_different_rule_knobs_share_model_calls(client, server):
    import concurrent.futures
    knobs = [{'threshold': 0.01}, {'threshold': 0.5}, {'threshold': 1.0}, {'threshold': 0.1}]
    run = lambda k: client.completions.create(model='m', prompt='Same knobs?', max_tokens=40, seed=9, extra_body=k)
    alone, costs = [], []
    for k in knobs:
        calls = health(server[0])['model_calls']
        alone.append(run(k).choices[0].text)
        costs.append(health(server[0])['model_calls'] - calls)
    calls = health(server[0])['model_calls']
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        together = [r.choices[0].text for r in pool.map(run, knobs)]
    assert together == alone
    assert health(server[0])['model_calls'] - calls < sum(costs)        # one lane: calls are shared


def test_a_short_request_arriving_during_a_long_one_finishes_first(client, server):
    import threading
    finished = {}

    def long():
        for c in client.completions.create(model='m', prompt='long', max_tokens=200, seed=1, stream=True):
            started.set()
        finished['long'] = time.time()
    started = threading.Event()
    thread = threading.Thread(target=long)
    thread.start()
    assert started.wait(60)                                              # the long one is running
    client.completions.create(model='m', prompt='short', max_tokens=8, seed=2)
    finished['short'] = time.time()
    thread.join(120)
    assert finished['short'] < finished['long']


def test_a_disconnect_mid_stream_frees_its_row_at_once(server, client):
    body = json.dumps({'prompt': 'bye', 'max_tokens': 200, 'stream': True}).encode()
    with socket.create_connection(('127.0.0.1', server[0]), timeout=30) as sock:
        sock.sendall(b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n'
                     b'Content-Length: %d\r\n\r\n' % len(body) + body)
        first = sock.recv(4096)
        while b'data: ' not in first:       # the first block has been written: the row is running
            first += sock.recv(4096)
        assert first.startswith(b'HTTP/1.1 200') and health(server[0])['running'] == 1
    for _ in range(100):            # the row leaves at the engine's next step, long before its 200 tokens
        if health(server[0])['running'] == 0:
            break
        time.sleep(0.05)
    assert health(server[0])['running'] == 0
    assert client.completions.create(model='m', prompt='after', max_tokens=4).choices[0].text


def raw(port, data, read_for=10):
    # Send bytes as a misbehaving client would; read the answer until the server closes the connection.
    with socket.create_connection(('127.0.0.1', port), timeout=read_for) as sock:
        sock.sendall(data)
        answer = b''
        while chunk := sock.recv(65536):
            answer += chunk
        return answer


def test_limits_a_public_endpoint_needs(server, client):
    huge = raw(server[0], b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\n{')
    assert huge.startswith(b'HTTP/1.1 413') and b'request_too_large' in huge
    status, answer = post(server[0], {'prompt': ['a', 'b', 'c'], 'n': 3})         # 9 rows > --max_batch=8
    assert status == 400 and answer['error']['param'] == 'n'
    t0 = time.time()                # headers promise a body that never comes: 408 after --read_timeout_s=2
    silent = raw(server[0], b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{"pro')
    assert silent.startswith(b'HTTP/1.1 408') and 1.5 < time.time() - t0 < 10
    assert raw(server[0], b'').startswith(b'HTTP/1.1 408')               # nothing at all: 408 too
    for field, value in (('threshold', 2.0), ('entropy_bound', -1), ('tokens_per_call', 0), ('order', 'up')):
        status, answer = post(server[0], {'prompt': 'x', field: value, **({'threshold': 0.5} if field == 'order' else {})})
        assert status == 400 and answer['error']['param'] == field, answer
    status, answer = post(server[0], {'prompt': 'x', 'threshold': 0.5, 'steps': 2})
    assert status == 400 and 'choose one unmasking rule' in answer['error']['message']
    # Drafts in the confidence order keep block_size x vocabulary floats per node: 1.5 MB each here, so
    # 1 + 4 k nodes of speculative_wide fit --max_draft_mb=8 up to k = 1; the uniform order's are 4x smaller.
    wide = {'prompt': 'x', 'rule': 'speculative_wide', 'knob': 2, 'order': 'confidence', 'max_tokens': 4}
    status, answer = post(server[0], wide)
    assert status == 400 and answer['error']['param'] == 'knob', answer
    assert '--max_draft_mb=8' in answer['error']['message'] and 'at most 1' in answer['error']['message']
    for fits in ({'knob': 1}, {'order': 'uniform'}):
        status, answer = post(server[0], {**wide, **fits, 'seed': 0})
        assert status == 200 and answer['choices'][0]['finish_reason'] == 'length', answer
    assert client.completions.create(model='m', prompt='still here', max_tokens=4, seed=0).choices[0].text


MIXED = [{}, dict(rule='threshold', knob=0.0), dict(rule='steps', knob=2), dict(rule='tokens_per_call', knob=2),
         dict(rule='entropy_bound', knob=30.0), dict(rule='threshold', knob=0.3, order='uniform')]


@pytest.mark.parametrize('rule', MIXED + ['mixed'])
def test_engine_rows_equal_generate_alone_in_float64(rule):
    # The engine in-process: rows with different prompt lengths (mid-block and whole blocks) and, for
    # 'mixed', different rules join the batch at different times and run past model_length; each row's
    # tokens equal model.generate for it alone, cached or not.
    model = random_model(vocab_size=50258, block_size=4, model_length=16, hidden_dim=32, n_heads=2).double()
    g = torch.Generator().manual_seed(0)
    prompts = [[50256] + torch.randint(0, 50000, (n,), generator=g).tolist() for n in (0, 2, 3, 4, 6, 7, 9, 12)]
    lengths = [30, 11, 25, 40, 17, 33, 22, 8]
    rules = [MIXED[i % len(MIXED)] if rule == 'mixed' else rule for i in range(8)]
    settings = [dict(temperature=0.8, top_p=0.9, **r) for r in rules]
    check_engine_rows_equal_generate_alone(model, prompts, lengths, settings, joining_late=5, steps_before=5)
