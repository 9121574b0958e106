"""Re-run chosen configs of the accuracy sweep (benchmarks/accuracy.py) one at a time, each
dtype separately, and name the first kernel launch that fails (CUDA_LAUNCH_BLOCKING=1 makes
an illegal access surface at the launch that made it); with ``--errors``, print each
backend's relative errors against float64 on the same rounded inputs instead.

    PYTHONPATH=src python3 benchmarks/sweep_repro.py 0 16 20 44 52 [--dtypes float32 bfloat16]
    # the Triton kernels (in the interpreter on CPU) beside the torch path, T cut to 1,024:
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/sweep_repro.py 92 --device cpu \\
        --dtypes float16 --tokens 1024 --errors triton torch
"""
import argparse
import os
import random
import traceback

os.environ.setdefault("CUDA_LAUNCH_BLOCKING", "1")
import torch  # noqa: E402

from accuracy import _to_device, build_inputs, draw_config, errors  # noqa: E402
from gdn.testing import forward_backward  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("indices", type=int, nargs="+")
parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
parser.add_argument("--device", default="cuda")
parser.add_argument("--tokens", type=int, help="run the config with T cut to this")
parser.add_argument("--beta", help="run the config with this β choice (accuracy.BETAS)")
parser.add_argument("--errors", nargs="+", metavar="BACKEND",
                    help="print these backends' errors against float64 on the rounded inputs")
args = parser.parse_args()
rng = random.Random(0)
configs = [draw_config(rng, 8192, 2**29) for _ in range(max(args.indices) + 1)]
for i in args.indices:
    config = configs[i] | ({"T": min(args.tokens, configs[i]["T"])} if args.tokens else {}) | (
        {"beta": args.beta} if args.beta else {})
    for name in args.dtypes:
        dtype = getattr(torch, name)
        x, op = build_inputs(config)
        x = _to_device(x, torch.device(args.device))
        options = dict(exact=dtype == torch.float32, chunk_size=64)
        if args.errors:
            reference = forward_backward(op, x.to(dtype).to(torch.float64, True),
                                         backend="torch")
            for backend in args.errors:
                got = forward_backward(op, x.to(dtype, True), backend=backend,
                                       **(options if backend == "triton" else {}))
                print(i, name, backend, config,
                      {k: f"{v:.1e}" for k, v in errors(got, reference).items()}, flush=True)
            continue
        try:
            forward_backward(op, x.to(dtype, True), backend="triton", **options)
            if args.device == "cuda":
                torch.cuda.synchronize()
            print(i, name, "ok", config, flush=True)
        except Exception:
            lines = traceback.format_exc().splitlines()
            where = [ln.strip() for ln in lines if "gdn/ops/triton" in ln]
            print(i, name, "FAILED", config, *where[-3:], lines[-1][:160], sep="\n  ",
                  flush=True)
            raise SystemExit(1) from None
