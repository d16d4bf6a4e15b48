"""Compare this port with the official bd3lms Hugging Face model on random configurations, both ways:
the official weights loaded here, and this repo's save_pretrained loaded by the official class.

    python benchmarks/official_parity.py --official=PATH/TO/bd3lms/models/hf    # needs transformers, einops

Prints the largest logit difference of the training pass (cat([xt, x0])) and the inference pass for each
configuration. Every parameter is random (the official init zeroes adaLN and the output layer).
"""
import argparse
import importlib
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
import bd3lm  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument('--official', required=True, help="bd3lms' models/hf folder")
args = p.parse_args()
folder = os.path.abspath(args.official)
sys.path.insert(0, os.path.dirname(folder))
Official = importlib.import_module(f'{os.path.basename(folder)}.modeling_bd3lm').BD3LM
OfficialConfig = importlib.import_module(f'{os.path.basename(folder)}.configuration_bd3lm').BD3LMConfig
Official.all_tied_weights_keys = {}  # recent transformers expect post_init(), which the official class never calls

CASES = [dict(block_size=8, model_length=32, hidden_dim=64, n_heads=4, vocab_size=97),
         dict(block_size=16, model_length=64, hidden_dim=96, n_heads=6, vocab_size=131),
         dict(block_size=32, model_length=32, hidden_dim=64, n_heads=2, vocab_size=50),   # block = context (MDLM)
         dict(block_size=1, model_length=16, hidden_dim=48, n_heads=3, vocab_size=70),
         dict(block_size=4, model_length=32, hidden_dim=128, n_heads=8, vocab_size=300, n_blocks=3, cond_dim=40)]

for case in CASES:
    c = dict(dict(cond_dim=32, n_blocks=2), **case)
    torch.manual_seed(0)
    official = Official(OfficialConfig(attn_backend='sdpa', **c)).eval()
    with torch.no_grad():
        for param in official.parameters():
            param.normal_(0, 0.2)
    L, bs, V = c['model_length'], c['block_size'], c['vocab_size']
    x0 = torch.randint(0, V - 1, (2, L))
    x0[:, 0] = V - 2
    xt = bd3lm.q_xt(x0, bd3lm.sample_t(2, L // bs).repeat_interleave(bs, 1), V - 1, bs)
    nb = max(1, L // bs // 2)
    xs = torch.cat([x0[:, :nb * bs], xt[:, nb * bs:(nb + 1) * bs]], 1)
    sigma = torch.zeros(2)
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b, torch.no_grad():
        official.save_pretrained(a, safe_serialization=True)
        ours = bd3lm.BD3LM.from_pretrained(a)
        ref_train = official(input_ids=torch.cat([xt, x0], 1), timesteps=sigma, return_dict=False)
        ref_infer = official(input_ids=xs, timesteps=sigma, sample_mode=True, return_dict=False)
        d_train = (ours(xt, x0) - ref_train).abs().max().item()
        d_infer = (ours(xs) - ref_infer).abs().max().item()
        ours.save_pretrained(b)
        back, info = Official.from_pretrained(b, output_loading_info=True)
        back.eval().backbone.gen_mask(L, bs, 'sdpa')  # its mask is not a weight; rebuild it after loading
        d_back = (back(input_ids=torch.cat([xt, x0], 1), timesteps=sigma, return_dict=False) - ref_train).abs().max().item()
        problems = {k: v for k, v in info.items() if v}
    print(f'{case}: train pass {d_train:.1e}, inference pass {d_infer:.1e}, '
          f'official class on our save_pretrained {d_back:.1e}{"  loading problems: " + str(problems) if problems else ""}')
