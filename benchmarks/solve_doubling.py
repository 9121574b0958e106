"""wy_solve's 16 × 16 diagonal blocks by doubling instead of forward substitution: accurate?

    python3 benchmarks/solve_doubling.py [--out benchmarks/results/accuracy]

wy_solve inverts each diagonal block of I + L by forward substitution: fifteen dependent
steps, each a cross-thread sum on the program's one warp. Since L¹⁶ = 0 the inverse is also
the product (I − L)(I + L²)(I + L⁴)(I + L⁸): six tensor-core products, four in a chain, which
could shorten the step that bounds wy_solve (NOTES.md §27.10). But that product is the
Neumann series Σ_{i<16} (−L)^i, and math.md §2.3 warns that its terms grow far beyond A's
entries when keys are alike. Here both are computed in float32 arithmetic on one block,
L = strictly-lower(diag(β) K Kᵀ) with unit keys k_i = normalise(u + σ·noise_i) (σ = 0:
one key repeated, as a repeated token gives; σ = 1: unrelated keys) and β uniform in
[0, β_max], against the float64 inverse. The doubling's products are taken in float32, in
TF32 (inputs rounded to 10 mantissa bits, as the kernels' block products are) and in tf32x3
(three TF32 products with the inputs split in two); the substitution by rows (wy_solve
before NOTES.md §35) and by columns (since). Prints and saves the worst error over the
trials, relative to max |A|.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

BC = 16


def to_tf32(x: torch.Tensor) -> torch.Tensor:
    """x rounded to TF32's 10 mantissa bits, to nearest with ties away from zero (the
    rounding of cvt.rna.tf32.f32)."""
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def product(a: torch.Tensor, b: torch.Tensor, precision: str) -> torch.Tensor:
    """a @ b in float32 sums with inputs as a tensor core in that precision takes them."""
    if precision == "float32":
        return a @ b
    a_hi, b_hi = to_tf32(a), to_tf32(b)
    if precision == "tf32":
        return a_hi @ b_hi
    a_lo, b_lo = to_tf32(a - a_hi), to_tf32(b - b_hi)
    return a_hi @ b_hi + (a_hi @ b_lo + a_lo @ b_hi)


def inverse_by_doubling(L: torch.Tensor, precision: str) -> torch.Tensor:
    """(I + L)⁻¹ = (I − L)(I + L²)(I + L⁴)(I + L⁸) for a strictly lower 16 × 16 L."""
    power = -L
    inverse = torch.eye(BC) + power
    for _ in range(3):
        power = product(power, power, precision)
        inverse = inverse + product(inverse, power, precision)
    return inverse


def inverse_by_substitution(L: torch.Tensor) -> torch.Tensor:
    """(I + L)⁻¹ row by row, as wy_solve formed it before its column order (NOTES.md §35)."""
    eye = torch.eye(BC)
    inverse = eye.clone()
    for i in range(1, BC):
        inverse[i] = eye[i] - (L[i, :, None] * inverse).sum(0)
    return inverse


def inverse_by_columns(L: torch.Tensor) -> torch.Tensor:
    """(I + L)⁻¹ column by column, as wy_solve.invert_four_by_columns forms it (the default
    since NOTES.md §35): X ← X − L[:, j] X[j, :]; row i's sum accumulates in order of j."""
    inverse = torch.eye(BC)
    for j in range(BC - 1):
        inverse = inverse - L[:, j, None] * inverse[j][None, :]
    return inverse


def worst_errors(noise: float, beta_max: float, trials: int, seed: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(seed)
    worst = {"substitution": 0.0, "substitution_by_columns": 0.0, "doubling_float32": 0.0,
             "doubling_tf32x3": 0.0, "doubling_tf32": 0.0}
    for _ in range(trials):
        u = torch.randn(64, generator=gen)
        k = torch.nn.functional.normalize(u + noise * torch.randn(BC, 64, generator=gen), dim=-1)
        beta = beta_max * torch.rand(BC, generator=gen)
        L = (beta[:, None] * (k @ k.T)).tril(-1)
        exact = torch.linalg.inv(torch.eye(BC, dtype=torch.float64) + L.double())
        scale = exact.abs().max().item()
        got = {"substitution": inverse_by_substitution(L),
               "substitution_by_columns": inverse_by_columns(L)}
        for precision in ("float32", "tf32x3", "tf32"):
            got[f"doubling_{precision}"] = inverse_by_doubling(L, precision)
        for name, inverse in got.items():
            error = (inverse.double() - exact).abs().max().item() / scale
            worst[name] = max(worst[name], error)
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--out", default=None, help="folder for a JSON of the errors")
    args = parser.parse_args()
    rows = []
    names = ("substitution", "substitution_by_columns", "doubling_float32", "doubling_tf32x3",
             "doubling_tf32")
    print(f"{'σ':>5} {'β max':>5} " + " ".join(f"{n:>17}" for n in names))
    for noise in (0.0, 0.01, 0.1, 1.0):
        for beta_max in (1.0, 2.0):
            worst = worst_errors(noise, beta_max, args.trials, seed=0)
            rows.append({"noise": noise, "beta_max": beta_max, "trials": args.trials} | worst)
            print(f"{noise:5.2f} {beta_max:5.1f} " + " ".join(f"{worst[n]:17.1e}" for n in names))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "solve-doubling-cpu.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
