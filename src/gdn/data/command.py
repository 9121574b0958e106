"""`gdn data prepare`: text files → a tokenised dataset directory for `gdn train --data`.

``add_data_parser(subparsers)`` adds the `data` verb (with its `prepare` sub-verb) to the
`gdn` parser; `gdn.cli` wires it in. The handler prints one summary line, and turns bad
input into one line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_data_parser", "run_prepare"]

PREPARE_EXAMPLES = """\
examples:
  gdn data prepare --out /tmp/pydoc                      # the built-in corpus, byte tokens
  gdn data prepare --out /tmp/pydoc-bpe --train-bpe 1024 # the same, with a 1024-token BPE
  gdn data prepare --input notes/ books.jsonl --out /tmp/mine --val-fraction 0.05
  gdn data prepare --input shard.parquet --out /tmp/web --tokenizer tokenizer.json

Inputs: .txt (one document per file), .jsonl (one per line, field "text"), .parquet
(column "text"); directories are read recursively in sorted order. Each document gets an
<|eos|> at its end; documents go to "train" or "val" by a hash of their text and the seed.
"""


def run_prepare(args: argparse.Namespace) -> int:
    """Run `gdn data prepare` from parsed flags; prints the summary, returns the exit code."""
    from gdn.data.prepare import prepare_dataset
    from gdn.data.shards import TokenDataset

    try:
        out = prepare_dataset(args.input, args.out, tokenizer=args.tokenizer,
                              train_bpe_vocab=args.train_bpe, val_fraction=args.val_fraction,
                              seed=args.seed, overwrite=args.overwrite,
                              text_field=args.text_field)
    except (OSError, ValueError, TypeError, ImportError) as error:
        print(f"gdn data prepare: error: {error}", file=sys.stderr)
        return 2
    train, val = TokenDataset(out, "train"), TokenDataset(out, "val")
    print(f"gdn data prepare: {out}: train {train.n_tokens:,} tokens in {train.n_documents:,} "
          f"documents, val {val.n_tokens:,} tokens in {val.n_documents:,} documents "
          f"(tokenizer {train.meta['tokenizer']}, vocab {train.vocab_size})")
    return 0


def add_data_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `data` (and `data prepare`) to a `gdn` verbs object; returns the `data` parser.
    The `prepare` parser sets ``run=run_prepare``, as gdn.cli's verbs do."""
    data = subparsers.add_parser(
        "data", help="prepare tokenised datasets for training",
        description="Dataset tools.\nexample: gdn data prepare --out /tmp/pydoc",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = data.add_subparsers(dest="data_verb", required=True)
    prepare = actions.add_parser(
        "prepare", help="tokenise text files (or the built-in corpus) into shards",
        description=__doc__.splitlines()[0] + "\n\n" + PREPARE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    prepare.add_argument("--input", nargs="+", metavar="PATH", default=None,
                         help="files or directories (.txt, .jsonl, .parquet); "
                              "omit for the built-in corpus (Python's pydoc topics)")
    prepare.add_argument("--out", required=True, metavar="DIR",
                         help="dataset directory to write (must be empty or absent)")
    vocab = prepare.add_mutually_exclusive_group()
    vocab.add_argument("--tokenizer", metavar="PATH", default=None,
                       help="a tokenizer.json to use (default: bytes, vocab 260)")
    vocab.add_argument("--train-bpe", type=int, metavar="VOCAB", default=None,
                       help="train a byte-level BPE of this vocab size (≥ 260) on the inputs")
    prepare.add_argument("--val-fraction", type=float, default=0.01, metavar="F",
                         help="share of documents held out for validation, in [0, 1) "
                              "(default 0.01; at least one when there are two or more)")
    prepare.add_argument("--seed", type=int, default=0,
                         help="seed of the train/val split (default 0)")
    prepare.add_argument("--text-field", default="text", metavar="NAME",
                         help="jsonl field / parquet column holding the text (default text)")
    prepare.add_argument("--overwrite", action="store_true",
                         help="replace a non-empty --out (the old one stays until the new one "
                              "is complete)")
    prepare.set_defaults(run=run_prepare)
    return data
