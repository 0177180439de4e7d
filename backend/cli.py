"""One command-line entry point with a subcommand per pipeline stage.

Each stage module that offers a command defines ``add_command(subparsers)``,
which adds its parser and sets ``func`` (called with the parsed namespace and
returning an exit code). Register the module in ``COMMAND_MODULES``.
"""

from __future__ import annotations

import argparse
import importlib
import logging

# Stage modules that contribute a subcommand, in the order --help lists them.
COMMAND_MODULES: list[str] = [
    "backend.corpus_build",
    "backend.miniclip",
    "backend.sae_cli",
    "backend.evaluate",
    "backend.generator",
    "backend.edits",
    "backend.build",
    "backend.cache",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m backend",
        description="MP-SAE Atlas: build corpora, train the embedded CLIP and "
        "MP-SAEs, and fill the cache the dashboard reads.",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log debug messages"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_command(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)
