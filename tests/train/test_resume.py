"""Resume exactness (RELIABILITY.md item 8): a run saved at step n and resumed repeats the
uninterrupted run's losses bit for bit (==, not allclose), on CPU, and ends with the same
parameters, also when the interrupted job left a partial checkpoint behind (item 9)."""

import dataclasses

import pytest
import torch

from gdn.data import prepare_dataset
from gdn.models import CausalLM
from gdn.train.checkpoint import COMPLETE, checkpoint_step, latest_checkpoint, load_checkpoint
from gdn.train.config import TrainConfig
from gdn.train.loop import train

N_STEPS = 8


@pytest.fixture(scope="module")
def base_config(tmp_path_factory) -> TrainConfig:
    data = prepare_dataset(None, tmp_path_factory.mktemp("data") / "pydoc")
    return TrainConfig(
        preset="gdn-tiny", model={"n_layers": 2}, data=str(data), seq_len=64, batch_size=2,
        grad_accum=2, max_steps=N_STEPS, warmup_steps=2, lr=3e-3, eval_every=2,
        eval_batches=1, save_every=0, log_every=1, tensorboard=False, plot=False,
        progress=False, export_hf=False, device="cpu", seed=3)


def _final_parameters(result, config: TrainConfig) -> dict[str, torch.Tensor]:
    model = CausalLM(config.model_config(min_vocab_size=260))
    load_checkpoint(result.checkpoint, model=model)
    return model.state_dict()


def test_resume_repeats_the_uninterrupted_run(tmp_path, base_config):
    full = train(dataclasses.replace(base_config, out=str(tmp_path / "full")))
    assert len(full.losses) == N_STEPS and full.last_step == N_STEPS

    # The interrupted job: checkpoints every 3 steps, stopped at 5 (the schedule still ends
    # at N_STEPS); then it "dies" during the step-5 save, before COMPLETE was written, and an
    # older save's temporary directory is lying around too.
    interrupted = dataclasses.replace(base_config, out=str(tmp_path / "resumed"),
                                      save_every=3, stop_at=5)
    first = train(interrupted)
    assert first.losses == full.losses[:5]
    checkpoints = tmp_path / "resumed" / "checkpoints"
    assert checkpoint_step(latest_checkpoint(checkpoints)) == 5
    (checkpoints / "step-00000005" / COMPLETE).unlink()
    (checkpoints / ".tmp-step-00000004-deadbeef").mkdir()
    assert checkpoint_step(latest_checkpoint(checkpoints)) == 3

    resumed = train(dataclasses.replace(interrupted, stop_at=0, resume=True))
    assert resumed.first_step == 3 and resumed.last_step == N_STEPS
    assert resumed.losses == full.losses[3:]  # bit-identical, steps 4 … N
    assert resumed.eval_loss == full.eval_loss

    expected = _final_parameters(full, base_config)
    got = _final_parameters(resumed, base_config)
    assert all(torch.equal(expected[name], got[name]) for name in expected)


def test_resume_twice_in_a_row(tmp_path, base_config):
    """Stop at 2, resume to 5, resume to the end: each piece continues the one before."""
    full = train(dataclasses.replace(base_config, out=str(tmp_path / "full"), grad_accum=1))
    config = dataclasses.replace(base_config, out=str(tmp_path / "pieces"), grad_accum=1)
    losses = train(dataclasses.replace(config, stop_at=2)).losses
    losses += train(dataclasses.replace(config, stop_at=5, resume=True)).losses
    losses += train(dataclasses.replace(config, resume=True)).losses
    assert losses == full.losses
