"""
An OpenAI-compatible completions server for a BD3-LM, so that the snippet on the released models' Hugging
Face page works against this project:

    python serve.py --init_from=kuleshov-group/bd3lm-owt-block_size4 --port=30000
    curl -X POST http://localhost:30000/v1/completions -H "Content-Type: application/json" \
      --data '{"model": "kuleshov-group/bd3lm-owt-block_size4", "prompt": "Once upon a time,", "max_tokens": 512, "temperature": 0.5}'

Endpoints: POST /v1/completions, GET /v1/models, GET /health. Python's standard library serves HTTP: no web
framework is needed for three endpoints. BD3-LM's own knobs come as extra fields: `steps`, `threshold`,
`entropy_bound`, `tokens_per_call`, `order` (the unmasking rule, as in generate) and `kv_cache`.

How a request flows (continuous batching at block boundaries):
  1. The HTTP thread parses and checks it, makes one Row per completion (prompt x n) and queues them
     (HTTP 503 at once past --max_pending waiting requests).
  2. The engine thread owns the model. Between model calls it admits waiting rows into a Lane, the running
     batch of rows that share an unmasking rule (rows with other rules run in their own lane, in turn):
     a row's prompt blocks are written into its own slot of the lane's KV cache, and it starts its first
     block, wherever the other rows are in theirs. Rows keep their own positions, cache counts, seeds,
     temperature, top_p and rule knob, so a row's tokens are what it would get alone.
  3. Each engine step is one model call for a lane: rows mid-block are denoised (bd3lm.denoise_step),
     rows whose block just finished write it into the cache in the same call.
  4. A finished block's tokens go to the client at once (one SSE chunk per block). A row that is done
     (EOS, max_tokens, a stop string, a client gone) leaves the lane at once and costs nothing more.
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
from tokenizer import get_tokenizer

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
max_prompt_tokens = 4096
max_body_bytes = 1_000_000  # a larger request body is refused (413) without being read
read_timeout_s = 30.0       # a client that sends nothing for this long gets HTTP 408
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
          'threshold': ((int, float, type(None)), None), 'entropy_bound': ((int, float, type(None)), None),
          'tokens_per_call': ((int, type(None)), None), 'order': ((str, type(None)), None),
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
    rule = {k: r[k] for k in ('steps', 'threshold', 'entropy_bound', 'tokens_per_call', 'order')}
    try:  # the unmasking rule, checked by the sampler itself
        bd3lm.Sampling(1, 'cpu', **rule)
    except ValueError as e:
        raise RequestError(str(e), next((k for k in rule if str(e).startswith(k)), 'steps'))
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
    """One completion being generated: its prompt and settings, where it stands, and where its text goes."""

    def __init__(self, request, prompt, index, seed, sink):
        self.request, self.prompt, self.index, self.seed, self.sink = request, prompt, index, seed, sink
        self.stream = tokenizer.stream(prompt)
        self.text, self.sent, self.finished, self.finish_reason, self.n_tokens = '', '', False, None, 0
        self.cancelled = False       # set by the HTTP thread when a streaming client goes away
        self.tokens = []             # generated so far (up to, not including, an EOS)
        self.end = len(prompt) + request['max_tokens']
        self.lo = len(prompt) // model.config.block_size * model.config.block_size   # its current block
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def lane_key(self):  # rows share a model call when their rule is the same kind (knobs may differ)
        r = self.request
        kind = next((k for k in ('steps', 'threshold', 'entropy_bound', 'tokens_per_call') if r[k] is not None), None)
        return kind, r['steps'], r['order'], r['kv_cache']

    def block_done(self, block):
        """The current block's tokens are final: send the new ones on; returns True when the row is done."""
        bs = model.config.block_size
        new = block[max(len(self.prompt) - self.lo, 0):min(self.end - self.lo, bs)].tolist()
        eos = tokenizer.eos_id in new
        new = new[:new.index(tokenizer.eos_id)] if eos else new
        self.tokens += new
        self.n_tokens += len(new)
        final = eos or self.lo + bs >= self.end
        self.emit(self.stream.feed(new, final=final), final=final, eos=eos)
        return self.finished

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


class Lane:
    """The running batch of rows that share an unmasking rule, so one model call serves them all. Row i sits
    in slot i of the lane's KV cache (allocated once, max_batch rows); per-row tensors hold its current block
    (xb), the sampler's BlockState and its Sampling knobs, and are rebuilt when rows join or leave."""

    def __init__(self, key):
        cfg = model.config
        self.key, self.rows = key, []
        self.cache = bd3lm.KVCache(cfg.n_layers, max_batch, cfg.n_heads, cfg.model_length, cfg.hidden_dim // cfg.n_heads,
                                   cfg.block_size, device, model.vocab_embed.embedding.dtype)
        self.xb = torch.zeros(0, cfg.block_size, dtype=torch.long, device=device)
        self.state = bd3lm.BlockState(torch.zeros(0, cfg.block_size, dtype=torch.bool, device=device))

    def regroup(self, keep, joining):
        """Rows at indices `keep` (ascending) stay, moving down into freed cache slots; `joining` rows are
        prefilled into the next slots and start their first block."""
        cfg, bs = model.config, model.config.block_size
        for new, old in enumerate(keep):
            if new != old:
                self.cache.k[:, new], self.cache.v[:, new] = self.cache.k[:, old], self.cache.v[:, old]
                self.cache.n_committed[new] = self.cache.n_committed[old]
        idx = torch.tensor(keep, dtype=torch.long, device=device)
        blocks, active = [self.xb[idx]], [self.state.active[idx]]
        for j, row in enumerate(joining):
            slot = len(keep) + j
            cache = self.cache.rows(slot, slot + 1)
            cache.n_committed.zero_()
            prompt = torch.tensor([row.prompt], device=device)
            bd3lm.prefill(model, prompt, cache)          # the prompt's complete blocks enter its cache slot
            block = torch.full((1, bs), cfg.mask_id, dtype=torch.long, device=device)
            block[0, :len(row.prompt) - row.lo] = prompt[0, row.lo:]
            pos = torch.arange(row.lo, row.lo + bs, device=device)
            blocks.append(block)
            active.append((block == cfg.mask_id) & (pos < row.end))
        old, n_new = self.state, len(joining)
        self.rows = [self.rows[i] for i in keep] + list(joining)
        self.xb = torch.cat(blocks)
        self.state = bd3lm.BlockState(torch.cat(active))
        fresh = lambda t, value: torch.full((n_new,) + t.shape[1:], value, dtype=t.dtype, device=device)
        for name, value in (('t', 1.0), ('step', 0), ('stale', True)):
            setattr(self.state, name, torch.cat([getattr(old, name)[idx], fresh(getattr(old, name), value)]))
        if old.probs is not None:
            self.state.probs = torch.cat([old.probs[idx], fresh(old.probs, 0.0)])
        r = [row.request for row in self.rows]
        kind = self.key[0]
        self.sampling = bd3lm.Sampling(
            len(self.rows), device, steps=self.key[1], order=self.key[2],
            **({kind: [x[kind] for x in r]} if kind in ('threshold', 'entropy_bound', 'tokens_per_call') else {}),
            temperature=[float(x['temperature']) for x in r], top_p=[float(x['top_p']) for x in r])
        self.generators = [row.generator for row in self.rows]

    def step(self):
        """One model call: rows mid-block are denoised; rows whose block finished write it into the cache."""
        n, bs = len(self.rows), model.config.block_size
        committing = ~self.state.active.any(-1)
        positions = torch.tensor([row.lo for row in self.rows], device=device)[:, None] + torch.arange(bs, device=device)
        cache, ran = self.cache.rows(0, n), []

        def hidden(t):
            ran.append(True)
            t = torch.where(committing, bd3lm.EPS, t.float())
            sigma = bd3lm.sigma_from_move_chance(t) if model.config.time_conditioning else None
            return model._hidden(self.xb, sigma, positions, cache)
        if not committing.all():
            bd3lm.denoise_step(model, self.xb, self.state, self.sampling, hidden, self.generators,
                               torch.zeros(n, dtype=torch.long, device=device))
        if committing.any() and not ran:     # steps=K may reuse its last output: the cache write still runs
            hidden(torch.zeros(n, device=device))
        cache.commit(committing)
        keep, complete = [], (~self.state.active.any(-1)).tolist()    # one host read per step, not per row
        for i, (row, committed) in enumerate(zip(self.rows, committing.tolist())):
            if committed:                       # its block is in the cache: start the next one
                row.lo += bs
                pos = torch.arange(row.lo, row.lo + bs, device=device)
                self.xb[i] = model.config.mask_id
                self.state.active[i] = pos < row.end
                self.state.t[i], self.state.step[i], self.state.stale[i] = 1.0, 0, True
            elif complete[i] and row.block_done(self.xb[i]):
                continue                        # done: EOS, max_tokens or a stop string
            if not row.cancelled:
                keep.append(i)
        if len(keep) < n:
            self.regroup(keep, [])


class Engine:
    """The one thread that runs the model: admits waiting rows at block boundaries, steps every lane one
    model call at a time, and retires finished rows (see the module docstring)."""

    def __init__(self):
        self.waiting, self.lanes, self.calls = [], {}, 0
        self.cv = threading.Condition()
        threading.Thread(target=self.run, daemon=True).start()

    def submit(self, rows):
        with self.cv:
            if len({id(r.request) for r in self.waiting}) >= max_pending:
                raise RequestError(f'the server is busy ({max_pending} requests waiting); try again shortly',
                                   status=503, kind='server_busy')
            self.waiting.extend(rows)
            self.cv.notify()

    def running(self):
        return sum(len(lane.rows) for lane in self.lanes.values())

    def run(self):
        while True:
            with self.cv:
                idle = not self.running()
                while not self.waiting and not self.running():
                    self.cv.wait()
            if idle:
                time.sleep(batch_wait_ms / 1000)      # let a burst of requests start together
            with self.cv:
                free = max_batch - self.running()
                joining = [r for r in self.waiting if not r.cancelled][:max(free, 0)]
                self.waiting = [r for r in self.waiting if r not in joining and not r.cancelled]
            for row in [r for r in joining if not r.request['kv_cache']]:
                self.guard([row], lambda: self.reference(row))
            groups = {}
            for row in (r for r in joining if r.request['kv_cache']):
                groups.setdefault(row.lane_key(), []).append(row)
            for key, rows in groups.items():
                lane = self.lanes.setdefault(key, Lane(key))
                self.guard(rows + lane.rows, lambda: lane.regroup(list(range(len(lane.rows))), rows))
            for key, lane in list(self.lanes.items()):
                if lane.rows:
                    self.guard(lane.rows, lane.step)
                    self.calls += 1

    def guard(self, rows, work):
        try:
            work()
        except Exception as e:  # never leave a client waiting, never kill the engine
            for row in rows:
                row.sink.put(('error', f'{type(e).__name__}: {e}'))
            for key, lane in list(self.lanes.items()):
                if set(map(id, lane.rows)) & set(map(id, rows)):
                    del self.lanes[key]               # a fresh lane next time

    def reference(self, row):
        """kv_cache=false: the uncached reference path, one generate call for this row alone."""
        r = row.request

        def on_block(x, end):
            block = x[0, row.lo:row.lo + model.config.block_size]
            row.block_done(torch.cat([block, block.new_full((model.config.block_size - len(block),), 0)]))
            row.lo += model.config.block_size
        model.generate(torch.tensor([row.prompt], device=device), r['max_tokens'], kv_cache=False,
                       generator=[row.generator], temperature=float(r['temperature']), top_p=float(r['top_p']),
                       stop_at_eos=True, on_block=on_block, steps=r['steps'], threshold=r['threshold'],
                       entropy_bound=r['entropy_bound'], tokens_per_call=r['tokens_per_call'], order=r['order'])
        row.emit(row.stream.feed([], final=True), final=True)


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
        if self.path in ('/health', '/v1/health'):
            return self.send_json(200, {'status': 'ok', 'running': engine.running(), 'waiting': len(engine.waiting),
                                        'model_calls': engine.calls})
        if self.path == '/v1/models':
            return self.send_json(200, {'object': 'list', 'data': [
                {'id': model_name, 'object': 'model', 'created': started, 'owned_by': 'bd3lm'}]})
        self.send_error_json(RequestError(f'no route GET {self.path}', status=404, kind='not_found'))

    def do_POST(self):
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
                raw = self.rfile.read(length)
            except TimeoutError:
                self.close_connection = True
                raise RequestError(f'the request body did not arrive within {read_timeout_s:g} s', status=408,
                                   kind='timeout')
            if len(raw) < length:
                self.close_connection = True
                raise RequestError(f'the body ended after {len(raw)} of {length} bytes')
            try:
                body = json.loads(raw or b'null')
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
            engine.submit(rows)
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
                sent = not r['stream'] or self.write_event(chunk([{'text': item[2], 'index': i, 'logprobs': None,
                                                                   'finish_reason': None}]))
            else:
                reasons[i], tokens[i] = item[2], item[3]
                pending -= 1
                sent = not r['stream'] or self.write_event(chunk([{'text': '', 'index': i, 'logprobs': None,
                                                                   'finish_reason': reasons[i]}]))
            if not sent:  # the client went away: its rows leave the engine at its next step
                for row in rows:
                    row.cancelled = True
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
        except OSError:  # broken pipe, reset, timed out: the client is gone
            return False


if __name__ == '__main__':
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if dtype not in ('float32', 'bfloat16', 'float16'):
        raise SystemExit(f"--dtype={dtype!r}: choose 'float32', 'bfloat16' or 'float16'")
    for _name in ('port', 'max_batch', 'max_pending', 'max_tokens_limit', 'max_prompt_tokens', 'max_body_bytes'):
        if not isinstance(globals()[_name], int) or globals()[_name] <= 0:
            raise SystemExit(f'--{_name}={globals()[_name]!r}: must be a positive integer')
    if not isinstance(read_timeout_s, (int, float)) or read_timeout_s <= 0:
        raise SystemExit(f'--read_timeout_s={read_timeout_s!r}: must be a positive number of seconds')
    try:
        model = bd3lm.BD3LM.from_pretrained(init_from, device=device).to(getattr(torch, dtype))
        tokenizer = get_tokenizer(model)
    except (ValueError, OSError, ImportError) as e:
        raise SystemExit(f'--init_from={init_from}: {e}') from None
    model_name = model_name or init_from
    started = int(time.time())
    engine = Engine()
    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    print(f'serving {model_name} ({model.config.block_size}-token blocks, {device} {dtype}) on '
          f'http://{host}:{server.server_address[1]}/v1', file=sys.stderr, flush=True)
    server.serve_forever()
