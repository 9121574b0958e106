"""Run the op once (forward+backward) at one shape with CUDA_LAUNCH_BLOCKING=1 and report the
first failing kernel launch, or the relative errors against float64 if none fails.

    PYTHONPATH=src python3 benchmarks/probe_launch.py 8,4096,16,128,128     # B,T,H,K,V[,HV]
    PYTHONPATH=src python3 benchmarks/probe_launch.py 8,4096,16,128,128 float32  # TF32 path
    PYTHONPATH=src python3 benchmarks/probe_launch.py 8,4096,16,128,128 bfloat16 deltanet

The quick full-shape check after a kernel change (``gpu_session.sh state`` runs it at three
shapes): the interpreter tests cannot see a GPU miscompile, and this names the kernel that
went wrong in a minute, where the gpu-marked tests take ten (benchmarks/NOTES.md §8).
"""
import os
import sys
import traceback

os.environ["CUDA_LAUNCH_BLOCKING"] = "1"
import torch  # noqa: E402

from gdn.ops import chunk_gated_delta_rule, chunk_gated_linear_attention  # noqa: E402
from gdn.testing import forward_backward, random_inputs, rel_error  # noqa: E402

B, T, H, K, V, *HV = (int(x) for x in sys.argv[1].split(","))    # B,T,H,K,V[,HV]
dtype = getattr(torch, sys.argv[2] if len(sys.argv) > 2 else "bfloat16")
# The variant: the gated delta rule, DeltaNet (no gate) or gated linear attention (no delta).
variant = sys.argv[3] if len(sys.argv) > 3 else "gated"
op = chunk_gated_linear_attention if variant == "gla" else chunk_gated_delta_rule
x = random_inputs(B=B, T=T, H=H, HV=HV[0] if HV else H, K=K, V=V, seed=0, device="cuda",
                  gate=variant != "deltanet", delta=variant != "gla")
try:
    got = forward_backward(op, x.to(dtype, requires_grad=True), seed=3, backend="triton")
    torch.cuda.synchronize()
except Exception:
    lines = traceback.format_exc().splitlines()
    print("FAILED:", *[ln for ln in lines if "launch.py" in ln or "passes.py" in ln][-3:],
          lines[-1][:200], sep="\n  ")
    sys.exit(0)
ref = forward_backward(op, x.to(torch.float64, requires_grad=True), seed=3, backend="torch")
print("o", f"{rel_error(got[0], ref[0]):.1e}", "state", f"{rel_error(got[1], ref[1]):.1e}",
      *[f"d{n} {rel_error(got[2][n], g):.1e}" for n, g in ref[2].items()])
