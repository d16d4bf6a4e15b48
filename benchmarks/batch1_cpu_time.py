"""
CPU seconds for 511 tokens from a random 4 x 256 BD3-LM (GPT-2 vocabulary, context 1024, blocks of 16) at
batch 1, one torch thread, best of 3. Run it in two checkouts alternately to compare samplers:

    for i in 1 2 3; do for t in ../old .; do (cd $t && python benchmarks/batch1_cpu_time.py); done; done
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.getcwd())
import bd3lm  # noqa: E402  (the checkout this runs in)

torch.set_num_threads(1)
torch.manual_seed(0)
layers = 'n_layers' if 'n_layers' in bd3lm.BD3LMConfig.__dataclass_fields__ else 'n_blocks'   # older checkouts
config = bd3lm.BD3LMConfig(block_size=16, vocab_size=50258, model_length=1024, hidden_dim=256, cond_dim=128,
                           n_heads=4, dropout=0.0, **{layers: 4})
model = bd3lm.BD3LM(config).eval()
idx = torch.full((1, 1), config.bos_id)
model.generate(idx, 32)                                        # warm-up
times = []
for _ in range(3):
    t0 = time.process_time()
    model.generate(idx, 511, generator=torch.Generator().manual_seed(0))
    times.append(time.process_time() - t0)
print(f'{os.getcwd()}: {min(times):.3f} CPU s for 511 tokens')
