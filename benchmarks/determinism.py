"""Run the op's forward+backward three times on the same inputs and report which outputs and
gradients are not bit for bit the same (the kernels promise run-to-run determinism).

    PYTHONPATH=src python3 benchmarks/determinism.py 8,256,3,48,96 [gated|deltanet|gla] [l2|trace]

With ``trace`` it also records what the wy backward is given (dw and the output stage's dk
and dg) and so tells whether the difference comes in with them or arises inside it.
"""
import sys

import torch

from gdn.ops import chunk_gated_delta_rule, chunk_gated_linear_attention
from gdn.testing import forward_backward, random_inputs

B, T, H, K, V, *HV = (int(x) for x in sys.argv[1].split(","))
variant = sys.argv[2] if len(sys.argv) > 2 else "gated"
l2 = len(sys.argv) > 3 and sys.argv[3] == "l2"
trace = len(sys.argv) > 3 and sys.argv[3] == "trace"
seen = []
if trace:
    from gdn.ops.triton import launch

    class Traced:
        """wy_backward_kernel with its inputs dw, dk_partial and dg cloned at each launch."""

        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                seen.append({"dw": args[4].clone(), "dk_partial": args[6].clone(),
                             "dg_in": None if args[9] is None else args[9].clone()})
                return self.kernel[grid](*args, **kwargs)
            return run

    launch.wy.wy_backward_kernel = Traced(launch.wy.wy_backward_kernel)
op = chunk_gated_linear_attention if variant == "gla" else chunk_gated_delta_rule
x = random_inputs(B=B, T=T, H=H, HV=HV[0] if HV else H, K=K, V=V, seed=0, device="cuda",
                  gate=variant != "deltanet", delta=variant != "gla")
kw = dict(use_qk_l2norm_in_kernel=True) if l2 else {}
runs = [forward_backward(op, x.to(torch.bfloat16, requires_grad=True), seed=3,
                         backend="triton", **kw) for _ in range(3)]
torch.cuda.synchronize()
first = runs[0]
names = ["o", "state", *[f"d{n}" for n in first[2]]]
values = lambda r: [r[0], r[1], *r[2].values()]  # noqa: E731
differ = []
for name, *xs in zip(names, *map(values, runs), strict=True):
    bad = sum(int(not torch.equal(xs[0], y)) for y in xs[1:])
    if bad:
        n = max(int((xs[0] != y).sum()) for y in xs[1:])
        differ.append(f"{name} ({n} elements)")
if trace:
    for name in seen[0]:
        xs = [d[name] for d in seen]
        if xs[0] is not None and not all(torch.equal(xs[0], y) for y in xs[1:]):
            differ.append(f"input {name}")
print(f"{sys.argv[1]} {variant}{' ' + sys.argv[3] if len(sys.argv) > 3 else ''}:",
      "deterministic" if not differ else "DIFFER " + ", ".join(differ))
