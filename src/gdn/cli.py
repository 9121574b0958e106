"""The `gdn` command. Thin: parses flags, calls the library, turns errors into one line.

    gdn train                      # gdn-tiny on the built-in corpus, CPU: ~1.5 min
    gdn data prepare --input notes.txt --out data/notes
    gdn train --data data/notes --max-steps 300 --out runs/notes
    torchrun --nproc_per_node 2 -m gdn train --preset gdn-tiny --max-steps 50
    gdn check                      # chunked path vs reference on this machine (CPU is fine)
    gdn check --length 1000 --head-dim 100
"""

from __future__ import annotations

import argparse
import sys

import torch

from gdn.data.command import add_data_parser
from gdn.train.command import add_train_parser


def _check(args: argparse.Namespace) -> int:
    from gdn.selfcheck import format_rows, run_check

    torch.set_num_threads(max(1, args.threads or torch.get_num_threads()))
    print(f"gdn check: B={args.batch} T={args.length} H={args.heads} HV={args.v_heads} "
          f"K=V={args.head_dim} chunk={args.chunk_size} seed={args.seed} "
          f"(torch {torch.__version__}, {torch.get_num_threads()} threads)")
    rows, reference_seconds = run_check(
        B=args.batch, T=args.length, H=args.heads, HV=args.v_heads, K=args.head_dim,
        V=args.head_dim, chunk_size=args.chunk_size, seed=args.seed)
    print(f"reference (token by token, float64) fwd+bwd: {reference_seconds:.3f} s for both ops")
    print(format_rows(rows))
    failed = [r for r in rows if not r.ok]
    print("all within tolerance" if not failed else f"{len(failed)} row(s) out of tolerance")
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gdn", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="verb", required=True)
    check = verbs.add_parser(
        "check", help="compare the chunked algorithm with the token-by-token reference",
        description="Forward and backward of both recurrences on random inputs; the chunked "
                    "path in float64 and float32 against the float64 reference.\n"
                    "example: gdn check --length 300 --heads 2 --v-heads 4 --head-dim 64",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    check.add_argument("--batch", type=int, default=2, help="B (default 2)")
    check.add_argument("--length", type=int, default=300, help="T (default 300)")
    check.add_argument("--heads", type=int, default=2, help="H, q/k heads (default 2)")
    check.add_argument("--v-heads", type=int, default=4, help="HV, v heads (default 4)")
    check.add_argument("--head-dim", type=int, default=64, help="K = V (default 64)")
    check.add_argument("--chunk-size", type=int, default=64, help="chunk size (default 64)")
    check.add_argument("--seed", type=int, default=0)
    check.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    check.set_defaults(run=_check)
    add_train_parser(verbs)
    add_data_parser(verbs)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (TypeError, ValueError) as error:
        print(f"gdn {args.verb}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
