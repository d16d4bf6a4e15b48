"""
The size of bd3lm.py (lines; def and class statements) and how many of its functions a reader meets: every
function (methods included) that one generation runs, counted with sys.setprofile, and those outside the model
itself (the layers of section 2, BD3LM's methods, the KV cache's methods, which the transformer calls). Run
in the checkout it is started from, so the same command measures an older one.

    python benchmarks/functions_met.py                      # bd3lm.generate, first-hitting, with the cache
    python benchmarks/functions_met.py --sampler=engine     # bd3lm_tools.engine.generate
    python benchmarks/functions_met.py --rule=threshold --knob=0.5
"""
import argparse
import ast
import os
import sys

import torch

sys.path.insert(0, os.getcwd())
import bd3lm  # noqa: E402  (the checkout this runs in)

p = argparse.ArgumentParser()
p.add_argument('--rule', default='first_hitting')
p.add_argument('--knob', type=float, default=None)
p.add_argument('--sampler', default='textbook', choices=['textbook', 'engine'])
p.add_argument('--prompt', type=int, default=6, help='prompt length (a complete block and a partial one at 4)')
args = p.parse_args()

MODEL = {'LayerNorm', 'Rotary', 'TimestepEmbedder', 'EmbeddingLayer', 'DDiTBlock', 'DDiTFinalLayer', 'BD3LM',
         'KVCache', 'Versions'}   # (Versions: an older checkout's cache view)
LAYERS = {'apply_rotary', 'modulate', 'flex_attention', 'compiled_flex_attention', 'build_masks', 'block_causal_mask_mod',
          'block_diff_mask_mod'}
if args.sampler == 'engine':
    from bd3lm_tools import engine  # noqa: E402
    generate = engine.generate
else:
    generate = bd3lm.generate       # (in a checkout before the split: its only sampler, the fast one)
path = os.path.abspath(bd3lm.__file__)
model = bd3lm.BD3LM(bd3lm.BD3LMConfig(block_size=4, vocab_size=37, model_length=16, hidden_dim=32, cond_dim=16,
                                      n_heads=4, n_layers=2)).eval()
met, every = set(), set()


def profile(frame, event, arg):
    if event == 'call' and os.path.abspath(frame.f_code.co_filename) == path:
        name = frame.f_code.co_qualname
        if '<' not in name:
            every.add(name)
            if name.split('.')[0] not in MODEL and name not in LAYERS:
                met.add(name)


idx = torch.randint(0, 35, (1, args.prompt), generator=torch.Generator().manual_seed(0))
kw = {} if args.rule == 'first_hitting' else dict(rule=args.rule, knob=args.knob)
sys.setprofile(profile)
generate(model, idx, 20, generator=torch.Generator().manual_seed(1), **kw)
sys.setprofile(None)
print(f'{args.sampler} sampler, {args.rule} (cached, prompt {args.prompt}, 20 tokens, blocks of 4): {len(every)} '
      f'functions of bd3lm.py met, methods included; {len(met)} outside the model and its layers:')
print('  ' + ', '.join(sorted(met)))
print('  every one: ' + ', '.join(sorted(every)))
source = open(path).read()
defs = sum(isinstance(node, (ast.FunctionDef, ast.ClassDef)) for node in ast.walk(ast.parse(source)))
print(f'bd3lm.py: {len(source.splitlines())} lines, {defs} def and class statements (nested ones included)')
