"""Which bf16 `tl.dot` pattern does Triton 3.6 get wrong on an H100? (benchmarks/NOTES.md §8, §9)

    PYTHONPATH=src python3 benchmarks/bf16_dot_probe.py            # on the GPU, seconds
    TRITON_INTERPRET=1 python3 benchmarks/bf16_dot_probe.py --cpu  # checks the probe itself

The forward output kernel and the wy backward computed wrong results with bf16 operands on
the GPU (output 2.2 relative error, gradients inf), while the interpreter and float32
operands were right. Both multiply a product held in registers by a tile, `tl.dot(P, x,
acc)`; the state passes, right in bf16, only multiply tiles from memory. Each kernel here is
one variant of the forward output's chunk step, o = (Q S) ⊙ e + (QKᵀ ⊙ D) Δ, one program per
64-row chunk walking V in blocks as the real kernel does, launched as the real kernels are
(4 warps, 1 stage), with 2 stages, and on 8 warps (output_backward's launch, right in bf16
at 1 stage), each in its own process, and is compared with the same arithmetic in float32
on the bf16-rounded inputs. A variant that is wrong on the GPU names the pattern to avoid.
First run (NOTES.md §9, before the 8-warp column and the per-process runs): every form was
wrong at one stage and right at two, and the register product alone hit an illegal address
at one stage, which ended that run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import torch
import triton
import triton.language as tl

BT, BK, V, BV = 64, 128, 128, 32


@triton.jit
def probe_kernel(q, k, s, d, e, out, VARIANT: tl.constexpr, BT: tl.constexpr,
                 BK: tl.constexpr, V: tl.constexpr, BV: tl.constexpr):
    """One chunk per program, V walked in BV blocks as in the real kernel."""
    i = tl.program_id(0).to(tl.int64)
    o_t, o_k, o_v = tl.arange(0, BT), tl.arange(0, BK), tl.arange(0, BV)
    b_q = tl.load(q + i * BT * BK + o_t[:, None] * BK + o_k[None, :])
    b_k = tl.load(k + i * BT * BK + o_t[:, None] * BK + o_k[None, :])
    b_e = tl.load(e + i * BT + o_t)
    qk = tl.dot(b_q, tl.trans(b_k))
    P = tl.where(o_t[:, None] >= o_t[None, :], qk, 0.0).to(b_q.dtype)
    for i_v in range(0, V // BV):
        cols = i_v * BV + o_v
        b_s = tl.load(s + i * BK * V + o_k[:, None] * V + cols[None, :])
        b_d = tl.load(d + i * BT * V + o_t[:, None] * V + cols[None, :])
        if VARIANT == 0:    # the kernel as it failed: acc form, acc scaled in registers
            o = tl.dot(b_q, b_s, tl.zeros([BT, BV], dtype=tl.float32))
            o = tl.dot(P, b_d, o * b_e[:, None])
        elif VARIANT == 1:  # separate products, then sums
            o = tl.dot(b_q, b_s) * b_e[:, None] + tl.dot(P, b_d)
        elif VARIANT == 2:  # acc form, acc not scaled
            o = tl.dot(P, b_d, tl.dot(b_q, b_s))
        elif VARIANT == 3:  # the register product alone
            o = tl.dot(P, b_d)
        else:               # P's transpose as the operand (fla#640's pattern)
            o = tl.dot(tl.trans(P), b_d)
        tl.store(out + i * BT * V + o_t[:, None] * V + cols[None, :], o)


VARIANTS = ("acc form, acc scaled", "separate products", "acc form", "register product",
            "transposed register product")


def expected(variant: int, q, k, s, d, e) -> torch.Tensor:
    dtype = d.dtype
    q, k, s, d, e = (x.float() for x in (q, k, s, d, e))
    P = torch.tril(q @ k.transpose(-1, -2)).to(dtype).float()
    if variant in (0, 1):
        return (q @ s) * e[..., None] + P @ d
    if variant == 2:
        return q @ s + P @ d
    if variant == 3:
        return P @ d
    return P.transpose(-1, -2) @ d


def run_one(variant: int, stages: int, warps: int, device: str, n: int) -> float:
    """Relative error of one variant at one launch configuration."""
    dtype = torch.float16 if device == "cpu" else torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(n, BT, BK, generator=gen) / BK**0.5 for _ in range(2))
    s, d = torch.randn(n, BK, V, generator=gen), torch.randn(n, BT, V, generator=gen)
    e = torch.rand(n, BT, generator=gen)
    q, k, s, d = (x.to(device, dtype) for x in (q, k, s, d))
    e = e.to(device)
    ref = expected(variant, q, k, s, d, e)
    out = torch.full((n, BT, V), float("nan"), device=device)
    probe_kernel[(n,)](q, k, s, d, e, out, VARIANT=variant, BT=BT, BK=BK, V=V, BV=BV,
                       num_warps=warps, num_stages=stages)
    return ((out - ref).norm() / ref.norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="interpreter check of the probe")
    parser.add_argument("--programs", type=int, default=4096)
    parser.add_argument("--one", help="VARIANT,STAGES,WARPS: run one configuration (the "
                        "parent runs each in its own process)")
    args = parser.parse_args()
    device = "cpu" if args.cpu else "cuda"
    n = 4 if args.cpu else args.programs
    if args.one:
        variant, stages, warps = map(int, args.one.split(","))
        print(f"{run_one(variant, stages, warps, device, n):.3e}")
        return
    # Each configuration in its own process: an illegal address (seen at one stage on the
    # H100, NOTES.md §9) poisons the CUDA context and would end the probe.
    print(f"{'variant':32} {'stages':>6} {'warps':>5} {'rel. error':>10}")
    for variant, name in enumerate(VARIANTS):
        for stages, warps in ((1, 4), (2, 4), (1, 8)):
            cmd = [sys.executable, __file__, "--one", f"{variant},{stages},{warps}",
                   "--programs", str(n)] + (["--cpu"] if args.cpu else [])
            run = subprocess.run(cmd, capture_output=True, text=True)
            if run.returncode != 0:
                last = (run.stderr.strip().splitlines() or ["?"])[-1]
                print(f"{name:32} {stages:6} {warps:5} {'FAILED':>10}  {last[:60]}")
                continue
            err = float(run.stdout.split()[-1])
            print(f"{name:32} {stages:6} {warps:5} {err:10.1e}  "
                  f"{'ok' if err < 1e-2 else 'WRONG'}")


if __name__ == "__main__":
    main()
