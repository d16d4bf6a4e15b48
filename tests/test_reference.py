"""The port reproduces the official bd3lms model (fixtures made with its Hugging Face code)."""
import json
import os

import pytest
import torch

import bd3lm
from bd3lm_tools import checkpoints
from conftest import REFERENCE


@pytest.mark.parametrize('src', ['folder', 'lightning.ckpt'])
def test_reproduces_official_outputs(reference, src):
    path = REFERENCE if src == 'folder' else os.path.join(REFERENCE, src)
    model = bd3lm.BD3LM.from_pretrained(path)
    assert model.config.block_size == 4 and model.config.vocab_size == 97 and model.config.mask_id == 96
    with torch.no_grad():
        logits_train = model(reference['xt'], reference['x0'])
        logits_sample = model(reference['xs'])
        per_token = model.nelbo(reference['x0'], t=reference['t'], xt=reference['xt'], reduction='none')
        nelbo = model.nelbo(reference['x0'], t=reference['t'], xt=reference['xt'])
    torch.testing.assert_close(logits_train, reference['logits_train'], atol=1e-4, rtol=0)
    torch.testing.assert_close(logits_sample, reference['logits_sample'], atol=1e-4, rtol=0)
    torch.testing.assert_close(per_token, reference['nelbo_tokens'].float(), atol=1e-4, rtol=1e-5)
    assert abs(nelbo.item() / reference['nelbo'].item() - 1) < 1e-5


def test_sampling_interval_is_kept_from_the_file(reference):
    folder = bd3lm.BD3LM.from_pretrained(REFERENCE)
    with open(os.path.join(REFERENCE, 'config.json')) as f:
        assert float(folder.sampling_eps_max) == pytest.approx(json.load(f)['sampling_eps_max'])
    ckpt = bd3lm.BD3LM.from_pretrained(os.path.join(REFERENCE, 'lightning.ckpt'))
    # the Lightning checkpoint stores its own searched interval next to the weights
    assert (float(ckpt.sampling_eps_min), float(ckpt.sampling_eps_max)) == pytest.approx((0.3, 0.8))


def test_lightning_uses_ema_not_raw_weights(reference):
    # state_dict in the fixture holds perturbed raw weights; only the EMA weights reproduce the outputs.
    raw = checkpoints.read_lightning(os.path.join(REFERENCE, 'lightning.ckpt'))['state_dict']
    ema = bd3lm.BD3LM.from_pretrained(os.path.join(REFERENCE, 'lightning.ckpt')).state_dict()
    assert not torch.equal(raw['backbone.blocks.0.attn_qkv.weight'], ema['blocks.0.attn_qkv.weight'])


def test_save_pretrained_writes_the_released_layout(reference, tmp_path):
    from safetensors.torch import load_file
    model = bd3lm.BD3LM.from_pretrained(REFERENCE)
    model.save_pretrained(tmp_path)
    released = load_file(os.path.join(REFERENCE, 'model.safetensors'))
    ours = load_file(tmp_path / 'model.safetensors')
    assert set(ours) == set(released)
    for k in released:
        assert ours[k].shape == released[k].shape and ours[k].dtype == released[k].dtype, k
        assert torch.equal(ours[k], released[k]), k
    config = json.loads((tmp_path / 'config.json').read_text())
    with open(os.path.join(REFERENCE, 'config.json')) as f:
        reference_config = json.load(f)
    for key in ('block_size', 'vocab_size', 'model_length', 'hidden_dim', 'cond_dim', 'n_blocks', 'n_heads',
                'adaln', 'time_conditioning', 'cross_attn', 'causal', 'var_min', 'model_type', 'architectures'):
        assert config[key] == reference_config[key], key
    again = bd3lm.BD3LM.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again(reference['xt'], reference['x0']), reference['logits_train'], atol=1e-4, rtol=0)


def test_released_config_without_adaln_key_defaults_to_adaln(reference, tmp_path):
    model = bd3lm.BD3LM.from_pretrained(REFERENCE)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / 'config.json').read_text())
    del config['adaln']
    (tmp_path / 'config.json').write_text(json.dumps(config))
    assert bd3lm.BD3LM.from_pretrained(tmp_path).config.adaln is True
