"""Is a call bound by the host? Time to enqueue a forward (or forward+backward) against the
time the GPU takes for it.

    python3 benchmarks/host_time.py --cases 8x4096-h16 8x4096-h16-gla [--backward] [--calls 50]

A call whose host side (Python planning, the custom op's dispatch, the launches) takes
longer than its kernels leaves the GPU idle between them, and benchmarks/ops.py's figure is
then the host's, not the kernels' (benchmarks/NOTES.md §18). Here `n` calls are enqueued
back to back with no synchronisation: enqueue ms is the host's time per call, total ms the
time per call until the GPU has finished them all. Enqueue close to total means host-bound.
Prints and saves JSON under benchmarks/results/host_time/.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ops as bench  # noqa: E402  (the shared header and case helpers)


def host_and_total(case: bench.Case, dtype: torch.dtype, calls: int, backward: bool,
                   backend: str, profile: int = 0) -> dict[str, float]:
    x = case.inputs(torch.device("cuda"), seed=0).to(dtype, requires_grad=backward)
    dO = torch.randn(case.B, case.T, case.HV, case.V, device="cuda", dtype=dtype)
    call = bench.BACKENDS[backend].call
    leaves = list(x.tensors().values())

    def step():
        if backward:
            for t in leaves:
                t.grad = None
            call(case.variant, x).backward(dO)
        else:
            with torch.no_grad():
                call(case.variant, x)

    for _ in range(3):   # compile and warm up
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        step()
    enqueued = time.perf_counter()
    torch.cuda.synchronize()
    done = time.perf_counter()
    if profile:   # where the host's time goes, by Python function
        profiler = cProfile.Profile()
        profiler.runcall(lambda: [step() for _ in range(calls)])
        torch.cuda.synchronize()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(profile)
        print(text.getvalue())
    return {"enqueue_ms": 1e3 * (enqueued - start) / calls,
            "total_ms": 1e3 * (done - start) / calls}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=["8x4096-h16", "8x4096-h16-gla"])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--backward", action="store_true", help="forward+backward calls")
    parser.add_argument("--backend", default="triton", choices=("triton", "fla"))
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also print the N Python functions with the most own time")
    parser.add_argument("--out", type=Path,
                        default=bench.ROOT / "benchmarks" / "results" / "host_time")
    args = parser.parse_args()
    head = bench.header(torch.device("cuda"))
    rows = []
    for name in args.cases:
        case = bench.parse_cases([name], ["gated_delta_rule"])[0]
        row = {"case": case.name, "variant": case.variant, "backend": args.backend,
               "backward": args.backward}
        row |= host_and_total(case, getattr(torch, args.dtype), args.calls, args.backward,
                              args.backend, args.profile)
        rows.append(row)
        print(f"{case.name:22} {args.backend:6} {'fwd+bwd' if args.backward else 'fwd':7} "
              f"enqueue {row['enqueue_ms']:.3f} ms  total {row['total_ms']:.3f} ms", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "-bwd" if args.backward else ""
    path = args.out / f"{bench.results_stem(head)}-{args.backend}{suffix}.json"
    path.write_text(json.dumps({"header": head, "rows": rows}, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
