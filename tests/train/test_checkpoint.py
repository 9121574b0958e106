"""Checkpoints: bit-exact round trip, retention, and crash safety (RELIABILITY.md 8, 9).

Crash safety is tested two ways: a failure injected at each stage of a save (monkeypatched
to raise), and a real SIGKILL of a child process that is saving a ~100 MB state in a loop.
Either way the previous checkpoint must stay the latest and load bit-exactly.
"""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from gdn.models import CausalLM, ModelConfig
from gdn.train import checkpoint as ckpt
from gdn.train.checkpoint import (
    COMPLETE,
    checkpoint_step,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from gdn.train.distributed import Runtime


def _model(seed: int) -> CausalLM:
    torch.manual_seed(seed)
    return CausalLM(ModelConfig.from_preset("gdn-tiny", n_layers=2))


def _optimizer(model: CausalLM) -> torch.optim.AdamW:
    """Two groups (decay / no decay), as the training loop builds them."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                              {"params": rest, "weight_decay": 0.0}], lr=3e-3)


def _train(model, optimizer, steps: int, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(0, 260, (1, 48), generator=gen)
        cu = torch.tensor([0, 17, 48], dtype=torch.int32)
        model(ids, labels=ids, cu_seqlens=cu).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def _assert_same_state(model_a, opt_a, model_b, opt_b) -> None:
    sa, sb = model_a.state_dict(), model_b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name
    if opt_a is None:
        return
    oa, ob = opt_a.state_dict(), opt_b.state_dict()
    assert oa["param_groups"] == ob["param_groups"]
    assert list(oa["state"]) == list(ob["state"])
    for index, state in oa["state"].items():
        for key, value in state.items():
            assert torch.equal(value, ob["state"][index][key]), (index, key)


@pytest.fixture(scope="module")
def trained():
    """A model and AdamW after 3 steps (the state every test saves)."""
    model = _model(0)
    optimizer = _optimizer(model)
    _train(model, optimizer, 3)
    return model, optimizer


def test_round_trip_is_bit_exact(tmp_path, trained):
    model, optimizer = trained
    extra = {"step": 3, "torch_rng": torch.get_rng_state(), "numpy_rng": np.random.get_state(),
             "python_rng": random.getstate(), "data": {"epoch": 1, "next_row": 12}}
    path = save_checkpoint(tmp_path, 3, model=model, optimizer=optimizer, extra=extra,
                           config={"preset": "gdn-tiny", "lr": 3e-3})
    assert path == tmp_path / "step-00000003" and latest_checkpoint(tmp_path) == path
    assert json.loads((path / "config.json").read_text()) == {"preset": "gdn-tiny", "lr": 3e-3}
    assert json.loads((path / COMPLETE).read_text())["step"] == 3

    fresh = _model(1)  # other initial weights, and an optimizer that has never stepped
    fresh_opt = _optimizer(fresh)
    assert not torch.equal(fresh.embed.weight, model.embed.weight)
    got = load_checkpoint(path, model=fresh, optimizer=fresh_opt)
    _assert_same_state(model, optimizer, fresh, fresh_opt)
    assert got["step"] == 3 and got["data"] == extra["data"]
    assert torch.equal(got["torch_rng"], extra["torch_rng"])
    assert got["python_rng"] == extra["python_rng"]
    assert np.array_equal(got["numpy_rng"][1], extra["numpy_rng"][1])

    # Training on from the restored state takes the same steps, bit for bit.
    original = _model(0)
    original.load_state_dict(model.state_dict())
    original_opt = _optimizer(original)
    original_opt.load_state_dict(optimizer.state_dict())
    _train(original, original_opt, 2, seed=7)
    _train(fresh, fresh_opt, 2, seed=7)
    _assert_same_state(original, original_opt, fresh, fresh_opt)


def test_model_only_checkpoint(tmp_path, trained):
    model, _ = trained
    path = save_checkpoint(tmp_path, 0, model=model, optimizer=None, extra={})
    fresh = _model(1)
    assert load_checkpoint(path, model=fresh) == {}
    _assert_same_state(model, None, fresh, None)
    with pytest.raises(ValueError, match="no optimizer state"):
        load_checkpoint(path, model=fresh, optimizer=_optimizer(fresh))


def test_retention_keeps_the_newest(tmp_path, trained):
    model, optimizer = trained
    for step in range(1, 6):
        save_checkpoint(tmp_path, step * 10, model=model, optimizer=optimizer,
                        extra={"step": step * 10}, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000040", "step-00000050"]
    assert checkpoint_step(latest_checkpoint(tmp_path)) == 50
    # An older step written after a newer one is kept too (it was just asked for), and the
    # newest complete one is never deleted.
    save_checkpoint(tmp_path, 7, model=model, optimizer=optimizer, extra={}, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000007", "step-00000050"]
    assert checkpoint_step(latest_checkpoint(tmp_path)) == 50


def test_same_step_saved_again_is_replaced(tmp_path, trained):
    model, optimizer = trained
    save_checkpoint(tmp_path, 5, model=model, optimizer=optimizer, extra={"v": 1})
    path = save_checkpoint(tmp_path, 5, model=model, optimizer=optimizer, extra={"v": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000005"]
    assert load_checkpoint(path, model=_model(1))["v"] == 2


def test_latest_ignores_partial_directories(tmp_path, trained):
    model, optimizer = trained
    assert latest_checkpoint(tmp_path / "missing") is None
    assert latest_checkpoint(tmp_path) is None
    save_checkpoint(tmp_path, 2, model=model, optimizer=optimizer, extra={})
    # A finished-looking temporary dir and a step dir without the marker: both interrupted.
    stale = tmp_path / ".tmp-step-00000009-0badf00d"
    stale.mkdir()
    (stale / COMPLETE).write_text("{}")
    (tmp_path / "step-00000008").mkdir()
    (tmp_path / "step-00000008" / "__0_0.distcp").write_bytes(b"half")
    assert checkpoint_step(latest_checkpoint(tmp_path)) == 2
    with pytest.raises(ValueError, match="incomplete"):
        load_checkpoint(tmp_path / "step-00000008", model=_model(1))
    # The next save removes the stale temporary directory.
    save_checkpoint(tmp_path, 3, model=model, optimizer=optimizer, extra={})
    assert not stale.exists() and checkpoint_step(latest_checkpoint(tmp_path)) == 3


def _fail_dcp_save(monkeypatch):
    def boom(*args, **kwargs):
        raise OSError("disk full (injected)")
    monkeypatch.setattr(ckpt.dcp, "save", boom)


def _fail_extra(monkeypatch):
    real = ckpt._write_durable

    def write(path, data):
        if path.name.startswith("extra-rank"):
            real(path, data[: len(data) // 2])  # half the file is on disk when it dies
            raise OSError("killed while writing extra (injected)")
        real(path, data)
    monkeypatch.setattr(ckpt, "_write_durable", write)


def _fail_marker(monkeypatch):
    real = ckpt._write_durable

    def write(path, data):
        if path.name == COMPLETE:
            raise OSError("killed before the marker (injected)")
        real(path, data)
    monkeypatch.setattr(ckpt, "_write_durable", write)


def _fail_rename(monkeypatch):
    def boom(src, dst):
        raise OSError("killed before the rename (injected)")
    monkeypatch.setattr(ckpt.os, "replace", boom)


@pytest.mark.parametrize("inject", [_fail_dcp_save, _fail_extra, _fail_marker, _fail_rename],
                         ids=["dcp-save", "extra", "marker", "rename"])
def test_failure_mid_save_keeps_previous(tmp_path, trained, monkeypatch, inject):
    model, optimizer = trained
    good = save_checkpoint(tmp_path, 10, model=model, optimizer=optimizer, extra={"step": 10})
    changed = _model(2)  # a different state: loading it by mistake would show
    changed_opt = _optimizer(changed)
    _train(changed, changed_opt, 1)
    with monkeypatch.context() as patch:
        inject(patch)
        with pytest.raises(OSError, match="injected"):
            save_checkpoint(tmp_path, 20, model=changed, optimizer=changed_opt,
                            extra={"step": 20})
    assert latest_checkpoint(tmp_path) == good
    assert not (tmp_path / "step-00000020").exists()
    assert any(p.name.startswith(".tmp-step-00000020-") for p in tmp_path.iterdir())
    fresh = _model(3)
    fresh_opt = _optimizer(fresh)
    assert load_checkpoint(latest_checkpoint(tmp_path), model=fresh,
                           optimizer=fresh_opt)["step"] == 10
    _assert_same_state(model, optimizer, fresh, fresh_opt)


_CHILD = textwrap.dedent("""
    import sys, torch
    from torch import nn
    from gdn.train.checkpoint import save_checkpoint
    root = sys.argv[1]
    torch.manual_seed(0)
    # ~100 MB of model + AdamW state: a save takes long enough to be killed inside it.
    model = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(8)])
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 1024)).sum().backward()
    optimizer.step()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()},
               root + "/../reference.pt")
    step = 1
    while True:  # save until killed; every save holds the same state
        save_checkpoint(root, step, model=model, optimizer=optimizer, extra={"step": step},
                        keep_last=2)
        step += 1
""")


@pytest.mark.parametrize("delay_s", [0.0, 0.12])
def test_sigkill_mid_save_keeps_previous(tmp_path, delay_s):
    """Kill a saving process with SIGKILL `delay_s` after a save's temporary directory
    appears (its first step and deep in the 100 MB write)."""
    root = tmp_path / "ckpt"
    root.mkdir()
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(root)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not (root / "step-00000001" / COMPLETE).exists():
            assert child.poll() is None, child.communicate()[1].decode()[-2000:]
            assert time.monotonic() < deadline, "the child never finished its first save"
            time.sleep(0.005)
        while not any(p.name.startswith(".tmp-step-") and checkpoint_step_of_tmp(p) >= 2
                      for p in root.iterdir()):
            assert child.poll() is None, child.communicate()[1].decode()[-2000:]
            assert time.monotonic() < deadline, "the child never began a second save"
            time.sleep(0.001)
        time.sleep(delay_s)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL

    latest = latest_checkpoint(root)
    assert latest is not None
    # The killed save left its temporary directory (or finished, if the kill came after the
    # rename); either way every step-* directory that latest could return is complete.
    partial = [p for p in root.iterdir() if p.name.startswith(".tmp-")]
    if delay_s == 0.0:  # killed as the save began: it cannot have finished
        assert partial
    killed_step = max(checkpoint_step_of_tmp(p) for p in partial) if partial else None
    if killed_step is not None:
        assert checkpoint_step(latest) < killed_step
    reference = torch.load(tmp_path / "reference.pt")
    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(8)])
    optimizer = torch.optim.AdamW(model.parameters())
    extra = load_checkpoint(latest, model=model, optimizer=optimizer)
    assert extra["step"] == checkpoint_step(latest)
    for name, value in reference["model"].items():
        assert torch.equal(model.state_dict()[name], value), name
    for index, state in reference["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(optimizer.state_dict()["state"][index][key], value), key


def checkpoint_step_of_tmp(path) -> int:
    """The step in a `.tmp-step-XXXXXXXX-<random>` name (0 for other `.tmp-` names)."""
    parts = path.name.split("-")
    return int(parts[2]) if len(parts) == 4 and parts[1] == "step" else 0


@pytest.mark.parametrize("call, match", [
    (lambda p, m: load_checkpoint(p / "nope", model=m), "does not exist"),
    (lambda p, m: load_checkpoint(p / "file", model=m), "not a directory"),
    (lambda p, m: load_checkpoint(p, model=m), "incomplete"),
    (lambda p, m: load_checkpoint(p / "step-00000001", model=m,
                                  runtime=Runtime(world_size=2)), "saved by 1 ranks"),
    (lambda p, m: save_checkpoint(p, -1, model=m, optimizer=None, extra={}), "step"),
    (lambda p, m: save_checkpoint(p, True, model=m, optimizer=None, extra={}), "step"),
    (lambda p, m: save_checkpoint(p, 1, model=m, optimizer=None, extra={}, keep_last=0),
     "keep_last"),
    (lambda p, m: save_checkpoint(p / "file", 1, model=m, optimizer=None, extra={}),
     "got a file"),
    (lambda p, m: latest_checkpoint(p / "file"), "got a file"),
    (lambda p, m: checkpoint_step(p / "weights"), "step-XXXXXXXX"),
])
def test_bad_input_is_one_line_value_error(tmp_path, trained, call, match):
    model, _ = trained
    (tmp_path / "file").write_text("x")
    save_checkpoint(tmp_path, 1, model=model, optimizer=None, extra={})
    with pytest.raises(ValueError, match=match) as info:
        call(tmp_path, model)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("call, match", [
    (lambda p, m: save_checkpoint(p, 1, model=m, optimizer=None, extra=[]), "extra"),
    (lambda p, m: save_checkpoint(p, 1, model="m", optimizer=None, extra={}), "model"),
    (lambda p, m: save_checkpoint(p, 1, model=m, optimizer=object(), extra={}), "optimizer"),
    (lambda p, m: load_checkpoint(p, model=m, runtime="cpu"), "runtime"),
])
def test_bad_type_is_type_error(tmp_path, trained, call, match):
    with pytest.raises(TypeError, match=match):
        call(tmp_path, trained[0])
