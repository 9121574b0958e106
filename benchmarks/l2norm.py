"""The q/k L2 norm: Triton kernels (triton/l2norm.py) against PyTorch (prepare.l2_normalize).

    python3 benchmarks/l2norm.py [--shapes 8,4096,16,128 1,65536,16,128] [--dtype bfloat16]

For each [B, T, H, K] shape: forward and forward+backward time of one tensor's norm
(do_bench medians), achieved GB/s by the fewest bytes (forward: read x, write y; backward:
read x and dy, write dx), peak memory of forward+backward, and the largest relative error of
y and dx against float64. Saves JSON under benchmarks/results/l2norm/ with the
header of benchmarks/ops.py (device, torch, Triton, commit).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ops as bench  # noqa: E402  (the shared header, result names)
from gdn.ops.prepare import l2_normalize  # noqa: E402
from gdn.ops.triton import triton_l2_normalize  # noqa: E402
from gdn.testing import rel_error  # noqa: E402

IMPLEMENTATIONS = {"torch": l2_normalize, "triton": triton_l2_normalize}


def measure(name: str, shape: tuple[int, ...], dtype: torch.dtype,
            device: torch.device) -> dict:
    normalize = IMPLEMENTATIONS[name]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen).to(device, dtype).requires_grad_()
    dy = torch.randn(*shape, generator=gen).to(device, dtype)

    def forward():
        with torch.no_grad():
            normalize(x)

    def forward_backward():
        normalize(x).backward(dy)

    timing = dict(repeats=5, budget_s=10.0)
    fwd, _, timer = bench.median_ms(forward, device, **timing)
    fwd_bwd, _, _ = bench.median_ms(forward_backward, device, grads=(x,), **timing)
    peak_mib = None
    if device.type == "cuda":
        x.grad = None
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        forward_backward()
        peak_mib = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    x64 = x.detach().double().requires_grad_()
    l2_normalize(x64).backward(dy.double())
    x.grad = None
    y = normalize(x)
    y.backward(dy)
    size = x.numel() * x.element_size()
    return {"impl": name, "shape": list(shape), "dtype": str(dtype).removeprefix("torch."),
            "timer": timer, "fwd_ms": fwd, "fwd_bwd_ms": fwd_bwd,
            "fwd_gbps": 2 * size / fwd / 1e6, "fwd_bwd_gbps": 5 * size / fwd_bwd / 1e6,
            "peak_mib": peak_mib,
            "rel_err": max(rel_error(y, l2_normalize(x64.detach())), rel_error(x.grad,
                                                                               x64.grad))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["8,4096,16,128", "1,65536,16,128",
                                                         "8,4096,6,256"])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cuda",
                        help="cpu runs the kernels in Triton's interpreter (TRITON_INTERPRET=1)"
                        " at small shapes: a check of this script, not a measurement")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results"
                        / "l2norm")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    head = bench.header(device)
    rows = []
    for spec in args.shapes:
        shape = tuple(int(n) for n in spec.split(","))
        for name in IMPLEMENTATIONS:
            row = measure(name, shape, dtype, device)
            rows.append(row)
            print(f"{spec:>16} {name:>6}  fwd {row['fwd_ms']:.3f} ms ({row['fwd_gbps']:.0f}"
                  f" GB/s)  fwd+bwd {row['fwd_bwd_ms']:.3f} ms ({row['fwd_bwd_gbps']:.0f}"
                  f" GB/s)  peak {row['peak_mib'] or 0:.0f} MiB  err {row['rel_err']:.1e}")
    if args.no_save:
        return
    path = bench.unused_path(args.out, bench.results_stem(head))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"header": head, "rows": rows}, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
