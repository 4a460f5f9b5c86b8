"""`dynabert` console command. Each part registers its own subcommands:

    train, eval   training/cli.py
    export        model/export.py
    serve         service/cli.py
    bench         bench/cli.py

A part module exposes ``register(subparsers)``, which adds its parsers and sets ``func``
(a callable taking the parsed args and returning an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

PARTS = ("training.cli", "model.export", "service.cli", "bench.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dynabert", description="Train, evaluate, export, serve and benchmark DynaBERT models."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in PARTS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:  # the part exists but one of its imports is missing: say so
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the console command: `serve` re-executes itself before torch is imported
        try:
            from service.cli import reexec_with_passive_openmp  # (the standard library only)
        except ModuleNotFoundError as e:
            if e.name not in ("service", "service.cli"):
                raise
        else:
            reexec_with_passive_openmp()
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (FileNotFoundError, ValueError) as e:  # user errors: one clear line, no traceback
        logging.getLogger("dynabert").error("%s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
