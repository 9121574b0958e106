"""The process layout of a training run and the model wrapper that goes with it.

One process (plain ``python``) runs with no process group. Under ``torchrun`` (the env
variables RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT are set) each process joins
one group: NCCL with device ``cuda:LOCAL_RANK`` on GPUs, gloo on CPU.

Gradients are SUMMED over ranks, not averaged (``wrap_model`` sets both DDP and FSDP2 up so):
a step's loss is Σ token losses / the global number of targets on every rank (see
``gdn.train.loop``), so the summed gradient is exactly the one-big-batch gradient, with no
world-size factor to multiply back in.

    runtime = init_runtime("auto")
    model = wrap_model(CausalLM(config), runtime)       # DDP / FSDP2 / unchanged
    n_global = all_reduce_sum(n_local_targets)           # int in, int out
    ...
    shutdown()
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["Runtime", "init_runtime", "wrap_model", "unwrap", "all_reduce_sum", "barrier",
           "shutdown"]

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class Runtime:
    """Where this process sits: its rank among ``world_size`` processes, its rank on this
    host, the device it computes on, and the process-group backend ("nccl", "gloo", or None
    for a single process without a group)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files, logs and draws progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _resolve_device(device: str | torch.device) -> torch.device:
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a str or torch.device, got {type(device).__name__}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") \
            from None
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: no CUDA device is visible to torch")
    return resolved


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") \
            from None


def init_runtime(device: str | torch.device = "auto", *,
                 timeout_s: float = 1800.0) -> Runtime:
    """The runtime of this process, joining the process group when launched by torchrun.

    device: "auto" (CUDA when visible, else CPU), "cpu", "cuda" or "cuda:N". Under torchrun
    with CUDA the device is ``cuda:LOCAL_RANK`` (an explicit index is refused: the launcher
    picks it). timeout_s bounds every collective, so a dead peer ends the run instead of
    hanging it. Calling it again in the same process reuses the existing group.
    """
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or timeout_s <= 0:
        raise ValueError(f"timeout_s must be a number > 0, got {timeout_s!r}")
    resolved = _resolve_device(device)
    if "WORLD_SIZE" not in os.environ or _env_int("WORLD_SIZE") <= 1:
        return Runtime(device=resolved)

    missing = [name for name in _ENV if name not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE is set but {', '.join(missing)} is not: launch with "
                         "torchrun (or set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)")
    rank, world_size, local_rank = (_env_int(name) for name in _ENV)
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK must be in [0, WORLD_SIZE={world_size}), got {rank}")
    if resolved.type == "cuda":
        if resolved.index is not None and resolved.index != local_rank:
            raise ValueError(f"device {str(device)!r}: under torchrun each process uses "
                             f"cuda:LOCAL_RANK (here cuda:{local_rank}); pass 'cuda' or 'auto'")
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} "
                             "CUDA devices are visible")
        resolved = torch.device("cuda", local_rank)
        torch.cuda.set_device(resolved)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=resolved if backend == "nccl" else None)
    elif dist.get_backend() != backend or dist.get_world_size() != world_size:
        raise ValueError(f"a process group ({dist.get_backend()}, world "
                         f"{dist.get_world_size()}) already exists; expected {backend}, world "
                         f"{world_size}")
    return Runtime(rank=rank, world_size=world_size, local_rank=local_rank, device=resolved,
                   backend=backend)


def _sum_allreduce_hook(process_group, bucket):
    """DDP communication hook: all-reduce a gradient bucket (dist.GradBucket) as a SUM (DDP's
    own divides by the world size; see the module docstring for why the loop wants the sum).
    No annotations: DDP checks them against the class, and this module's postponed
    annotations would be strings."""
    group = process_group if process_group is not None else dist.group.WORLD
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def wrap_model(model: nn.Module, runtime: Runtime, *,
               param_dtype: torch.dtype | None = None) -> nn.Module:
    """Move ``model`` to ``runtime.device`` and wrap it for data parallelism.

    - one process: the model itself (moved), no wrapper;
    - several processes on CUDA: FSDP2 (``fully_shard``) on each of ``model.blocks`` and then
      on the root, parameters sharded over the ranks; ``param_dtype`` (e.g. torch.bfloat16)
      computes in that dtype with float32 master weights and float32 gradient reduction;
    - several processes on CPU: DDP over gloo (param_dtype must stay None there).

    Gradients are summed over ranks in both wrapped cases. Use ``unwrap`` to reach the
    CausalLM (its config, ``flops_per_token``, export). Seed every rank the same before
    building the model: DDP broadcasts rank 0's parameters, but FSDP2 keeps each rank's own
    slice of its local copy, so differently initialised ranks would mix.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(runtime, Runtime):
        raise TypeError(f"runtime must be a Runtime (init_runtime()), got "
                        f"{type(runtime).__name__}")
    if param_dtype is not None and not (isinstance(param_dtype, torch.dtype)
                                        and param_dtype.is_floating_point):
        raise ValueError(f"param_dtype must be None or a floating torch.dtype, got "
                         f"{param_dtype!r}")
    model = model.to(runtime.device)
    if not runtime.distributed:
        return model
    if runtime.device.type == "cuda":
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        blocks = getattr(model, "blocks", None)
        if not isinstance(blocks, nn.ModuleList):
            raise ValueError("model must have a .blocks ModuleList to be sharded with FSDP2 "
                             f"(a CausalLM); got {type(model).__name__}")
        for block in blocks:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        # FSDP2 reduce-scatters as a mean by default; a divide factor of 1 makes it a sum, and
        # forcing plain SUM collectives avoids NCCL's PREMUL_SUM (gloo lacks it).
        # Each fully_shard-ed module holds its own state, so set it on every one of them.
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)
        return model
    if param_dtype is not None:
        raise ValueError(f"param_dtype={param_dtype} needs CUDA (FSDP2); DDP on CPU trains in "
                         "float32")
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(model)
    ddp.register_comm_hook(None, _sum_allreduce_hook)
    return ddp


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP and ``torch.compile`` wrappers (FSDP2 shards in place, so an
    FSDP2 model is its own CausalLM)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            return model


def all_reduce_sum(x: torch.Tensor | int | float) -> torch.Tensor | int | float:
    """Σ over ranks of x. A tensor is reduced in place and returned; an int or float gives
    back the same Python type (float64 on the wire, exact for counts below 2**53). Without a
    process group it returns x unchanged."""
    if isinstance(x, bool) or not isinstance(x, (torch.Tensor, int, float)):
        raise TypeError(f"x must be a tensor, int or float, got {type(x).__name__}")
    if not (dist.is_available() and dist.is_initialized()):
        return x
    if isinstance(x, torch.Tensor):
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x
    device = (torch.device("cuda", torch.cuda.current_device())
              if dist.get_backend() == "nccl" else torch.device("cpu"))
    dtype = torch.int64 if isinstance(x, int) else torch.float64
    wire = torch.tensor(x, dtype=dtype, device=device)
    dist.all_reduce(wire, op=dist.ReduceOp.SUM)
    return type(x)(wire.item())


def barrier() -> None:
    """Wait for every rank (a no-op without a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    """Leave the process group, if any (call once at the end of a run)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
