"""The bytes each Triton kernel moves in one forward+backward, against its measured time: how
far the kernel decomposition itself is from a time target (benchmarks/NOTES.md §22).

    python3 benchmarks/byte_budget.py benchmarks/results/stages/<stages.py file>.json [...]

For a stages.py result (the delta rule, gated or not, bf16, the default recomputing backward)
it counts each kernel's reads and writes of the tensors handed between kernels, by the
launchers' arguments (launch.py, passes.py), prints GB, measured ms, achieved TB/s and the
time those bytes take at the bandwidth asked, and sums them: a floor of this decomposition,
however fast each kernel gets. Small tensors (g, β, dg's parts) count too; re-reads that L2
serves do not, nor the segmented passes' extra work (long rows, passes.plan_segments: their
transitions, combine and second pass), so a segmented shape's figure is a lower bound. Saves
JSON under benchmarks/results/budget/.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

BT = 64                 # the chunk
HBM3_PEAK_TBS = 3.35    # H100 SXM's HBM3 (NVIDIA's figure)


def kernel_bytes(B: int, T: int, H: int, HV: int, K: int, V: int, *, gated: bool,
                 element: int = 2, even_states: bool = False) -> dict[str, float]:
    """Bytes each kernel reads and writes in one forward+backward (all its calls), for 16-bit
    inputs (``element`` bytes) and the default launches: the state passes form the writes
    from A and v (math.md §3.10), reading A's hi part only; the training forward keeps Δ and
    the backward forms the chunk states from it (math.md §4.6); up to K = 128 the forward's
    state pass computes the output (math.md §3.9), above it output_forward does from the
    stored states. (Before 2026-12-03 wy_apply formed w and u, which the passes read, and
    before 2026-12-07 a dv_local kernel formed scale·PᵀdO for the reverse pass, which now
    reads the forward's chunk scores: the budget files of that code count them. Since
    NOTES.md §31.7 the reverse pass writes dv and hands on dB_u = Aᵀ dΔ in dΔ's place, where
    wy_backward wrote dv. Before 722ccfe the backward recomputed Δ as well: k, A's hi part,
    v and the rows with β read, Δ and the states written, where now k, Δ and the gate's
    rows are read and the states written.) ``even_states`` (the default since f4edcdc where
    the forward's pass computes the output, math.md §4.8): the forward writes the even
    chunks' states as well, there is no pass from Δ, and output_backward reads the kept half
    (each odd chunk reads its pair's kept state, k and Δ again, from L2: not counted)."""
    TT = B * T
    qk = TT * H * K * element                  # q or k (or dq, dk: one per q/k head)
    w = TT * HV * K * element                  # dw, dk's output part (per v head)
    v = TT * HV * V * element                  # v, Δ, dO, o, dΔ, dv
    a = TT * HV * BT * 2 * element             # A as two 16-bit parts (hi, lo)
    a_hi = a // 2                              # what the state passes read of it
    gate = TT * HV * element if gated else 0   # g (read), dg (float32 written and read)
    beta = TT * HV * element
    row = TT * HV * 4                          # one float32 row of the decay table
    # The table's rows a pass reads: e^Γ, e^{Γ_C − Γ} (and the forward pass with the output
    # Γ's pair) if gated, β always.
    forward_rows, reverse_rows = (4 if gated else 0) * row + row, (2 if gated else 0) * row + row
    states = -(-T // BT) * B * HV * K * V * element   # one [K, V] state per chunk and v head
    dg_parts = (2 if K > 64 else 1) * TT * HV * 4 if gated else 0
    scores = TT * HV * BT * element            # scale·P per chunk and v head (scores.py)
    fused = K <= 128
    # The forward writes Δ for the backward (fused: besides o; unfused: for output_forward).
    forward_pass = qk + a_hi + v + forward_rows + (qk + v + scores + v if fused
                                                   else states + v)
    recompute = qk + v + (2 if gated else 0) * row + states     # k, Δ, e^Γ rows → states
    even = even_states and fused
    if even:
        forward_pass += states // 2
        recompute = 0
    backward_states = states // 2 if even else states          # what output_backward reads
    return {
        "wy_solve_kernel": qk + gate + beta + a,
        "chunk_decays_kernel": 2 * (gate + beta + (5 if gated else 1) * row),  # two calls
        "state_forward_kernel": forward_pass + recompute,
        "output_forward_kernel": 0 if fused else qk + qk + gate + v + states + v + scores,
        # reads q, k, A's hi part, the table, dO, the scores; writes dS, dB_u and dv
        "state_backward_kernel": qk + qk + a_hi + reverse_rows + v + scores + states + v + v,
        "output_backward_kernel": (qk + qk + gate + v + v + v + backward_states + states
                                   + qk + w + w + dg_parts),
        "wy_backward_kernel": (qk + v + gate + beta + a + w + v + w + qk
                               + 2 * TT * HV * 4 * gated + TT * HV * 4),
    }


def budget(result: dict, bandwidth_tbs: float) -> dict:
    B, T, H, K, V, *rest = (int(x) for x in result["case"].split("x"))
    HV = rest[0] if rest else H
    if result["dtype"] not in ("bfloat16", "float16") or result.get("forward_only"):
        raise SystemExit(f"{result['case']}: byte_budget counts 16-bit forward+backward runs")
    if result["variant"] not in ("gated_delta_rule", "deltanet"):
        raise SystemExit(f"{result['variant']}: byte_budget counts the delta rule only")
    tiles = result["header"].get("gdn_env", {}).get("GDN_TRITON_TILES", "")
    counted = kernel_bytes(B, T, H, HV, K, V, gated=result["variant"] == "gated_delta_rule",
                           even_states="even_states=1" in tiles)
    measured = result["ms_per_fwd_bwd"]
    rows = []
    for name, n_bytes in counted.items():
        ms = sum(t for kernel, t in measured.items() if kernel.startswith(name))
        if n_bytes == 0 and ms == 0:
            continue
        rows.append(dict(kernel=name, gb=n_bytes / 1e9, ms=ms,
                         tbs=n_bytes / ms / 1e9 if ms else None,
                         floor_ms=n_bytes / bandwidth_tbs / 1e9))
    other = sum(measured.values()) - sum(r["ms"] for r in rows)
    rows.append(dict(kernel="other (sums, casts)", gb=0.0, ms=other, tbs=None,
                     floor_ms=0.0))
    total_bytes = sum(counted.values())
    kernels_ms = sum(r["ms"] for r in rows)
    return dict(case=result["case"], variant=result["variant"],
                commit=result["header"]["commit"], device=result["header"]["device"],
                bandwidth_tbs=bandwidth_tbs, rows=rows, gb=total_bytes / 1e9,
                kernels_ms=kernels_ms, tbs=total_bytes / kernels_ms / 1e9,
                floor_ms=total_bytes / bandwidth_tbs / 1e9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, nargs="+", help="stages.py JSON files")
    parser.add_argument("--bandwidth", type=float, default=HBM3_PEAK_TBS,
                        help="TB/s for the floor column (default: H100 SXM's HBM3 peak)")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parent / "results" / "budget")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    for path in args.results:
        b = budget(json.loads(path.read_text()), args.bandwidth)
        print(f"{b['case']} {b['variant']} at {b['commit']} on {b['device']}: "
              f"{b['gb']:.2f} GB, {b['kernels_ms']:.3f} ms of kernels, {b['tbs']:.2f} TB/s; "
              f"floor at {args.bandwidth} TB/s {b['floor_ms']:.3f} ms")
        print(f"  {'kernel':24} {'GB':>6} {'ms':>7} {'TB/s':>5} {'floor ms':>8}")
        for r in b["rows"]:
            tbs = f"{r['tbs']:5.2f}" if r["tbs"] else "    —"
            print(f"  {r['kernel']:24} {r['gb']:6.3f} {r['ms']:7.3f} {tbs} {r['floor_ms']:8.3f}")
        if not args.no_save:
            args.out.mkdir(parents=True, exist_ok=True)
            target = args.out / f"{path.stem}-budget.json"
            target.write_text(json.dumps(b, indent=1) + "\n")
            print(f"wrote {target}")


if __name__ == "__main__":
    main()
