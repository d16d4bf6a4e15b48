"""
Train a BD3-LM. With no arguments this is the CPU demo: it prepares the embedded corpus (Python's own
documentation) if needed, trains a small model for a few minutes, and prints samples.

    python train.py                                           # the demo, CPU, offline
    python train.py config/owt_mdlm_pretrain.py               # the paper's MDLM pretraining (GPU)
    python train.py config/owt_bd3lm_finetune.py --block_size=4
    torchrun --standalone --nproc_per_node=8 train.py config/owt_bd3lm_finetune.py

Settings are the module globals below, overridden by config/*.py files and --key=value flags.
out_dir is both a resume point (ckpt.pt) and a model folder (config.json + model.safetensors, EMA
weights) that BD3LM.from_pretrained(out_dir) and sample.py --init_from=out_dir load.
"""
import json
import math
import os
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict

import numpy as np
import torch
from tqdm import tqdm

import bd3lm
from bd3lm_tools import checkpoints
import prepare
from bd3lm_tools.tokenizer import get_tokenizer

# -----------------------------------------------------------------------------
# I/O
out_dir = 'out-demo'
init_from = 'scratch'       # 'scratch', 'resume' (from out_dir), or a model to fine-tune: hub id, folder, .ckpt
eval_only = False           # score the whole validation split of --dataset with --init_from's model and exit
eval_batch_size = 16        # chunks per batch in eval_only
eval_passes = 1             # eval_only: passes over the split, each with fresh noise (more passes: a tighter estimate)
eval_interval = 125
eval_iters = 10             # validation batches per evaluation
log_interval = 25
always_save_checkpoint = True
# data
dataset = 'python_docs'     # <data_dir>/<dataset>/{train,val}.bin, made by prepare.py
data_dir = 'data'
batch_size = 16             # micro-batch size
gradient_accumulation_steps = 1
# model
block_size = 16
model_length = 128          # training context L
n_layers = 4
n_heads = 4
hidden_dim = 128
cond_dim = 64
dropout = 0.0
time_conditioning = False
# loss
noise_schedule = 'loglinear'
sampling_eps_min = 1e-3     # training noise interval [beta, omega]; replaced by the search when clip_search
sampling_eps_max = 1.0
clip_search = True          # the data-driven clipped schedule (Sec. 5.2), run at every evaluation
clip_search_widths = '0.5'  # the paper: '0.25,0.5,0.75' (config/owt_*.py); one width keeps the CPU demo quick
clip_search_delta = 0.1     # the paper: 0.05
clip_search_iters = 2       # validation batches per interval in the search (it evaluates every candidate)
resample = False            # resample block masks whose masked fraction falls outside [beta, omega]
# optimizer
learning_rate = 2e-3
max_iters = 250
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.999
grad_clip = 1.0
warmup_iters = 25
lr_decay = 'cosine'         # 'constant' or 'cosine' (down to min_lr at lr_decay_iters)
lr_decay_iters = 250
min_lr = 2e-4
ema = 0.999                 # EMA decay; evaluation, samples and saved weights use the EMA (0 disables it)
# run
max_minutes = 9.0           # stop after this many minutes (0: no limit); a checkpoint is written
num_samples = 3             # samples printed at the end
sample_tokens = 96          # their length (0: no samples)
seed = 1337
device = 'auto'             # 'auto', 'cpu', 'cuda', ...
dtype = 'auto'              # 'auto' (bfloat16 on CUDA if supported, else float32), 'float32', 'bfloat16'
compile = False             # torch.compile the training step (CUDA)
flex_attention = 'auto'     # 'auto' (on CUDA), True, False
wandb_log = False
wandb_project = 'bd3lm'
wandb_run_name = 'run'
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
settings = {k: v for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))}
# -----------------------------------------------------------------------------

# Check every setting before any work is done: one line that names the problem and the fix.
_positive = ('batch_size', 'gradient_accumulation_steps', 'eval_interval', 'eval_iters', 'log_interval', 'block_size',
             'model_length', 'n_layers', 'n_heads', 'hidden_dim', 'cond_dim', 'clip_search_iters', 'eval_batch_size',
             'eval_passes')
for _name in _positive:
    if not isinstance(globals()[_name], int) or isinstance(globals()[_name], bool) or globals()[_name] <= 0:
        raise SystemExit(f'--{_name}={globals()[_name]!r}: must be a positive integer')
_choices = {'dtype': ('auto', 'float32', 'bfloat16', 'float16'), 'flex_attention': ('auto', True, False),
            'lr_decay': ('constant', 'cosine'), 'noise_schedule': bd3lm.SCHEDULES}
for _name, _allowed in _choices.items():  # type-exact: 1 is not True, 'True' is not True
    if not any(globals()[_name] == a and type(globals()[_name]) is type(a) for a in _allowed):
        raise SystemExit(f'--{_name}={globals()[_name]!r}: choose one of {", ".join(map(repr, _allowed))}')
if not (isinstance(learning_rate, (int, float)) and learning_rate >= 0 and max_iters >= 0 and 0 <= ema < 1):
    raise SystemExit(f'need learning_rate >= 0, max_iters >= 0 and 0 <= ema < 1 (got {learning_rate}, {max_iters}, {ema})')
if device.startswith('cuda') and not torch.cuda.is_available():
    raise SystemExit(f'--device={device}: this machine has no CUDA GPU (or this torch build has no CUDA); use --device=cpu')
if device == 'mps' and not torch.backends.mps.is_available():
    raise SystemExit('--device=mps: MPS is not available here; use --device=cpu')


def safe_exp(x):  # perplexity of a NELBO; a diverged run's huge NELBO gives inf, not an OverflowError
    return math.exp(x) if x < 700 else float('inf')


try:  # an unwritable out_dir is found now, not at the first save after training
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryFile(dir=out_dir):
        pass
except OSError as e:
    raise SystemExit(f'--out_dir={out_dir}: cannot write there ({e.strerror}); choose a writable folder')
if int(os.environ.get('RANK', 0)) == 0:
    checkpoints.recover_folder(out_dir)  # a save that a kill cut off is finished or dropped

ddp = int(os.environ.get('RANK', -1)) != -1
if device == 'auto':
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
if ddp:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    rank, local_rank, world_size = int(os.environ['RANK']), int(os.environ['LOCAL_RANK']), int(os.environ['WORLD_SIZE'])
    dist.init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo')
    if device.startswith('cuda'):
        device = f'cuda:{local_rank}'
        torch.cuda.set_device(device)
    if gradient_accumulation_steps % world_size:
        raise SystemExit(f'gradient_accumulation_steps={gradient_accumulation_steps} must be a multiple of the '
                         f'{world_size} processes')
    gradient_accumulation_steps //= world_size
else:
    rank, world_size = 0, 1
master = rank == 0
device_type = 'cuda' if device.startswith('cuda') else 'cpu'
if dtype == 'auto':
    dtype = 'bfloat16' if device_type == 'cuda' and torch.cuda.is_bf16_supported() else 'float32'
autocast = nullcontext() if dtype == 'float32' else torch.autocast(device_type, dtype=getattr(torch, dtype))
if model_length % block_size:
    raise SystemExit(f'model_length={model_length} is not a multiple of block_size={block_size}; '
                     f'pick a block_size that divides it (e.g. --block_size=16)')
torch.manual_seed(seed + rank)
if device_type == 'cuda':
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

# --- data --------------------------------------------------------------------------------------------
data_dir = os.path.join(data_dir, dataset)
splits = ('val',) if eval_only else ('train', 'val')  # evaluation needs no train.bin


def _prepared(folder):
    try:
        with open(os.path.join(folder, 'meta.json')) as f:
            return 'format' in json.load(f) and all(os.path.exists(os.path.join(folder, f'{s}.bin')) for s in splits)
    except (OSError, ValueError):
        return False


if not _prepared(data_dir):
    if dataset == 'python_docs':  # the demo's embedded corpus: prepare it on the spot (again, if made by an old version)
        if master:
            prepare.prepare_python_docs(os.path.dirname(data_dir))
        if ddp:
            dist.barrier()
    else:
        raise SystemExit(f'dataset {dataset!r} not found: {data_dir}/{"/".join(s + ".bin" for s in splits)} or meta.json is missing. Make it with '
                         f'`python prepare.py --dataset={dataset}` or `python prepare.py --input=PATH --name={dataset}`')
meta = prepare.read_meta(data_dir)  # the tokenizer, special ids and sequence format of this dataset
data = {split: np.memmap(os.path.join(data_dir, f'{split}.bin'), dtype=np.uint16, mode='r') for split in splits}
for split, tokens in data.items():
    if len(tokens) < model_length and not eval_only:
        raise SystemExit(f'{data_dir}/{split}.bin holds {len(tokens)} tokens, fewer than model_length={model_length}')


def load_model(source, device='cpu'):
    try:  # the loader's messages name the problem and the fix: one line, no traceback
        return bd3lm.BD3LM.from_pretrained(source, device=device)
    except (ValueError, OSError, ImportError) as e:
        raise SystemExit(f'--init_from={source}: {e}') from None


def check_tokens(model, what):
    # The model and the data must speak the same tokens (vocabulary, special ids).
    theirs = {k: getattr(model.config, k) for k in ('tokenizer', 'vocab_size', 'mask_id', 'bos_id', 'eos_id')}
    ours = prepare.model_config_fields(meta)
    if theirs != ours or (meta.get('vocab') is not None and meta['vocab'] != model.vocab):
        raise SystemExit(f'{what} was trained with other tokens ({theirs}) than {data_dir} holds ({ours}); '
                         f'prepare the data with the model\'s tokenizer')


@torch.no_grad()
def evaluate_likelihood(model):
    """The paper's likelihood protocol (bd3lms ppl_eval): every consecutive model_length chunk of the
    validation stream, in the dataset's format; one t per block from the full interval [1e-3, 1] with
    antithetic sampling; position 0 of each chunk never masked or scored. Returns (NELBO in nats per
    scored token averaged over eval_passes passes, scored tokens per pass). Block size 1 is scored at
    t = 1, where the NELBO is the exact autoregressive NLL, as bd3lms does."""
    L = model.config.model_length
    chunks = prepare.chunks(data['val'], L, meta)
    if len(chunks) == 0:
        raise SystemExit(f'{data_dir}/val.bin holds {len(data["val"])} tokens, too few for one {L}-token chunk')
    interval = (1.0, 1.0) if model.config.block_size == 1 else bd3lm.FULL_INTERVAL
    noise = torch.Generator(device).manual_seed(seed)
    total = 0.0
    batches = range(0, len(chunks), eval_batch_size)
    for _ in range(eval_passes):
        for i in tqdm(batches, desc='evaluating', unit='batch', disable=not master, mininterval=2):
            x0 = chunks[i:i + eval_batch_size].to(device)
            with autocast:
                per_token = model.nelbo(x0, interval=interval, reduction='none', generator=noise)
            total += per_token[:, 1:].double().sum().item()
    tokens = len(chunks) * (L - 1)
    return total / (tokens * eval_passes), tokens


if eval_only:
    if not master:
        raise SystemExit('eval_only runs in one process; start it without torchrun')
    source = out_dir if init_from == 'resume' else init_from
    if source == 'scratch':
        raise SystemExit('--eval_only=True needs a model: --init_from=<hub id, folder, .ckpt> or resume (out_dir)')
    model = load_model(source, device)
    check_tokens(model, source)
    t0 = time.time()
    nelbo, tokens = evaluate_likelihood(model)
    result = {'nelbo': nelbo, 'ppl': safe_exp(nelbo), 'tokens': tokens, 'passes': eval_passes, 'model': source,
              'dataset': dataset, 'format': meta['format'], 'seed': seed, 'minutes': (time.time() - t0) / 60}
    print(f'{source} on {dataset} (val, {meta["format"]}): NELBO {nelbo:.4f} nats/token, perplexity <= '
          f'{result["ppl"]:.2f} ({tokens:,} scored tokens x {eval_passes} pass(es), seed {seed})')
    with open(os.path.join(out_dir, 'eval.json'), 'w') as f:
        json.dump(result, f, indent=2)
    sys.exit(0)
# Separate generators for the data and the noise, saved in checkpoints so that --resume continues exactly.
data_gen = torch.Generator().manual_seed(seed + rank)
noise_gen = torch.Generator(device).manual_seed(seed + 1000 + rank)


def get_batch(split, generator=data_gen):
    return prepare.sample_windows(data[split], batch_size, model_length, meta, generator).to(device, non_blocking=True)

# --- model ---------------------------------------------------------------------------------------------
config = bd3lm.BD3LMConfig(block_size=block_size, model_length=model_length, hidden_dim=hidden_dim, cond_dim=cond_dim,
                           n_layers=n_layers, n_heads=n_heads, dropout=dropout, time_conditioning=time_conditioning,
                           **prepare.model_config_fields(meta))
iter_num, best_val_loss, checkpoint = 0, float('inf'), None
ckpt_path = os.path.join(out_dir, 'ckpt.pt')
if init_from == 'resume':
    if not os.path.exists(ckpt_path):
        raise SystemExit(f'--init_from=resume: no checkpoint at {ckpt_path}')
    try:
        checkpoint = torch.load(ckpt_path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise SystemExit(f'--init_from=resume: {ckpt_path} is not a readable checkpoint ({type(e).__name__}: {e}); '
                         f'it may be truncated: restore it or start again') from None
    # Resuming continues the same model: a model flag that disagrees with the checkpoint is refused
    # rather than half-applied (to change the model, fine-tune it: --init_from=<out_dir>).
    model_args = {checkpoints.RENAMED.get(k, k): v for k, v in checkpoint['model_args'].items()}  # older runs: n_blocks
    conflicts = [f'{k}={globals()[k]!r} (checkpoint: {v!r})' for k, v in model_args.items()
                 if k in globals() and globals()[k] != v]
    if conflicts:
        raise SystemExit(f'--init_from=resume: this run sets {", ".join(conflicts)}. Drop those flags to resume as '
                         f'trained, or fine-tune a changed model with --init_from={out_dir} and a new --out_dir')
    config = bd3lm.BD3LMConfig(**model_args)
    model = bd3lm.BD3LM(config)
    model.load_state_dict(checkpoint['model'])
    iter_num, best_val_loss = checkpoint['iter_num'], checkpoint['best_val_loss']
elif init_from == 'scratch':
    model = bd3lm.BD3LM(config)
    # DiT initialisation: adaLN modulations and the output layer start at zero (each block starts as
    # the identity and the first predictions are uniform).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if 'adaLN_modulation' in name or name.startswith('output_layer.linear'):
                p.zero_()
else:  # fine-tune: the pretrained weights, loaded strictly into this run's config (e.g. a new block_size)
    pretrained = load_model(init_from)
    check_tokens(pretrained, f'init_from={init_from}')
    try:
        model = checkpoints.build(config, pretrained.state_dict(), 'cpu', f'init_from={init_from}')
    except ValueError as e:
        raise SystemExit(f'{e}\nSet n_layers/n_heads/hidden_dim/cond_dim to the pretrained model\'s: {pretrained.config}')
    model.train()
model.vocab = meta.get('vocab')
if init_from != 'resume':
    model.sampling_eps_min.fill_(sampling_eps_min)
    model.sampling_eps_max.fill_(sampling_eps_max)
model.to(device)
use_flex = device_type == 'cuda' if flex_attention == 'auto' else bool(flex_attention)
if use_flex and device_type != 'cuda':
    raise SystemExit('--flex_attention=True: PyTorch has no FlexAttention backward on CPU, so it trains on CUDA only; '
                     'use --flex_attention=False here (SDPA, the same numbers)')
model.use_flex_attention(use_flex)
n_params = sum(p.numel() for p in model.parameters())
if master:
    print(f'{n_params / 1e6:.2f}M parameters, {config}, attention: {"flex" if use_flex else "sdpa"}, {device} {dtype}')

ema_params = [p.detach().clone() for p in model.parameters()] if ema > 0 else None
optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, betas=(beta1, beta2), weight_decay=weight_decay,
                              fused=device_type == 'cuda')
if checkpoint is not None:
    optimizer.load_state_dict(checkpoint['optimizer'])
    if ema_params is not None:
        for e, saved in zip(ema_params, checkpoint['ema']):
            e.copy_(saved)
    data_gen.set_state(checkpoint['data_gen'])
    noise_gen.set_state(checkpoint['noise_gen'].to(noise_gen.get_state().device))
    torch.set_rng_state(checkpoint['torch_rng'])


class NELBO(torch.nn.Module):
    """The loss as a module, so DDP sees a forward() and syncs gradients."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x0, t, xt):  # t, xt: drawn eagerly (model.forward_process), so a compiled step is one graph
        return self.model.nelbo(x0, t=t, xt=xt, schedule=noise_schedule)


loss_module = NELBO(model)
if compile:  # fullgraph: a graph break is an error, not a silent slowdown
    loss_module = torch.compile(loss_module, fullgraph=True)
if ddp:
    loss_module = DDP(loss_module, device_ids=[local_rank] if device_type == 'cuda' else None)


class ema_weights:
    """Context: swap the EMA weights in (evaluation, sampling, saving), restore the raw ones after."""

    def __enter__(self):
        if ema_params is not None:
            self.raw = [p.detach().clone() for p in model.parameters()]
            with torch.no_grad():
                for p, e in zip(model.parameters(), ema_params):
                    p.copy_(e)

    def __exit__(self, *exc):
        if ema_params is not None:
            with torch.no_grad():
                for p, r in zip(model.parameters(), self.raw):
                    p.copy_(r)


@torch.no_grad()
def evaluate(search=True):
    """Validation NELBO on the full interval [1e-3, 1] (the paper's reported bound), EMA weights, and
    the clipped-schedule search on the same batches, measured with the training estimator (resampling
    included). As in bd3lms, the search is not run before any training (search=False at iteration 0)."""
    model.eval()
    gen = torch.Generator().manual_seed(0)          # the same validation batches every time
    noise = torch.Generator(device).manual_seed(0)
    batches = [get_batch('val', gen) for _ in range(eval_iters)]
    out = {}
    with ema_weights(), autocast:
        losses = [model.nelbo(x, interval=bd3lm.FULL_INTERVAL, schedule=noise_schedule, generator=noise).item()
                  for x in batches]
        out['val_nelbo'] = sum(losses) / len(losses)
        if search and clip_search:  # block size 1: full interval vs t = 1 (the AR loss)
            widths = [float(w) for w in str(clip_search_widths).split(',')]
            best, variances = bd3lm.search_clip_interval(model, batches[:clip_search_iters], widths, clip_search_delta,
                                                         noise_schedule, resample, noise)
            out['clip_interval'], out['clip_variances'] = best, variances
    model.train()
    return out


def lr_at(it):
    if it < warmup_iters:
        return learning_rate * (it + 1) / warmup_iters
    if lr_decay == 'constant' or it >= lr_decay_iters:
        return learning_rate if lr_decay == 'constant' else min_lr
    ratio = (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


def save_checkpoint():
    """ckpt.pt (everything needed to resume exactly) and the EMA model as config.json + model.safetensors,
    written together (checkpoints.write_together): a kill at any point leaves them from the same iteration."""
    state = {'model': model.state_dict(), 'optimizer': optimizer.state_dict(), 'model_args': asdict(config),
             'ema': ema_params, 'iter_num': iter_num, 'best_val_loss': best_val_loss, 'config': settings,
             'data_gen': data_gen.get_state(), 'noise_gen': noise_gen.get_state().cpu(),
             'torch_rng': torch.get_rng_state(), 'next_batch': x0.cpu()}

    def write(folder):
        torch.save(state, os.path.join(folder, 'ckpt.pt'))
        with ema_weights():
            model.save_pretrained(folder)
    checkpoints.write_together(out_dir, write)


def mfu(tokens_per_second):
    # Model FLOPs utilisation against an H100's dense bf16 peak: 6 flops per parameter per token of the
    # 2L-long pass (both halves), plus attention over the block-diffusion mask (counted dense).
    n_layer_params = n_params - 2 * config.vocab_size * config.hidden_dim
    flops_per_token = 6 * n_layer_params * 2 + 12 * config.n_layers * config.hidden_dim * 2 * model_length
    flops_per_token += 6 * config.vocab_size * config.hidden_dim * 0.5  # the masked half projected to the vocab
    return tokens_per_second * flops_per_token / 989e12


if wandb_log and master:
    import wandb
    wandb.init(project=wandb_project, name=wandb_run_name, config=settings)

# --- training loop -----------------------------------------------------------------------------------------
tokens_per_iter = gradient_accumulation_steps * world_size * batch_size * model_length
if master:
    print(f'{tokens_per_iter:,} tokens per iteration; training iterations {iter_num} -> {max_iters}')
start_time = time.time()
bar = tqdm(total=max_iters, initial=iter_num, desc='training', unit='it', disable=not master, mininterval=5)
t_last, tokens_since, bad_steps = time.time(), 0, 0
start_iter = iter_num
x0 = get_batch('train') if checkpoint is None else checkpoint['next_batch'].to(device)
checkpoint = None
while iter_num < max_iters:
    if iter_num % eval_interval == 0 and master:
        stats = evaluate(search=iter_num > 0)
        line = f'iter {iter_num}: val NELBO {stats["val_nelbo"]:.4f} (ppl <= {safe_exp(stats["val_nelbo"]):.2f})'
        if 'clip_interval' in stats:
            beta, omega = stats['clip_interval']
            model.sampling_eps_min.fill_(beta)
            model.sampling_eps_max.fill_(omega)
            line += f', clipped schedule [{beta:.3f}, {omega:.3f}] (NELBO variance {stats["clip_variances"][stats["clip_interval"]]:.3f} vs {stats["clip_variances"][bd3lm.FULL_INTERVAL]:.3f} on [1e-3, 1])'
        tqdm.write(line)
        if wandb_log:
            wandb.log({'iter': iter_num, 'val/nelbo': stats['val_nelbo'], 'val/ppl': safe_exp(stats['val_nelbo']),
                       'sampling_eps_min': float(model.sampling_eps_min), 'sampling_eps_max': float(model.sampling_eps_max)})
        best_val_loss = min(best_val_loss, stats['val_nelbo'])
        if iter_num > 0 and always_save_checkpoint:
            save_checkpoint()
    if ddp and iter_num % eval_interval == 0:  # every rank trains on the interval rank 0 chose
        dist.broadcast(model.sampling_eps_min, 0)
        dist.broadcast(model.sampling_eps_max, 0)
    if iter_num % eval_interval == 0 or iter_num == start_iter:
        train_interval = model.clipped_interval()   # read once per evaluation, not every step (a host sync)

    lr = lr_at(iter_num)
    for group in optimizer.param_groups:
        group['lr'] = lr
    for micro_step in range(gradient_accumulation_steps):
        if ddp:  # sync gradients on the last micro-step only
            loss_module.require_backward_grad_sync = micro_step == gradient_accumulation_steps - 1
        # Training draws t on the clipped interval (Sec. 5.2); evaluation scores the full one.
        t, xt = model.forward_process(x0, train_interval, noise_schedule, resample=resample, generator=noise_gen)
        with autocast:
            loss = loss_module(x0, t, xt) / gradient_accumulation_steps
        x0 = get_batch('train')  # fetch the next batch while the GPU works
        loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float('inf'))
    if not torch.isfinite(grad_norm):
        # A NaN/inf loss or gradient: skip the update, so the weights stay the last good ones. A run that
        # keeps producing them has diverged: save those last good weights and stop with a clear message.
        optimizer.zero_grad(set_to_none=True)
        bad_steps += 1
        if master:
            tqdm.write(f'iter {iter_num}: non-finite loss {loss.item() * gradient_accumulation_steps} or gradients; '
                       f'update skipped ({bad_steps} in a row)')
        if bad_steps >= 10:
            if master:
                save_checkpoint()
            raise SystemExit(f'training diverged at iteration {iter_num} (10 non-finite steps in a row at lr {lr:.2e}). '
                             f'The last good weights are saved in {out_dir}; lower --learning_rate or --grad_clip, '
                             f'or raise --warmup_iters, and resume from there or start again')
        continue
    bad_steps = 0
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if ema_params is not None:  # the bd3lms EMA, with its warm-up of the decay
        decay = min(ema, (1 + iter_num + 1) / (10 + iter_num + 1))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], 1 - decay)
    iter_num += 1
    tokens_since += tokens_per_iter
    bar.update(1)
    if iter_num % log_interval == 0 and master:
        elapsed = time.time() - t_last
        tps = tokens_since / elapsed
        line = f'iter {iter_num}: loss {loss.item() * gradient_accumulation_steps:.4f}, lr {lr:.2e}, {tps:,.0f} tokens/s'
        if device_type == 'cuda':
            line += f', MFU {100 * mfu(tps / world_size):.1f}%'
        tqdm.write(line)
        if wandb_log:
            wandb.log({'iter': iter_num, 'train/loss': loss.item() * gradient_accumulation_steps, 'lr': lr, 'tokens_per_s': tps})
        t_last, tokens_since = time.time(), 0
    if max_minutes and time.time() - start_time > 60 * max_minutes:
        if master:
            tqdm.write(f'stopping after {max_minutes} minutes at iteration {iter_num}')
        break
bar.close()

if master:
    stats = evaluate()
    best_val_loss = min(best_val_loss, stats['val_nelbo'])
    print(f'final: val NELBO {stats["val_nelbo"]:.4f} nats/token (ppl <= {safe_exp(stats["val_nelbo"]):.2f}), '
          f'{iter_num} iterations, {(time.time() - start_time) / 60:.1f} min')
    save_checkpoint()
    with open(os.path.join(out_dir, 'final.json'), 'w') as f:
        json.dump({'val_nelbo': stats['val_nelbo'], 'val_ppl': safe_exp(stats['val_nelbo']), 'iter': iter_num,
                   'minutes': (time.time() - start_time) / 60}, f)
    if num_samples > 0 and sample_tokens > 0:
        enc = get_tokenizer(model)
        with ema_weights():
            model.eval()
            out = model.generate(torch.full((num_samples, 1), config.bos_id, device=device), sample_tokens,
                                 top_p=0.9, generator=torch.Generator(device).manual_seed(seed))
        for i, row in enumerate(out.tolist()):
            print(f'---------- sample {i + 1}')
            print(enc.decode(row))
if ddp:
    dist.destroy_process_group()
