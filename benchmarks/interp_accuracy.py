"""One shape's float16 errors against float64 with the Triton kernels in the interpreter (CPU):
a quick check of a kernel change's rounding where no GPU is at hand. float16 stands in for
bfloat16, which the interpreter gets wrong (README); its 10-bit mantissa shows the same
roundings three bits smaller.

    PYTHONPATH=src python3 benchmarks/interp_accuracy.py [B,T,H,K,V] [label]

Run it with PYTHONPATH on two trees (``git archive <commit> src``) to compare them.
"""
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"
import torch  # noqa: E402

from gdn.ops import chunk_gated_delta_rule  # noqa: E402
from gdn.testing import forward_backward, random_inputs, rel_error  # noqa: E402

B, T, H, K, V = (int(x) for x in (sys.argv[1] if len(sys.argv) > 1 else "2,192,2,64,64")
                 .split(","))
label = sys.argv[2] if len(sys.argv) > 2 else ""
x = random_inputs(B=B, T=T, H=H, K=K, V=V, seed=5)
rounded = x.to(torch.float16).to(torch.float64)
ref = forward_backward(chunk_gated_delta_rule, rounded.to(torch.float64, requires_grad=True),
                       seed=3, backend="torch")
got = forward_backward(chunk_gated_delta_rule, x.to(torch.float16, requires_grad=True), seed=3,
                       backend="triton")
print(label, f"{B},{T},{H},{K},{V} float16:", "o", f"{rel_error(got[0], ref[0]):.2e}",
      *[f"d{n} {rel_error(got[2][n], g):.2e}" for n, g in ref[2].items()])
