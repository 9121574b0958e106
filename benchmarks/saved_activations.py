"""What one block keeps for its backward: bytes of the tensors autograd saves, by source line.

    python3 benchmarks/saved_activations.py --presets gdn-0.4b transformer-0.4b --seq-len 4096

The saved tensors of a block are fixed by its autograd graph, not by the device, so this runs
on the CPU (bf16 autocast, the torch backend for the recurrent op) and says where a model's
activation memory goes before a GPU run measures the peak. Each storage is counted once,
under the innermost gdn source line that created the saved tensor's graph node.
"""

from __future__ import annotations

import argparse
import traceback
from collections import defaultdict

import torch

from gdn.models import ModelConfig
from gdn.models.lm import Block


def saved_bytes(preset: str, seq_len: int, documents: int) -> dict[str, int]:
    config = ModelConfig.from_preset(preset, backend="torch")
    block = Block(config, config.layer_types[0])
    x = torch.randn(1, seq_len, config.d_model, requires_grad=True)
    cu_seqlens = torch.linspace(0, seq_len, documents + 1).round().to(torch.int32)
    by_line: dict[str, int] = defaultdict(int)
    storages: set[int] = set()

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in storages:
            storages.add(storage.data_ptr())
            frames = [f for f in traceback.extract_stack()[:-1] if "/gdn/" in f.filename]
            where = (f"{frames[-1].filename.split('/gdn/')[-1]}:{frames[-1].lineno}"
                     if frames else "(outside gdn)")
            by_line[where] += storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16):
        block(x, cu_seqlens=cu_seqlens)
    return dict(by_line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["gdn-0.4b", "transformer-0.4b"])
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--documents", type=int, default=2)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    torch.manual_seed(0)
    for preset in args.presets:
        by_line = saved_bytes(preset, args.seq_len, args.documents)
        total = sum(by_line.values())
        print(f"{preset}: {total / 2**20:,.0f} MiB saved by one block at T = {args.seq_len}")
        for where, size in sorted(by_line.items(), key=lambda kv: -kv[1])[:args.top]:
            print(f"  {size / 2**20:8.1f} MiB  {where}")


if __name__ == "__main__":
    main()
