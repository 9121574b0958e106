"""`gdn train`: the flags are the fields of ``TrainConfig``, generated from the dataclass.

``add_train_parser(subparsers)`` adds the verb to the `gdn` parser (gdn.cli wires it in);
its handler ``run_train`` builds the config — TrainConfig defaults, then ``--config`` TOML
values, then the flags given on the command line — and calls ``gdn.train.loop.train``. Bad
values and a diverged run end with one line on stderr (exit status 2 and 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from gdn.train.config import TrainConfig, load_toml

__all__ = ["TRAIN_EXAMPLES", "add_train_parser", "config_from_args", "run_train"]

TRAIN_EXAMPLES = """\
examples (CPU is fine; the first is the demo, ~1.5 minutes on 2 cores):
  gdn train
  gdn train --max-steps 30 --seq-len 128 --out runs/quick
  gdn train --model d_model=96 --model n_layers=2 --lr 1e-2 --max-steps 30
  gdn train --max-steps 40 --stop-at 20 --out runs/split    # a first job: steps 1-20
  gdn train --max-steps 40 --resume --out runs/split        # the next job: steps 21-40
  gdn data prepare --out /tmp/pydoc && gdn train --data /tmp/pydoc --max-steps 30
  gdn train --config run.toml --lr 1e-3
  torchrun --nproc-per-node 2 -m gdn train --batch-size 4 --out runs/ddp

A run.toml holds the same fields (flags given on the command line win over it):
  max_steps = 300
  seq_len = 512
  out = "runs/longer"
  [model]
  backend = "torch"

The run directory gets config.json, metrics.jsonl, tensorboard/, checkpoints/, loss.png and
hf/ (the Hugging Face export). --resume continues the newest complete checkpoint there, with
the loss of every later step bit-identical on CPU to an uninterrupted run.
"""


def _parse_override(text: str) -> tuple[str, object]:
    """KEY=VALUE → (key, value): VALUE as an int, float, true/false, none, or a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (a ModelConfig field), got "
                                         f"{text!r}")
    lowered = raw.lower()
    if lowered in ("true", "false"):
        return key, lowered == "true"
    if lowered in ("none", "null"):
        return key, None
    for convert in (int, float):
        try:
            return key, convert(raw)
        except ValueError:
            pass
    return key, raw


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_field(parser: argparse.ArgumentParser, field: dataclasses.Field) -> None:
    help_text = field.metadata["help"]
    kind = str(field.type)
    common = dict(dest=field.name, default=argparse.SUPPRESS)
    if "metavar" in field.metadata:
        common["metavar"] = field.metadata["metavar"]
    if field.name == "model":
        parser.add_argument(_flag(field.name), action="append", type=_parse_override,
                            help=help_text, **common)
    elif field.name == "resume":
        parser.add_argument(_flag(field.name), nargs="?", const=True, help=help_text, **common)
    elif kind == "bool":
        default = "on" if field.default else "off"
        parser.add_argument(_flag(field.name), action=argparse.BooleanOptionalAction,
                            help=f"{help_text} (default {default})", **common)
    else:
        convert = int if kind == "int" else float if kind.startswith("float") else str
        common.setdefault("metavar", {int: "N", float: "X", str: "NAME"}[convert])
        shown = "" if field.default is None else f" (default {field.default})"
        parser.add_argument(_flag(field.name), type=convert, help=help_text + shown, **common)


def add_train_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `train` to a `gdn` verbs object and return its parser (``run=run_train``)."""
    parser = subparsers.add_parser(
        "train", help="train a model (gdn-tiny on the built-in corpus by default)",
        description="Train a causal LM of the gdn family on a prepared dataset (one process, "
                    "or every rank of a torchrun job).\n\n" + TRAIN_EXAMPLES,
        usage="gdn train [--config FILE] [--FIELD VALUE ...]  (gdn train --help lists them)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="a TOML file of TrainConfig fields ([model] for the model "
                             "overrides); flags given here override it")
    for field in dataclasses.fields(TrainConfig):
        _add_field(parser, field)
    parser.set_defaults(run=run_train)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from parsed `gdn train` flags: the defaults, then ``--config``, then the
    flags that were given."""
    values = load_toml(args.config) if getattr(args, "config", None) else {}
    for field in dataclasses.fields(TrainConfig):
        if field.name not in vars(args):
            continue
        given = getattr(args, field.name)
        if field.name == "model":
            base = values.get("model", {})
            if not isinstance(base, dict):
                raise TypeError(f"model must be a table of ModelConfig overrides, got "
                                f"{base!r}")
            given = {**base, **dict(given)}
        values[field.name] = given
    return TrainConfig.from_dict(values)


def run_train(args: argparse.Namespace) -> int:
    """The `gdn train` handler: 0 when the run finished, 2 for bad input (one line), 1 when
    it diverged."""
    from gdn.train.guard import TrainingDiverged

    try:
        config = config_from_args(args)
        from gdn.train.loop import train

        train(config)
    except (TypeError, ValueError, FileNotFoundError, NotADirectoryError) as error:
        print(f"gdn train: error: {error}", file=sys.stderr)
        return 2
    except TrainingDiverged as error:
        print(f"gdn train: {error}", file=sys.stderr)
        return 1
    return 0
