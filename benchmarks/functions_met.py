"""
How many functions of the sampler a reader meets: every function of bd3lm.py (and speculative.py) that one
generation runs, outside the model itself (the layers of section 2, BD3LM's methods, the KV cache's
methods, which the transformer calls). A sys.settrace count, run in the checkout it is started from.

    python benchmarks/functions_met.py                      # first-hitting, with the cache
    python benchmarks/functions_met.py --rule=threshold --knob=0.5
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.getcwd())
import bd3lm  # noqa: E402  (the checkout this runs in)
from bd3lm_tools import engine  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument('--rule', default='first_hitting')
p.add_argument('--knob', type=float, default=None)
p.add_argument('--prompt', type=int, default=6, help='prompt length (a complete block and a partial one at 4)')
args = p.parse_args()

MODEL = {'LayerNorm', 'Rotary', 'TimestepEmbedder', 'EmbeddingLayer', 'DDiTBlock', 'DDiTFinalLayer', 'BD3LM',
         'KVCache', 'Versions'}   # (Versions: an older checkout's cache view)
LAYERS = {'apply_rotary', 'modulate', '_flex_attention', 'block_causal_mask_mod', 'block_diff_mask_mod'}
files = {os.path.abspath(bd3lm.__file__)}
if 'speculative' in sys.modules:
    files.add(os.path.abspath(sys.modules['speculative'].__file__))
layers = 'n_layers' if 'n_layers' in bd3lm.BD3LMConfig.__dataclass_fields__ else 'n_blocks'
model = bd3lm.BD3LM(bd3lm.BD3LMConfig(block_size=4, vocab_size=37, model_length=16, hidden_dim=32, cond_dim=16,
                                      n_heads=4, **{layers: 2})).eval()
met = set()


def trace(frame, event, arg):
    if event == 'call' and os.path.abspath(frame.f_code.co_filename) in files:
        name = frame.f_code.co_qualname
        if name.split('.')[0] not in MODEL and name not in LAYERS and '<' not in name:
            met.add(name)
    return None


idx = torch.randint(0, 35, (1, args.prompt), generator=torch.Generator().manual_seed(0))
kw = {} if args.rule == 'first_hitting' else dict(rule=args.rule, knob=args.knob)
if kw and 'rule' not in __import__('inspect').signature(bd3lm.generate).parameters:
    kw = {args.rule: args.knob}
sys.settrace(trace)
engine.generate(model, idx, 20, generator=torch.Generator().manual_seed(1), **kw)
sys.settrace(None)
print(f'{len(met)} functions of {", ".join(os.path.basename(f) for f in sorted(files))} met by one {args.rule} '
      f'generation (cached, prompt {args.prompt}, 20 tokens, blocks of 4):')
print('  ' + ', '.join(sorted(met)))
