"""Parameter groups by name, AdamW construction, and the warm-up + cosine schedule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gdn.models import CausalLM, ModelConfig
from gdn.train.optim import build_optimizer, decay_split, parameter_groups
from gdn.train.schedule import lr_at


def _tiny(preset: str, **overrides) -> CausalLM:
    return CausalLM(ModelConfig.from_preset(preset, d_model=96, n_layers=3, **overrides))


@pytest.mark.parametrize("preset", ["gdn-tiny", "h2-tiny", "deltanet-tiny"])
def test_only_matmul_weights_decay(preset):
    model = _tiny(preset, tie_embeddings=False)
    decay, no_decay = decay_split(model)
    params = dict(model.named_parameters())
    assert set(decay) | set(no_decay) == set(params) and not set(decay) & set(no_decay)
    linear = {f"{m}.weight" for m, module in model.named_modules()
              if isinstance(module, nn.Linear)}
    assert set(decay) == linear  # every nn.Linear matrix (the untied head too), nothing else
    leaves = [name.rsplit(".", 1)[-1] for name in no_decay]
    if preset != "deltanet-tiny":  # DeltaNet has no gate, hence no A_log / dt_bias
        assert "A_log" in leaves and "dt_bias" in leaves
    assert "embed.weight" in no_decay
    assert any(name.endswith("conv.weight") for name in no_decay)
    assert any(name.endswith("norm.weight") for name in no_decay)
    if preset == "h2-tiny":
        assert "D" in leaves and any(name.endswith("conv.bias") for name in no_decay)


def test_embedding_decay_is_optional_and_wrapper_prefixes_are_ignored():
    class Wrapper(nn.Module):  # names like DDP's "module." prefix
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.module = inner

    model = Wrapper(_tiny("gdn-tiny"))
    decay, no_decay = decay_split(model)
    assert "module.embed.weight" in no_decay
    assert "module.blocks.0.mixer.A_log" in no_decay
    decay_with, _ = decay_split(model, decay_embeddings=True)
    assert set(decay_with) == set(decay) | {"module.embed.weight"}


def test_groups_and_optimizer():
    model = _tiny("gdn-tiny")
    groups = parameter_groups(model, weight_decay=0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["foreach"] is True and not optimizer.defaults["fused"]
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.95)
    with pytest.raises(ValueError, match="weight_decay"):
        parameter_groups(model, weight_decay=-1)


def test_decayed_weights_shrink_and_the_rest_do_not():
    model = _tiny("gdn-tiny")
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = build_optimizer(model, lr=0.1, weight_decay=0.5, betas=(0.9, 0.95))
    optimizer.step()
    decay, no_decay = decay_split(model)
    params = dict(model.named_parameters())
    for name in decay:  # zero gradient: only the decay moves them, by a factor 1 − lr·wd
        torch.testing.assert_close(params[name], before[name] * 0.95)
    for name in no_decay:
        assert torch.equal(params[name], before[name]), name


def test_schedule_warmup_peak_and_floor():
    kw = dict(lr=1e-2, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_at(1, **kw) == pytest.approx(1e-3)
    assert lr_at(5, **kw) == pytest.approx(5e-3)
    assert lr_at(10, **kw) == pytest.approx(1e-2)
    assert lr_at(60, **kw) == pytest.approx(1e-3 + 9e-3 * 0.5)  # halfway down the cosine
    assert lr_at(110, **kw) == pytest.approx(1e-3)
    assert lr_at(500, **kw) == pytest.approx(1e-3)  # past the end: the floor
    values = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
    assert lr_at(1, lr=1.0, warmup_steps=0, max_steps=4, min_lr_ratio=0.0) == \
        pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(3, lr=1.0, warmup_steps=3, max_steps=3, min_lr_ratio=0.2) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="step"):
        lr_at(-1, **kw)
    assert lr_at(4, lr=1.0, warmup_steps=8, max_steps=4, min_lr_ratio=0.0) == \
        pytest.approx(1.0)  # warm-up longer than the run: the run is the warm-up
    with pytest.raises(ValueError, match="warmup_steps"):
        lr_at(1, lr=1.0, warmup_steps=-1, max_steps=4, min_lr_ratio=0.0)
