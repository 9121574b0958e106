"""The non-finite guard: a NaN step leaves parameters and AdamW state bit-identical, and
max_bad_steps in a row stop the run with TrainingDiverged."""

from __future__ import annotations

import json

import pytest
import torch

from gdn.data import PackedBatches, TokenDataset, builtin_dataset
from gdn.models import CausalLM, ModelConfig
from gdn.train import loop
from gdn.train.config import TrainConfig
from gdn.train.guard import NonFiniteGuard, TrainingDiverged, step_is_finite
from gdn.train.loop import train_step
from gdn.train.optim import build_optimizer

SMALL = {"d_model": 48, "n_layers": 1}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return builtin_dataset(tmp_path_factory.mktemp("cache") / "pydoc")


def _poison(module, inputs, output):
    return output * float("nan")


def test_step_is_finite():
    assert step_is_finite(torch.tensor(2.0), torch.tensor(0.5))
    assert step_is_finite(1.0, 3)
    assert not step_is_finite(torch.tensor(float("nan")), torch.tensor(0.5))
    assert not step_is_finite(torch.tensor(1.0), torch.tensor(float("inf")))
    assert not step_is_finite(float("-inf"), 1.0)


def test_nan_step_leaves_parameters_and_optimizer_state_bit_identical(dataset):
    torch.manual_seed(0)
    model = CausalLM(ModelConfig.from_preset("gdn-tiny", **SMALL))
    optimizer = build_optimizer(model, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95))
    batches = PackedBatches(TokenDataset(dataset), seq_len=64, rows=2, seed=0)
    guard = NonFiniteGuard(max_bad_steps=3)
    for step in (1, 2):  # a real optimizer state first
        loss, norm = train_step(model, optimizer, [next(batches)], grad_clip=1.0)
        assert guard.check(loss, norm, step=step, optimizer=optimizer)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}

    hook = model.blocks[0].register_forward_hook(_poison)
    loss, norm = train_step(model, optimizer, [next(batches)], grad_clip=1.0)
    assert torch.isnan(loss)
    assert not guard.check(loss, norm, step=3, optimizer=optimizer)
    hook.remove()
    assert all(p.grad is None for p in model.parameters())  # the NaN gradients are gone
    assert guard.state_dict() == {"bad_in_a_row": 1, "bad_total": 1}
    for name, p in model.named_parameters():
        assert torch.equal(p, params[name]), name
    for p, s in optimizer.state.items():
        for key, value in s.items():
            assert torch.equal(value, state[id(p)][key]), key

    loss, norm = train_step(model, optimizer, [next(batches)], grad_clip=1.0)
    assert guard.check(loss, norm, step=3, optimizer=optimizer)  # the streak resets
    assert guard.state_dict() == {"bad_in_a_row": 0, "bad_total": 1}


def test_max_bad_steps_in_a_row_raise():
    guard = NonFiniteGuard(max_bad_steps=2)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))])
    assert not guard.check(float("nan"), 1.0, step=7, optimizer=optimizer)
    with pytest.raises(TrainingDiverged, match="2 non-finite steps in a row at step 8") as caught:
        guard.check(1.0, float("inf"), step=8, optimizer=optimizer)
    assert "\n" not in str(caught.value)
    restored = NonFiniteGuard(max_bad_steps=2)
    restored.load_state_dict({"bad_in_a_row": 1, "bad_total": 4})
    with pytest.raises(TrainingDiverged):  # a resumed streak still counts
        restored.check(float("nan"), 1.0, step=9, optimizer=optimizer)
    with pytest.raises(ValueError, match="max_bad_steps"):
        NonFiniteGuard(0)


def test_training_run_stops_after_max_bad_steps(dataset, tmp_path, monkeypatch):
    def poisoned_model(config):
        model = CausalLM(config)
        model.blocks[0].register_forward_hook(_poison)
        return model

    monkeypatch.setattr(loop, "build_model", poisoned_model)
    config = TrainConfig(data=str(dataset), out=str(tmp_path / "run"), model=SMALL, seq_len=32,
                         batch_size=2, max_steps=5, max_bad_steps=3, export_hf=False,
                         tensorboard=False, plot=False, progress=False)
    with pytest.raises(TrainingDiverged, match="3 non-finite steps in a row at step 1"):
        loop.train(config)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert len(lines) == 2  # the third raised before its line
    assert all(r["skipped"] and r["loss"] is None and r["step"] == 1 for r in lines)
