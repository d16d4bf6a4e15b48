"""serve.py, called with the official openai client: completions, n, seeds, streaming, stop, errors."""
import http.client
import json
import os
import socket
import subprocess
import sys
import time

import pytest

import bd3lm
from conftest import random_model

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
    proc = subprocess.Popen([sys.executable, 'serve.py', f'--init_from={folder}', f'--port={port}', '--max_pending=4',
                             '--max_tokens_limit=200'], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
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
    assert r.usage.prompt_tokens == 1 + len(bd3lm.get_tokenizer().encode('Once upon a time,'))
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
    ids = bd3lm.get_tokenizer().encode('Token ids')
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
    assert client.completions.create(model='m', prompt='still here', max_tokens=4).choices[0].text


def test_client_disconnecting_mid_stream_does_not_hurt_the_server(server, client):
    body = json.dumps({'prompt': 'bye', 'max_tokens': 150, 'stream': True}).encode()
    with socket.create_connection(('127.0.0.1', server[0]), timeout=30) as sock:
        sock.sendall(b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n'
                     b'Content-Length: %d\r\n\r\n' % len(body) + body)
        first = sock.recv(4096)
        assert first.startswith(b'HTTP/1.1 200') and b'data: ' in first + sock.recv(4096)
    # the socket is closed here, after the first chunk, while the server is still generating
    assert client.completions.create(model='m', prompt='after', max_tokens=4).choices[0].text


def test_a_full_queue_answers_503_at_once(server):
    # --max_pending=4: a burst of 8 long requests leaves some waiting; the overflow is refused, not queued.
    import concurrent.futures
    body = {'prompt': 'busy', 'max_tokens': 200, 'steps': None}
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        statuses = [f.result()[0] for f in [pool.submit(post, server[0], {**body, 'prompt': f'busy {i} ' * (i + 1)})
                                             for i in range(12)]]
    assert 503 in statuses and 200 in statuses and set(statuses) <= {200, 503}
