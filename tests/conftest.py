import os

import pytest
import torch

import bd3lm

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
