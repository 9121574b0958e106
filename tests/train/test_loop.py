"""train(config): the loss falls on the built-in corpus; accumulation equals one big batch;
the run directory; refusals of runs that would mix with another."""

from __future__ import annotations

import json

import pytest
import torch

from gdn.data import builtin_dataset
from gdn.train.config import TrainConfig
from gdn.train.loop import train

SMALL = {"d_model": 48, "n_layers": 1}
QUIET = dict(export_hf=False, tensorboard=False, plot=False, progress=False)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return str(builtin_dataset(tmp_path_factory.mktemp("cache") / "pydoc"))


def test_tokenise_pack_train_loss_falls(tmp_path):
    # The whole path: the built-in corpus prepared with the byte tokenizer, packed, gdn-tiny.
    path = builtin_dataset(tmp_path / "cache")
    config = TrainConfig(data=str(path), out=str(tmp_path / "run"), seq_len=64, batch_size=4,
                         max_steps=30, warmup_steps=3, eval_every=15, eval_batches=1,
                         save_every=0, **QUIET)
    result = train(config)
    assert len(result.losses) == 30 and (result.first_step, result.last_step) == (0, 30)
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert first > 4.0 and last < first - 1.0, (first, last)  # bytes: ln 260 = 5.56 at init
    assert result.eval_loss is not None and result.eval_loss < first - 0.8
    assert result.checkpoint == tmp_path / "run" / "checkpoints" / "step-00000030"
    assert json.loads((tmp_path / "run" / "config.json").read_text())["max_steps"] == 30


def _losses(dataset, out, **fields):
    values = dict(data=dataset, out=str(out), model=SMALL, seq_len=32, max_steps=3,
                  warmup_steps=1, eval_every=0, eval_batches=1, save_every=0, **QUIET)
    config = TrainConfig(**{**values, **fields})
    return train(config)


def test_gradient_accumulation_equals_one_big_batch(dataset, tmp_path):
    big = _losses(dataset, tmp_path / "big", batch_size=4, grad_accum=1)
    accumulated = _losses(dataset, tmp_path / "acc", batch_size=2, grad_accum=2)
    torch.testing.assert_close(accumulated.losses, big.losses, rtol=1e-5, atol=0)
    assert accumulated.eval_loss == pytest.approx(big.eval_loss, rel=1e-5)


def test_recomputed_blocks_change_nothing_but_memory(dataset, tmp_path):
    plain = _losses(dataset, tmp_path / "plain", batch_size=2)
    recomputed = _losses(dataset, tmp_path / "ckpt", batch_size=2, activation_checkpointing=True)
    assert recomputed.losses == plain.losses


def test_run_directory_rules(dataset, tmp_path):
    out = tmp_path / "run"
    first = _losses(dataset, out, batch_size=2, stop_at=2)
    assert first.last_step == 2 and (out / "checkpoints" / "step-00000002").is_dir()
    with pytest.raises(ValueError, match="already holds checkpoints"):
        _losses(dataset, out, batch_size=2)  # a fresh run must not mix with that one
    with pytest.raises(ValueError, match="other seq_len"):
        _losses(dataset, out, batch_size=2, seq_len=48, resume=True)
    with pytest.raises(ValueError, match="other model; start a new --out"):
        _losses(dataset, out, batch_size=2, model={"d_model": 96, "n_layers": 1}, resume=True)
    with pytest.raises(ValueError, match="no complete checkpoint"):
        _losses(dataset, tmp_path / "other", batch_size=2, resume=str(tmp_path))
    resumed = _losses(dataset, out, batch_size=2, resume=True)
    assert (resumed.first_step, resumed.last_step, len(resumed.losses)) == (2, 3, 1)
    assert resumed.checkpoint == out / "checkpoints" / "step-00000003"
    steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").open()) if "loss" in r]
    assert steps == [1, 2, 3]


def test_export_hf_loads_with_transformers(dataset, tmp_path):
    pytest.importorskip("transformers")
    from gdn.models.hf import GDNForCausalLM

    config = TrainConfig(data=dataset, out=str(tmp_path / "run"), model=SMALL, seq_len=32,
                         batch_size=2, max_steps=2, eval_every=0, eval_batches=1,
                         **{**QUIET, "export_hf": True})
    train(config)
    hf_dir = tmp_path / "run" / "hf"
    assert (hf_dir / "model.safetensors").is_file() and (hf_dir / "tokenizer.json").is_file()
    exported = GDNForCausalLM.from_pretrained(hf_dir)
    from gdn.train.checkpoint import load_checkpoint
    from gdn.train.loop import build_model

    trained = build_model(config.model_config())
    load_checkpoint(tmp_path / "run" / "checkpoints" / "step-00000002", model=trained)
    ids = torch.tensor([[72, 101, 108, 108, 111]])
    torch.testing.assert_close(exported(ids).logits, trained(ids).logits, rtol=0, atol=0)
