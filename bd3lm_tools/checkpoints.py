"""
File formats of BD3-LM models, kept out of the method file:

  - the released Hugging Face layout: config.json + model.safetensors (+ vocab.txt for WordPiece), keys
    prefixed 'backbone.', the layer count named `n_blocks` (BD3LMConfig calls it n_layers);
  - bd3lms Lightning training checkpoints (.ckpt), read with a safe unpickler that executes nothing;
  - the hub (huggingface_hub, optional), and writes that a kill never leaves half done.

bd3lm.BD3LM.from_pretrained / save_pretrained call load() / save() here.
"""
import collections
import json
import os
import shutil
from dataclasses import asdict, fields

import torch

from bd3lm import FULL_INTERVAL, BD3LM, BD3LMConfig

# -----------------------------------------------------------------------------
# The released layout: config.json keys

# Keys that released config.json files carry but that do not change the model's numbers.
IGNORED_KEYS = ('attn_backend', 'architectures', 'auto_map', 'model_type', 'return_dict', 'dtype',
                'torch_dtype', 'transformers_version', 'var_min', 'sampling_eps_min', 'sampling_eps_max',
                'cross_attn', 'causal', 'name_or_path', '_name_or_path')
# Keys a config.json must have: they change the numbers and cannot be read off the weights.
REQUIRED_KEYS = ('block_size', 'vocab_size', 'model_length', 'hidden_dim', 'cond_dim', 'n_blocks', 'n_heads')
RENAMED = {'n_blocks': 'n_layers'}  # released key -> BD3LMConfig field


def config_from_json(d, source='config'):
    """BD3LMConfig from a released/saved config.json dict: known extras are ignored, unknown or missing keys
    are an error (a silent default such as block_size=16 would give wrong numbers)."""
    if not isinstance(d, dict):
        raise ValueError(f'{source} must hold a JSON object, got {type(d).__name__}')
    d = {RENAMED.get(k, k): v for k, v in d.items()}
    names = {f.name for f in fields(BD3LMConfig)}
    unknown = sorted(k for k in d if k not in names and k not in IGNORED_KEYS)
    if unknown:
        raise ValueError(f'{source}: unknown config keys {unknown}; BD3LMConfig takes {sorted(names)}')
    missing = [k for k in REQUIRED_KEYS if RENAMED.get(k, k) not in d]
    if missing:
        raise ValueError(f'{source} lacks {missing}: these set the model\'s shape and numbers and cannot be '
                         f'guessed; add them (every released config.json has them)')
    if d.get('causal') or d.get('cross_attn') is False:
        raise ValueError(f'{source} describes an autoregressive/causal bd3lms model (causal=true or '
                         'cross_attn=false); only BD3-LM / MDLM checkpoints are supported')
    return BD3LMConfig(**{k: v for k, v in d.items() if k in names})


def released_config(model):
    """config.json as the official BD3LM class reads it."""
    cfg = {{v: k for k, v in RENAMED.items()}.get(k, k): v for k, v in asdict(model.config).items()}
    cfg.update({
        'architectures': ['BD3LM'], 'model_type': 'bd3lm', 'attn_backend': 'sdpa', 'cross_attn': True,
        'causal': False, 'var_min': True, 'return_dict': False,
        'sampling_eps_min': float(model.sampling_eps_min), 'sampling_eps_max': float(model.sampling_eps_max),
    })
    return cfg

# -----------------------------------------------------------------------------
# Saving and loading

def _state_dict_to_released(model):
    sd = {}
    for k, v in model.state_dict().items():
        sd[k if k.startswith('sampling_eps') else 'backbone.' + k] = v.detach().contiguous()
    return sd


def save(model, out_dir):
    """Write config.json + model.safetensors (+ vocab.txt) in the released layout (keys prefixed 'backbone.')."""
    from safetensors.torch import save_file
    os.makedirs(out_dir, exist_ok=True)
    tensors = {k: v.cpu().float() if v.is_floating_point() else v.cpu() for k, v in _state_dict_to_released(model).items()}
    atomic_write(os.path.join(out_dir, 'model.safetensors'), lambda p: save_file(tensors, p, metadata={'format': 'pt'}))
    if model.vocab is not None:  # a WordPiece model's vocabulary travels with it: the folder is self-contained
        write_vocab(os.path.join(out_dir, 'vocab.txt'), model.vocab)
    text = json.dumps(released_config(model), indent=2, sort_keys=True)
    atomic_write(os.path.join(out_dir, 'config.json'), lambda p: open(p, 'w').write(text))


def atomic_write(path, write):
    # Write to a temporary name, then rename: a crash never leaves a half-written file at `path`.
    tmp = path + '.tmp'
    write(tmp)
    os.replace(tmp, path)


def write_together(folder, write):
    """Write several files into `folder` as one unit. write(stage) fills folder/.saving/, which is then
    marked COMPLETE and moved into place file by file; recover_folder() finishes a move that a kill cut
    off, or drops a stage that was never completed. So the files always come from the same write."""
    stage = os.path.join(folder, '.saving')
    shutil.rmtree(stage, ignore_errors=True)
    os.makedirs(stage)
    write(stage)
    open(os.path.join(stage, 'COMPLETE'), 'w').close()
    recover_folder(folder)


def recover_folder(folder):
    """Finish or drop an interrupted write_together(), and remove stale temporary files (*.tmp)."""
    stage = os.path.join(folder, '.saving')
    if os.path.isdir(stage):
        if os.path.exists(os.path.join(stage, 'COMPLETE')):
            for name in sorted(os.listdir(stage)):
                if name != 'COMPLETE' and not name.endswith('.tmp'):
                    os.replace(os.path.join(stage, name), os.path.join(folder, name))
        shutil.rmtree(stage)
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        if name.endswith('.tmp'):
            os.remove(os.path.join(folder, name))


def load(src, device='cpu', cls=BD3LM):
    """src: a model folder, a bd3lms Lightning .ckpt, or a hub id; see BD3LM.from_pretrained."""
    src = os.fspath(src)
    if os.path.isdir(src):
        return _load_hf_folder(cls, src, device)
    if os.path.isfile(src):
        return _load_lightning(cls, src, device)
    looks_local = src.startswith(('.', '/', '~')) or os.path.isdir(src.split('/')[0]) or src.endswith(('.ckpt', '.pt'))
    if src.count('/') == 1 and not looks_local:
        return _load_hf_folder(cls, _download_from_hub(src), device)
    raise FileNotFoundError(f'{src!r} does not exist: pass a model folder (config.json + model.safetensors), a '
                            f"bd3lms Lightning .ckpt file, or a hub id like 'kuleshov-group/bd3lm-owt-block_size16'")


def _download_from_hub(repo_id):
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ImportError(f'loading {repo_id!r} from the Hugging Face hub needs huggingface_hub: '
                          f"pip install 'bd3lm[hub]' (or download config.json and model.safetensors "
                          f'into a folder and pass the folder)') from None
    try:
        return snapshot_download(repo_id, allow_patterns=['config.json', 'model.safetensors', 'vocab.txt'])
    except Exception as e:
        raise OSError(f'could not download {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {e}). '
                      f'When offline, download config.json and model.safetensors elsewhere and pass their '
                      f'folder instead.') from None


def _load_hf_folder(cls, folder, device):
    config_path = os.path.join(folder, 'config.json')
    weights_path = os.path.join(folder, 'model.safetensors')
    for p in (config_path, weights_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f'{p} not found: a model folder needs config.json and model.safetensors '
                                    f'(as written by save_pretrained or train.py)')
    from safetensors.torch import load_file
    try:
        with open(config_path) as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f'{config_path} is not valid JSON ({e}); restore it from the original model') from None
    config = config_from_json(d, config_path)
    if not any(k in d for k in ('mask_id', 'bos_id', 'eos_id')) and config.vocab_size != 50258:
        import warnings
        warnings.warn(f'{config_path} names no special tokens, so the GPT-2 convention is assumed (mask = '
                      f'vocab_size - 1 = {config.mask_id}, BOS = EOS = {config.bos_id}). If the model was trained '
                      f'otherwise (e.g. BERT [MASK] = 103), add "mask_id", "bos_id", "eos_id" to config.json, '
                      f'or load its Lightning .ckpt, which records them.')
    try:
        tensors = load_file(weights_path)
    except Exception as e:
        raise ValueError(f'{weights_path} is not a readable safetensors file ({e}); download or save it again') from None
    # Exports with var_min=False carry no trained interval: use the config's, else the full one.
    for key, default in zip(('sampling_eps_min', 'sampling_eps_max'), FULL_INTERVAL):
        if key not in tensors:
            tensors[key] = torch.tensor(float(d.get(key, default)))
    vocab = None
    if config.tokenizer == 'wordpiece':
        vocab_path = os.path.join(folder, 'vocab.txt')
        if not os.path.isfile(vocab_path):
            raise FileNotFoundError(f'{vocab_path} not found: this WordPiece model needs its vocabulary beside the '
                                    f'weights (save_pretrained writes it)')
        vocab = read_vocab(vocab_path)
    return build(config, tensors, device, weights_path, vocab, cls)


def build(config, released_sd, device, what, vocab=None, cls=BD3LM):
    """Strictly load a released-layout state dict: every tensor used, every shape checked, every value
    finite (a corrupted file must not load as a model that outputs NaN)."""
    model = cls(config)
    own = model.state_dict()
    sd = {(k[len('backbone.'):] if k.startswith('backbone.') else k): v for k, v in released_sd.items()}
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = [f'{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}'
             for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(f'{what} does not fit the model {config}:\n'
                         + (f'  missing keys: {missing}\n' if missing else '')
                         + (f'  unexpected keys: {unexpected}\n' if unexpected else '')
                         + (f'  shape mismatches: {wrong}\n' if wrong else ''))
    broken = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise ValueError(f'{what} holds NaN or infinite values in {broken[:5]}{" ..." if len(broken) > 5 else ""}: '
                         f'the file is corrupted (or the run diverged); use another checkpoint')
    if vocab is not None and len(vocab) != config.vocab_size:
        raise ValueError(f'{what}: the vocabulary lists {len(vocab)} tokens but the model has vocab_size='
                         f'{config.vocab_size}')
    model.load_state_dict(sd, strict=True)
    model.vocab = vocab
    return model.to(device).eval()


# Classes a bd3lms Lightning checkpoint pickles besides tensors: its Hydra/OmegaConf config and the
# tokenizer object. They are rebuilt as inert stand-ins that only record their state; nothing from
# the file is ever called. Any other global (os.system, ...) is refused.
_INERT_MODULES = ('omegaconf.', 'transformers.', 'tokenizers.', 'typing.')


class _Inert:
    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state


def read_lightning(path):
    """The dict inside a bd3lms Lightning .ckpt, unpickled without executing anything it names."""
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as e:
        raise ValueError(f'{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {e})') from None
    plain = {'collections.defaultdict': collections.defaultdict, 'builtins.dict': dict,
             'builtins.list': list, 'builtins.set': set, 'builtins.tuple': tuple}
    allowed, refused = [], []
    for name in unsafe:
        if name in plain:
            allowed.append(plain[name])
        elif name.startswith(_INERT_MODULES):
            allowed.append((type(name.rsplit('.', 1)[1], (_Inert,), {}), name))
        else:
            refused.append(name)
    if refused:
        raise ValueError(f'refusing to load {path}: it asks to call {refused}, which a model checkpoint '
                         f'never needs (a malicious or foreign pickle). Nothing was executed.')
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location='cpu', weights_only=True)


def _omegaconf_to_python(node):
    # DictConfig/ListConfig/ValueNode stand-ins -> plain dicts, lists and values.
    if isinstance(node, _Inert):
        state = getattr(node, 'state', None) or {}
        if '_content' in state:
            return _omegaconf_to_python(state['_content'])
        return state.get('_val')
    if isinstance(node, dict):
        return {k: _omegaconf_to_python(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_omegaconf_to_python(v) for v in node]
    return node


def _resolve(cfg, value):
    # Resolve plain '${a.b}' interpolations (e.g. block_size: ${model.length}).
    if isinstance(value, str) and value.startswith('${') and value.endswith('}') and ':' not in value:
        node = cfg
        for part in value[2:-1].split('.'):
            node = node[part]
        return _resolve(cfg, node)
    return value


def _load_lightning(cls, path, device):
    ckpt = read_lightning(path)
    if not isinstance(ckpt, dict) or 'state_dict' not in ckpt:
        raise ValueError(f'{path} is not a bd3lms Lightning checkpoint (no state_dict); for a train.py '
                         f'checkpoint pass its out_dir folder instead')
    state_dict = {k.replace('_orig_mod.', ''): v for k, v in ckpt['state_dict'].items()}
    if 'backbone.vocab_embed.embedding' not in state_dict:
        raise ValueError(f'{path} holds no bd3lms DiT weights (no backbone.vocab_embed.embedding in its state_dict); '
                         f'it is not a BD3-LM / MDLM Lightning checkpoint')
    hp = _omegaconf_to_python(ckpt.get('hyper_parameters', {}).get('config', {})) or {}
    model_cfg = hp.get('model', {})
    algo_cfg = hp.get('algo', {})
    get = lambda section, key: _resolve(hp, section.get(key))
    if algo_cfg.get('name') == 'ar' or algo_cfg.get('parameterization') == 'ar':
        raise ValueError(f'{path} is a bd3lms autoregressive (algo=ar) checkpoint; only BD3-LM / MDLM checkpoints load here')
    # Only masked diffusion with the loglinear schedule and SUBS is this model; anything else (SEDD's
    # score entropy, another noise) would be scored wrongly, so it is refused rather than loaded.
    parameterization, noise = algo_cfg.get('parameterization', 'subs'), hp.get('noise', {}).get('type', 'loglinear')
    if parameterization != 'subs' or noise != 'loglinear' or algo_cfg.get('name', 'bd3lm') not in ('bd3lm', 'mdlm'):
        raise ValueError(f'{path} is a bd3lms {algo_cfg.get("name")!r} checkpoint with parameterization='
                         f'{parameterization!r} and noise={noise!r}; only BD3-LM / MDLM (SUBS, loglinear) load here')
    # Shapes come from the weights themselves; the run config supplies what weights cannot tell (heads,
    # context, block size). adaLN is read off the weights too: bd3lms' model configs say `adaln: False`,
    # yet its non-causal DiT always builds adaLN layers.
    emb = state_dict['backbone.vocab_embed.embedding']
    n_layers = len({k.split('.')[2] for k in state_dict if k.startswith('backbone.blocks.')})
    adaln = 'backbone.output_layer.adaLN_modulation.weight' in state_dict
    cond_dim = state_dict['backbone.sigma_map.mlp.0.weight'].shape[0] if adaln else int(get(model_cfg, 'cond_dim'))
    tokens = _lightning_tokenizer(ckpt.get('hyper_parameters', {}).get('tokenizer'), emb.shape[0], path,
                                  (hp.get('data') or {}).get('tokenizer_name_or_path'))
    config = BD3LMConfig(
        block_size=int(_resolve(hp, hp.get('block_size')) or get(model_cfg, 'length')),
        vocab_size=emb.shape[0], model_length=int(get(model_cfg, 'length')), hidden_dim=emb.shape[1],
        cond_dim=cond_dim, n_layers=n_layers, n_heads=int(get(model_cfg, 'n_heads')),
        dropout=float(get(model_cfg, 'dropout') or 0.0), adaln=adaln,
        time_conditioning=bool(get(algo_cfg, 'time_conditioning') or False), **tokens['config'])
    # The EMA weights are what the released models are; shadow_params follow parameters() order,
    # which is the order of the parameter entries in state_dict (buffers excluded).
    ema = ckpt.get('ema')
    if ema and ema.get('shadow_params'):
        param_names = [k for k in state_dict
                       if not k.endswith(('rotary_emb.inv_freq',)) and not k.startswith('sampling_eps')
                       and k != 'backbone.block_diff_mask']
        shadow = ema['shadow_params']
        if len(shadow) != len(param_names):
            raise ValueError(f'{path}: the EMA holds {len(shadow)} tensors but the model has {len(param_names)} '
                             f'parameters; the checkpoint is inconsistent')
        for name, tensor in zip(param_names, shadow):
            if tensor.shape != state_dict[name].shape:
                raise ValueError(f'{path}: EMA tensor for {name} has shape {tuple(tensor.shape)}, '
                                 f'expected {tuple(state_dict[name].shape)}')
            state_dict[name] = tensor
    for key in ('sampling_eps_min', 'sampling_eps_max'):
        if key in ckpt:
            state_dict[key] = torch.as_tensor(ckpt[key]).float().reshape(())
    state_dict.pop('backbone.block_diff_mask', None)
    for key, default in zip(('sampling_eps_min', 'sampling_eps_max'), FULL_INTERVAL):
        state_dict.setdefault(key, torch.tensor(default))
    return build(config, state_dict, device, path, tokens['vocab'], cls)


def _lightning_tokenizer(tok, n_embeddings, path, name_hint=None):
    """The special tokens and vocabulary a bd3lms checkpoint was trained with, read off its pickled
    tokenizer (an inert stand-in: only its stored data is looked at). bd3lms uses the tokenizer's own
    mask token when it has one (BERT: [MASK] inside the vocabulary), else appends one after the
    vocabulary; BOS and EOS are the first id that encoding bos/eos_token gives: [CLS] for BERT."""
    state = getattr(tok, 'state', None) if isinstance(tok, _Inert) else None
    state = state if isinstance(state, dict) else {}
    kind = type(tok).__name__ if tok is not None else ''

    def token_str(value):  # AddedToken stand-ins keep their text under 'content'
        if isinstance(value, _Inert):
            return (getattr(value, 'state', None) or {}).get('content')
        return value if isinstance(value, str) else None

    specials = dict(state.get('_special_tokens_map') or {})
    for name in ('mask', 'bos', 'eos', 'cls', 'sep', 'unk', 'pad'):  # older transformers: _mask_token, ...
        value = token_str(specials.get(f'{name}_token')) or token_str(state.get(f'_{name}_token')) \
            or token_str(state.get(f'{name}_token')) or token_str((state.get('init_kwargs') or {}).get(f'{name}_token'))
        specials[name] = value
    vocab_map = state.get('vocab') or getattr(state.get('wordpiece_tokenizer'), 'state', {}).get('vocab')
    if 'Bert' in kind or (vocab_map and not kind.startswith('GPT2')):
        if not vocab_map:
            raise ValueError(f'{path}: its {kind} tokenizer carries no vocabulary (a fast tokenizer?); only the '
                             f'slow BertTokenizer that bd3lms pickles is supported')
        if not (getattr(state.get('basic_tokenizer'), 'state', None) or {}).get('do_lower_case', True):
            raise ValueError(f'{path}: a cased WordPiece tokenizer is not supported (only bert-base-uncased style)')
        vocab = [None] * len(vocab_map)
        for token, i in vocab_map.items():
            vocab[i] = token
        # bd3lms takes BOS = tokenizer.encode(bos_token)[0] and EOS = tokenizer.encode(eos_token)[0]. A BERT
        # tokenizer's encode() puts [CLS] first, so both are [CLS]: its LM1B stream is s1 [CLS] s2 [CLS] ...
        # and every chunk is framed by [CLS] at both ends. The model learned [CLS] as its separator.
        cls_id = vocab_map.get(specials.get('cls'))
        config = {'tokenizer': 'wordpiece', 'mask_id': vocab_map.get(specials.get('mask')), 'bos_id': cls_id,
                  'eos_id': cls_id}
        if None in config.values() or len(vocab) != n_embeddings:
            raise ValueError(f'{path}: the WordPiece tokenizer ({len(vocab)} tokens, special tokens {specials}) does '
                             f'not fit a model with {n_embeddings} embeddings and a mask token inside the vocabulary')
        return {'config': config, 'vocab': vocab}
    if name_hint not in (None, 'gpt2') and not kind.startswith('GPT2'):
        raise ValueError(f'{path} was trained with the tokenizer {name_hint!r} ({kind or "none pickled"}), '
                         f'which is not supported here (GPT-2 BPE or BERT WordPiece)')
    # GPT-2 (and stand-ins of its layout): <|endoftext|> is the last token, the mask appended after it.
    return {'config': {'tokenizer': 'gpt2', 'mask_id': n_embeddings - 1, 'bos_id': n_embeddings - 2,
                       'eos_id': n_embeddings - 2}, 'vocab': None}


def read_vocab(path):
    """A vocab.txt (BERT's format): one token per line, in id order."""
    with open(path, encoding='utf-8') as f:
        vocab = f.read().split('\n')
    return vocab[:-1] if vocab and vocab[-1] == '' else vocab


def write_vocab(path, vocab):
    def write(p):
        with open(p, 'w', encoding='utf-8') as f:
            f.write(''.join(token + '\n' for token in vocab))
    atomic_write(path, write)
