"""Where a training step's GPU time goes: CUDA time per kernel of one full step of a preset.

    python3 benchmarks/train_profile.py --preset gdn-0.4b --seq-len 4096 --rows 8

Runs the training loop's step (``gdn.train.loop.train_step`` + AdamW, as
``benchmarks/train_throughput.py`` does) a few times to warm up, then profiles ``--steps``
steps with torch.profiler and prints the ``--top`` kernels by CUDA time per step, so a change
to a layer can name the kernel it should move (benchmarks/NOTES.md).
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gdn.models import CausalLM, ModelConfig  # noqa: E402
from gdn.train.loop import train_step  # noqa: E402
from gdn.train.optim import build_optimizer  # noqa: E402
from train_throughput import synthetic_batch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="gdn-0.4b")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    device = torch.device("cuda")
    model = CausalLM(ModelConfig.from_preset(args.preset)).to(device)
    optimizer = build_optimizer(model, lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95),
                                device=device)
    batch = synthetic_batch(rows=args.rows, seq_len=args.seq_len,
                            vocab_size=model.config.vocab_size, layout="packed",
                            device=device, seed=0)

    def step():
        train_step(model, optimizer, [batch], grad_clip=1.0, autocast_dtype=torch.bfloat16)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    per_kernel = defaultdict(float)
    for event in prof.key_averages():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[event.key] += event.device_time_total / args.steps / 1000.0
    total = sum(per_kernel.values())
    print(f"{args.preset} L={args.seq_len} rows={args.rows}: {total:.1f} ms of kernels per step")
    for name, ms in sorted(per_kernel.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"{ms:9.2f} ms {100 * ms / total:5.1f}%  {name[:90]}")


if __name__ == "__main__":
    main()
