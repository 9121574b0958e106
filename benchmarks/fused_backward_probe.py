"""Can one forward pass of the backward replace the state recomputation and output_backward?
(benchmarks/NOTES.md §18)

    PYTHONPATH=src python3 benchmarks/fused_backward_probe.py [--shapes 8,4096,16,128,128 ...]
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/fused_backward_probe.py --cpu

The backward today (launch.chunk_backward) recomputes the chunk states with the forward pass,
storing S at every chunk start and Δ (bf16: 268 + 134 MB at 8x4096-h16), runs the reverse
pass, and then output_backward reads S, dS and Δ back to form dq, dk's output part, dw and
dg. The reverse pass needs neither S nor Δ (math.md §4.2: dS and dΔ come from q, k, w, dO
and dv_local). So it can run first, and a forward pass that follows can form everything
output_backward forms from the state it holds in registers, S never stored:

    Δ = u − w S,   dq = scale·diag(e^Γ) dO Sᵀ + dM K,   dw = −dΔ Sᵀ,
    dk′ = diag(e^{Γ_C − Γ}) Δ dS′ᵀ + dMᵀ Q,   dM = scale·(dO Δᵀ) ⊙ D,   dg as output_backward,

with dS′ (the state's gradient at the chunk's end) read from the reverse pass's output.
Each of those products sums over V, so the program holds all of V (BV = V ≤ 128, B·HV
programs on eight warps) instead of a block of it.

Bytes a chunk and head (bf16, K = V = 128): today the recomputing pass reads k, w, u and
writes S and Δ (96 KB) and output_backward reads S, dS, dO, Δ, dΔ, q, k and writes dq, dk′,
dw (192 KB): 288 KB. The fused pass reads w, u, k, q, dO, dΔ, dS and writes dq, dk′, dw:
192 KB. Its step has 15 products (~15 MFLOP) on one program per SM, so it may be bound by
its chain instead. The probe says which, at K = 128 with a gate and the delta term, rows of
T tokens, no initial state; it is not the op.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

from gdn.ops.triton import launch, output, passes
from gdn.ops.triton.common import (
    load_rows_stored,
    mm,
    mma,
    store_rows,
    store_vec,
)
from gdn.ops.triton.decays import load_chunk_decays, load_decay_matrix
from gdn.testing import rel_error

sys.path.insert(0, str(Path(__file__).resolve().parent))
from transposed_state_probe import save_rows, state_pass_inputs, try_variant  # noqa: E402


@triton.jit
def _query_grad(b_do, S, b_q, b_k, dM, e_gamma, scale, DT: tl.constexpr):
    """Columns of one row block of K: dq = scale·diag(e^Γ) dO S_bᵀ + dM K_b, and Σ_c of the
    first term times q (dg's part from the inter-chunk output)."""
    d_q = mm(b_do, tl.trans(S.to(DT)), DT, "tf32") * (scale * e_gamma)[:, None]
    d_gamma = tl.sum(d_q * b_q.to(tl.float32), axis=1)
    return mma(dM.to(DT), b_k, d_q, DT, "tf32"), d_gamma


@triton.jit
def _key_grad(delta, dS, b_q, b_k, dM, to_end, DT: tl.constexpr):
    """Columns of one row block of K: dk′ = diag(e^{Γ_C − Γ}) Δ dS′_bᵀ + dMᵀ Q_b, and the
    write term Σ_c (first term ⊙ k) of dg."""
    d_k = mm(delta, tl.trans(dS), DT, "tf32") * to_end[:, None]
    write = tl.sum(d_k * b_k.to(tl.float32), axis=1)
    return mma(tl.trans(dM).to(DT), b_q, d_k, DT, "tf32"), write


@triton.jit
def _rows_desc(x, row_stride, n_rows, n_cols, BR: tl.constexpr, BC: tl.constexpr,
               TMA: tl.constexpr):
    """A TMA descriptor of a [n_rows, n_cols] row-major view (rows past n_rows read as 0),
    or None where the loads go through pointers."""
    if TMA:
        desc = tl.make_tensor_descriptor(x, shape=[n_rows, n_cols], strides=[row_stride, 1],
                                         block_shape=[BR, BC])
    else:
        desc = None
    return desc


@triton.jit
def _tile(desc, x, t0, end, stride, col0, n_cols, BT: tl.constexpr, BD: tl.constexpr,
          TMA: tl.constexpr):
    """Rows t0 … t0+BT−1, columns col0 … of a packed row, by TMA or by pointers."""
    if TMA:
        tile = desc.load([t0, col0])
    else:
        tile = load_rows_stored(x, t0, end, stride, col0, n_cols, BT, BD)
    return tile


@triton.jit
def _put(desc, x, value, t0, end, stride, col0, n_cols, BT: tl.constexpr, BD: tl.constexpr,
         TMA: tl.constexpr):
    if TMA:
        desc.store([t0, col0], value.to(desc.dtype))
    else:
        store_rows(x, value, t0, end, stride, col0, n_cols, BT, BD)


@triton.jit
def fused_kernel(q, k, w, u, decays, do, d_delta, d_states, dq, dk, dw, dg, TT, scale, n_rows,
                 H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                 T: tl.constexpr, KB: tl.constexpr, BV: tl.constexpr, DT: tl.constexpr,
                 BT: tl.constexpr, PARTS: tl.constexpr = 4, TMA: tl.constexpr = False):
    """One (sequence, v head) through its chunks, S = [S1; S2] ([KB, BV] each, K = 2·KB,
    BV ≥ V): the step of state.py's forward pass plus output_backward's products (PARTS
    of them, for measuring: 1 dw, 2 and dq, 3 and dk′, 4 and dg). TMA: tiles through tensor
    descriptors (no address registers), rows past the sequence's end read as zeros. n_rows:
    NC·HV·K, the rows of d_states seen as [n_rows, V]."""
    i_nh = tl.program_id(0)
    i_n, i_hv = i_nh // HV, i_nh % HV
    i_h = i_hv // (HV // H)
    bos = i_n * T
    end = bos + T
    n_chunks = (T + BT - 1) // BT
    w_d = _rows_desc(w + i_hv * K, HV * K, end, K, BT, KB, TMA)
    u_d = _rows_desc(u + i_hv * V, HV * V, end, V, BT, BV, TMA)
    k_d = _rows_desc(k + i_h * K, H * K, end, K, BT, KB, TMA)
    q_d = _rows_desc(q + i_h * K, H * K, end, K, BT, KB, TMA)
    do_d = _rows_desc(do + i_hv * V, HV * V, end, V, BT, BV, TMA)
    dd_d = _rows_desc(d_delta + i_hv * V, HV * V, end, V, BT, BV, TMA)
    dS_d = _rows_desc(d_states, V, n_rows, V, KB, BV, TMA)
    dq_d = _rows_desc(dq + i_h * K, H * K, end, K, BT, KB, TMA)
    dk_d = _rows_desc(dk + i_hv * K, HV * K, end, K, BT, KB, TMA)
    dw_d = _rows_desc(dw + i_hv * K, HV * K, end, K, BT, KB, TMA)
    S1 = tl.zeros([KB, BV], dtype=tl.float32)
    S2 = tl.zeros([KB, BV], dtype=tl.float32)
    for i in range(0, n_chunks):
        t0 = bos + i * BT
        e_gamma, to_end, e_last = load_chunk_decays(decays, i_hv, TT, t0, end, BT)
        w1 = _tile(w_d, w + i_hv * K, t0, end, HV * K, 0, K, BT, KB, TMA)
        w2 = _tile(w_d, w + i_hv * K, t0, end, HV * K, KB, K, BT, KB, TMA)
        ws = mma(w2, S2.to(DT), mm(w1, S1.to(DT), DT, "tf32"), DT, "tf32")
        b_u = _tile(u_d, u + i_hv * V, t0, end, HV * V, 0, V, BT, BV, TMA)
        delta = (b_u.to(tl.float32) - ws).to(DT)
        if PARTS >= 1:
            b_dd = _tile(dd_d, d_delta + i_hv * V, t0, end, HV * V, 0, V, BT, BV, TMA)
            _put(dw_d, dw + i_hv * K, -mm(b_dd, tl.trans(S1.to(DT)), DT, "tf32"), t0, end,
                 HV * K, 0, K, BT, KB, TMA)
            _put(dw_d, dw + i_hv * K, -mm(b_dd, tl.trans(S2.to(DT)), DT, "tf32"), t0, end,
                 HV * K, KB, K, BT, KB, TMA)
        k1 = _tile(k_d, k + i_h * K, t0, end, H * K, 0, K, BT, KB, TMA)
        k2 = _tile(k_d, k + i_h * K, t0, end, H * K, KB, K, BT, KB, TMA)
        if PARTS >= 2:
            b_do = _tile(do_d, do + i_hv * V, t0, end, HV * V, 0, V, BT, BV, TMA)
            dM = mm(b_do, tl.trans(delta), DT, "tf32") * load_decay_matrix(
                decays, i_hv, TT, t0, end, BT) * scale
            q1 = _tile(q_d, q + i_h * K, t0, end, H * K, 0, K, BT, KB, TMA)
            q2 = _tile(q_d, q + i_h * K, t0, end, H * K, KB, K, BT, KB, TMA)
            d_q, d_gamma = _query_grad(b_do, S1, q1, k1, dM, e_gamma, scale, DT)
            _put(dq_d, dq + i_h * K, d_q, t0, end, H * K, 0, K, BT, KB, TMA)
            d_q, part = _query_grad(b_do, S2, q2, k2, dM, e_gamma, scale, DT)
            _put(dq_d, dq + i_h * K, d_q, t0, end, H * K, KB, K, BT, KB, TMA)
            d_gamma += part
        if PARTS >= 3:
            row = ((i_n * n_chunks + i) * HV + i_hv) * K
            dS1 = _tile(dS_d, d_states, row, n_rows, V, 0, V, KB, BV, TMA)
            dS2 = _tile(dS_d, d_states, row + KB, n_rows, V, 0, V, KB, BV, TMA)
            S_dS = tl.sum(tl.sum(S1 * dS1.to(tl.float32), axis=1), axis=0)
            S_dS += tl.sum(tl.sum(S2 * dS2.to(tl.float32), axis=1), axis=0)
            d_k, write = _key_grad(delta, dS1, q1, k1, dM, to_end, DT)
            _put(dk_d, dk + i_hv * K, d_k, t0, end, HV * K, 0, K, BT, KB, TMA)
            d_k, part = _key_grad(delta, dS2, q2, k2, dM, to_end, DT)
            _put(dk_d, dk + i_hv * K, d_k, t0, end, HV * K, KB, K, BT, KB, TMA)
            write += part
        if PARTS >= 4:
            qk = mma(q2, tl.trans(k2), mm(q1, tl.trans(k1), DT, "tf32"), DT, "tf32")
            E = dM * qk
            d_gamma += tl.sum(E, axis=1) - tl.sum(E, axis=0) - write
            d_last = e_last * S_dS + tl.sum(write, axis=0)
            store_vec(dg + i_hv, tl.cumsum(d_gamma, axis=0, reverse=True) + d_last, t0, end,
                      HV, BT)

        delta = (delta.to(tl.float32) * to_end[:, None]).to(DT)
        S1 = mma(tl.trans(k1), delta, S1 * e_last, DT, "tf32")
        S2 = mma(tl.trans(k2), delta, S2 * e_last, DT, "tf32")


def _inputs(shape, device, dtype):
    """The backward's tensors up to output_backward, from the op's own stages: the state
    passes' inputs, then the reverse pass's dS and dΔ."""
    B, T, H, K, V = shape
    p, q_, k_, w, u, g_, d_, do, dv_local = state_pass_inputs(shape, device, dtype)
    scale = K ** -0.5
    d_states, d_delta, _ = passes.state_backward(
        p, q_, k_, w, d_, do, dv_local, None, want_dh0=True, scale=scale, segs=None,
        transitions=None, g_=g_)
    return p, q_, k_, w, u, g_, d_, do, d_states, d_delta, scale


def _today(p, q_, k_, w, u, g_, d_, do, d_states, d_delta, scale):
    """The recomputing forward pass and output_backward, as launch.chunk_backward runs them."""
    states, v_new, _, _ = passes.state_forward(p, k_, w, u, g_, d_, None, None)
    dq = torch.empty(p.TT, p.H, p.K, device=q_.device, dtype=q_.dtype)
    dk = torch.empty(p.TT, p.HV, p.K, **p.lo)
    dw = torch.empty(p.TT, p.HV, p.K, **p.lo)
    o_flags = launch.output_backward_flags(p)
    n_kb = triton.cdiv(p.K, o_flags["KB"])
    dg = torch.empty(n_kb, p.TT, p.HV, **p.f32)
    output.output_backward_kernel[(p.table.num_chunks * n_kb, p.H)](
        q_, k_, g_, v_new, do, d_delta, states, d_states, dq, dk, dw, dq, dk, dg, *p.chunks,
        scale, p.TT * p.HV, 0, V=p.V, BV=launch.OUTPUT_BACKWARD_BV, DELTA=True, **o_flags)
    return dq, dk, dw, dg.sum(0)


def _fused(p, q_, k_, w, u, d_, do, d_states, d_delta, scale, T, warps, stages, tma, parts=4):
    dq = torch.full((p.TT, p.H, p.K), float("nan"), device=q_.device, dtype=q_.dtype)
    dk = torch.full((p.TT, p.HV, p.K), float("nan"), **p.lo)
    dw = torch.full((p.TT, p.HV, p.K), float("nan"), **p.lo)
    dg = torch.full((p.TT, p.HV), float("nan"), **p.f32)
    fused_kernel[(p.B * p.HV,)](
        q_, k_, w, u, d_, do, d_delta, d_states, dq, dk, dw, dg, p.TT, scale,
        p.table.num_chunks * p.HV * p.K, H=p.H, HV=p.HV, K=p.K, V=p.V, T=T, KB=p.K // 2,
        BV=triton.next_power_of_2(p.V), DT=p.flags["DT"], BT=launch.BT, PARTS=parts, TMA=tma,
        num_warps=warps, num_stages=stages)
    return dq, dk, dw, dg


def run(shape, device, dtype, variants, bench) -> dict:
    B, T, H, K, V = shape
    assert K in (64, 128) and V <= 128, "the probe holds K as two row blocks and all of V"
    p, q_, k_, w, u, g_, d_, do, d_states, d_delta, scale = _inputs(shape, device, dtype)
    ref = _today(p, q_, k_, w, u, g_, d_, do, d_states, d_delta, scale)
    row = {"shape": shape}
    if bench:
        row["today: recompute + output_backward"] = triton.testing.do_bench(
            lambda: _today(p, q_, k_, w, u, g_, d_, do, d_states, d_delta, scale))
        row["today: recompute alone"] = triton.testing.do_bench(
            lambda: passes.state_forward(p, k_, w, u, g_, d_, None, None))
    for warps, stages, tma, parts in variants:
        name = f"fused w{warps} s{stages}" + (" tma" if tma else "") + f" parts{parts}"

        def call(warps=warps, stages=stages, tma=tma, parts=parts):
            return _fused(p, q_, k_, w, u, d_, do, d_states, d_delta, scale, T, warps, stages,
                          bool(tma), parts)
        got = try_variant(row, name, call)
        if got is None:
            continue
        errors = {n: rel_error(a, b) for n, a, b in zip(("dq", "dk", "dw", "dg"), got, ref,
                                                         strict=True) if parts == 4}
        row[name + " errors"] = errors
        if bench:
            row[name] = triton.testing.do_bench(call)
        print(name, {n: f"{e:.1e}" for n, e in errors.items()}, row.get(name), flush=True)
    print(json.dumps({k: v for k, v in row.items() if k.startswith("today")}), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="*", default=["8,4096,16,128,128"])
    parser.add_argument("--variants", nargs="*",
                        default=["8:1:0:4", "8:1:1:4", "8:2:1:4", "8:1:1:1", "8:1:1:2"],
                        help="warps:stages:tma:parts of the fused pass")
    parser.add_argument("--cpu", action="store_true", help="check the kernel in the "
                        "interpreter at tiny shapes (TRITON_INTERPRET=1, float32 and float16)")
    parser.add_argument("--out", type=Path, help="write the figures here as JSON")
    args = parser.parse_args()
    if args.cpu:
        assert os.environ.get("TRITON_INTERPRET") == "1", "--cpu needs TRITON_INTERPRET=1"
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8))
        for dtype in (torch.float32, torch.float16):
            run((2, 200, 2, 128, 96), "cpu", dtype, [(4, 1, 0, 4), (4, 1, 1, 4)], bench=False)
        return
    variants = [tuple(int(x) for x in v.split(":")) for v in args.variants]
    # Tensor descriptors made on the device need global scratch memory for themselves.
    triton.set_allocator(lambda size, align, stream: torch.empty(size, device="cuda",
                                                                 dtype=torch.int8))
    rows = [run(tuple(int(x) for x in s.split(",")), "cuda", torch.bfloat16, variants, True)
            for s in args.shapes]
    save_rows(args.out, "fused_backward_probe", rows)


if __name__ == "__main__":
    sys.exit(main())
