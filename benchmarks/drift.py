"""The bf16 drift of the undamped delta rule (NOTES.md §20-21): one config's errors against
float64 on the same rounded inputs, per backend, forward and backward.

A state that never decays keeps every rounding the kernels make in it; this prints how much
each choice of operands leaves (run once per GDN_TRITON_TILES choice: the knobs are read at
import) beside the torch path and fla 0.6.0 (GVA expanded for it), and saves one JSON line
per run to --out.

    PYTHONPATH=src python3 benchmarks/drift.py --index 92 --backends triton torch fla
    GDN_TRITON_TILES=state_x3=1,solve_x3=1 PYTHONPATH=src python3 benchmarks/drift.py \\
        --shape 65536,4,4,128,128 --variant deltanet --beta uniform
"""
import argparse
import json
import os
import random
import time
from pathlib import Path

import torch

from accuracy import BETAS, _to_device, build_inputs, draw_config, errors
from gdn.testing import forward_backward


def fla_op(variant: str):
    """fla's op in gdn's calling convention; q/k heads repeated to the v heads (fla 0.6.0
    has no GVA here), inside the graph so their gradients sum back."""
    import fla.ops.common.chunk_o as fla_chunk_o
    fla_chunk_o.TRITON_ABOVE_3_7_1 = True     # ops.py: its guard refuses Triton 3.6's backward
    from fla.ops.delta_rule import chunk_delta_rule
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    def call(q, k, v, g=None, beta=None, initial_state=None, cu_seqlens=None,
             output_final_state=True, **_):
        groups = v.shape[2] // q.shape[2]
        q, k = (x.repeat_interleave(groups, dim=2) for x in (q, k))
        if variant == "deltanet":
            return chunk_delta_rule(q, k, v, beta, initial_state=initial_state,
                                    output_final_state=output_final_state, cu_seqlens=cu_seqlens)
        return chunk_gated_delta_rule(q, k, v, g, beta, initial_state=initial_state,
                                      output_final_state=output_final_state,
                                      cu_seqlens=cu_seqlens)
    return call


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--index", type=int, help="a config of accuracy.py's sweep (seed 0)")
    parser.add_argument("--shape", help="T,H,HV,K,V of a config of one sequence instead")
    parser.add_argument("--variant", default="deltanet", choices=("deltanet", "gated_delta_rule"))
    parser.add_argument("--beta", choices=[*BETAS, "sigmoid"],
                        help="override the config's β; sigmoid: σ(normal), in (0, 1), as a "
                             "layer's β")
    parser.add_argument("--gate", default="realistic", help="with --shape: accuracy.GATES key")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backends", nargs="+", default=["triton"])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/probes/drift.jsonl"))
    args = parser.parse_args()
    if args.index is not None:
        rng = random.Random(0)
        config = [draw_config(rng, 8192, 2**29) for _ in range(args.index + 1)][-1]
    else:
        T, H, HV, K, V = (int(x) for x in args.shape.split(","))
        config = dict(variant=args.variant, T=T, H=H, HV=HV, K=K, V=V, docs=None,
                      gate="none" if args.variant == "deltanet" else args.gate,
                      beta="uniform", initial_state=True, chunk_size=64, seed=1)
    if args.beta:
        config["beta"] = args.beta
    dtype = getattr(torch, args.dtype)
    x, op = build_inputs(config | ({"beta": "one"} if args.beta == "sigmoid" else {}))
    if args.beta == "sigmoid":
        gen = torch.Generator().manual_seed(config["seed"])
        x.beta = torch.sigmoid(torch.randn(x.beta.shape, generator=gen, dtype=torch.float64))
    x = _to_device(x, torch.device(args.device))
    start = time.perf_counter()
    reference = forward_backward(op, x.to(dtype).to(torch.float64, True), backend="torch")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for backend in args.backends:
        call = fla_op(config["variant"]) if backend == "fla" else op
        # triton-exact: the kernels with exact=True on the same 16-bit inputs (NOTES §21.5).
        options = ({} if backend == "fla" else
                   {"backend": "triton", "exact": True} if backend == "triton-exact" else
                   {"backend": backend})
        got = forward_backward(call, x.to(dtype, True), **options)
        row = dict(config=config, dtype=args.dtype, backend=backend,
                   tiles=os.environ.get("GDN_TRITON_TILES", ""),
                   fp32_operands=os.environ.get("GDN_TRITON_FP32_OPERANDS", ""),
                   errors=errors(got, reference))
        grads = max(v for k, v in row["errors"].items() if k.startswith("d"))
        print(f"{backend:12} tiles={row['tiles'] or '-':28} output {row['errors']['output']:.1e}"
              f"  state {row['errors']['state']:.1e}  worst grad {grads:.1e}", flush=True)
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
