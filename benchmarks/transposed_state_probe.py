"""Does holding the state transposed shorten a state pass's step? (benchmarks/NOTES.md §17)

    PYTHONPATH=src python3 benchmarks/transposed_state_probe.py [--shapes 2,16384,16,128,128 ...]
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/transposed_state_probe.py --cpu

The state passes (state.py) hold the state as [K, BV] row blocks and multiply it as the
right operand: w S in the forward, K dS in the reverse. On an H100 a wgmma takes its right
operand from shared memory only, so every step writes the state to shared memory, fences,
and waits on each product before the next (the TTGIR of the forward pass: a local_alloc of
each row block, then warp_group_dot and a wait with nothing pending, four times a step).
Held transposed, Sᵀ [BV, K], the same products become Sᵀ wᵀ and dSᵀ Kᵀ, with the state the
LEFT operand, which a wgmma takes from registers; the update Sᵀ += Δ̃ᵀ K has Δ̃ᵀ, also in
registers, on the left. The step then has no shared-memory round trip on its chain.

Here are the plain passes (no segments, no output, K ≤ 128 as two row blocks of 64, zero
initial state, gated, with the delta term) written that way, checked against state.py's on
the same inputs and timed beside them. A variant that is faster on the GPU says whether to
rewrite the passes; the probe is not the op.
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

from gdn.ops.triton import launch, passes, wy_solve
from gdn.ops.triton.common import load_cols_stored, load_rows_stored, mma
from gdn.ops.triton.decays import load_chunk_decays
from gdn.testing import random_inputs, rel_error


@triton.jit
def _store_cols(ptr, x, t0, end, stride, col0, n_cols, BT: tl.constexpr, BD: tl.constexpr):
    """A [BD, BT] tile to rows t0 … of a packed row, transposed (x[d, t] to row t, col d)."""
    o_t = t0 + tl.arange(0, BT).to(tl.int64)
    o_d = col0 + tl.arange(0, BD)
    m = (o_t < end)[None, :] & (o_d < n_cols)[:, None]
    tl.store(ptr + o_t[None, :] * stride + o_d[:, None], x.to(ptr.dtype.element_ty), mask=m)


@triton.jit
def _store_block_t(ptr, St, row0, K, col0, V, KB: tl.constexpr, BV: tl.constexpr):
    """Sᵀ's block [BV, KB] to rows row0 … of a [K, V] row-major state."""
    o_r = row0 + tl.arange(0, KB)
    o_c = col0 + tl.arange(0, BV)
    m = (o_r < K)[None, :] & (o_c < V)[:, None]
    tl.store(ptr + o_r[None, :] * V + o_c[:, None], St.to(ptr.dtype.element_ty), mask=m)


@triton.jit
def _slice(H: tl.constexpr, HV: tl.constexpr, V: tl.constexpr, T: tl.constexpr,
           BV: tl.constexpr, BT: tl.constexpr):
    """This program's sequence, v head, q/k head, token bounds, first column, chunk count
    (rows of T tokens, the V blocks of a (sequence, head) next to each other)."""
    n_v: tl.constexpr = (V + BV - 1) // BV
    i_nh, i_v = tl.program_id(0) // n_v, tl.program_id(0) % n_v
    i_n, i_hv = i_nh // HV, i_nh % HV
    bos = i_n * T
    return i_n, i_hv, i_hv // (HV // H), bos, bos + T, i_v * BV, (T + BT - 1) // BT


@triton.jit
def forward_t_kernel(k, w, u, decays, states, v_new, ht, TT, H: tl.constexpr,
                     HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, T: tl.constexpr,
                     KB: tl.constexpr, BV: tl.constexpr, DT: tl.constexpr, BT: tl.constexpr):
    """S ← e^{Γ_C} S + K̃ᵀ (u − w S), carried as Sᵀ = [S1ᵀ S2ᵀ] ([BV, KB] each, K = 2·KB)."""
    i_n, i_hv, i_h, bos, end, col0, n_chunks = _slice(H, HV, V, T, BV, BT)
    S1 = tl.zeros([BV, KB], dtype=tl.float32)
    S2 = tl.zeros([BV, KB], dtype=tl.float32)
    for i in range(0, n_chunks):
        t0 = bos + i * BT
        e_gamma, to_end, e_last = load_chunk_decays(decays, i_hv, TT, t0, end, BT)
        p_chunk = ((i_n * n_chunks + i) * HV + i_hv).to(tl.int64) * (K * V)
        _store_block_t(states + p_chunk, S1, 0, K, col0, V, KB, BV)
        _store_block_t(states + p_chunk, S2, KB, K, col0, V, KB, BV)
        u_t = load_cols_stored(u + i_hv * V, t0, end, HV * V, col0, V, BT, BV).to(tl.float32)
        w1 = load_rows_stored(w + i_hv * K, t0, end, HV * K, 0, K, BT, KB)
        w2 = load_rows_stored(w + i_hv * K, t0, end, HV * K, KB, K, BT, KB)
        ws = mma(S1.to(DT), tl.trans(w1), tl.zeros([BV, BT], dtype=tl.float32), DT, "tf32")
        ws = mma(S2.to(DT), tl.trans(w2), ws, DT, "tf32")
        delta_t = u_t - ws                                     # Δᵀ [BV, BT]
        _store_cols(v_new + i_hv * V, delta_t, t0, end, HV * V, col0, V, BT, BV)
        delta_t = (delta_t * to_end[None, :]).to(DT)
        k1 = load_rows_stored(k + i_h * K, t0, end, H * K, 0, K, BT, KB)
        k2 = load_rows_stored(k + i_h * K, t0, end, H * K, KB, K, BT, KB)
        S1 = mma(delta_t, k1, S1 * e_last, DT, "tf32")
        S2 = mma(delta_t, k2, S2 * e_last, DT, "tf32")
    p_state = (i_n * HV + i_hv).to(tl.int64) * (K * V)
    _store_block_t(ht + p_state, S1, 0, K, col0, V, KB, BV)
    _store_block_t(ht + p_state, S2, KB, K, col0, V, KB, BV)


@triton.jit
def backward_t_kernel(q, k, w, decays, do, dv_local, d_states, d_delta, dh0, TT, scale,
                      H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                      T: tl.constexpr, KB: tl.constexpr, BV: tl.constexpr, DT: tl.constexpr,
                      BT: tl.constexpr):
    """dSᵀ ← e^{Γ_C} dSᵀ + dOᵀ Q̃ − dΔᵀ W with dΔᵀ = dv_localᵀ + (dSᵀ Kᵀ) diag(e^{Γ_C − Γ_r}),
    carried as dSᵀ = [dS1ᵀ dS2ᵀ]; d_states gets dS at each chunk's end."""
    i_n, i_hv, i_h, bos, end, col0, n_chunks = _slice(H, HV, V, T, BV, BT)
    dS1 = tl.zeros([BV, KB], dtype=tl.float32)
    dS2 = tl.zeros([BV, KB], dtype=tl.float32)
    for j in range(0, n_chunks):
        i = n_chunks - 1 - j
        t0 = bos + i * BT
        e_gamma, to_end, e_last = load_chunk_decays(decays, i_hv, TT, t0, end, BT)
        p_chunk = ((i_n * n_chunks + i) * HV + i_hv).to(tl.int64) * (K * V)
        _store_block_t(d_states + p_chunk, dS1, 0, K, col0, V, KB, BV)
        _store_block_t(d_states + p_chunk, dS2, KB, K, col0, V, KB, BV)
        k1 = load_rows_stored(k + i_h * K, t0, end, H * K, 0, K, BT, KB)
        k2 = load_rows_stored(k + i_h * K, t0, end, H * K, KB, K, BT, KB)
        kds = mma(dS1.to(DT), tl.trans(k1), tl.zeros([BV, BT], dtype=tl.float32), DT, "tf32")
        kds = mma(dS2.to(DT), tl.trans(k2), kds, DT, "tf32")
        d_d = load_cols_stored(dv_local + i_hv * V, t0, end, HV * V, col0, V, BT, BV)
        d_d = d_d.to(tl.float32) + kds * to_end[None, :]
        b_do = load_cols_stored(do + i_hv * V, t0, end, HV * V, col0, V, BT, BV)
        b_do = (b_do.to(tl.float32) * (scale * e_gamma)[None, :]).to(DT)
        _store_cols(d_delta + i_hv * V, d_d, t0, end, HV * V, col0, V, BT, BV)
        d_d = (-d_d).to(DT)
        q1 = load_rows_stored(q + i_h * K, t0, end, H * K, 0, K, BT, KB)
        q2 = load_rows_stored(q + i_h * K, t0, end, H * K, KB, K, BT, KB)
        w1 = load_rows_stored(w + i_hv * K, t0, end, HV * K, 0, K, BT, KB)
        w2 = load_rows_stored(w + i_hv * K, t0, end, HV * K, KB, K, BT, KB)
        dS1 = mma(d_d, w1, mma(b_do, q1, dS1 * e_last, DT, "tf32"), DT, "tf32")
        dS2 = mma(d_d, w2, mma(b_do, q2, dS2 * e_last, DT, "tf32"), DT, "tf32")
    p_state = (i_n * HV + i_hv).to(tl.int64) * (K * V)
    _store_block_t(dh0 + p_state, dS1, 0, K, col0, V, KB, BV)
    _store_block_t(dh0 + p_state, dS2, KB, K, col0, V, KB, BV)


def state_pass_inputs(shape, device, dtype):
    """The state passes' inputs from the op's own first stages: w, u from the wy stage (also
    used by fused_backward_probe.py)."""
    B, T, H, K, V = shape
    x = random_inputs(B=B, T=T, H=H, K=K, V=V, seed=0).to(dtype)
    q, k, v, g, beta = (t.to(device) for t in (x.q, x.k, x.v, x.g, x.beta))
    p = launch._plan(q, v, g, None, False)
    q_, k_, v_, g_, b_ = (launch._flat(t) for t in (q, k, v, g, beta))
    a = torch.empty(p.TT, p.HV, launch.BT, **p.f32)
    wy_solve.wy_solve_kernel[(p.table.num_chunks, p.HV)](
        k_, g_, b_, a, *p.chunks, BC=wy_solve.BC,
        **(launch.row_block_flags(p.flags) | launch.INVERSE_LAUNCH))
    w, u = launch._wy_apply(p, k_, v_, g_, b_, a)
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(p.TT, p.HV, V, generator=gen).to(device, dtype)
    dv_local = torch.randn(p.TT, p.HV, V, generator=gen).to(device, dtype)
    return p, q_, k_, w, u, g_, launch._decays(p, g_), do, dv_local


def _forward_t(p, k_, w, u, d_, T, BV, warps, stages):
    states = torch.empty(p.table.num_chunks, p.HV, p.K, p.V, **p.lo)
    v_new = torch.empty(p.TT, p.HV, p.V, **p.lo)
    final = torch.empty(p.B, p.HV, p.K, p.V, **p.f32)
    forward_t_kernel[(p.B * p.HV * triton.cdiv(p.V, BV),)](
        k_, w, u, d_, states, v_new, final, p.TT, H=p.H, HV=p.HV, K=p.K, V=p.V, T=T, KB=64,
        BV=BV, DT=p.flags["DT"], BT=launch.BT, num_warps=warps, num_stages=stages)
    return states, v_new, final


def _backward_t(p, q_, k_, w, d_, do, dv_local, scale, T, BV, warps, stages):
    d_states = torch.empty(p.table.num_chunks, p.HV, p.K, p.V, **p.lo)
    d_delta = torch.empty(p.TT, p.HV, p.V, **p.lo)
    dh0 = torch.empty(p.B, p.HV, p.K, p.V, **p.f32)
    backward_t_kernel[(p.B * p.HV * triton.cdiv(p.V, BV),)](
        q_, k_, w, d_, do, dv_local, d_states, d_delta, dh0, p.TT, scale, H=p.H, HV=p.HV,
        K=p.K, V=p.V, T=T, KB=64, BV=BV, DT=p.flags["DT"], BT=launch.BT, num_warps=warps,
        num_stages=stages)
    return d_states, d_delta, dh0


def run(shape, device, dtype, variants, bench) -> dict:
    B, T, H, K, V = shape
    p, q_, k_, w, u, g_, d_, do, dv_local = state_pass_inputs(shape, device, dtype)
    scale = K ** -0.5
    ref_f = passes.state_forward(p, k_, w, u, g_, d_, None, None)[:3]
    ref_b = passes.state_backward(p, q_, k_, w, d_, do, dv_local, None, want_dh0=True,
                                  scale=scale, segs=None, transitions=None, g_=g_)
    row = {"shape": shape}
    if bench:
        row["state.py forward"] = triton.testing.do_bench(
            lambda: passes.state_forward(p, k_, w, u, g_, d_, None, None))
        row["state.py reverse"] = triton.testing.do_bench(
            lambda: passes.state_backward(p, q_, k_, w, d_, do, dv_local, None, want_dh0=True,
                                          scale=scale, segs=None, transitions=None, g_=g_))
    for direction, BV, warps, stages in variants:
        name = f"transposed {direction} BV={BV} w{warps} s{stages}"
        if direction == "forward":
            def call(BV=BV, warps=warps, stages=stages):
                return _forward_t(p, k_, w, u, d_, T, BV, warps, stages)
            ref = ref_f
        else:
            def call(BV=BV, warps=warps, stages=stages):
                return _backward_t(p, q_, k_, w, d_, do, dv_local, scale, T, BV, warps, stages)
            ref = ref_b
        got = try_variant(row, name, call)
        if got is None:
            continue
        errors = [rel_error(a, b) for a, b in zip(got, ref, strict=True)]
        row[name + " errors"] = errors
        if bench:
            row[name] = triton.testing.do_bench(call)
        print(name, [f"{e:.1e}" for e in errors], row.get(name), flush=True)
    print(json.dumps({k: v for k, v in row.items() if "state.py" in k}), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="*", default=["2,16384,16,128,128",
                                                        "8,4096,16,128,128"])
    parser.add_argument("--cpu", action="store_true", help="check the kernels in the "
                        "interpreter at a tiny shape (TRITON_INTERPRET=1, float16)")
    parser.add_argument("--out", type=Path, help="write the figures here as JSON")
    args = parser.parse_args()
    if args.cpu:
        assert os.environ.get("TRITON_INTERPRET") == "1", "--cpu needs TRITON_INTERPRET=1"
        run((1, 200, 2, 128, 96), "cpu", torch.float16,
            [("forward", 32, 4, 1), ("reverse", 32, 2, 1)], bench=False)
        return
    variants = [("forward", 64, 4, 2), ("forward", 64, 4, 3), ("forward", 32, 4, 2),
                ("forward", 32, 2, 2), ("forward", 64, 4, 1), ("reverse", 32, 2, 2),
                ("reverse", 32, 4, 2), ("reverse", 64, 4, 2), ("reverse", 32, 2, 1)]
    rows = [run(tuple(int(x) for x in s.split(",")), "cuda", torch.bfloat16, variants, True)
            for s in args.shapes]
    save_rows(args.out, "transposed_state_probe", rows)


def try_variant(row: dict, name: str, call):
    """call()'s result, or None for a variant that does not compile or fit, its error in
    row[name] (also used by fused_backward_probe.py)."""
    try:
        return call()
    except Exception as error:
        row[name] = f"failed: {type(error).__name__}: {str(error)[:160]}"
        print(name, row[name], flush=True)
        return None


def save_rows(out: Path | None, name: str, rows: list) -> None:
    """A probe's rows as out/name.json with the device, torch, Triton and GDN_COMMIT (also
    used by fused_backward_probe.py); nothing without out."""
    if out:
        out.mkdir(parents=True, exist_ok=True)
        header = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                      triton=triton.__version__, commit=os.environ.get("GDN_COMMIT", "?"))
        (out / f"{name}.json").write_text(json.dumps(dict(header=header, rows=rows), indent=1))


if __name__ == "__main__":
    sys.exit(main())
