"""dg without the chunk states: how accurate is the scaling identity in float32 and bf16?

    python3 benchmarks/dg_identity.py [--out benchmarks/results/accuracy]

The gate enters the rule only through a rescaling (math.md §4.7): with S_t = e^{Γ_t} S̃_t,
S̃ follows the ungated delta rule on v_t e^{−Γ_t}, and o_t = scale · e^{Γ_t} S̃_tᵀ q_t. So

    ∂L/∂Γ_t = q_t·dq_t − v_t·dv_t   (+ ⟨S_T, dS_T⟩ at a sequence's last step)

with dq, dv the op's own gradients (per v head), and dg is the reverse cumulative sum of
that over each sequence. The kernels now form dg from per-chunk terms and ⟨S_c, dS_{c+1}⟩,
which output_backward reads the states again for (NOTES.md §25-26). Here the identity's dg is
formed from the torch path's dq and dv and compared with the float64 token loop's dg:
in float64 (the identity itself), from float32 gradients (what a float32 kernel would sum),
and from gradients rounded to bf16 (what a kernel summing stored bf16 gradients would see),
beside the present path's own dg error in the same precision. The cancellation in a long
reverse sum is the risk: each term is O(1), a strongly decayed tail sums to almost nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gdn.ops import chunk_gated_delta_rule  # noqa: E402
from gdn.testing import dg_by_scaling, random_inputs, rel_error  # noqa: E402

CASES = {
    # name: random_inputs kwargs, and an edit of g
    "gated_1k": (dict(B=2, T=1000, H=2, K=64, V=48, initial_state=True), None),
    "gated_8k": (dict(B=1, T=8192, H=2, K=64, V=64), None),
    "resets": (dict(B=1, T=3000, H=2, K=32, V=32, initial_state=True), "resets"),
    "weak_decay_8k": (dict(B=1, T=8192, H=2, K=64, V=64), "weak"),
    "varlen": (dict(T=2000, H=2, K=48, V=40, doc_lengths=[1, 700, 64, 1235],
                    initial_state=True), None),
    "beta_two": (dict(B=1, T=2000, H=2, K=32, V=32), "beta2"),
}


def _inputs(name: str):
    kwargs, edit = CASES[name]
    x = random_inputs(**kwargs, seed=5)
    if edit == "resets":
        x.g[:, ::97] = -1e4                     # a reset every 97 steps
    elif edit == "weak":
        x.g = x.g * 1e-3                        # nearly undamped: long memory
    elif edit == "beta2":
        x.beta = 2 * x.beta
    return x


def _grads(x, dtype, backend, do, d_final):
    xi = x.to(dtype, requires_grad=True)
    o, s = chunk_gated_delta_rule(**xi.kwargs(), output_final_state=True, backend=backend)
    loss = (o.double() * do).sum() + (s.double() * d_final).sum()
    names = ["q", "k", "v", "g", "beta"]
    grads = torch.autograd.grad(loss, [getattr(xi, n) for n in names])
    return s.detach(), dict(zip(names, grads, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="folder for a JSON of the errors")
    args = parser.parse_args()
    rows = []
    print(f"{'case':16} {'id f64':>9} {'id f32':>9} {'path f32':>9} {'id bf16-g':>9}")
    for name in CASES:
        x = _inputs(name)
        gen = torch.Generator().manual_seed(1)
        do = torch.randn(*x.v.shape, generator=gen, dtype=torch.float64)
        N = x.q.shape[0] if x.cu_seqlens is None else x.cu_seqlens.numel() - 1
        d_final = torch.randn(N, x.v.shape[2], x.q.shape[-1], x.v.shape[-1], generator=gen,
                              dtype=torch.float64)
        s64, ref = _grads(x, torch.float64, "reference", do, d_final)
        row = {"case": name}
        row["identity_f64"] = rel_error(dg_by_scaling(x, ref["q"], ref["v"], s64, d_final),
                                        ref["g"])
        s32, g32 = _grads(x, torch.float32, "torch", do, d_final)
        x32 = x.to(torch.float32)
        row["identity_f32"] = rel_error(
            dg_by_scaling(x32, g32["q"], g32["v"], s32, d_final.float()), ref["g"])
        row["path_f32"] = rel_error(g32["g"], ref["g"])
        # Gradients rounded to bf16 as a kernel would store them; the sum in float32.
        dq16, dv16 = (g32[n].to(torch.bfloat16).float() for n in ("q", "v"))
        row["identity_bf16_grads"] = rel_error(
            dg_by_scaling(x32, dq16, dv16, s32, d_final.float()), ref["g"])
        rows.append(row)
        print(f"{name:16} {row['identity_f64']:9.1e} {row['identity_f32']:9.1e} "
              f"{row['path_f32']:9.1e} {row['identity_bf16_grads']:9.1e}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "dg-identity-cpu.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
