"""The forward's wy stage in one kernel (``wy_forward``, GDN_TRITON_TILES=wy_fused=1) against
wy_solve + wy_apply and against w = A diag(β e^Γ) K, u = A diag(β) V formed in float64, on
the awkward shapes of the wy_solve tests, in Triton's interpreter and on the GPU; and the
whole op with it against the op without it."""

import pytest
import torch
from test_triton_wy_solve import CASES, _a_float64, _chunk_spans
from triton_cases import COMMON_CASES, case_inputs, interpreter_only, op_for

from gdn.testing import forward_backward, random_inputs, rel_error

pytest.importorskip("triton")


def _two_ways(x, exact: bool):
    """(A, w, u) from wy_forward_kernel, then from wy_solve + wy_apply; outputs NaN-poisoned
    so that an unwritten element fails."""
    from gdn.ops.triton import launch, wy_solve

    p = launch._plan(x.q, x.v, x.g, x.cu_seqlens, exact)
    k_, v_, g_, b_ = (launch._flat(t) for t in (x.k, x.v, x.g, x.beta))
    runs = []
    for fused in (True, False):
        a = torch.full((p.TT, p.HV, launch.BT), float("nan"), device=x.k.device)
        if fused:
            w, u = launch._wy_forward(p, k_, v_, g_, b_, a, poison=True)
        else:
            wy_solve.wy_solve_kernel[(p.table.num_chunks, p.HV)](
                k_, g_, b_, a, *p.chunks, BC=wy_solve.BC, **launch._solve_flags(p))
            w, u = launch._wy_apply(p, k_, v_, g_, b_, a)
        runs.append((a, w, u))
    return runs


def _wu_float64(x) -> tuple[torch.Tensor, torch.Tensor]:
    """w = A diag(β e^Γ) K and u = A diag(β) V of every chunk in float64 (math.md §2.2),
    [TT, HV, K] and [TT, HV, V]."""
    from gdn.ops.prepare import expand_heads

    B, T, HV, V = x.v.shape
    a = _a_float64(x)
    k = expand_heads(x.k, HV).double().flatten(0, 1)          # [TT, HV, K]
    v = x.v.double().flatten(0, 1)
    beta = x.beta.double().flatten(0, 1)                        # [TT, HV]
    g = None if x.g is None else x.g.double().flatten(0, 1)
    w = torch.zeros_like(k)
    u = torch.zeros_like(v)
    for lo, hi in _chunk_spans(x, B * T):
        a_c = a[lo:hi, :, :hi - lo].transpose(0, 1)             # [HV, n, n]
        kb = beta[lo:hi] if g is None else beta[lo:hi] * g[lo:hi].cumsum(0).exp()
        w[lo:hi] = (a_c @ (kb.T[:, :, None] * k[lo:hi].transpose(0, 1))).transpose(0, 1)
        u[lo:hi] = (a_c @ (beta[lo:hi].T[:, :, None] * v[lo:hi].transpose(0, 1))).transpose(0, 1)
    return w, u


def _check(x, exact: bool, bound: float):
    (a, w, u), (a0, w0, u0) = _two_ways(x, exact)
    # A comes from the same code in both kernels: the same bits.
    assert torch.equal(a, a0)
    w64, u64 = _wu_float64(x)
    for name, fused, apart, exact64 in (("w", w, w0, w64), ("u", u, u0, u64)):
        assert torch.isfinite(fused).all(), name
        # As close to float64 as wy_apply's, within a rounding of the hand-off dtype.
        err, err0 = rel_error(fused, exact64), rel_error(apart, exact64)
        assert err <= max(bound, 1.5 * err0), (name, err, err0)


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_wy_forward_matches_float64(case, dtype):
    kwargs, gate_scale = CASES[case]
    x = random_inputs(**kwargs, dtype=dtype, seed=7)
    if x.g is not None:
        x.g = (x.g.double() * gate_scale).to(dtype)
    _check(x, exact=dtype == torch.float32, bound=1e-6 if dtype == torch.float32 else 1e-3)


OP_CASES = {
    **COMMON_CASES,
    "gva_varlen_v100": (dict(T=150, H=2, HV=4, K=32, V=100, initial_state=True,
                             doc_lengths=[1, 70, 0, 14, 65]), True, False),
    "gated_segmented": (dict(B=2, T=300, H=1, HV=2, K=16, V=20, initial_state=True), True,
                        True),
}


def _same_op_either_way(case, dtype, monkeypatch, **kwargs):
    from gdn.ops.triton import launch

    x, delta = case_inputs(OP_CASES[case], dtype, 71, monkeypatch)
    runs = []
    for fused in (False, True):
        monkeypatch.setattr(launch, "WY_FUSED", fused)
        runs.append(forward_backward(op_for(delta), x, seed=8, backend="triton", **kwargs))
    (o0, s0, g0), (o1, s1, g1) = runs
    # w and u differ by the order of float32 sums (and a rounding to the hand-off dtype):
    # outputs and the state by about that, the gradients (whose backward recomputes w and u
    # with wy_apply either way) likewise.
    bound = 1e-5 if dtype == torch.float32 else 3e-3
    assert rel_error(o1, o0) <= bound
    assert rel_error(s1, s0) <= bound
    assert g0.keys() == g1.keys()
    for name, grad in g0.items():
        assert rel_error(g1[name], grad, floor_rms=1e-3) <= bound, name


@interpreter_only
@pytest.mark.parametrize(("case", "dtype"), [
    *((case, dtype) for case in ("gated", "deltanet")
      for dtype in (torch.float32, torch.float16)),
    # The long ones in fp16 only (each call ~15 s in the interpreter).
    ("gva_varlen_v100", torch.float16), ("gated_segmented", torch.float16)])
def test_the_op_with_the_fused_wy_forward_matches_the_op_without(case, dtype, monkeypatch):
    _same_op_either_way(case, dtype, monkeypatch)


@interpreter_only
def test_the_fused_wy_forward_hands_over_float32_with_precise_state(monkeypatch):
    """precise_state: w and u leave the fused kernel in float32, as they leave wy_apply."""
    _same_op_either_way("gated", torch.float16, monkeypatch, precise_state=True)


@interpreter_only
def test_the_forward_launches_one_wy_kernel_when_fused(monkeypatch):
    from gdn.ops import chunk_gated_delta_rule
    from gdn.ops.triton import launch

    launches = []
    for name in ("_wy_forward", "_wy_apply"):
        original = getattr(launch, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            launches.append(_name)
            return _original(*args, **kwargs)
        monkeypatch.setattr(launch, name, counted)
    x = random_inputs(B=1, T=70, H=1, K=16, V=16, dtype=torch.float32, seed=72)
    for fused, expected in ((True, ["_wy_forward"]), (False, ["_wy_apply"])):
        monkeypatch.setattr(launch, "WY_FUSED", fused)
        launches.clear()
        chunk_gated_delta_rule(**x.kwargs(), backend="triton")
        assert launches == expected


@pytest.mark.gpu
@pytest.mark.parametrize("K", [128, 256])
def test_wy_forward_matches_float64_on_gpu(K):
    """bf16 inputs at a full shape, V = 100 (a ragged V block), GVA, ragged last chunk."""
    x = random_inputs(B=2, T=4096 - 7, H=4, HV=8, K=K, V=100, dtype=torch.bfloat16,
                      device="cuda", seed=9)
    _check(x, exact=False, bound=5e-3)
