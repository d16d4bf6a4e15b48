"""
Bit-for-bit regression check: a fixed matrix of configurations (model shapes, the training and inference
passes, the NELBO, generation with every rule, cached and uncached, per-row settings, past the context)
run on random weights and saved; a later run compares its outputs with a saved file exactly.

    python benchmarks/regression.py --save=before.pt        # on the old commit
    python benchmarks/regression.py --compare=before.pt     # on the new one: prints every entry, exit 1 on a change

Sampling entries are keyed by the rule's name and knob, so the same matrix runs on samplers with different
call signatures (the `rule=`/`knob=` API, or the older per-rule keywords).
"""
import argparse
import inspect
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
import bd3lm  # noqa: E402
try:                                        # the engine; a checkout before the split has one sampler
    from bd3lm_tools.engine import generate as sampler  # noqa: E402
except ImportError:
    sampler = bd3lm.generate

LAYERS = 'n_layers' if 'n_layers' in bd3lm.BD3LMConfig.__dataclass_fields__ else 'n_blocks'
MODELS = {  # name -> config overrides of a tiny random model
    'bs4': dict(block_size=4, model_length=16),
    'bs1': dict(block_size=1, model_length=16),
    'mdlm': dict(block_size=16, model_length=16),
    'time_cond': dict(block_size=4, model_length=16, time_conditioning=True),
    'no_adaln': dict(block_size=4, model_length=16, adaln=False),
}
# (name, knob, order) of the sampler settings; knob None for rules without one
RULES = [('first_hitting', None, None), ('steps', 3, None), ('threshold', 0.3, None),
         ('threshold', 0.3, 'confidence'), ('entropy_bound', 1.0, None), ('tokens_per_call', 2, None)]


TEXTBOOK = []      # per sampling entry: bd3lm.generate gave the engine's tokens


def random_model(**overrides):
    fields = dict(block_size=4, vocab_size=37, model_length=16, hidden_dim=32, cond_dim=16, n_heads=4,
                  dropout=0.0, **{LAYERS: 2})
    fields.update(overrides)
    torch.manual_seed(0)
    model = bd3lm.BD3LM(bd3lm.BD3LMConfig(**fields))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


def generate(model, idx, n, rule, knob, order, **kw):
    if 'rule' in inspect.signature(sampler).parameters:
        return sampler(model, idx, n, rule=rule, knob=knob, order=order, **kw)
    old = {} if rule == 'first_hitting' else {rule: knob}
    if order is not None:
        old['order'] = order
    return sampler(model, idx, n, **old, **kw)


@torch.no_grad()
def run():
    out = {}
    for name, overrides in MODELS.items():
        model = random_model(**overrides)
        cfg = model.config
        g = torch.Generator().manual_seed(1)
        x0 = torch.randint(0, cfg.vocab_size - 1, (3, cfg.model_length), generator=g)
        x0[:, 0] = cfg.bos_id
        t, xt = model.forward_process(x0, generator=g)
        out[f'{name}/train_logits'] = model(xt, x0)
        out[f'{name}/infer_logits'] = model(xt)
        out[f'{name}/nelbo_terms'] = model.nelbo(x0, t=t, xt=xt, reduction='none')
        out[f'{name}/nelbo_sampled'] = model.nelbo(x0, generator=torch.Generator().manual_seed(2))
        # the clipped schedule: resampled masks (max_tries=1 reaches the fallback), its NELBO, the search
        out[f'{name}/q_xt_resampled'] = bd3lm.q_xt(x0, torch.full(x0.shape, 0.5), cfg.mask_id, cfg.block_size,
                                                    (0.3, 0.7), torch.Generator().manual_seed(4), max_tries=1)
        out[f'{name}/nelbo_clipped'] = model.nelbo(x0, interval=(0.3, 0.8), resample=True,
                                                   generator=torch.Generator().manual_seed(5))
        best, variances = bd3lm.search_clip_interval(model, [x0], generator=torch.Generator().manual_seed(6))
        out[f'{name}/clip_search'] = torch.tensor([*best, *variances.values()], dtype=torch.float64)
        out[f'{name}/flex_train_logits'] = model.use_flex_attention()(xt, x0)
        model.use_flex_attention(False)
        idx = torch.randint(0, cfg.mask_id, (2, 3), generator=g)
        n = 12 if cfg.block_size == cfg.model_length else 40
        for rule, knob, order in RULES:
            for kv_cache in (True, False):
                key = f'{name}/{rule}={knob}/order={order}/cache={kv_cache}'
                kw = dict(kv_cache=kv_cache, generator=torch.Generator().manual_seed(3), return_stats=True)
                x, stats = generate(model, idx, n, rule, knob, order, **kw)
                out[key] = x
                out[key + '/nfe'] = torch.tensor(stats['nfe'])
                if sampler is not bd3lm.generate:       # the textbook sampler gives the engine's tokens
                    kw.pop('return_stats')
                    kw['generator'] = torch.Generator().manual_seed(3)
                    TEXTBOOK.append(torch.equal(x, bd3lm.generate(model, idx, n, rule, knob, order, **kw)))
        # per-row settings and generators, a prompt ending mid-block
        gens = [torch.Generator().manual_seed(10 + r) for r in range(3)]
        idx3 = torch.randint(0, cfg.mask_id, (3, 6), generator=g)
        out[f'{name}/per_row'] = generate(model, idx3, [5, 9, 10] if n == 12 else [7, 20, 33], 'first_hitting',
                                          None, None, generator=gens, temperature=[1.0, 0.5, 0.0],
                                          top_p=[1.0, 0.8, 0.9])
    return out


if __name__ == '__main__':
    p = argparse.ArgumentParser()
    p.add_argument('--save')
    p.add_argument('--compare')
    args = p.parse_args()
    changed = []
    out = run()
    if args.save:
        torch.save(out, args.save)
        print(f'saved {len(out)} entries to {args.save}')
    if args.compare:
        before = torch.load(args.compare)
        changed = [k for k in before if k not in out or not torch.equal(before[k], out[k])]
        for k in before:
            print(f'{"CHANGED" if k in changed else "same   "} {k}')
        print(f'{len(before) - len(changed)} of {len(before)} entries bit for bit identical')
    if TEXTBOOK:
        print(f'textbook sampler (bd3lm.generate) = engine: {sum(TEXTBOOK)} of {len(TEXTBOOK)} sampling entries')
    sys.exit(1 if (args.compare and changed) or not all(TEXTBOOK) else 0)
