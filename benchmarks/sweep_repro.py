"""Re-run chosen configs of the accuracy sweep (benchmarks/accuracy.py) one at a time, each
dtype separately, and name the first kernel launch that fails (CUDA_LAUNCH_BLOCKING=1 makes
an illegal access surface at the launch that made it).

    PYTHONPATH=src python3 benchmarks/sweep_repro.py 0 16 20 44 52 [--dtypes float32 bfloat16]
"""
import argparse
import os
import random
import traceback

os.environ.setdefault("CUDA_LAUNCH_BLOCKING", "1")
import torch  # noqa: E402

from accuracy import _to_device, build_inputs, draw_config  # noqa: E402
from gdn.testing import forward_backward  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("indices", type=int, nargs="+")
parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
parser.add_argument("--device", default="cuda")
args = parser.parse_args()
rng = random.Random(0)
configs = [draw_config(rng, 8192, 2**29) for _ in range(max(args.indices) + 1)]
for i in args.indices:
    for dtype in args.dtypes:
        x, op = build_inputs(configs[i])
        x = _to_device(x, torch.device(args.device))
        try:
            forward_backward(op, x.to(getattr(torch, dtype), True), backend="triton",
                             exact=dtype == "float32", chunk_size=64)
            if args.device == "cuda":
                torch.cuda.synchronize()
            print(i, dtype, "ok", configs[i], flush=True)
        except Exception:
            lines = traceback.format_exc().splitlines()
            where = [ln.strip() for ln in lines if "gdn/ops/triton" in ln]
            print(i, dtype, "FAILED", configs[i], *where[-3:], lines[-1][:160], sep="\n  ",
                  flush=True)
            raise SystemExit(1) from None
