"""The single `mmssl` entry point.

Each command lives in the package that owns it and exposes `register(subparsers)`, which adds its
parser and sets `func(args) -> int | None`. Command modules import only light things at top level
so that `mmssl --help` and `mmssl prep ...` stay fast; heavy imports happen inside the handlers.
The modules are named here as strings and imported on demand, which also keeps `mmssl` free of a
hard import of `eval` (see DESIGN.md).
"""
from __future__ import annotations

import argparse
import importlib
import sys

from mmssl.errors import UserError

# command modules, in the order `mmssl --help` lists them
COMMAND_MODULES = (
    "data_prep.cli",        # prep csv|folder|coco|synthetic
    "mmssl.train.cli",      # train
    "eval.cli",             # eval zeroshot|retrieval|linear-probe
    "mmssl.export",         # export
    "eval.index.cli",       # index build|search
    "eval.serve",           # serve
    "mmssl.quickstart",     # quickstart
    "mmssl.report",         # report (HTML from a quickstart folder)
)


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit status 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="mmssl", description="mmssl: multimodal (image-text) self-supervised pretraining, evaluation and search.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineErrorParser)
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mmssl")
    except PackageNotFoundError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
    except UserError as err:
        sys.stderr.write(f"mmssl: error: {err}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("mmssl: interrupted\n")
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
