"""Where the time goes: CUDA time per Triton kernel of one forward+backward, by stage.

    python3 benchmarks/stages.py --shape 8,4096,16,128,128 [--fp32-operands] [--forward] [--tag T]
    GDN_TRITON_TILES=state_bv=16 python3 benchmarks/stages.py --tag state_bv16
    GDN_TRITON_SEGMENT_CHUNKS=0 python3 benchmarks/stages.py --shape 1,65536,16,128,128 \
        --tag unsegmented
    ncu --kernel-name regex:state_backward --launch-skip 2 --launch-count 1 \
        python3 benchmarks/stages.py --shape 2,16384,16,128,128 --external

Runs the op a few times under torch.profiler and prints each kernel's mean time per
forward+backward, so an optimisation can name the kernel it should move (benchmarks/NOTES.md).
Saves JSON under benchmarks/results/stages/ with the same header as benchmarks/ops.py.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ops as bench  # noqa: E402  (the shared header and case helpers)


def profile(case: bench.Case, dtype: torch.dtype, steps: int,
            backend: str = "triton", forward_only: bool = False) -> dict[str, float]:
    x = case.inputs(torch.device("cuda"), seed=0).to(dtype, requires_grad=True)
    dO = torch.randn(case.B, case.T, case.HV, case.V, device="cuda", dtype=dtype)
    call = bench.BACKENDS[backend].call
    leaves = list(x.tensors().values())

    def step():
        # Gradients cleared first, as ops.py's timing does: otherwise every call after the
        # first adds into .grad, an element-wise kernel that is not the op's (0.40 ms at
        # 8x4096-h16 in the profiles up to NOTES.md §9).
        for t in leaves:
            t.grad = None
        if forward_only:   # as ops.py times the forward: no autograd
            with torch.no_grad():
                call(case.variant, x)
            return
        call(case.variant, x).backward(dO)

    for _ in range(2):  # compile and warm up outside the profile
        step()
    torch.cuda.synchronize()
    if steps == 0:   # --external: the calls above are for a profiler outside the process
        return {}
    activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    per_kernel = defaultdict(float)
    for event in prof.key_averages():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[event.key] += event.device_time_total / steps / 1000.0   # ms
    return dict(sorted(per_kernel.items(), key=lambda kv: -kv[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="8,4096,16,128,128", help="B,T,H,K,V[,HV]")
    parser.add_argument("--variant", default="gated_delta_rule", choices=bench.VARIANTS)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--backend", default="triton",
                        choices=("triton", "triton-keep", "triton-exact", "triton-precise",
                                 "fla"),
                        help="fla: the yardstick's kernels, stage by stage, for comparison")
    parser.add_argument("--fp32-operands", action="store_true",
                        help="float32 operands and intermediates for bf16 inputs")
    parser.add_argument("--external", action="store_true",
                        help="two forward+backward calls without torch.profiler, nothing "
                             "saved: for an external profiler (ncu)")
    parser.add_argument("--forward", action="store_true",
                        help="the forward alone (no autograd), as ops.py times it")
    parser.add_argument("--tag", default="", help="suffix of the results file, e.g. state_bv16")
    parser.add_argument("--out", type=Path, default=bench.ROOT / "benchmarks" / "results" /
                        "stages")
    args = parser.parse_args()
    if args.fp32_operands:
        os.environ["GDN_TRITON_FP32_OPERANDS"] = "1"
    if args.tag and not re.fullmatch(r"[A-Za-z0-9._-]+", args.tag):
        parser.error(f"--tag: {args.tag!r} must be letters, digits, '.', '_' or '-'")
    case = bench.parse_cases([args.shape], [args.variant])[0]
    if args.external:
        profile(case, getattr(torch, args.dtype), 0, args.backend, args.forward)
        return
    times = profile(case, getattr(torch, args.dtype), args.steps, args.backend, args.forward)
    head = bench.header(torch.device("cuda"))
    # The file first: a caller that pipes the table into `head` must not lose it (NOTES §10).
    args.out.mkdir(parents=True, exist_ok=True)
    tag = f"{case.name}-{args.variant}-{args.dtype}{'-fp32ops' if args.fp32_operands else ''}"
    tag += "-fwd" if args.forward else ""
    tag += f"-{args.tag}" if args.tag else ""
    # The backend in the name unless it is the default: two backends in one call (triton
    # and triton-keep, NOTES.md §19) had written one file.
    tag += f"-{args.backend}" if args.backend != "triton" else ""
    path = args.out / f"{bench.results_stem(head)}-{tag}.json"
    path.write_text(json.dumps({"header": head, "case": case.name, "variant": args.variant,
                                "dtype": args.dtype, "backend": args.backend,
                                "fp32_operands": args.fp32_operands,
                                "forward_only": args.forward,
                                "ms_per_fwd_bwd": times}, indent=1) + "\n")
    total = sum(times.values())
    per = "forward" if args.forward else "forward+backward"
    print(f"{args.backend} {case.name} {args.variant} {args.dtype} "
          f"fp32_operands={args.fp32_operands}: {total:.3f} ms of kernels per {per}")
    for name, ms in times.items():
        print(f"  {ms:8.3f} ms  {100 * ms / total:5.1f}%  {name[:90]}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
