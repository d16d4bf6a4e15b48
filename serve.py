"""
An OpenAI-compatible completions server for a BD3-LM, so that the snippet on the released models' Hugging
Face page works against this project:

    python serve.py --init_from=kuleshov-group/bd3lm-owt-block_size4 --port=30000
    curl -X POST http://localhost:30000/v1/completions -H "Content-Type: application/json" \
      --data '{"model": "kuleshov-group/bd3lm-owt-block_size4", "prompt": "Once upon a time,", "max_tokens": 512, "temperature": 0.5}'

Endpoints: POST /v1/completions, GET /v1/models, GET /health. Requests that arrive together are batched
into one `generate` call (every row has its own seed, length, temperature and top_p, and stops on its
own), so concurrent clients share the model's passes. Python's standard library serves HTTP: no web
framework is needed for three endpoints. BD3-LM's own knobs come as extra fields: `steps` (None =
first-hitting, K = K denoising steps per block) and `kv_cache`.
"""
import json
import os
import queue
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

import bd3lm

# -----------------------------------------------------------------------------
init_from = 'out-demo'      # any model BD3LM.from_pretrained accepts: hub id, folder, Lightning .ckpt
model_name = None           # the name /v1/models reports (default: init_from)
host = '127.0.0.1'
port = 30000
device = 'auto'
dtype = 'float32'           # 'float32', 'bfloat16', 'float16'
max_batch = 16              # rows per generate call
batch_wait_ms = 20          # how long the batcher waits for more requests to join a batch
max_pending = 64            # requests waiting beyond this get HTTP 503 at once
max_tokens_limit = 4096     # the largest max_tokens a request may ask for
max_prompt_tokens = 4096
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
# -----------------------------------------------------------------------------


class RequestError(Exception):
    def __init__(self, message, param=None, status=400, kind='invalid_request_error'):
        super().__init__(message)
        self.param, self.status, self.kind = param, status, kind


# Fields of OpenAI's completions API: (types allowed, default). Accepted fields this server does not
# implement are refused when set to anything but their default, so nothing is silently ignored.
FIELDS = {'model': ((str,), None), 'prompt': ((str, list), None), 'max_tokens': ((int,), 16),
          'temperature': ((int, float), 1.0), 'top_p': ((int, float), 1.0), 'n': ((int,), 1),
          'seed': ((int, type(None)), None), 'stop': ((str, list, type(None)), None), 'stream': ((bool,), False),
          'steps': ((int, type(None)), None), 'kv_cache': ((bool,), True), 'user': ((str,), None),
          'stream_options': ((dict, type(None)), None), 'echo': ((bool,), False), 'logprobs': ((int, type(None)), None),
          'best_of': ((int, type(None)), None), 'presence_penalty': ((int, float), 0), 'frequency_penalty': ((int, float), 0),
          'logit_bias': ((dict, type(None)), None), 'suffix': ((str, type(None)), None)}
UNSUPPORTED = {'echo': False, 'logprobs': None, 'best_of': None, 'presence_penalty': 0, 'frequency_penalty': 0,
               'logit_bias': None, 'suffix': None}


def parse_request(body, tokenizer, config):
    """JSON body -> a validated dict, prompts as lists of ids (BOS first). Raises RequestError."""
    if not isinstance(body, dict):
        raise RequestError('the request body must be a JSON object')
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise RequestError(f'unrecognized request argument(s): {", ".join(unknown)}', unknown[0])
    r = {k: default for k, (_, default) in FIELDS.items()}
    for key, value in body.items():
        types = FIELDS[key][0]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise RequestError(f'{key}: expected {" or ".join(t.__name__ for t in types)}, got {type(value).__name__}', key)
        r[key] = value
    for key, default in UNSUPPORTED.items():
        if r[key] not in (default, None) and not (key == 'best_of' and r[key] == 1):
            raise RequestError(f'{key} is not supported by this BD3-LM server', key)
    if r['prompt'] is None:
        raise RequestError('prompt is required', 'prompt')
    if not 1 <= r['max_tokens'] <= max_tokens_limit:
        raise RequestError(f'max_tokens must be in [1, {max_tokens_limit}], got {r["max_tokens"]}', 'max_tokens')
    if not 0 <= r['temperature'] <= 2:
        raise RequestError(f'temperature must be in [0, 2], got {r["temperature"]}', 'temperature')
    if not 0 < r['top_p'] <= 1:
        raise RequestError(f'top_p must be in (0, 1], got {r["top_p"]}', 'top_p')
    if not 1 <= r['n'] <= max_batch:
        raise RequestError(f'n must be in [1, {max_batch}], got {r["n"]}', 'n')
    if r['steps'] is not None and r['steps'] < 1:
        raise RequestError(f'steps must be null (first-hitting) or a positive integer, got {r["steps"]}', 'steps')
    stops = [r['stop']] if isinstance(r['stop'], str) else (r['stop'] or [])
    if len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise RequestError('stop must be a non-empty string or a list of at most 4 of them', 'stop')
    r['stop'] = stops
    prompt = r['prompt']  # a string, a list of strings, a list of ids, or a list of lists of ids
    if isinstance(prompt, str):
        prompts = [tokenizer.encode(prompt)]
    elif prompt and all(isinstance(p, str) for p in prompt):
        prompts = [tokenizer.encode(p) for p in prompt]
    elif prompt and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
        prompts = [prompt]
    elif prompt and all(isinstance(p, list) and p and all(isinstance(i, int) and not isinstance(i, bool) for i in p)
                        for p in prompt):
        prompts = prompt
    else:
        raise RequestError('prompt must be a string, a list of strings, a list of token ids or a list of such lists',
                           'prompt')
    for ids in prompts:
        bad = [i for i in ids if not 0 <= i < config.vocab_size or i == config.mask_id]
        if bad:
            raise RequestError(f'prompt token ids must lie in [0, {config.vocab_size - 1}] and not be the mask id '
                               f'{config.mask_id}; got {bad[:5]}', 'prompt')
        if len(ids) + 1 > max_prompt_tokens:
            raise RequestError(f'the prompt has {len(ids)} tokens; at most {max_prompt_tokens - 1} are allowed', 'prompt')
        if config.block_size == config.model_length and len(ids) + 1 + r['max_tokens'] > config.model_length:
            raise RequestError(f'this MDLM-like model writes at most {config.model_length} tokens with the prompt; '
                               f'lower max_tokens', 'max_tokens')
    r['prompts'] = [[config.bos_id] + list(ids) for ids in prompts]
    if len(r['prompts']) * r['n'] > max_batch:
        raise RequestError(f'{len(r["prompts"])} prompts x n={r["n"]} exceeds the {max_batch} rows a request may use', 'n')
    return r


class Row:
    """One completion being generated: a prompt, its settings, and where its text goes."""

    def __init__(self, request, prompt, index, seed, sink):
        self.request, self.prompt, self.index, self.sink = request, prompt, index, sink
        self.seed = seed
        self.stream = tokenizer.stream(prompt)
        self.text, self.sent, self.finished, self.finish_reason, self.n_tokens = '', '', False, None, 0

    def key(self):  # rows batch together when these agree
        return len(self.prompt), self.request['steps'], self.request['kv_cache']

    def emit(self, piece, final=False, eos=False):
        """Add text, cut at the first stop string; send what is certain to the client."""
        if self.finished:
            return
        stops = self.request['stop']
        held = self.text + piece
        cut = min((held.find(s) for s in stops if s in held), default=-1)
        if cut >= 0:
            held, final, self.finish_reason = held[:cut], True, 'stop'
        elif final:
            self.finish_reason = 'stop' if eos else 'length'
        # Hold back a tail that could still become a stop string.
        keep = 0 if final else max((len(s) - 1 for s in stops), default=0)
        ready = held[:len(held) - keep] if keep else held
        new, self.text, self.sent = ready[len(self.sent):], held, ready
        if new:
            self.sink.put(('text', self.index, new))
        if final:
            self.finished = True
            self.sink.put(('done', self.index, self.finish_reason, self.n_tokens))


class Batcher:
    """One worker thread: takes waiting rows, groups those that can share a batch, runs generate."""

    def __init__(self):
        self.pending = []
        self.lock = threading.Condition()
        threading.Thread(target=self.run, daemon=True).start()

    def submit(self, rows):
        with self.lock:
            if len({id(r.request) for r in self.pending}) >= max_pending:
                raise RequestError(f'the server is busy ({max_pending} requests waiting); try again shortly',
                                   status=503, kind='server_busy')
            self.pending.extend(rows)
            self.lock.notify()

    def run(self):
        while True:
            with self.lock:
                while not self.pending:
                    self.lock.wait()
            time.sleep(batch_wait_ms / 1000)  # let concurrent requests join
            with self.lock:
                key = self.pending[0].key()
                batch = [r for r in self.pending if r.key() == key][:max_batch]
                self.pending = [r for r in self.pending if r not in batch]
            try:
                self.generate(batch)
            except Exception as e:  # never leave a client waiting, never kill the worker
                for row in batch:
                    row.sink.put(('error', str(e)))

    @torch.no_grad()
    def generate(self, rows):
        idx = torch.tensor([r.prompt for r in rows], device=device)
        P = idx.shape[1]
        gens = [torch.Generator(device=device).manual_seed(r.seed) for r in rows]
        sent = [P] * len(rows)

        def on_block(x, end):  # after every block: each row's new tokens, up to its EOS or max_tokens
            for i, row in enumerate(rows):
                if row.finished:
                    continue
                stop_at = min(end, P + row.request['max_tokens'])
                new = x[i, sent[i]:stop_at].tolist()
                eos = tokenizer.eos_id in new
                new = new[:new.index(tokenizer.eos_id)] if eos else new
                sent[i] = stop_at
                row.n_tokens += len(new)
                final = eos or stop_at == P + row.request['max_tokens']
                row.emit(row.stream.feed(new, final=final), final=final, eos=eos)

        req = rows[0].request
        model.generate(idx, [r.request['max_tokens'] for r in rows], steps=req['steps'], kv_cache=req['kv_cache'],
                       top_p=[float(r.request['top_p']) for r in rows],
                       temperature=[float(r.request['temperature']) for r in rows],
                       generator=gens, stop_at_eos=True, on_block=on_block)
        for row in rows:  # rows cut short by the batch's end are final now
            row.emit(row.stream.feed([], final=True), final=True)


def completion_id():
    return 'cmpl-' + uuid.uuid4().hex[:24]


class Handler(BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'

    def log_message(self, fmt, *args):  # one short line per request on stderr
        sys.stderr.write(f'{self.address_string()} {fmt % args}\n')

    def send_json(self, status, obj):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def send_error_json(self, e):
        self.send_json(e.status, {'error': {'message': str(e), 'type': e.kind, 'param': e.param, 'code': None}})

    def do_GET(self):
        if self.path in ('/health', '/v1/health'):
            return self.send_json(200, {'status': 'ok'})
        if self.path == '/v1/models':
            return self.send_json(200, {'object': 'list', 'data': [
                {'id': model_name, 'object': 'model', 'created': started, 'owned_by': 'bd3lm'}]})
        self.send_error_json(RequestError(f'no route GET {self.path}', status=404, kind='not_found'))

    def do_POST(self):
        if self.path != '/v1/completions':
            return self.send_error_json(RequestError(f'no route POST {self.path}', status=404, kind='not_found'))
        try:
            length = int(self.headers.get('Content-Length') or 0)
            try:
                body = json.loads(self.rfile.read(length) or b'null')
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise RequestError(f'the body is not valid JSON ({e})')
            r = parse_request(body, tokenizer, model.config)
            sink = queue.Queue()
            rows, index = [], 0
            for p, prompt in enumerate(r['prompts']):
                for j in range(r['n']):
                    seed = (r['seed'] if r['seed'] is not None else int.from_bytes(uuid.uuid4().bytes[:4], 'big')) + j
                    rows.append(Row(r, prompt, index, seed, sink))
                    index += 1
            batcher.submit(rows)
        except RequestError as e:
            return self.send_error_json(e)
        cid, created = completion_id(), int(time.time())
        chunk = lambda choices: {'id': cid, 'object': 'text_completion', 'created': created, 'model': model_name,
                                 'choices': choices}
        texts, reasons, tokens = [''] * len(rows), [None] * len(rows), [0] * len(rows)
        if r['stream']:
            self.send_response(200)
            self.send_header('Content-Type', 'text/event-stream')
            self.send_header('Cache-Control', 'no-cache')
            self.send_header('Connection', 'close')
            self.end_headers()
            self.close_connection = True
        pending = len(rows)
        while pending:
            item = sink.get()
            if item[0] == 'error':
                error = RequestError(f'generation failed: {item[1]}', status=500, kind='server_error')
                if not r['stream']:
                    return self.send_error_json(error)
                return self.write_event({'error': {'message': str(error), 'type': error.kind}})
            kind, i = item[0], item[1]
            if kind == 'text':
                texts[i] += item[2]
                if r['stream'] and not self.write_event(chunk([{'text': item[2], 'index': i, 'logprobs': None,
                                                                'finish_reason': None}])):
                    return  # the client went away; its rows finish unseen
            else:
                reasons[i], tokens[i] = item[2], item[3]
                pending -= 1
                if r['stream'] and not self.write_event(chunk([{'text': '', 'index': i, 'logprobs': None,
                                                                'finish_reason': reasons[i]}])):
                    return
        prompt_tokens = sum(len(p) for p in r['prompts']) * r['n']
        usage = {'prompt_tokens': prompt_tokens, 'completion_tokens': sum(tokens),
                 'total_tokens': prompt_tokens + sum(tokens)}
        if r['stream']:
            if (r['stream_options'] or {}).get('include_usage'):
                self.write_event({**chunk([]), 'usage': usage})
            self.write_event('[DONE]')
            return
        choices = [{'text': texts[i], 'index': i, 'logprobs': None, 'finish_reason': reasons[i]} for i in range(len(rows))]
        self.send_json(200, {**chunk(choices), 'usage': usage})

    def write_event(self, obj):
        try:
            self.wfile.write(f'data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n'.encode())
            self.wfile.flush()
            return True
        except (BrokenPipeError, ConnectionResetError):
            return False


if __name__ == '__main__':
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if dtype not in ('float32', 'bfloat16', 'float16'):
        raise SystemExit(f"--dtype={dtype!r}: choose 'float32', 'bfloat16' or 'float16'")
    for _name in ('port', 'max_batch', 'max_pending', 'max_tokens_limit', 'max_prompt_tokens'):
        if not isinstance(globals()[_name], int) or globals()[_name] <= 0:
            raise SystemExit(f'--{_name}={globals()[_name]!r}: must be a positive integer')
    try:
        model = bd3lm.BD3LM.from_pretrained(init_from, device=device).to(getattr(torch, dtype))
        tokenizer = bd3lm.get_tokenizer(model)
    except (ValueError, OSError, ImportError) as e:
        raise SystemExit(f'--init_from={init_from}: {e}') from None
    model_name = model_name or init_from
    started = int(time.time())
    batcher = Batcher()
    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    print(f'serving {model_name} ({model.config.block_size}-token blocks, {device} {dtype}) on '
          f'http://{host}:{server.server_address[1]}/v1', file=sys.stderr, flush=True)
    server.serve_forever()
