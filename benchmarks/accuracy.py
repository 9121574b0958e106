"""Accuracy sweep: the chunked path against the float64 token loop over seeded configs.

    python benchmarks/accuracy.py                 # 200 configs, T up to 8192 (a few minutes)
    python benchmarks/accuracy.py --configs 20 --max-tokens 500 --no-save
    python benchmarks/accuracy.py --backend triton --device cuda   # the Triton kernels
    # … in n processes (each compiles its own configs' kernels), then one file of them all:
    python benchmarks/accuracy.py --backend triton --device cuda --shard 3/n --time-limit 300
    python benchmarks/accuracy.py --merge benchmarks/results/accuracy/*-shard*.json

With ``--backend triton`` the kernels run in float32 with ``exact=True`` and in bfloat16,
against the float64 chunked torch path on the same device (it agrees with the float64 token
loop to ~10⁻¹⁴, tests/ops/test_chunked_vs_reference.py, and is fast on a GPU); the chunk is
64, the kernels' size. The bfloat16 errors are against float64 on the same bf16-rounded
inputs (the kernels' own error, as the gpu tests and RELIABILITY.md item 2 take it; results
before 2026-11-23 14:00 took the unrounded inputs, so input rounding was in them).

The sweep RELIABILITY.md item 1 asks for: T from 1 to 8192 (never a multiple of the chunk),
head dims 32–256 including 60 and 100, GVA ratios 1/2/4, packed documents with 1-token
ones, log gates from 0 to −10⁴ (mixed within a chunk), β at 0, 1e-6, 1, 2 or uniform in
[0, 2], with and without an initial state, for the gated delta rule, DeltaNet and gated
linear attention. Each config runs forward+backward in float64 (reference and chunked) and
float32 (chunked); errors are relative RMS against the float64 reference with an RMS floor of
1, the inputs' scale (gdn.testing.rel_error). Prints the worst error per dtype and quantity and
writes benchmarks/results/accuracy/<device>-<date>-<commit>.json.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from gdn.ops import chunk_gated_delta_rule, chunk_gated_linear_attention
from gdn.testing import forward_backward, random_inputs, rel_error
from ops import ROOT, header, results_stem

GATES = {"zero": 0.0, "realistic": None, "strong": -1e4}
BETAS = {"zero": 0.0, "tiny": 1e-6, "one": 1.0, "two": 2.0, "uniform": None}
MIXED_GATES = torch.tensor([0.0, -1e-3, -1.0, -30.0, -1e4], dtype=torch.float64)


def draw_config(rng: random.Random, max_tokens: int, budget: float) -> dict:
    """One config; the state size times T is kept under ``budget`` so each runs in seconds."""
    variant = rng.choice(["gated_delta_rule", "deltanet", "gated_linear_attention"])
    K, V = rng.choice([32, 60, 64, 100, 128, 256]), rng.choice([32, 60, 64, 100, 128, 256])
    H = rng.choice([1, 2])
    HV = H * rng.choice([1, 2, 4])
    T_cap = max(1, min(max_tokens, int(budget // (HV * K * V))))
    T = min(T_cap, round(2 ** rng.uniform(0, 13)))
    if T % 64 == 0:
        T = max(1, T - rng.randint(1, 63))
    docs = None
    if T > 2 and rng.random() < 0.3:
        cuts = sorted(rng.sample(range(1, T), min(rng.randint(1, 6), T - 1)))
        docs = [b - a for a, b in zip([0, *cuts], [*cuts, T], strict=True)]
        if rng.random() < 0.5:
            docs = [1, *docs[1:]] if docs[0] > 1 else docs
            docs[-1] = T - sum(docs[:-1])
    return dict(variant=variant, T=T, H=H, HV=HV, K=K, V=V, docs=docs,
                gate=rng.choice([*GATES, "mixed"]) if variant != "deltanet" else "none",
                beta=rng.choice(list(BETAS)) if variant != "gated_linear_attention" else "none",
                initial_state=rng.random() < 0.5, chunk_size=64, seed=rng.randrange(2**16))


def build_inputs(c: dict):
    delta = c["variant"] != "gated_linear_attention"
    x = random_inputs(T=c["T"], H=c["H"], HV=c["HV"], K=c["K"], V=c["V"],
                      gate=c["gate"] != "none", delta=delta, initial_state=c["initial_state"],
                      doc_lengths=c["docs"], seed=c["seed"])
    gen = torch.Generator().manual_seed(c["seed"])
    if c["gate"] == "mixed":
        x.g = MIXED_GATES[torch.randint(len(MIXED_GATES), x.g.shape, generator=gen)]
    elif GATES.get(c["gate"]) is not None:
        x.g = torch.full_like(x.g, GATES[c["gate"]])
    if delta and BETAS[c["beta"]] is not None:
        x.beta = torch.full_like(x.beta, BETAS[c["beta"]])
    elif delta:
        x.beta = 2 * torch.rand(x.beta.shape, generator=gen, dtype=torch.float64)
    return x, chunk_gated_delta_rule if delta else chunk_gated_linear_attention


def _to_device(x, device: torch.device):
    for name, t in x.tensors().items():
        setattr(x, name, t.to(device))
    if x.cu_seqlens is not None:
        x.cu_seqlens = x.cu_seqlens.to(device)
    return x


def errors(actual, expected) -> dict[str, float]:
    out = {"output": rel_error(actual[0], expected[0], floor_rms=1.0),
           "state": rel_error(actual[1], expected[1], floor_rms=1.0)}
    for name, grad in expected[2].items():
        out[f"d{name}"] = rel_error(actual[2][name], grad, floor_rms=1.0)
    return out


def summarise(rows: list[dict]) -> dict[str, float]:
    """The worst error per dtype and quantity ("float32 grads" is the worst of every
    gradient) over the rows."""
    worst = {}
    for row in rows:
        for dtype, errs in row.items():
            if dtype in ("config", "index"):
                continue
            for quantity, value in errs.items():
                key = f"{dtype} {'grads' if quantity[0] == 'd' else quantity}"
                worst[key] = max(worst.get(key, 0.0), value)
    return dict(sorted(worst.items()))


def save(result: dict, device: torch.device | None, tag: str) -> None:
    head = result["header"] if device is None else header(device)
    result = {"header": head, **{k: v for k, v in result.items() if k != "header"}}
    path = ROOT / "benchmarks" / "results" / "accuracy" / f"{results_stem(head)}{tag}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path.relative_to(ROOT)}")


def report(result: dict) -> None:
    stopped = f", stopped by the time limit after {len(result['rows'])}" if (
        result.get("stopped")) else ""
    print(f"\n{len(result['rows'])} configs in {result['seconds']:.0f} s{stopped}; worst "
          "relative RMS error (floor RMS 1) against the float64 reference:")
    for key, value in result["worst"].items():
        print(f"  {key:<18} {value:.2e}")


def merge(paths: list[str]) -> None:
    """One result from results of disjoint configs of one sweep (``--shard``, or a later run
    with ``--skip-done``): their rows in config order; "seconds" is the longest file's (the
    shards of a run run side by side), "seconds_per_file" each one's."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    same = ("configs", "max_tokens", "budget", "seed", "backend", "device")
    if any({k: p["args"][k] for k in same} != {k: parts[0]["args"][k] for k in same}
           for p in parts):
        raise SystemExit(f"--merge: the files are not of one sweep (they differ in {same})")
    rows = sorted((r for p in parts for r in p["rows"]), key=lambda r: r["index"])
    indices = [r["index"] for r in rows]
    if len(set(indices)) != len(indices):
        raise SystemExit("--merge: a config appears in more than one file")
    result = {"header": parts[-1]["header"],
              "args": parts[0]["args"] | {"shard": "all", "merged": [Path(p).name
                                                                     for p in paths]},
              "seconds": max(p["seconds"] for p in parts),
              "seconds_per_file": {Path(path).name: p["seconds"]
                                   for path, p in zip(paths, parts, strict=True)},
              "stopped": len(rows) < parts[0]["args"]["configs"],
              "worst": summarise(rows), "rows": rows}
    report(result)
    backend = parts[0]["args"]["backend"]
    save(result, None, f"-{backend}" if backend != "torch" else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=8192)
    parser.add_argument("--budget", type=float, default=2**29,
                        help="cap on T·HV·K·V per config (keeps each config to seconds)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", choices=["torch", "triton"], default="torch")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--shard", default="0/1", help="r/n: run configs i with i %% n = r "
                        "(the same configs whichever n)")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="seconds after which no further config starts (the result says so)")
    parser.add_argument("--skip-done", nargs="+", metavar="FILE",
                        help="skip the configs these results of the same sweep hold")
    parser.add_argument("--skip-indices", default="", metavar="I,J,...",
                        help="skip these configs too (e.g. ones a cut-off run printed, NOTES.md "
                             "§20)")
    parser.add_argument("--merge", nargs="+", metavar="FILE",
                        help="join results of disjoint configs of one sweep")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    if args.merge:
        merge(args.merge)
        return
    shard, shards = (int(x) for x in args.shard.split("/"))
    if not 0 <= shard < shards:
        raise SystemExit(f"--shard: expected r/n with 0 <= r < n; got {args.shard!r}")
    device = torch.device(args.device)
    if args.backend == "torch":
        truth_backend, runs = "reference", [(torch.float64, {}), (torch.float32, {})]
    else:
        truth_backend = "torch"
        runs = [(torch.float32, {"exact": True, "backend": "triton", "chunk_size": 64}),
                (torch.bfloat16, {"backend": "triton", "chunk_size": 64})]

    done = {r["index"] for path in args.skip_done or []
            for r in json.loads(Path(path).read_text())["rows"]}
    done |= {int(i) for i in args.skip_indices.split(",") if i}
    rng = random.Random(args.seed)
    rows, stopped = [], False
    start = time.perf_counter()
    for i in range(args.configs):
        c = draw_config(rng, args.max_tokens, args.budget)   # every i: the rng's sequence
        if i % shards != shard or i in done:
            continue
        if args.time_limit is not None and time.perf_counter() - start > args.time_limit:
            stopped = True
            break
        x, op = build_inputs(c)
        x = _to_device(x, device)
        truth = forward_backward(op, x.to(torch.float64, True), backend=truth_backend)
        row = {"index": i, "config": c}
        for dtype, options in runs:
            kwargs = {"chunk_size": c["chunk_size"], **options}
            reference = truth
            if dtype in (torch.bfloat16, torch.float16):
                reference = forward_backward(op, x.to(dtype).to(torch.float64, True),
                                             backend=truth_backend)
            got = forward_backward(op, x.to(dtype, True), **kwargs)
            row[str(dtype).removeprefix("torch.")] = errors(got, reference)
        rows.append(row)
        print(f"[{i + 1}/{args.configs}] {c['variant']} T={c['T']} HV={c['HV']} K={c['K']} "
              f"V={c['V']} docs={c['docs'] is not None} gate={c['gate']} beta={c['beta']}: "
              f"float32 worst {max(row['float32'].values()):.2e}", flush=True)
    result = {"args": vars(args), "seconds": time.perf_counter() - start, "stopped": stopped,
              "worst": summarise(rows), "rows": rows}
    report(result)
    if not args.no_save:
        tag = "" if args.backend == "torch" else f"-{args.backend}"
        save(result, device, tag + (f"-shard{shard}of{shards}" if shards > 1 else ""))


if __name__ == "__main__":
    main()
