"""
Sample from a BD3-LM: released weights, a bd3lms Lightning checkpoint or a train.py out_dir.

    python sample.py --init_from=kuleshov-group/bd3lm-owt-block_size16 --start="The meaning of life"
    python sample.py --init_from=out-demo --num_samples=3 --max_new_tokens=128 --rule=steps --knob=4
    python sample.py config/genppl_owt.py --init_from=kuleshov-group/bd3lm-owt-block_size4   # the paper's gen PPL

With --gen_ppl_model=NAME_OR_PATH (any Hugging Face causal LM, e.g. gpt2-large; needs `transformers`)
the samples are scored as in the paper: generative perplexity under that judge, and their unigram entropy.
"""
import json
import math
import os
import sys
import time

import torch
from tqdm import tqdm

import bd3lm
from bd3lm_tools import engine
from bd3lm_tools.tokenizer import get_tokenizer

# -----------------------------------------------------------------------------
init_from = 'out-demo'  # hub id, HF-layout folder, Lightning .ckpt, or a train.py out_dir
start = ''              # prompt text, or FILE:path to read it from a file; the model's BOS is always prepended
num_samples = 1
max_new_tokens = 256
rule = 'first_hitting'  # the unmasking rule: a name in bd3lm.RULES or a drafting rule (see --help)
knob = None             # its setting: steps K, threshold tau, entropy_bound gamma (nats), tokens_per_call k
order = None            # the order a rule ranks positions in: 'uniform', 'confidence', 'entropy' (default: the rule's)
top_p = 0.9             # nucleus sampling
nucleus = 'standard'    # 'standard' (smallest set reaching top_p) or 'bd3lms' (cumulative mass <= top_p)
stop_at_eos = False     # stop a sample at the first EOS it generates
stop_entropy = None     # e.g. 4.0: stop when the last 256 tokens' unigram entropy falls below this
seed = 1337
device = 'auto'         # 'auto', 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'auto'          # 'auto' (bfloat16 on CUDA if supported, else float32), 'float32', 'bfloat16', 'float16'
compile = False         # torch.compile each cached model call (engine.compile_sampler), rules that do not draft
textbook = False        # sample with bd3lm.generate, the plain Alg. 2 loop: the same text, slower, no call counts
compile_mode = 'default'  # torch.compile's mode: 'reduce-overhead' captures CUDA graphs on a GPU
kv_cache = True
temperature = 1.0       # divides the logits (0 = greedy)
gen_ppl_model = None    # e.g. 'gpt2-large': score the samples' generative perplexity with this causal LM
gen_ppl_stride = 512    # sliding-window stride over the judge's context for long samples
retry_degenerate = False  # bd3lms' fixed-length rule: redraw a sample whose last 256 tokens' unigram entropy
                        # falls below 4 at any block (up to 10 tries)
out_file = None         # write the samples, gen_ppl, entropy, NFEs and these settings as JSON
_help = f'unmasking rules (--rule): {", ".join(engine.rules())}'
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
# -----------------------------------------------------------------------------

# Check the settings before loading anything: one line that names the problem and the fix.
_number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
MAX_NEW_TOKENS = 1_000_000  # per sample: far past any use, and the token tensor of every sample fits in memory
_checks = [('num_samples', isinstance(num_samples, int) and num_samples > 0, 'a positive integer'),
           ('max_new_tokens', isinstance(max_new_tokens, int) and 0 < max_new_tokens <= MAX_NEW_TOKENS,
            f'a positive integer <= {MAX_NEW_TOKENS:,}'),
           ('top_p', _number(top_p) and 0 < top_p <= 1, 'a number in (0, 1]'),
           ('stop_entropy', stop_entropy is None or _number(stop_entropy), 'None or a number such as 4.0'),
           ('temperature', _number(temperature) and temperature >= 0, 'a number >= 0'),
           ('gen_ppl_stride', isinstance(gen_ppl_stride, int) and gen_ppl_stride > 0, 'a positive integer'),
           ('retry_degenerate', isinstance(retry_degenerate, bool), 'True or False'),
           ('textbook', isinstance(textbook, bool) and not (textbook and (compile or retry_degenerate or rule not in
                                                                          bd3lm.RULES)),
            'True or False; the textbook sampler runs the rules of bd3lm.RULES, without --compile or --retry_degenerate'),
           ('dtype', dtype in ('auto', 'float32', 'bfloat16', 'float16'), "'auto', 'float32', 'bfloat16' or 'float16'"),
           ('compile_mode', compile_mode in ('default', 'reduce-overhead', 'max-autotune'),
            "'default', 'reduce-overhead' or 'max-autotune'")]
for _name, _ok, _what in _checks:
    if not _ok:
        raise SystemExit(f'--{_name}={globals()[_name]!r}: must be {_what}')
try:  # the rule, its knob and the other sampler settings, checked by the sampler before anything loads
    bd3lm.check_generate(None, None, None, rule, knob, order, temperature, top_p, nucleus, None, stop_entropy,
                         rules=engine.rules())
except ValueError as e:
    raise SystemExit(f'--{e}') from None
if device != 'auto':    # a device name torch knows, which this machine and this torch build have
    try:
        torch.empty(0, device=device)
    except Exception:
        raise SystemExit(f'--device={device}: not a device this machine (or this torch build) has; use '
                         f'--device=auto or --device=cpu') from None
if start.startswith('FILE:'):
    try:
        with open(start[5:], encoding='utf-8') as f:
            start = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f'--start={start}: cannot read it as UTF-8 text ({getattr(e, "strerror", None) or e})') from None
if out_file is not None and not (os.access(os.path.dirname(os.path.abspath(out_file)), os.W_OK)
                                 and not os.path.isdir(out_file)):
    raise SystemExit(f'--out_file={out_file}: cannot write a file there (its folder must exist and be writable)')

if device == 'auto':
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
if dtype == 'auto':
    dtype = 'bfloat16' if device.startswith('cuda') and torch.cuda.is_bf16_supported() else 'float32'
torch.manual_seed(seed)
generator = torch.Generator(device=device).manual_seed(seed)

try:
    model = bd3lm.BD3LM.from_pretrained(init_from, device=device).to(getattr(torch, dtype))
except (ValueError, OSError, ImportError) as e:  # the loader's messages name the problem and the fix
    raise SystemExit(f'--init_from={init_from}: {e}') from None
if compile:
    engine.compile_sampler(mode=compile_mode)   # the cached call (model pass + rule + write-back) as one graph per kind of call
enc = get_tokenizer(model)  # the model's own: GPT-2 BPE, or the WordPiece vocabulary it carries
prompt = [model.config.bos_id] + enc.encode(start)
cfg = model.config
if cfg.block_size == cfg.model_length and len(prompt) + max_new_tokens > cfg.model_length:
    raise SystemExit(f'--max_new_tokens={max_new_tokens}: this model is MDLM-like (block_size = model_length = '
                     f'{cfg.model_length}), so the prompt ({len(prompt)} tokens with BOS) and the new tokens must fit '
                     f'in {cfg.model_length}; lower --max_new_tokens or shorten --start')
idx = torch.tensor([prompt] * num_samples, device=device)
try:  # and against this model (its vocabulary, an MDLM-like model's length)
    bd3lm.check_generate(model.config, idx, max_new_tokens, rule, knob, order, temperature, top_p, nucleus, generator,
                         stop_entropy, rules=engine.rules())
except ValueError as e:
    raise SystemExit(f'--{e}') from None
print(f'{init_from}: block_size={cfg.block_size}, context {cfg.model_length}, '
      f'{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {device} {dtype}', file=sys.stderr)

# Stream the first sample block by block as it is generated (a block boundary can split a multi-byte
# character or a word: the stream holds those back until complete); the progress bar goes to stderr.
n_blocks = -(-(len(prompt) + max_new_tokens) // cfg.block_size) - len(prompt) // cfg.block_size
bar = tqdm(total=n_blocks, desc='blocks', unit='block', file=sys.stderr, leave=False)
stream = enc.stream(prompt)
printed = [len(prompt)]
if num_samples == 1:
    sys.stdout.write(enc.decode(prompt))  # the prompt as the model reads it (WordPiece lower-cases it)


def on_block(x, end):
    bar.update(1)
    if num_samples == 1:
        sys.stdout.write(stream.feed(x[0, printed[0]:end].tolist()))
        sys.stdout.flush()
        printed[0] = end


def degenerate(ids, block_size, window=256, floor=4.0):
    """bd3lms' check, made after every block once more than 256 tokens exist: the unigram entropy of the last
    256 tokens below 4 nats. Tokens never change once written, so checking the finished sample at every
    block end gives the same verdict."""
    ends = list(range(block_size, len(ids), block_size)) + [len(ids)]
    return any(e > window and bd3lm.unigram_entropy(ids[e - window:e]) < floor for e in ends)


def textbook_sample(idx, on_block=None):
    # bd3lm.generate, the plain sampler: its rows' lengths replayed from its stop rules (tokens never change
    # once written, so the replay cuts where the sampler did); it counts no calls
    x = bd3lm.generate(model, idx, max_new_tokens, rule, knob, order, temperature, top_p, nucleus, kv_cache,
                       generator, stop_at_eos, stop_entropy, None, on_block)
    lengths = torch.full((len(x),), x.shape[1], device=x.device)
    done = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    for end in range(len(prompt) // cfg.block_size * cfg.block_size + cfg.block_size, x.shape[1] + cfg.block_size,
                     cfg.block_size):
        bd3lm.apply_stops(x.clone(), done, lengths, len(prompt), min(end, x.shape[1]), stop_at_eos, stop_entropy,
                          cfg.eos_id)
    return x, {'lengths': lengths, 'nfe': None, 'row_nfe': None}


t0 = time.perf_counter()
sample = textbook_sample if textbook else lambda idx, on_block=None: engine.generate(model, 
    idx, max_new_tokens, top_p=top_p, kv_cache=kv_cache, generator=generator, stop_at_eos=stop_at_eos,
    stop_entropy=stop_entropy, on_block=on_block, return_stats=True, temperature=temperature, rule=rule, knob=knob,
    order=order, nucleus=nucleus)
out, stats = sample(idx, on_block)
bar.close()
redrawn = 0
if retry_degenerate:  # as bd3lms' fixed-length sampling: a degenerate sample is thrown away and drawn again
    for _ in range(10):
        bad = [i for i in range(num_samples) if degenerate(out[i, :int(stats['lengths'][i])], cfg.block_size)]
        if not bad:
            break
        redrawn += len(bad)
        again, more = sample(idx[bad])
        out[bad], stats['lengths'][bad] = again, more['lengths']
        stats['nfe'] += more['nfe']
        stats['row_nfe'][bad] += more['row_nfe']
    still = sum(degenerate(out[i, :int(stats['lengths'][i])], cfg.block_size) for i in range(num_samples))
    print(f'retry_degenerate: {redrawn} draw(s) thrown away; {still} sample(s) still degenerate after 10 tries '
          f'(kept, and counted in the JSON)' if still else f'retry_degenerate: {redrawn} draw(s) thrown away',
          file=sys.stderr)
if device.startswith('cuda'):
    torch.cuda.synchronize()
elapsed = time.perf_counter() - t0
if num_samples == 1:
    print(stream.feed([], final=True))
else:
    for i in range(num_samples):
        print(f'---------- sample {i + 1}')
        print(enc.decode(out[i, :int(stats['lengths'][i])].tolist()))
new_tokens = int((stats['lengths'] - len(prompt)).sum())
calls = '' if textbook else (f', {stats["nfe"]} model calls (NFEs), '
                             f'{new_tokens / max(1, int(stats["row_nfe"].sum())):.2f} tokens per call')
print(f'---------- {new_tokens} tokens in {elapsed:.2f}s ({new_tokens / elapsed:.1f} tokens/s){calls}'
      + (' (textbook sampler)' if textbook else ''), file=sys.stderr)


@torch.no_grad()
def generative_perplexity(texts, judge_name, stride=512):
    """The paper's sample-quality protocol: each text is re-tokenized with the judge's tokenizer, the
    judge's BOS first; every token after it that is not EOS is scored (EOS tokens the model generated are
    in the text as <|endoftext|>: context, never targets), with windows of the judge's context starting
    every `stride` tokens (a window scores the tokens the previous one did not reach). Returns, per text,
    (summed NLL, scored tokens, the judge's token ids)."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise SystemExit('--gen_ppl_model needs transformers: pip install transformers') from None
    judge_tok = AutoTokenizer.from_pretrained(judge_name)
    judge = AutoModelForCausalLM.from_pretrained(judge_name).to(device).eval()
    context = getattr(judge.config, 'n_positions', None) or judge.config.max_position_embeddings
    stride = min(stride, context)
    bos = judge_tok.bos_token_id if judge_tok.bos_token_id is not None else judge_tok.eos_token_id
    scores = []
    for text in tqdm(texts, desc='gen ppl', unit='sample', file=sys.stderr, leave=False):
        ids = torch.tensor([bos] + judge_tok.encode(text, add_special_tokens=False), device=device)
        total, count, scored_to = 0.0, 0, 1               # position 0 is BOS: never a target
        for begin in range(0, len(ids), stride):
            end = min(begin + context, len(ids))
            if end > scored_to:
                log_p = judge(ids[None, begin:end]).logits[0].float().log_softmax(-1)     # (end - begin, V)
                targets = torch.arange(scored_to, end, device=device)
                nll = -log_p[targets - 1 - begin].gather(-1, ids[targets][:, None]).squeeze(-1)
                keep = ids[targets] != judge_tok.eos_token_id
                total += nll[keep].double().sum().item()
                count += int(keep.sum())
                scored_to = end
            if end == len(ids):
                break
        scores.append((total, count, ids.tolist()))
    return scores


if gen_ppl_model is not None or out_file is not None:
    rows = [out[i, len(prompt):int(stats['lengths'][i])].tolist() for i in range(num_samples)]
    texts = [enc.completion(prompt, row) for row in rows]
    # The judge reads the samples as bd3lms decodes them: generated EOS tokens stay, as <|endoftext|>.
    judged = [enc.completion(prompt, row, keep_special=True) for row in rows]
    result = {'samples': texts, 'nfe': stats['nfe'],
              'nfe_per_sample': None if textbook else stats['row_nfe'].tolist(),
              'tokens_per_call': None if textbook else [len(r) / max(1, int(n)) for r, n in zip(rows, stats['row_nfe'])],
              'redrawn': redrawn,
              'settings': {k: globals()[k] for k in ('init_from', 'start', 'num_samples', 'max_new_tokens', 'rule',
                                                     'knob', 'order', 'top_p',
                                                     'nucleus', 'temperature', 'stop_at_eos', 'stop_entropy', 'seed',
                                                     'kv_cache', 'textbook', 'dtype', 'gen_ppl_model', 'gen_ppl_stride',
                                                     'retry_degenerate')}}
    # Entropy as bd3lms measures it: per sample, the unigram entropy of the token ids the judge reads (its
    # BOS and any EOS included), averaged over samples. Without a judge: the model's own ids, BOS first.
    ids = [[model.config.bos_id] + row for row in rows]
    if gen_ppl_model is not None:
        scores = generative_perplexity(judged, gen_ppl_model, gen_ppl_stride)
        ids = [s[2] for s in scores]
        nll, count = sum(s[0] for s in scores), sum(s[1] for s in scores)
        result['gen_ppl'] = math.exp(nll / count) if count else float('nan')       # token-weighted
        per_sample = [math.exp(s[0] / s[1]) for s in scores if s[1]]
        result['gen_ppl_mean'] = sum(per_sample) / len(per_sample) if per_sample else float('nan')  # Table 3's
        result['gen_ppl_per_sample'], result['gen_ppl_tokens'] = per_sample, count
    result['entropy'] = sum(bd3lm.unigram_entropy(torch.tensor(i)) for i in ids) / len(ids)
    if gen_ppl_model is not None:
        print(f'generative perplexity under {gen_ppl_model}: mean of per-sample {result["gen_ppl_mean"]:.2f} (Table 3), '
              f'token-weighted {result["gen_ppl"]:.2f} ({result["gen_ppl_tokens"]:,} tokens), unigram entropy '
              f'{result["entropy"]:.3f}', file=sys.stderr)
    if out_file is not None:
        try:
            with open(out_file, 'w') as f:
                json.dump(result, f, indent=2)
        except OSError as e:
            raise SystemExit(f'--out_file={out_file}: cannot write it ({e.strerror or e})') from None
