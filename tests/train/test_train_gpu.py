"""Training on the lent GPU (marked ``gpu``): bf16 autocast through the Triton kernels, the
loss falls and a resume repeats the uninterrupted run; with two GPUs, FSDP2 over NCCL equals
one GPU with the same global batch within bf16 reduction order.

    PYTHONPATH=src python3 -m pytest -m gpu tests/train/test_train_gpu.py
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from gdn.data import builtin_dataset
from gdn.train.config import TrainConfig
from gdn.train.loop import train
from gdn.train.metrics import read_metrics

pytestmark = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
QUIET = dict(export_hf=False, tensorboard=False, plot=False, progress=False)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return str(builtin_dataset(tmp_path_factory.mktemp("cache") / "pydoc"))


def _config(dataset, out, **fields) -> TrainConfig:
    values = dict(data=dataset, out=str(out), model={"backend": "triton"}, seq_len=256,
                  batch_size=8, max_steps=40, warmup_steps=4, eval_every=0, eval_batches=1,
                  save_every=0, device="cuda", **QUIET)
    return TrainConfig(**{**values, **fields})


@needs_cuda
def test_bf16_training_on_triton_falls(dataset, tmp_path):
    result = train(_config(dataset, tmp_path / "run"))
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert first > 4.0 and last < first - 1.5, (first, last)


@needs_cuda
def test_resume_on_gpu_repeats_the_run(dataset, tmp_path):
    # Bit-identity is the CPU promise (RELIABILITY item 8); on the GPU the kernels are
    # deterministic too, so the resumed losses must at least agree to bf16 rounding.
    whole = train(_config(dataset, tmp_path / "whole", max_steps=12)).losses
    train(_config(dataset, tmp_path / "split", max_steps=12, stop_at=6, save_every=6))
    resumed = train(_config(dataset, tmp_path / "split", max_steps=12, resume=True)).losses
    assert len(resumed) == 6
    assert torch.allclose(torch.tensor(resumed), torch.tensor(whole[6:]), rtol=1e-3), \
        (resumed, whole[6:])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_fsdp_on_two_gpus_equals_one_gpu(dataset, tmp_path):
    common = ["--data", dataset, "--seq-len", "256", "--max-steps", "6", "--warmup-steps", "2",
              "--eval-every", "0", "--eval-batches", "1", "--save-every", "0", "--no-progress",
              "--no-tensorboard", "--no-plot", "--no-export-hf"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", "2", "-m", "gdn", "train"]
    subprocess.run([*torchrun, *common, "--batch-size", "2", "--out", str(tmp_path / "two")],
                   env=env, check=True, timeout=600)
    subprocess.run([sys.executable, "-m", "gdn", "train", *common, "--batch-size", "4",
                    "--out", str(tmp_path / "one")], env=env, check=True, timeout=600)
    two = [m["loss"] for m in read_metrics(tmp_path / "two" / "metrics.jsonl")]
    one = [m["loss"] for m in read_metrics(tmp_path / "one" / "metrics.jsonl")]
    assert len(two) == len(one) == 6
    # bf16 autocast: the two runs reduce in different orders, so agree to a few 1e-3.
    assert torch.allclose(torch.tensor(two), torch.tensor(one), rtol=5e-3), (two, one)
    shutil.rmtree(tmp_path)
