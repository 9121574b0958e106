"""Time the reverse state pass under launch choices (BV, warps, stages, gate source) at
several shapes, in one process (benchmarks/NOTES.md §17).

    PYTHONPATH=src python3 benchmarks/state_sweep.py --shapes 8,4096,16,128,128 \
        --configs 32:2:2:0 64:4:2:0 --out $OUT/sweep

A config is BV:warps:stages:inline (inline 1 = the decays from g, 0 = from the table). Each
is set the way GDN_TRITON_TILES would set it, and the pass is timed plain (no segments) with
do_bench on the op's own inputs (``_inputs``: wy_solve's A and the decay table of random
inputs; dO and the chunk scores random). stages.py times the whole op; this times one pass under
many choices without a process and a compile of the op per choice.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import triton

from gdn.ops.triton import launch, passes, wy_solve
from gdn.testing import random_inputs


def _inputs(shape, device, dtype):
    """The reverse pass's inputs at (B, T, H, K, V), gated, with the delta term: the launch
    plan, q, k, wy_solve's A, g, the decay table, and random dO and chunk scores."""
    B, T, H, K, V = shape
    x = random_inputs(B=B, T=T, H=H, K=K, V=V, seed=0, device=device).to(dtype)
    p = launch._plan(x.q, x.v, x.g, None, exact=False)
    q_, k_, v_, g_, b_ = (launch._flat(t) for t in (x.q, x.k, x.v, x.g, x.beta))
    a = torch.empty(launch.a_shape(p.TT, p.HV, p.lo["dtype"]), **p.lo)
    wy_solve.wy_solve_kernel[(p.table.num_chunks, p.HV)](k_, g_, b_, a, *p.chunks,
                                                         BC=wy_solve.BC,
                                                         **launch._solve_flags(p))
    scores = torch.randn(launch.scores_shape(p.table.num_chunks, p.HV), **p.lo)
    return (p, q_, k_, a, g_, launch._decays(p, g_, b_), torch.randn_like(v_), scores)


def time_reverse(shape, configs) -> dict:
    p, q_, k_, a, g_, d_, do, chunk_scores = _inputs(shape, "cuda", torch.bfloat16)
    scale = shape[3] ** -0.5
    row = {}
    for config in configs:
        BV, warps, stages, inline = (int(x) for x in config.split(":"))
        passes.TILES["state_bwd_bv"] = BV
        passes.STATE_WARPS["reverse"], passes.STATE_STAGES["reverse"] = warps, stages
        passes.TILES["inline_gates"] = inline

        def call():
            return passes.state_backward(p, q_, k_, a, d_, do, chunk_scores, None,
                                         want_dh0=True, scale=scale, segs=None,
                                         transitions=None, g_=g_)
        try:
            call()
            row[config] = triton.testing.do_bench(call)
        except Exception as error:          # a choice that does not fit or compile
            row[config] = f"failed: {type(error).__name__}: {str(error)[:100]}"
        print(shape, config, row[config], flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", required=True)
    parser.add_argument("--configs", nargs="+", required=True)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = {s: time_reverse(tuple(int(x) for x in s.split(",")), args.configs)
            for s in args.shapes}
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        header = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                      triton=triton.__version__, commit=os.environ.get("GDN_COMMIT", "?"))
        (args.out / f"state_sweep-{header['commit']}.json").write_text(
            json.dumps(dict(header=header, reverse_ms=rows), indent=1))


if __name__ == "__main__":
    main()
