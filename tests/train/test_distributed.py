"""The runtime and data-parallel training (RELIABILITY.md item 11): two gloo processes with
one row each train like one process with two rows (and like one row × 2 accumulation
steps), within float reduction order.

The two ranks are plain subprocesses with torchrun's environment variables and a free port;
the parent kills both as soon as either fails, and after a deadline, so a dead rank can never
leave its peer hanging in a collective."""

import dataclasses
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from gdn.data import prepare_dataset
from gdn.models import CausalLM
from gdn.train.config import TrainConfig
from gdn.train.distributed import (
    Runtime,
    all_reduce_sum,
    barrier,
    init_runtime,
    shutdown,
    unwrap,
    wrap_model,
)
from gdn.train.loop import train
from gdn.train.metrics import read_metrics

STEPS = 4
DEADLINE_S = 150


@pytest.fixture(scope="module")
def base_config(tmp_path_factory) -> TrainConfig:
    data = prepare_dataset(None, tmp_path_factory.mktemp("data") / "pydoc")
    return TrainConfig(
        preset="gdn-tiny", model={"n_layers": 2}, data=str(data), seq_len=64, batch_size=2,
        max_steps=STEPS, warmup_steps=1, lr=3e-3, eval_every=0, eval_batches=2,
        save_every=0, tensorboard=False, plot=False, progress=False, export_hf=False,
        device="cpu", seed=1)


# --- one process ------------------------------------------------------------------------


def test_single_process_runtime(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    runtime = init_runtime("cpu")
    assert runtime == Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"),
                              backend=None)
    assert runtime.is_main and not runtime.distributed
    model = nn.Linear(3, 2)
    assert wrap_model(model, runtime) is model and unwrap(model) is model
    assert all_reduce_sum(7) == 7 and all_reduce_sum(2.5) == 2.5
    x = torch.ones(2)
    assert all_reduce_sum(x) is x and torch.equal(x, torch.ones(2))
    barrier()
    shutdown()  # no group: nothing to leave, no error


def test_unwrap_reaches_through_compile_wrappers():
    class Compiled(nn.Module):  # stands for torch.compile's OptimizedModule (_orig_mod)
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner
    inner = nn.Linear(2, 2)
    assert unwrap(Compiled(Compiled(inner))) is inner


@pytest.mark.parametrize("env, call, error, match", [
    ({}, lambda: init_runtime("tpu"), ValueError, "device"),
    ({}, lambda: init_runtime("cpu", timeout_s=0), ValueError, "timeout_s"),
    ({}, lambda: init_runtime(3), TypeError, "device"),
    ({"WORLD_SIZE": "2"}, lambda: init_runtime("cpu"), ValueError, "RANK"),
    ({"WORLD_SIZE": "two"}, lambda: init_runtime("cpu"), ValueError, "WORLD_SIZE"),
    ({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0"}, lambda: init_runtime("cpu"),
     ValueError, "RANK must be in"),
    ({}, lambda: wrap_model("model", Runtime()), TypeError, "model"),
    ({}, lambda: wrap_model(nn.Linear(2, 2), "cpu"), TypeError, "runtime"),
    ({}, lambda: wrap_model(nn.Linear(2, 2), Runtime(), param_dtype=torch.int8), ValueError,
     "param_dtype"),
    ({}, lambda: all_reduce_sum("3"), TypeError, "x must be"),
])
def test_bad_input_names_the_argument(monkeypatch, env, call, error, match):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(error, match=match) as info:
        call()
    assert "\n" not in str(info.value)


def test_gradient_accumulation_equals_one_big_batch(tmp_path, base_config):
    one = train(dataclasses.replace(base_config, out=str(tmp_path / "one")))
    accumulated = train(dataclasses.replace(base_config, out=str(tmp_path / "accum"),
                                            batch_size=1, grad_accum=2))
    torch.testing.assert_close(torch.tensor(accumulated.losses), torch.tensor(one.losses),
                               rtol=1e-5, atol=0)
    torch.testing.assert_close(_grad_norms(accumulated.run_dir), _grad_norms(one.run_dir),
                               rtol=1e-5, atol=0)
    _assert_parameters_close(_parameters(accumulated.checkpoint, base_config),
                             _parameters(one.checkpoint, base_config))


# --- two processes ----------------------------------------------------------------------

_RANK = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    from gdn.train.config import TrainConfig
    from gdn.train.loop import train
    config = TrainConfig.from_dict(json.loads(sys.argv[1]))
    result = train(config)
    with open(sys.argv[2], "w") as f:
        json.dump({"losses": result.losses, "checkpoint": str(result.checkpoint),
                   "eval_loss": result.eval_loss}, f)
""")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(config: TrainConfig, world_size: int, tmp_path) -> list[dict]:
    """Run ``train(config)`` in world_size processes as torchrun would; each rank's result."""
    port = _free_port()
    procs, outputs = [], []
    for rank in range(world_size):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(world_size),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        outputs.append(tmp_path / f"rank{rank}.json")
        log = open(tmp_path / f"rank{rank}.log", "wb")  # noqa: SIM115 (closed below)
        procs.append((subprocess.Popen(
            [sys.executable, "-c", _RANK, json.dumps(config.to_dict()), str(outputs[-1])],
            env=env, stdout=log, stderr=subprocess.STDOUT), log))
    failure = None
    try:
        deadline = time.monotonic() + DEADLINE_S
        while any(p.poll() is None for p, _ in procs):
            failed = [r for r, (p, _) in enumerate(procs) if p.poll() not in (None, 0)]
            if failed:
                failure = f"rank {failed[0]} exited with {procs[failed[0]][0].returncode}"
                break
            if time.monotonic() > deadline:
                failure = f"the ranks did not finish within {DEADLINE_S} s"
                break
            time.sleep(0.05)
        else:
            bad = [r for r, (p, _) in enumerate(procs) if p.returncode != 0]
            failure = f"rank {bad[0]} exited with {procs[bad[0]][0].returncode}" if bad else None
    finally:
        for p, log in procs:  # never leave a rank waiting on a dead peer
            if p.poll() is None:
                p.kill()
            p.wait()
            log.close()
    if failure:
        logs = "\n".join((tmp_path / f"rank{r}.log").read_text()[-3000:]
                         for r in range(world_size))
        pytest.fail(f"{failure}\n{logs}")
    return [json.loads(path.read_text()) for path in outputs]


def _grad_norms(run_dir) -> torch.Tensor:
    """The global gradient norm of each step, from the run's metrics.jsonl. Losses alone
    cannot show a gradient off by a constant factor (e.g. averaged instead of summed over
    ranks): AdamW's update and the norm clip are blind to the scale; the norm is not."""
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if "grad_norm" in r]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    return torch.tensor([r["grad_norm"] for r in records])


def _parameters(checkpoint, config: TrainConfig) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint of any world size, read with DCP directly."""
    state = CausalLM(config.model_config(min_vocab_size=260)).state_dict()
    with warnings.catch_warnings():  # DCP warns that no_dist=True means one process
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({"model": state}, checkpoint_id=checkpoint, no_dist=True)
    return state


def _assert_parameters_close(got: dict, expected: dict) -> None:
    assert list(got) == list(expected)
    for name in expected:
        # Adam divides by √v: a rounding-level gradient difference can move a weight by a
        # small fraction of lr·steps (3e-3·4), far below what a wrong gradient would.
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=2e-5,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_two_ranks_equal_one_process(tmp_path, base_config):
    single = train(dataclasses.replace(base_config, out=str(tmp_path / "single"),
                                       eval_every=2))
    ranks = _run_ranks(dataclasses.replace(base_config, out=str(tmp_path / "ddp"),
                                           batch_size=1, eval_every=2), 2, tmp_path)
    assert len(single.losses) == STEPS
    for result in ranks:  # every rank reports the global loss of each step
        torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(single.losses),
                                   rtol=1e-5, atol=0)
        assert result["eval_loss"] == pytest.approx(single.eval_loss, rel=1e-5)
    assert ranks[0]["losses"] == ranks[1]["losses"]
    torch.testing.assert_close(_grad_norms(tmp_path / "ddp"), _grad_norms(single.run_dir),
                               rtol=1e-5, atol=0)
    # A loss that went down shows the ranks trained (not just evaluated) together.
    assert single.losses[-1] < single.losses[0]
    ddp_checkpoint = tmp_path / "ddp" / "checkpoints" / f"step-{STEPS:08d}"
    assert ranks[0]["checkpoint"] == str(ddp_checkpoint)
    assert sorted(p.name for p in ddp_checkpoint.glob("extra-rank*.pt")) == [
        "extra-rank0.pt", "extra-rank1.pt"]
    _assert_parameters_close(_parameters(ddp_checkpoint, base_config),
                             _parameters(single.checkpoint, base_config))
