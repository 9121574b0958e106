"""Training throughput: tokens/s, MFU and peak memory of a full optimizer step per model.

    python benchmarks/train_throughput.py                       # CUDA: the six 0.4b presets
    python benchmarks/train_throughput.py --presets gdn-0.4b h1-0.4b --seq-lens 4096
    python benchmarks/train_throughput.py --device cpu --presets gdn-tiny --seq-lens 128 \\
        --steps 2                                                # CPU smoke check, seconds
    GDN_COMMIT=abc1234 python3 benchmarks/train_throughput.py   # name the commit (no git)

Each case (preset, seq_len) runs the training loop's own step (``gdn.train.loop.train_step``:
forward, backward of Σ token losses / targets, global-norm clip) and the optimizer step
(``gdn.train.optim.build_optimizer``: AdamW, fused on CUDA) on random tokens, with the same
tokens per step for every seq_len (default 32,768 on CUDA: 8 rows × 4096, 2 × 16384). Rows are
packed as ``gdn train`` packs them (``--layout packed``: input_ids [1, rows·L] with
cu_seqlens at the row boundaries) or given as a batch (``--layout batched``: [rows, L]).
Compute is bfloat16 autocast over float32 weights on CUDA, float32 on CPU.

After ``--warmup`` steps (Triton compiles, autotuning, allocator warm-up) ``--steps`` steps
are timed one by one (CUDA events on CUDA, wall clock on CPU); the median step gives
tokens/s = tokens_per_step / step time, achieved TFLOP/s = tokens/s × flops_per_token(L)
(``CausalLM.flops_per_token``: 6·N for the matmuls + 3× the mixers' token-mixing forward)
and MFU = that / the device's peak (``gdn.train.metrics.peak_flops``: the dense bf16 table;
``--peak-flops`` overrides; n/a on CPU). Peak memory is torch.cuda.max_memory_allocated over
warm-up and timed steps (weights, AdamW state, activations). A case that runs out of memory
is recorded as "oom" and the run goes on. Prints a table and writes
benchmarks/results/train/<device>-<date>-<commit>[-tag].json with the ops.py header.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch

from gdn.data import Batch
from gdn.models import CausalLM, ModelConfig, preset_names
from gdn.train.loop import train_step
from gdn.train.metrics import peak_flops
from gdn.train.optim import build_optimizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ops as bench  # noqa: E402  (the shared header: GPU, torch, Triton, commit, date)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PRESETS = [f"{family}-0.4b" for family in
                   ("gdn", "h1", "h2", "mamba2", "deltanet", "transformer")]


def synthetic_batch(*, rows: int, seq_len: int, vocab_size: int, layout: str,
                    device: torch.device, seed: int) -> Batch:
    """Random tokens for one step: rows sequences of seq_len tokens, packed into one row
    with cu_seqlens [rows + 1] (layout "packed") or as a [rows, seq_len] batch."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (rows, seq_len), generator=gen)
    n_targets = rows * (seq_len - 1)  # each sequence's last token predicts nothing
    if layout == "packed":
        ids = ids.reshape(1, rows * seq_len)
        cu_seqlens = torch.arange(rows + 1, dtype=torch.int32) * seq_len
        return Batch(input_ids=ids, labels=ids, cu_seqlens=cu_seqlens,
                     n_targets=n_targets).to(device)
    ids = ids.to(device)
    return Batch(input_ids=ids, labels=ids, cu_seqlens=None, n_targets=n_targets)


class StepTimer:
    """Per-step times in seconds: CUDA events on CUDA (read after one synchronize at the
    end, so timing adds no stall), perf_counter on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:],
                                                             strict=False)]
        return [b - a for a, b in zip(self.marks, self.marks[1:], strict=False)]


def run_case(preset: str, seq_len: int, args, device: torch.device,
             dtype: torch.dtype) -> dict:
    """Build, warm up and time one (preset, seq_len) case; the row of the results."""
    rows = args.tokens_per_step // seq_len
    row = {"preset": preset, "seq_len": seq_len, "rows": rows, "layout": args.layout,
           "tokens_per_step": rows * seq_len, "dtype": str(dtype).removeprefix("torch."),
           "overrides": args.override}
    torch.manual_seed(args.seed)
    config = ModelConfig.from_preset(preset, **args.override)
    model = CausalLM(config).to(device)
    if args.activation_checkpointing:
        from gdn.train.loop import _checkpoint_blocks
        _checkpoint_blocks(model)
    if args.compile:
        model = torch.compile(model)
    optimizer = build_optimizer(model, lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95),
                                device=device)
    inner = getattr(model, "_orig_mod", model)
    flops_per_token = inner.flops_per_token(seq_len)
    row.update(params=inner.num_parameters(), flops_per_token=flops_per_token)
    batches = [synthetic_batch(rows=rows, seq_len=seq_len, vocab_size=config.vocab_size,
                               layout=args.layout, device=device, seed=args.seed + i)
               for i in range(2)]  # alternate two batches: no step sees only one input

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    timer, losses = StepTimer(device), []
    try:
        for i in range(args.warmup + args.steps):
            if i == args.warmup:
                timer.mark()
            loss, _ = train_step(model, optimizer, [batches[i % 2]], grad_clip=1.0,
                                 autocast_dtype=dtype)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
            if i >= args.warmup:
                timer.mark()
        times = timer.seconds()
    except torch.OutOfMemoryError:
        row.update(status="oom")
        return row
    finally:
        del model, inner, optimizer, batches
        gc.collect()
        if device.type == "cuda":
            row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            torch.cuda.empty_cache()

    step_s = statistics.median(times)
    tokens_per_s = row["tokens_per_step"] / step_s
    tflops = tokens_per_s * flops_per_token / 1e12
    peak = args.peak_flops or peak_flops(device, dtype)
    final_loss = float(losses[-1])
    row.update(status="ok" if final_loss == final_loss else "non-finite loss",
               step_ms=1e3 * step_s, step_ms_all=[1e3 * t for t in times],
               tokens_per_s=tokens_per_s, tflops=tflops,
               mfu=None if peak is None else tflops * 1e12 / peak, peak_flops=peak,
               first_loss=float(losses[0]), final_loss=final_loss)
    return row


def table(rows: list[dict]) -> list[str]:
    lines = [f"{'preset':<16} {'L':>6} {'rows':>4} {'params':>8} {'step ms':>9} "
             f"{'tok/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>8} {'loss':>7}  status"]
    for r in rows:
        if r.get("status") != "ok" and "step_ms" not in r:
            lines.append(f"{r['preset']:<16} {r['seq_len']:>6} {r['rows']:>4} "
                         f"{r.get('params', 0) / 1e6:>7.1f}M {'':>9} {'':>10} {'':>8} "
                         f"{'':>6} {r.get('peak_memory_gib', float('nan')):>8.1f} "
                         f"{'':>7}  {r['status']}")
            continue
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        memory = f"{r['peak_memory_gib']:.1f}" if "peak_memory_gib" in r else "n/a"
        lines.append(f"{r['preset']:<16} {r['seq_len']:>6} {r['rows']:>4} "
                     f"{r['params'] / 1e6:>7.1f}M {r['step_ms']:>9.1f} "
                     f"{r['tokens_per_s']:>10,.0f} {r['tflops']:>8.2f} {mfu:>6} {memory:>8} "
                     f"{r['final_loss']:>7.3f}  {r['status']}")
    return lines


def parse_override(text: str) -> tuple[str, object]:
    """KEY=VALUE for ModelConfig: ints, floats, true/false/none, else the string."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--override must be KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    lowered = value.lower()
    if lowered in ("true", "false"):
        return key, lowered == "true"
    if lowered == "none":
        return key, None
    for kind in (int, float):
        try:
            return key, kind(value)
        except ValueError:
            pass
    return key, value


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter,
        epilog=__doc__.split("\n\n")[1])
    parser.add_argument("--presets", nargs="+", default=DEFAULT_PRESETS,
                        help="model presets (default: the six 0.4b families)")
    parser.add_argument("--seq-lens", nargs="+", type=int, default=[4096, 16384],
                        help="sequence lengths L (each must divide --tokens-per-step)")
    parser.add_argument("--tokens-per-step", type=int,
                        help="tokens of one optimizer step, rows = this / L (default 32768 on "
                        "CUDA; on CPU 8 rows of the longest L)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per case")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 3 on CUDA, "
                        "1 on CPU)")
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"],
                        help="autocast dtype (default bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--layout", choices=["packed", "batched"], default="packed",
                        help="packed: [1, rows·L] + cu_seqlens, as gdn train feeds the model; "
                        "batched: [rows, L]")
    parser.add_argument("--override", type=parse_override, action="append", default=[],
                        metavar="KEY=VALUE", help="ModelConfig override, e.g. backend=triton "
                        "(repeatable)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="recompute each block in the backward (as gdn train does)")
    parser.add_argument("--peak-flops", type=float,
                        help="peak FLOP/s of the device for MFU (default: the bf16 table)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; on "
                        "a busy machine 1 avoids OpenMP threads waiting on each other)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "train")
    parser.add_argument("--tag", default="", help="suffix of the results file name")
    parser.add_argument("--no-save", action="store_true", help="print only; write no files")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device visible to torch")
    if unknown := [p for p in args.presets if p not in preset_names()]:
        parser.error(f"--presets: unknown {unknown}; choose from {', '.join(preset_names())}")
    if args.tokens_per_step is None:
        args.tokens_per_step = 32768 if device.type == "cuda" else 8 * max(args.seq_lens)
    for name, value in (("--tokens-per-step", args.tokens_per_step), ("--steps", args.steps)):
        if value < 1:
            parser.error(f"{name} must be >= 1, got {value}")
    if bad := [L for L in args.seq_lens if L < 2 or args.tokens_per_step % L]:
        parser.error(f"--seq-lens: {bad} must be >= 2 and divide --tokens-per-step "
                     f"{args.tokens_per_step}")
    if args.warmup is None:
        args.warmup = 3 if device.type == "cuda" else 1
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if not re.fullmatch(r"[A-Za-z0-9._-]*", args.tag):
        parser.error(f"--tag: {args.tag!r} must be letters, digits, '.', '_' or '-'")
    args.override = dict(args.override)
    try:
        for preset in args.presets:
            ModelConfig.from_preset(preset, **args.override)
    except (TypeError, ValueError) as error:
        parser.error(f"--override: {error}")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))

    head = bench.header(device)
    rows = []
    for preset in args.presets:
        for seq_len in args.seq_lens:
            print(f"{preset} L={seq_len} ...", file=sys.stderr, flush=True)
            try:
                rows.append(run_case(preset, seq_len, args, device, dtype))
            except Exception as error:  # noqa: BLE001 — record it, time the other cases
                print(f"{preset} L={seq_len}: {type(error).__name__}: {error}",
                      file=sys.stderr)
                rows.append({"preset": preset, "seq_len": seq_len,
                             "rows": args.tokens_per_step // seq_len,
                             "status": f"error: {type(error).__name__}: {error}"[:300]})
    if device.type == "cpu":
        head["load_avg_end"] = list(os.getloadavg())
    result = {"header": head, "rows": rows}

    sys.stderr.flush()
    print(f"\n{head['device']} · torch {head['torch']} · Triton {head['triton']} · "
          f"commit {head['commit']} · {str(dtype).removeprefix('torch.')} · {args.layout} · "
          f"{args.tokens_per_step:,} tokens/step · median of {args.steps} steps")
    print("\n".join(table(rows)))
    if not args.no_save:
        stem = bench.results_stem(head)
        path = args.out / (f"{stem}-{args.tag}.json" if args.tag else f"{stem}.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    if any(r["status"].startswith("error") for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
