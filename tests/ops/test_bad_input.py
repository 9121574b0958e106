"""Bad input to the public recurrences: a typed, one-line error that names the argument,
raised before any computation (RELIABILITY.md item 7; the checks live in ops/validate.py).

Each case changes one argument of a valid, tiny call and states what it expects: the exact
exception type (TypeError for a wrong kind of object or dtype, ValueError for a wrong shape
or value, as validate.py's docstring promises), the argument the message names, and a piece
of what the message says was expected (a shape, a range, a dtype).

Letters: B batch, T time, H q/k heads, HV v heads, K key dim, V value dim, N sequences.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

import gdn.ops
from gdn.ops import (
    chunk_gated_delta_rule,
    chunk_gated_linear_attention,
    chunked,
    fused_recurrent_gated_delta_rule,
    recurrent_gated_delta_rule,
    recurrent_gated_linear_attention,
    reference,
)
from gdn.testing import random_inputs

B, T, H, HV, K, V = 2, 5, 2, 4, 6, 3
DOCS = [1, 2, 2]  # varlen calls pack N = 3 documents into B = 1

DELTA_RULE = (chunk_gated_delta_rule, recurrent_gated_delta_rule)  # fused_* is an alias
ALL_FNS = [
    pytest.param(chunk_gated_delta_rule, id="chunk_delta"),
    pytest.param(recurrent_gated_delta_rule, id="rec_delta"),
    pytest.param(chunk_gated_linear_attention, id="chunk_gla"),
    pytest.param(recurrent_gated_linear_attention, id="rec_gla"),
]


def valid_args(fn: Callable, *, varlen: bool = False) -> dict:
    """A valid float32 call of ``fn``, with an initial state and the final state asked for."""
    delta = fn in DELTA_RULE
    x = random_inputs(B=1 if varlen else B, T=T, H=H, HV=HV, K=K, V=V, delta=delta,
                      initial_state=True, doc_lengths=DOCS if varlen else None,
                      dtype=torch.float32)
    return {**x.kwargs(delta=delta), "output_final_state": True}


@dataclass(frozen=True)
class Case:
    id: str
    fn: Callable
    change: Callable[[dict], dict]  # valid arguments -> the arguments to replace or add
    error: type[Exception]
    name: str  # the argument the message must name
    expected: str = ""  # more text the message must contain
    varlen: bool = False

    def call(self):
        args = valid_args(self.fn, varlen=self.varlen)
        return self.fn(**{**args, **self.change(args)})


def poke(x: torch.Tensor, value: float) -> torch.Tensor:
    """A copy of ``x`` with its first element set to ``value``."""
    x = x.clone()
    x.view(-1)[0] = value
    return x


def empty_time(a: dict) -> dict:
    return {n: a[n][:, :0] for n in ("q", "k", "v", "g", "beta") if n in a}


def float64_inputs(a: dict) -> dict:
    """float64 q, k, v, g, beta; the float32 initial state is then the wrong dtype."""
    return {n: a[n].double() for n in ("q", "k", "v", "g", "beta") if n in a}


def cu(*bounds: int) -> Callable[[dict], dict]:
    return lambda a: {"cu_seqlens": torch.tensor(bounds, dtype=torch.int32)}


def gla_with_beta_in_fifth_place(q, k, v, g, **rest):
    """A delta-rule call ported to gated linear attention: beta lands in ``scale``."""
    return chunk_gated_linear_attention(q, k, v, g, torch.rand_like(g), **rest)


CDR, RDR, FDR = chunk_gated_delta_rule, recurrent_gated_delta_rule, fused_recurrent_gated_delta_rule
CGLA, RGLA = chunk_gated_linear_attention, recurrent_gated_linear_attention
TE, VE = TypeError, ValueError
BTHK, BTHV = "(2, 5, 2, 6)", "(2, 5, 4)"
FLOATS = "float16, bfloat16, float32 or float64"

CASES = [
    # Not a tensor.
    Case("chunk_delta/q-list", CDR, lambda a: {"q": a["q"].tolist()}, TE, "q", "torch.Tensor"),
    Case("chunk_delta/k-numpy", CDR, lambda a: {"k": a["k"].numpy()}, TE, "k", "ndarray"),
    Case("rec_delta/v-list", RDR, lambda a: {"v": a["v"].tolist()}, TE, "v", "torch.Tensor"),
    Case("chunk_delta/g-float", CDR, lambda a: {"g": -0.1}, TE, "g", "torch.Tensor"),
    Case("chunk_delta/beta-float", CDR, lambda a: {"beta": 0.5}, TE, "beta", "torch.Tensor"),
    Case("chunk_gla/g-list", CGLA, lambda a: {"g": a["g"].tolist()}, TE, "g", "torch.Tensor"),
    Case("chunk_delta/initial_state-list", CDR,
         lambda a: {"initial_state": a["initial_state"].tolist()}, TE, "initial_state",
         "torch.Tensor"),
    Case("chunk_delta/cu_seqlens-list", CDR, lambda a: {"cu_seqlens": [0, 1, 3, 5]}, TE,
         "cu_seqlens", "torch.Tensor", varlen=True),
    # Wrong rank.
    Case("chunk_delta/q-3d", CDR, lambda a: {"q": a["q"][0]}, VE, "q", "[B, T, H, K] (4 dims)"),
    Case("chunk_delta/k-3d", CDR, lambda a: {"k": a["k"][0]}, VE, "k", BTHK),
    Case("chunk_delta/v-5d", CDR, lambda a: {"v": a["v"][..., None]}, VE, "v",
         "[B, T, HV, V]"),
    Case("chunk_delta/g-4d", CDR, lambda a: {"g": a["g"][..., None]}, VE, "g", BTHV),
    Case("rec_delta/beta-2d", RDR, lambda a: {"beta": a["beta"][..., 0]}, VE, "beta", BTHV),
    Case("chunk_gla/g-2d", CGLA, lambda a: {"g": a["g"][..., 0]}, VE, "g", BTHV),
    # B, T or heads that disagree with q.
    Case("chunk_delta/k-batch", CDR, lambda a: {"k": a["k"][:1]}, VE, "k", BTHK),
    Case("chunk_delta/k-head-dim", CDR, lambda a: {"k": a["k"][..., :5]}, VE, "k", BTHK),
    Case("chunk_delta/k-heads", CDR, lambda a: {"k": a["k"][:, :, :1]}, VE, "k", BTHK),
    Case("chunk_delta/v-batch", CDR, lambda a: {"v": a["v"][:1]}, VE, "v", "B=2"),
    Case("rec_delta/v-time", RDR, lambda a: {"v": a["v"][:, :4]}, VE, "v", "T=5"),
    Case("chunk_delta/g-time", CDR, lambda a: {"g": a["g"][:, :4]}, VE, "g", BTHV),
    Case("chunk_delta/g-per-qk-head", CDR, lambda a: {"g": a["g"][:, :, :H]}, VE, "g", BTHV),
    Case("chunk_delta/beta-batch", CDR, lambda a: {"beta": a["beta"][:1]}, VE, "beta", BTHV),
    Case("chunk_gla/g-time", CGLA, lambda a: {"g": a["g"][:, :4]}, VE, "g", BTHV),
    # HV not a multiple of H.
    Case("chunk_delta/hv-3-of-h-2", CDR, lambda a: {"v": a["v"][:, :, :3]}, VE, "v", "HV=3"),
    Case("rec_delta/hv-1-of-h-2", RDR, lambda a: {"v": a["v"][:, :, :1]}, VE, "v", "HV=1"),
    Case("chunk_gla/hv-3-of-h-2", CGLA, lambda a: {"v": a["v"][:, :, :3]}, VE, "v", "HV=3"),
    # T = 0 and empty head dims.
    Case("chunk_delta/t-0", CDR, empty_time, VE, "q", "T, H, K, HV, V all >= 1"),
    Case("rec_gla/t-0", RGLA, empty_time, VE, "q", "T, H, K, HV, V all >= 1"),
    Case("chunk_delta/v-dim-0", CDR, lambda a: {"v": a["v"][..., :0]}, VE, "v", ">= 1"),
    # dtypes.
    Case("chunk_delta/q-int32", CDR, lambda a: {"q": a["q"].int()}, TE, "q", FLOATS),
    Case("chunk_delta/k-complex", CDR, lambda a: {"k": a["k"].to(torch.complex64)}, TE, "k",
         FLOATS),
    Case("rec_delta/v-int64", RDR, lambda a: {"v": a["v"].long()}, TE, "v", FLOATS),
    Case("chunk_delta/g-int32", CDR, lambda a: {"g": a["g"].int()}, TE, "g", FLOATS),
    Case("chunk_delta/beta-bool", CDR, lambda a: {"beta": a["beta"] > 0.5}, TE, "beta",
         FLOATS),
    Case("chunk_gla/g-complex", CGLA, lambda a: {"g": a["g"].to(torch.complex64)}, TE, "g",
         FLOATS),
    Case("chunk_delta/v-bf16-q-fp32", CDR, lambda a: {"v": a["v"].bfloat16()}, TE, "v",
         "v torch.bfloat16"),
    Case("chunk_delta/k-fp64-q-fp32", CDR, lambda a: {"k": a["k"].double()}, TE, "k",
         "k torch.float64"),
    Case("rec_gla/q-fp16-kv-fp32", RGLA, lambda a: {"q": a["q"].half()}, TE, "q",
         "q torch.float16"),
    # beta where the recurrence needs one, and where it has none.
    Case("chunk_delta/beta-none", CDR, lambda a: {"beta": None}, TE, "beta", "delta rule"),
    Case("fused_delta/beta-none", FDR, lambda a: {"beta": None}, TE, "beta", "delta rule"),
    # Gated linear attention has no beta parameter: Python's own TypeError names it.
    Case("chunk_gla/beta-keyword", CGLA, lambda a: {"beta": torch.rand_like(a["g"])}, TE,
         "beta", "unexpected keyword"),
    Case("rec_gla/beta-keyword", RGLA, lambda a: {"beta": torch.rand_like(a["g"])}, TE,
         "beta", "unexpected keyword"),
    # Passed fifth, as in the delta rule, beta is taken for scale, and scale is what's named.
    Case("chunk_gla/beta-positional-is-scale", gla_with_beta_in_fifth_place, lambda a: {}, TE,
         "scale", "got Tensor"),
    # initial_state.
    Case("chunk_delta/initial_state-n-2-for-3-docs", CDR,
         lambda a: {"initial_state": a["initial_state"][:2]}, VE, "initial_state",
         "(3, 4, 6, 3)", varlen=True),
    Case("chunk_delta/initial_state-kv-swapped", CDR,
         lambda a: {"initial_state": a["initial_state"].transpose(-1, -2)}, VE,
         "initial_state", "[N, HV, K, V] = (2, 4, 6, 3)"),
    Case("rec_delta/initial_state-per-qk-head", RDR,
         lambda a: {"initial_state": a["initial_state"][:, :H]}, VE, "initial_state",
         "(2, 4, 6, 3)"),
    Case("chunk_gla/initial_state-3d", CGLA,
         lambda a: {"initial_state": a["initial_state"][0]}, VE, "initial_state",
         "(2, 4, 6, 3)"),
    Case("chunk_delta/initial_state-bf16", CDR,
         lambda a: {"initial_state": a["initial_state"].bfloat16()}, TE, "initial_state",
         "torch.float32"),
    Case("chunk_delta/initial_state-fp64-for-fp32", CDR,
         lambda a: {"initial_state": a["initial_state"].double()}, TE, "initial_state",
         "torch.float32"),
    Case("chunk_delta/initial_state-fp32-for-fp64", CDR, float64_inputs, TE, "initial_state",
         "torch.float64"),
    # cu_seqlens.
    Case("chunk_delta/cu_seqlens-float", CDR,
         lambda a: {"cu_seqlens": a["cu_seqlens"].float()}, TE, "cu_seqlens", "int32 or int64",
         varlen=True),
    Case("chunk_delta/cu_seqlens-2d", CDR, lambda a: {"cu_seqlens": a["cu_seqlens"][None]}, VE,
         "cu_seqlens", "[N+1]", varlen=True),
    Case("chunk_delta/cu_seqlens-one-element", CDR, cu(0), VE, "cu_seqlens", "N >= 1",
         varlen=True),
    Case("chunk_delta/cu_seqlens-with-b-2", CDR, cu(0, 5), VE, "cu_seqlens", "B=2"),
    Case("chunk_delta/cu_seqlens-start-1", CDR, cu(1, 1, 3, 5), VE, "cu_seqlens", "start at 0",
         varlen=True),
    Case("rec_delta/cu_seqlens-decreasing", RDR, cu(0, 3, 1, 5), VE, "cu_seqlens",
         "non-decreasing", varlen=True),
    Case("chunk_delta/cu_seqlens-short-of-t", CDR, cu(0, 1, 3, 4), VE, "cu_seqlens",
         "end at T=5", varlen=True),
    Case("chunk_delta/cu_seqlens-past-t", CDR, cu(0, 1, 3, 6), VE, "cu_seqlens", "end at T=5",
         varlen=True),
    Case("chunk_gla/cu_seqlens-short-of-t", CGLA, cu(0, 1, 3, 4), VE, "cu_seqlens",
         "end at T=5", varlen=True),
    # Gate and beta values.
    Case("chunk_delta/g-positive", CDR, lambda a: {"g": -a["g"]}, VE, "g", "<= 0"),
    Case("chunk_delta/g-nan", CDR, lambda a: {"g": poke(a["g"], float("nan"))}, VE, "g",
         "finite"),
    Case("rec_delta/g-minus-inf", RDR, lambda a: {"g": poke(a["g"], -float("inf"))}, VE, "g",
         "finite"),
    Case("chunk_gla/g-positive", CGLA, lambda a: {"g": -a["g"]}, VE, "g", "<= 0"),
    Case("rec_gla/g-nan", RGLA, lambda a: {"g": poke(a["g"], float("nan"))}, VE, "g",
         "finite"),
    Case("chunk_delta/beta-negative", CDR, lambda a: {"beta": poke(a["beta"], -0.1)}, VE,
         "beta", "[0, 2]"),
    Case("fused_delta/beta-above-2", FDR, lambda a: {"beta": poke(a["beta"], 2.5)}, VE, "beta",
         "[0, 2]"),
    Case("chunk_delta/beta-nan", CDR, lambda a: {"beta": poke(a["beta"], float("nan"))}, VE,
         "beta", "[0, 2]"),
    # backend.
    Case("chunk_delta/backend-cuda", CDR, lambda a: {"backend": "cuda"}, VE, "backend",
         "auto, reference, torch"),
    Case("chunk_delta/backend-triton-chunk-32", CDR,
         lambda a: {"backend": "triton", "chunk_size": 32}, VE, "backend", "chunk_size 64"),
    Case("rec_delta/backend-triton", RDR, lambda a: {"backend": "triton"}, VE, "backend",
         "no recurrent"),
    Case("chunk_delta/exact-not-bool", CDR, lambda a: {"exact": 1}, TE, "exact", "bool"),
    Case("chunk_gla/backend-Torch", CGLA, lambda a: {"backend": "Torch"}, VE, "backend",
         "'Torch'"),
    # chunk_size: a wrong value is a ValueError, a wrong kind of object a TypeError.
    Case("chunk_delta/chunk_size-0", CDR, lambda a: {"chunk_size": 0}, VE, "chunk_size",
         "positive"),
    Case("chunk_delta/chunk_size-negative", CDR, lambda a: {"chunk_size": -16}, VE,
         "chunk_size", "positive"),
    Case("chunk_gla/chunk_size-0", CGLA, lambda a: {"chunk_size": 0}, VE, "chunk_size",
         "positive"),
    Case("chunk_delta/chunk_size-float", CDR, lambda a: {"chunk_size": 16.0}, TE, "chunk_size",
         "int"),
    Case("chunk_delta/chunk_size-bool", CDR, lambda a: {"chunk_size": True}, TE, "chunk_size",
         "int"),
    # None would silently run the token-by-token reference under an explicit "torch" backend.
    Case("chunk_delta/chunk_size-none", CDR, lambda a: {"chunk_size": None, "backend": "torch"},
         TE, "chunk_size", "int"),
    # scale.
    Case("chunk_delta/scale-str", CDR, lambda a: {"scale": "0.5"}, TE, "scale", "real number"),
    Case("chunk_delta/scale-bool", CDR, lambda a: {"scale": True}, TE, "scale", "real number"),
    Case("rec_delta/scale-tensor", RDR, lambda a: {"scale": torch.tensor(0.5)}, TE, "scale",
         "real number"),
    Case("chunk_delta/scale-nan", CDR, lambda a: {"scale": float("nan")}, VE, "scale",
         "finite"),
    Case("chunk_delta/scale-inf", CDR, lambda a: {"scale": float("inf")}, VE, "scale",
         "finite"),
    Case("rec_gla/scale-minus-inf", RGLA, lambda a: {"scale": -float("inf")}, VE, "scale",
         "finite"),
    # Flags that must be bools.
    Case("chunk_delta/output_final_state-1", CDR, lambda a: {"output_final_state": 1}, TE,
         "output_final_state", "bool"),
    Case("chunk_gla/output_final_state-yes", CGLA, lambda a: {"output_final_state": "yes"}, TE,
         "output_final_state", "bool"),
    Case("chunk_delta/use_qk_l2norm_in_kernel-1", CDR,
         lambda a: {"use_qk_l2norm_in_kernel": 1}, TE, "use_qk_l2norm_in_kernel", "bool"),
    Case("rec_delta/use_qk_l2norm_in_kernel-yes", RDR,
         lambda a: {"use_qk_l2norm_in_kernel": "yes"}, TE, "use_qk_l2norm_in_kernel", "bool"),
    Case("chunk_delta/check_values-1", CDR, lambda a: {"check_values": 1}, TE, "check_values",
         "bool"),
    Case("rec_gla/check_values-yes", RGLA, lambda a: {"check_values": "yes"}, TE,
         "check_values", "bool"),
    # One tensor on another device. "meta" stands in for CUDA on a CPU-only machine: the
    # device check comes after the shape and dtype checks (which meta tensors pass) and before
    # the value checks (which would fail on meta data), so it is the check that fires.
    Case("chunk_delta/k-on-meta", CDR, lambda a: {"k": a["k"].to("meta")}, VE, "k",
         "one device"),
    Case("chunk_delta/g-on-meta", CDR, lambda a: {"g": a["g"].to("meta")}, VE, "g",
         "one device"),
    Case("rec_gla/initial_state-on-meta", RGLA,
         lambda a: {"initial_state": a["initial_state"].to("meta")}, VE, "initial_state",
         "one device"),
    Case("chunk_delta/cu_seqlens-on-meta", CDR,
         lambda a: {"cu_seqlens": a["cu_seqlens"].to("meta")}, VE, "cu_seqlens", "one device",
         varlen=True),
]
CASE_PARAMS = [pytest.param(case, id=case.id) for case in CASES]


def names(argument: str) -> str:
    """A pattern for ``argument`` as a whole word of the message."""
    return rf"(?<![\w.]){re.escape(argument)}(?!\w)"


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_bad_input_raises_typed_one_line_error_naming_the_argument(case):
    with pytest.raises(case.error, match=names(case.name)) as info:
        case.call()
    message = str(info.value)
    assert type(info.value) is case.error
    assert case.expected in message
    assert "\n" not in message


@pytest.mark.parametrize("fn", ALL_FNS)
@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_the_valid_call_each_case_starts_from_passes(fn, varlen):
    o, state = fn(**valid_args(fn, varlen=varlen))
    assert o.shape == ((1 if varlen else B), T, HV, V)
    assert state.shape == ((len(DOCS) if varlen else B), HV, K, V)


@pytest.fixture
def computation_forbidden(monkeypatch):
    """Make every path that computes a recurrence (or normalises q, k) fail loudly."""

    def computation_ran(*args, **kwargs):
        raise AssertionError("computation ran")

    monkeypatch.setattr(chunked, "chunked_recurrence", computation_ran)
    monkeypatch.setattr(reference, "recurrence", computation_ran)
    monkeypatch.setattr(gdn.ops, "l2_normalize", computation_ran)


@pytest.mark.parametrize("fn", ALL_FNS)
@pytest.mark.parametrize("backend", ["auto", "reference", "torch"])
def test_forbidding_computation_stops_a_valid_call(fn, backend, computation_forbidden):
    # The control for the next test: the patched functions are the ones a call reaches.
    with pytest.raises(AssertionError, match="computation ran"):
        fn(**valid_args(fn), backend=backend)


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_bad_input_raises_before_any_computation(case, computation_forbidden):
    with pytest.raises(case.error, match=names(case.name)):
        case.call()


@pytest.mark.parametrize("fn", ALL_FNS)
def test_value_checks_are_on_by_default_on_cpu_and_can_be_switched_off(fn):
    args = valid_args(fn)
    args["g"] = -args["g"]  # g > 0: growth instead of decay
    if fn in DELTA_RULE:
        args["beta"] = args["beta"] + 2.5  # outside [0, 2]
    with pytest.raises(ValueError, match=names("g")):
        fn(**args)  # check_values=None: on for CPU tensors
    with pytest.raises(ValueError, match=names("g")):
        fn(**args, check_values=True)
    o, state = fn(**args, check_values=False)  # no check: the recurrence runs (and may blow up)
    assert o.shape == (B, T, HV, V) and state.shape == (B, HV, K, V)
