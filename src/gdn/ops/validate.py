"""Input checks shared by every backend of the recurrences.

Letters: B batch, T time, H q/k heads, HV v heads (a multiple of H), K key dim, V value dim,
N sequences (B, or the number of documents in ``cu_seqlens``).

Every check runs before any computation and raises ``TypeError`` (wrong kind of object or
dtype) or ``ValueError`` (wrong shape or value) with the argument's name in the message.
Shape, dtype and device checks are free. Value checks (gate and beta ranges, ``cu_seqlens``
contents) read tensor values, which on a GPU costs a device-to-host sync; they are on by
default for CPU tensors (except inside torch.compile) and off for CUDA tensors, and
``check_values`` overrides either way.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from itertools import pairwise

import numpy
import torch

INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)
BETA_MAX = 2.0  # β ∈ [0, 2]: (I − β k kᵀ) keeps eigenvalues in [−1, 1] (math.md §1.3)


@dataclass(frozen=True)
class Dims:
    """Sizes of one call, read off validated inputs."""

    B: int
    T: int
    H: int
    HV: int
    K: int
    V: int
    N: int


def state_dtype(input_dtype: torch.dtype) -> torch.dtype:
    """The recurrent state is float32, or float64 when the inputs are float64."""
    return torch.float64 if input_dtype == torch.float64 else torch.float32


def _require_tensor(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def _require_shape(name: str, x: torch.Tensor, expected: tuple[int, ...], legend: str) -> None:
    if tuple(x.shape) != expected:
        raise ValueError(f"{name} must have shape {legend} = {expected}, got {tuple(x.shape)}")


def _require_float(name: str, x: torch.Tensor) -> None:
    if x.dtype not in INPUT_DTYPES:
        raise TypeError(
            f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}"
        )


def _require_flag(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a Python bool, got {value!r} of {type(value)}")


def check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    beta: torch.Tensor | None,
    *,
    needs_beta: bool,
    scale: float | None,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    cu_seqlens: torch.Tensor | None,
    use_qk_l2norm_in_kernel: bool,
    check_values: bool | None,
) -> Dims:
    """Validate the arguments of a recurrence and return its sizes.

    ``needs_beta`` is True for the delta rule (beta required) and False for gated linear
    attention (beta must be None). See the module docstring for what ``check_values`` does.
    """
    q = _require_tensor("q", q)
    k = _require_tensor("k", k)
    v = _require_tensor("v", v)
    if q.dim() != 4:
        raise ValueError(f"q must have shape [B, T, H, K] (4 dims), got {tuple(q.shape)}")
    B, T, H, K = q.shape
    _require_shape("k", k, (B, T, H, K), "[B, T, H, K] like q")
    if v.dim() != 4 or tuple(v.shape[:2]) != (B, T):
        raise ValueError(f"v must have shape [B, T, HV, V] with B={B}, T={T} as in q, "
                         f"got {tuple(v.shape)}")
    HV, V = v.shape[2], v.shape[3]
    if min(T, H, K, HV, V) < 1:
        raise ValueError(f"q {tuple(q.shape)} and v {tuple(v.shape)} must have T, H, K, HV, "
                         "V all >= 1")
    if HV % H != 0:
        raise ValueError(f"v has HV={HV} heads, which is not a multiple of the H={H} heads "
                         "of q and k")
    for name, x in (("q", q), ("k", k), ("v", v)):
        _require_float(name, x)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, "
                        f"v {v.dtype}")

    device = q.device
    per_step = {"g": g, "beta": beta}
    if needs_beta and beta is None:
        raise TypeError("beta must be a tensor of shape [B, T, HV] for the delta rule, got None")
    assert needs_beta or beta is None, "gated linear attention takes no beta"
    for name, x in per_step.items():
        if x is None:
            continue
        x = _require_tensor(name, x)
        _require_shape(name, x, (B, T, HV), "[B, T, HV]")
        _require_float(name, x)

    if cu_seqlens is None:
        N = B
    else:
        cu_seqlens = _require_tensor("cu_seqlens", cu_seqlens)
        if cu_seqlens.dtype not in INDEX_DTYPES:
            raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError("cu_seqlens must have shape [N+1] with N >= 1, got "
                             f"{tuple(cu_seqlens.shape)}")
        if B != 1:
            raise ValueError(f"cu_seqlens needs the documents packed into B=1, got B={B}")
        N = cu_seqlens.numel() - 1

    if initial_state is not None:
        initial_state = _require_tensor("initial_state", initial_state)
        _require_shape("initial_state", initial_state, (N, HV, K, V), "[N, HV, K, V]")
        if initial_state.dtype != state_dtype(q.dtype):
            raise TypeError(f"initial_state must be {state_dtype(q.dtype)} for {q.dtype} "
                            f"inputs, got {initial_state.dtype}")

    others = {"k": k, "v": v, **per_step, "initial_state": initial_state,
              "cu_seqlens": cu_seqlens}
    for name, x in others.items():
        if x is not None and x.device != device:
            raise ValueError(f"{name} is on {x.device} but q is on {device}; "
                             "all tensors must share one device")

    if scale is not None:
        if isinstance(scale, (bool, numpy.bool_)) or not isinstance(scale, numbers.Real):
            hint = ("" if needs_beta or not isinstance(scale, torch.Tensor) else
                    " (gated linear attention has no beta: its fifth argument is scale)")
            raise TypeError(f"scale must be a real number or None, got "
                            f"{type(scale).__name__}{hint}")
        if not math.isfinite(scale):
            raise ValueError(f"scale must be finite, got {scale}")
    _require_flag("output_final_state", output_final_state)
    _require_flag("use_qk_l2norm_in_kernel", use_qk_l2norm_in_kernel)
    if check_values is not None:
        _require_flag("check_values", check_values)

    if check_values is None:
        # Off while torch.compile traces: the checks branch on tensor values, which a
        # full graph cannot contain. check_values=True still asks for them (and breaks it).
        check_values = device.type == "cpu" and not torch.compiler.is_compiling()
    if check_values:
        _check_values(T, g, beta, cu_seqlens)
    return Dims(B=B, T=T, H=H, HV=HV, K=K, V=V, N=N)


def _check_values(
    T: int,
    g: torch.Tensor | None,
    beta: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
) -> None:
    """Range checks that read tensor values (a host sync on GPU)."""
    if g is not None:
        if not bool(torch.isfinite(g).all()):
            raise ValueError("g must be a finite log decay <= 0 at every step "
                             "(found a NaN or infinite value)")
        if not bool((g <= 0).all()):
            raise ValueError("g must be a finite log decay <= 0 at every step "
                             f"(found max {g.max().item():.3g})")
    if beta is not None and not bool(torch.all((beta >= 0) & (beta <= BETA_MAX))):
        raise ValueError(f"beta must lie in [0, {BETA_MAX:g}] at every step "
                         f"(found range [{beta.min().item():.3g}, {beta.max().item():.3g}])")
    if cu_seqlens is not None:
        bounds = cu_seqlens.tolist()
        if bounds[0] != 0:
            raise ValueError(f"cu_seqlens must start at 0, got {bounds[0]}")
        if any(b < a for a, b in pairwise(bounds)):
            raise ValueError(f"cu_seqlens must be non-decreasing, got {bounds}")
        if bounds[-1] != T:
            raise ValueError(f"cu_seqlens must end at T={T}, got {bounds[-1]}")


def check_chunk_size(chunk_size: object) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral):
        raise TypeError(f"chunk_size must be an int, got {type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size}")
    return int(chunk_size)


def check_recompute(recompute: object) -> bool | str:
    """What the Triton backward forms again (math.md §4.6): True, the chunk states from the
    Δ the forward kept; "all", Δ too (least memory); False, nothing (the forward keeps the
    states as well)."""
    if not (isinstance(recompute, bool) or (isinstance(recompute, str) and recompute == "all")):
        raise TypeError(f"recompute must be True, False or 'all', got {recompute!r}")
    return recompute
