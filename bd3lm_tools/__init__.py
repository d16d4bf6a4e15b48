"""The library beside the method in bd3lm.py: everything that makes the model fast, served, stored and
evaluated. Each module uses bd3lm's public names only.

  engine        the fast sampler: one forward pass per model call, ring KV cache, compiled call, per-row
                settings and generators, continuous batching for serve.py
  speculative   lossless speculative decoding: drafting rules registered with the engine
  checkpoints   file formats: the released layout, bd3lms Lightning checkpoints, the hub
  tokenizer     each model's tokenizer: GPT-2 BPE (offline) or BERT WordPiece
  harness       the model inside lm-evaluation-harness (needs the 'eval' extra)
"""

from bd3lm_tools import speculative  # noqa: E402,F401  (registers the drafting rules with the engine)
