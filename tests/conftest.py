import os

import pytest
import torch

import bd3lm
from bd3lm_tools import engine

# Made by the official bd3lms model (see fixtures/README.md); they travel with the repo, so the comparison
# with the official model always runs.
REFERENCE = os.path.join(os.path.dirname(__file__), 'fixtures', 'bd3lm_tiny_bs4')


def random_model(seed=0, std=0.2, **overrides):
    """A tiny BD3LM whose every parameter is random (the real init zeroes adaLN and the output layer,
    which would hide bugs behind zeros)."""
    fields = dict(block_size=4, vocab_size=37, model_length=16, hidden_dim=32, cond_dim=16, n_layers=2, n_heads=4)
    fields.update(overrides)
    torch.manual_seed(seed)
    model = bd3lm.BD3LM(bd3lm.BD3LMConfig(**fields))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model.eval()


def random_tokens(model, batch_size=3, length=None, seed=0):
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, cfg.vocab_size - 1, (batch_size, length or cfg.model_length), generator=g)
    x0[:, 0] = cfg.vocab_size - 2  # a BOS-like token
    return x0


@pytest.fixture(scope='session')
def reference():
    return torch.load(os.path.join(REFERENCE, 'reference.pt'), weights_only=False)


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
    """A small token dataset in the prepare.py format (wrapped GPT-2), made from the embedded corpus's first
    documents: <data_dir>/tiny/{train,val}.bin + meta.json."""
    import prepare
    root = tmp_path_factory.mktemp('data')
    docs = [text for _, (_, text) in zip(range(60), prepare.python_docs())]
    prepare.write(((f'doc{i}', d) for i, d in enumerate(docs)), str(root / 'tiny'), 0.2, 'test')
    return str(root)


def check_engine_rows_equal_generate_alone(model, prompts, lengths, settings, joining_late, steps_before):
    """Engine rows (one per prompt, with its own length, seed and sampling settings) run in one engine.Batch:
    all but the `joining_late` last join first, the rest `steps_before` model calls later, while the first
    are mid-text. Each row's tokens must equal model.generate for it alone; so must one uncached row's."""
    from bd3lm_tools import engine
    seed = lambda i: torch.Generator().manual_seed(1000 + i)
    rows = [engine.Row(p, n, seed(i), **s) for i, (p, n, s) in enumerate(zip(prompts, lengths, settings))]
    batch = engine.Batch(model, 'cpu', engine.KVCache(model, len(rows), 'cpu'))
    for row in rows[:len(rows) - joining_late]:
        batch.admit(row)
    for _ in range(steps_before):
        batch.step()
    for row in rows[len(rows) - joining_late:]:
        batch.admit(row)
    for _ in range(sum(lengths) + len(rows) * 4):              # bounded: every step makes progress
        if not batch.rows:
            break
        batch.step()
    assert not batch.rows
    for i, row in enumerate(rows):
        out = engine.generate(model, torch.tensor([prompts[i]]), lengths[i], generator=[seed(i)], **settings[i])
        assert row.tokens == out[0, len(prompts[i]):].tolist(), i
    # the reference path: one uncached row, one model call per engine step
    alone = engine.Row(prompts[-1], 21, seed(7), kv_cache=False, **settings[-1])
    batch = engine.Batch(model, 'cpu')
    batch.admit(alone)
    while batch.rows:
        batch.step()
    out = engine.generate(model, torch.tensor([prompts[-1]]), 21, generator=[seed(7)], kv_cache=False, **settings[-1])
    assert alone.tokens == out[0, len(prompts[-1]):].tolist()
