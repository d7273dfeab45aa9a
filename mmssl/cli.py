"""The single `mmssl` entry point.

Each command lives in the package that owns it and exposes `register(subparsers)`, which adds its
parser and sets `func(args) -> int | None`. Command modules import only light things at top level
so that `mmssl --help` and `mmssl prep ...` stay fast; heavy imports happen inside the handlers.

Commands register lazily: `COMMANDS` names each command's module as a string with a one-line help,
`mmssl --help` lists the table without importing any command module, and `mmssl CMD ...` imports
CMD's module alone and lets it register its full parser. So `mmssl train` runs without the `eval`
package installed, and `mmssl eval ...` without it says, in one line, which package is missing.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Iterable, NamedTuple

from mmssl.errors import UserError


class Command(NamedTuple):
    name: str     # `mmssl NAME ...`
    module: str   # imported only when NAME is run (or by `build_parser()` with every command)
    help: str     # the line `mmssl --help` shows; the module's own parser gives the same one


# in the order `mmssl --help` lists them
COMMANDS = (
    Command("prep", "data_prep.cli", "turn raw data into webdataset shards"),
    Command("train", "mmssl.train.cli", "train a dual encoder (contrastive + optional heads) on webdataset shards"),
    Command("eval", "eval.cli", "zero-shot classification, retrieval, linear probe"),
    Command("finetune", "mmssl.finetune.cli",
            "fine-tune a checkpoint's image tower on labelled data (CE, LP-FT, FLYP; WiSE-FT)"),
    Command("wise", "mmssl.finetune.wise_cli", "WiSE-FT: interpolate a zero-shot and a fine-tuned checkpoint"),
    Command("export", "mmssl.export", "write open_clip-loadable weights + model config JSON"),
    Command("caption", "mmssl.captioning", "caption images with a checkpoint's caption head (CoCa)"),
    Command("embed", "eval.embed_cli",
            "embed shards with a model into img_emb/ text_emb/ metadata/ parts (clip-retrieval layout)"),
    Command("index", "eval.index.cli", "build and query FAISS search indexes"),
    Command("serve", "eval.serve", "serve an index over HTTP (search API and web page)"),
    Command("quickstart", "mmssl.quickstart",
            "the main job: synthetic data -> training -> eval -> search index -> report.html"),
    Command("report", "mmssl.report", "write DIR/report.html from a quickstart folder's artefacts"),
)


class MissingPackage(Exception):
    """A command's module (or a package it imports at top level) is not installed."""

    def __init__(self, command: Command, package: str):
        super().__init__(f"`mmssl {command.name}` needs the '{package}' package, which is not installed")


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit status 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def build_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The `mmssl` parser; `commands`: the names whose modules are imported and register their
    full parsers (default: every command); the others are one-line entries for `mmssl --help`.

    Raises `MissingPackage` when a named command's module cannot be imported for want of a package.
    """
    wanted = None if commands is None else set(commands)
    parser = OneLineErrorParser(prog="mmssl", description="mmssl: multimodal (image-text) self-supervised pretraining, evaluation and search.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineErrorParser)
    sub.required = True
    for command in COMMANDS:
        if wanted is None or command.name in wanted:
            _import(command).register(sub)
        else:
            sub.add_parser(command.name, help=command.help)
    return parser


def _import(command: Command):
    try:
        return importlib.import_module(command.module)
    except ModuleNotFoundError as err:
        if not err.name:
            raise
        raise MissingPackage(command, err.name.partition(".")[0]) from err


def _command_name(argv: list[str]) -> str | None:
    """The command word: the first argument that is not an option (`mmssl` itself takes no values)."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mmssl")
    except PackageNotFoundError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    name = _command_name(argv)
    try:
        # an unknown command (or none) gets the table alone: argparse's one-line error, exit 2
        parser = build_parser([name] if any(command.name == name for command in COMMANDS) else [])
    except MissingPackage as err:
        sys.stderr.write(f"mmssl: error: {err}\n")
        return 2
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
