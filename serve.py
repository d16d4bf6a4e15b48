"""
An OpenAI-compatible completions server for a BD3-LM, so that the snippet on the released models' Hugging
Face page works against this project:

    python serve.py --init_from=kuleshov-group/bd3lm-owt-block_size4 --port=30000
    curl -X POST http://localhost:30000/v1/completions -H "Content-Type: application/json" \
      --data '{"model": "kuleshov-group/bd3lm-owt-block_size4", "prompt": "Once upon a time,", "max_tokens": 512, "temperature": 0.5}'

Endpoints: POST /v1/completions, GET /v1/models, GET /health. Python's standard library serves HTTP: no web
framework is needed for three endpoints. BD3-LM's own knobs come as extra fields: `rule` (a name in
bd3lm_tools.engine.rules()), `knob`, `order` and `kv_cache`; `steps`, `threshold`, `entropy_bound` and `tokens_per_call`
are accepted as aliases of rule + knob.

How a request flows:
  1. The HTTP thread parses and checks it, makes one Row per completion (prompt x n, each with its own
     generator from (seed, choice)) and queues them (HTTP 503 at once past --max_pending waiting requests).
  2. The engine thread (bd3lm_tools/engine.py) owns the model and all of its KV cache (max_batch rows, allocated at
     start). Between model calls it admits waiting rows: a row's prompt blocks go into its cache slot and
     it starts its first block, wherever the other rows are in theirs. One engine step is one model call
     for every running row, whatever its rule: the sampler's own denoising step, each row with its own
     rule, knob, seed, temperature and top_p, so a row's tokens are what it would get alone.
  3. A finished block's tokens go to the client at once (one SSE chunk per block). A row that is done
     (EOS, max_tokens, a stop string, its client gone, another row of its request failed) leaves at once.
  4. A failure in a step answers that step's requests with a JSON 500; if the engine thread ever stops,
     /health answers 503 and new requests get 503 at once.
"""
import json
import math
import os
import queue
import select
import socket
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import torch

import bd3lm
import bd3lm_tools.engine
from bd3lm_tools.engine import Engine, EngineStopped, Row as EngineRow
from bd3lm_tools.tokenizer import get_tokenizer

# -----------------------------------------------------------------------------
init_from = 'out-demo'      # any model BD3LM.from_pretrained accepts: hub id, folder, Lightning .ckpt
model_name = None           # the name /v1/models reports (default: init_from)
host = '127.0.0.1'
port = 30000
device = 'auto'
dtype = 'float32'           # 'float32', 'bfloat16', 'float16'
max_batch = 16              # rows (completions) running at once, all lanes together; also the most a request may ask
batch_wait_ms = 20          # an idle engine waits this long for a burst of requests to start together
max_pending = 64            # requests waiting beyond this get HTTP 503 at once
max_tokens_limit = 4096     # the largest max_tokens a request may ask for
max_steps = 1_000_000       # the largest steps=K a request may ask for (any K costs <= block_size calls)
max_prompt_tokens = 4096
max_draft_mb = 128          # MiB per row: the draft laws of a drafting rule (rule.draft_bytes; speculative.py)
max_body_bytes = 1_000_000  # a larger request body is refused (413) without being read
read_timeout_s = 30.0       # HTTP 408 for a client silent this long, or whose body takes longer
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
          'rule': ((str,), 'first_hitting'), 'knob': ((int, float, type(None)), None),
          'order': ((str, type(None)), None), 'kv_cache': ((bool,), True), 'user': ((str,), None),
          # aliases of rule + knob, as the per-rule fields earlier clients send
          'steps': ((int, type(None)), None), 'threshold': ((int, float, type(None)), None),
          'entropy_bound': ((int, float, type(None)), None), 'tokens_per_call': ((int, type(None)), None),
          'stream_options': ((dict, type(None)), None), 'echo': ((bool,), False), 'logprobs': ((int, type(None)), None),
          'best_of': ((int, type(None)), None), 'presence_penalty': ((int, float), 0), 'frequency_penalty': ((int, float), 0),
          'logit_bias': ((dict, type(None)), None), 'suffix': ((str, type(None)), None)}
ALIASES = ('steps', 'threshold', 'entropy_bound', 'tokens_per_call')
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
    knob_field = 'knob'
    aliases = [k for k in ALIASES if r[k] is not None]
    if aliases:
        if len(aliases) > 1 or 'rule' in body or 'knob' in body:
            raise RequestError(f'choose one unmasking rule: {", ".join(aliases + [k for k in ("rule", "knob") if k in body])}'
                               f' given', aliases[0])
        knob_field = aliases[0]
        r['rule'], r['knob'] = knob_field, r[knob_field]
    rules = bd3lm_tools.engine.rules()
    if r['rule'] not in rules:
        raise RequestError(f'rule must be one of {", ".join(rules)}, got {r["rule"]!r}', 'rule')
    if r['rule'] == 'steps' and isinstance(r['knob'], int) and r['knob'] > max_steps:
        raise RequestError(f'steps must be at most {max_steps:,}, got {r["knob"]:,}', knob_field)
    try:  # the rule's knob and order, checked by the sampler itself
        checked = bd3lm.check_generate(None, None, None, r['rule'], r['knob'], r['order'], rules=rules)
        rule, order = checked.rule, checked.order
    except ValueError as e:
        raise RequestError(str(e), 'order' if str(e).startswith('order') else knob_field)
    if hasattr(rule, 'draft_bytes'):    # a drafting rule: the draft laws it keeps per row are capped
        size, limit = rule.draft_bytes(r['knob'], order, config), max_draft_mb * 2 ** 20
        if size > limit:
            fits = [k for k in range(config.block_size) if rule.draft_bytes(k, order, config) <= limit]
            raise RequestError(f'rule {r["rule"]!r} in order {order!r} at knob {r["knob"]} keeps {size / 2 ** 20:,.1f} MiB '
                               f'of draft laws per row with this model, over --max_draft_mb={max_draft_mb}: '
                               + (f'use a knob of at most {max(fits)}' if fits else 'choose another order'), knob_field)
    if r['seed'] is not None and not 0 <= r['seed'] < 2 ** 63:
        raise RequestError(f'seed must be in [0, 2^63), got {r["seed"]}', 'seed')
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
    r['prompts'] = [list(ids) if ids and ids[0] == config.bos_id else [config.bos_id] + list(ids) for ids in prompts]
    for ids in r['prompts']:            # BOS counted once, whether the client sent it or not
        if len(ids) > max_prompt_tokens:
            raise RequestError(f'the prompt has {len(ids)} tokens with BOS; at most {max_prompt_tokens} are allowed', 'prompt')
        if config.block_size == config.model_length and len(ids) + r['max_tokens'] > config.model_length:
            raise RequestError(f'this MDLM-like model writes at most {config.model_length} tokens with the prompt; '
                               f'lower max_tokens', 'max_tokens')
    if len(r['prompts']) * r['n'] > max_batch:
        raise RequestError(f'{len(r["prompts"])} prompts x n={r["n"]} exceeds the {max_batch} rows a request may use', 'n')
    return r


class Row(EngineRow):
    """One completion: an engine row whose finished blocks become text, cut at the request's stop strings,
    and go to the request's sink ('text', i, piece) / ('done', i, reason, tokens) / ('error', message)."""

    def __init__(self, request, prompt, index, seed, sink):
        r = request
        super().__init__(prompt, r['max_tokens'], torch.Generator(device=device).manual_seed(seed), r['rule'],
                         r['knob'], r['order'], r['temperature'], r['top_p'], r['kv_cache'])
        self.request, self.index, self.sink = request, index, sink
        self.stream = tokenizer.stream(prompt)
        self.text, self.sent, self.finished, self.finish_reason, self.n_tokens = '', '', False, None, 0

    def block_done(self, new):
        """A block's new tokens are final: send their text on; returns True when the row is done."""
        eos = tokenizer.eos_id in new
        new = new[:new.index(tokenizer.eos_id)] if eos else new
        self.tokens += new
        final = eos or self.lo + model.config.block_size >= self.end
        self.emit(self.stream.feed(new, final=final), len(new), final=final, eos=eos)
        return self.finished

    def emit(self, piece, n_new, final=False, eos=False):
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
        # usage counts the tokens returned: those of the text kept, when a stop string cut it
        self.n_tokens = len(tokenizer.encode(held)) if cut >= 0 else self.n_tokens + n_new
        # Hold back a tail that could still become a stop string.
        keep = 0 if final else max((len(s) - 1 for s in stops), default=0)
        ready = held[:len(held) - keep] if keep else held
        new, self.text, self.sent = ready[len(self.sent):], held, ready
        if new:
            self.sink.put(('text', self.index, new))
        if final:
            self.finished = True
            self.sink.put(('done', self.index, self.finish_reason, self.n_tokens))

    def fail(self, message):
        """The engine could not finish this row: the request fails, and its other rows end too."""
        self.sink.put(('error', message))
        for row in self.request['rows']:
            row.cancelled = True


def completion_id():
    return 'cmpl-' + uuid.uuid4().hex[:24]


class Handler(BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'

    def setup(self):
        self.timeout = read_timeout_s         # the socket's timeout: a silent client cannot hold a thread forever
        super().setup()

    def handle_one_request(self):
        self.raw_requestline = None
        super().handle_one_request()
        if self.raw_requestline is None:      # timed out before sending a request line: say so, then close
            self.request_version, self.requestline, self.close_connection = 'HTTP/1.1', '', True
            try:
                self.send_error_json(RequestError(f'no request within {read_timeout_s:g} s', status=408,
                                                  kind='timeout'))
            except OSError:
                pass

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
        self.safely(self.get)

    def do_POST(self):
        self.safely(self.post)

    def safely(self, handle):
        # Any unexpected exception becomes a JSON 500: a connection never drops without an answer.
        try:
            handle()
        except Exception as e:
            self.close_connection = True
            try:
                self.send_error_json(RequestError(f'internal error: {type(e).__name__}: {e}', status=500,
                                                  kind='server_error'))
            except OSError:
                pass

    def get(self):
        if self.path in ('/health', '/v1/health'):
            snap = engine.snapshot              # published by the engine thread after every step
            return self.send_json(200 if snap['alive'] else 503,
                                  {'status': 'ok' if snap['alive'] else 'engine stopped', **snap})
        if self.path == '/v1/models':
            return self.send_json(200, {'object': 'list', 'data': [
                {'id': model_name, 'object': 'model', 'created': started, 'owned_by': 'bd3lm'}]})
        self.send_error_json(RequestError(f'no route GET {self.path}', status=404, kind='not_found'))

    def post(self):
        if self.path != '/v1/completions':
            return self.send_error_json(RequestError(f'no route POST {self.path}', status=404, kind='not_found'))
        try:
            try:
                length = int(self.headers.get('Content-Length') or 0)
            except ValueError:
                length = -1
            if not 0 <= length <= max_body_bytes:   # refused unread: a huge Content-Length never reaches memory
                self.close_connection = True
                raise RequestError(f'the request body must be 0 to {max_body_bytes:,} bytes (Content-Length: '
                                   f'{self.headers.get("Content-Length")})', status=413, kind='request_too_large')
            try:
                raw = self.read_body(length)
            except TimeoutError:
                self.close_connection = True
                raise RequestError(f'the request body did not arrive within {read_timeout_s:g} s', status=408,
                                   kind='timeout')
            if len(raw) < length:
                self.close_connection = True
                raise RequestError(f'the body ended after {len(raw)} of {length} bytes')
            try:
                body = json.loads(raw or b'null')
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:   # (or nested too deep)
                raise RequestError(f'the body is not valid JSON ({e})')
            r = parse_request(body, tokenizer, model.config)
            sink = queue.Queue()
            # Choice j's generator comes from (seed, j): requests with different seeds never share a choice.
            seed = r['seed'] if r['seed'] is not None else int.from_bytes(uuid.uuid4().bytes[:8], 'big') >> 1
            seeds = [int(s.generate_state(1, np.uint64)[0]) for s in np.random.SeedSequence(seed).spawn(
                len(r['prompts']) * r['n'])]
            r['rows'] = rows = [Row(r, prompt, i, seeds[i], sink)
                                for i, prompt in enumerate(p for p in r['prompts'] for _ in range(r['n']))]
            if len({id(x.request) for x in list(engine.waiting)}) >= max_pending:
                raise RequestError(f'the server is busy ({max_pending} requests waiting); try again shortly',
                                   status=503, kind='server_busy')
            try:
                engine.submit(rows)
            except EngineStopped as e:
                raise RequestError(str(e), status=503, kind='engine_stopped')
        except RequestError as e:
            return self.send_error_json(e)
        try:
            self.answer(r, rows, sink)
        finally:        # however the request ends (done, failed, its client gone), its rows leave the engine
            for row in rows:
                row.cancel()

    def answer(self, r, rows, sink):
        """Wait for the rows' text and send it: as SSE chunks (stream) or as one JSON body."""
        cid, created = completion_id(), int(time.time())
        chunk = lambda choices: {'id': cid, 'object': 'text_completion', 'created': created, 'model': model_name,
                                 'choices': choices}
        if r['stream']:
            self.send_response(200)
            self.send_header('Content-Type', 'text/event-stream')
            self.send_header('Cache-Control', 'no-cache')
            self.send_header('Connection', 'close')
            self.end_headers()
            self.close_connection = True
        done = self.relay(r, len(rows), sink, chunk)
        if done is None:
            return
        texts, reasons, tokens = done
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

    def relay(self, r, n, sink, chunk):
        """The n rows' (texts, finish reasons, token counts), passing text on as it comes when streaming;
        None when the request ended early: its client left, or it failed (answered here with the error)."""
        texts, reasons, tokens, pending = [''] * n, [None] * n, [0] * n, n
        while pending:
            try:
                item = sink.get(timeout=0.2)
            except queue.Empty:         # an engine that stopped sends nothing more: say so
                item = None if engine.alive else ('error', engine.snapshot['error'])
            if self.client_gone():      # checked between blocks: a client that only waits is noticed too
                return None
            if item is None:
                continue
            if item[0] == 'error':
                error = RequestError(f'generation failed: {item[1]}', status=500, kind='server_error')
                if not r['stream']:
                    self.send_error_json(error)
                else:
                    self.write_event({'error': {'message': str(error), 'type': error.kind}})
                return None
            kind, i = item[0], item[1]
            if kind == 'text':
                texts[i] += item[2]
                sent = not r['stream'] or self.write_event(chunk([{'text': item[2], 'index': i, 'logprobs': None,
                                                                   'finish_reason': None}]))
            else:
                reasons[i], tokens[i] = item[2], item[3]
                pending -= 1
                sent = not r['stream'] or self.write_event(chunk([{'text': '', 'index': i, 'logprobs': None,
                                                                   'finish_reason': reasons[i]}]))
            if not sent:                # a write failed: the client went away
                return None
        return texts, reasons, tokens

    def read_body(self, length):
        # The whole body within read_timeout_s, however slowly it trickles in: a client sending a byte at a
        # time would otherwise hold this thread for read_timeout_s per byte.
        deadline, raw = time.monotonic() + read_timeout_s, bytearray()
        while len(raw) < length:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self.connection.settimeout(left)
            chunk = self.rfile.read1(length - len(raw))
            if not chunk:
                break
            raw += chunk
        self.connection.settimeout(read_timeout_s)
        return bytes(raw)

    def client_gone(self):
        # A client that closed its connection makes the socket readable with nothing to read.
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b''
        except (OSError, ValueError):
            return True

    def write_event(self, obj):
        try:
            self.wfile.write(f'data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n'.encode())
            self.wfile.flush()
            return True
        except OSError:  # broken pipe, reset, timed out: the client is gone
            return False


if __name__ == '__main__':
    # Check the settings before loading anything: one line that names the flag and its valid range.
    if dtype not in ('float32', 'bfloat16', 'float16'):
        raise SystemExit(f"--dtype={dtype!r}: choose 'float32', 'bfloat16' or 'float16'")
    _int = lambda v: isinstance(v, int) and not isinstance(v, bool)
    _number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    _checks = [('port', _int(port) and 1 <= port <= 65535, 'an integer in [1, 65535]'),
               ('batch_wait_ms', _number(batch_wait_ms) and 0 <= batch_wait_ms <= 60_000,
                'a number of milliseconds in [0, 60000]'),
               ('read_timeout_s', _number(read_timeout_s) and 0 < read_timeout_s <= 86_400,
                'a number of seconds in (0, 86400]')]
    _checks += [(_name, _int(globals()[_name]) and globals()[_name] > 0, 'a positive integer')
                for _name in ('max_batch', 'max_pending', 'max_tokens_limit', 'max_steps', 'max_prompt_tokens',
                              'max_body_bytes', 'max_draft_mb')]
    for _name, _ok, _what in _checks:
        if not _ok:
            raise SystemExit(f'--{_name}={globals()[_name]!r}: must be {_what}')
    if device != 'auto':    # a device name torch knows, which this machine and this torch build have
        try:
            torch.empty(0, device=device)
        except Exception:
            raise SystemExit(f'--device={device}: not a device this machine (or this torch build) has; use '
                             f'--device=auto or --device=cpu') from None
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        raise SystemExit(f'--host={host}: cannot resolve it ({getattr(e, "strerror", None) or e}); use an '
                         f'address of this machine, such as 127.0.0.1 or 0.0.0.0') from None
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    try:
        model = bd3lm.BD3LM.from_pretrained(init_from, device=device).to(getattr(torch, dtype))
        tokenizer = get_tokenizer(model)
    except (ValueError, OSError, ImportError) as e:
        raise SystemExit(f'--init_from={init_from}: {e}') from None
    model_name = model_name or init_from
    started = int(time.time())
    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OSError as e:
        raise SystemExit(f'--host={host} --port={port}: cannot listen there ({e.strerror or e}); choose another '
                         f'--port, or an address of this machine as --host') from None
    engine = Engine(model, device, max_batch, batch_wait_ms / 1000)
    server.daemon_threads = True
    print(f'serving {model_name} ({model.config.block_size}-token blocks, {device} {dtype}) on '
          f'http://{host}:{server.server_address[1]}/v1', file=sys.stderr, flush=True)
    server.serve_forever()
