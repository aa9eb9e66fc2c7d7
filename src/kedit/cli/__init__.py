"""``kedit`` command line. Each command group lives in its own module ``kedit.cli.<group>`` that
defines ``register(subparsers)``; heavy imports (transformers, MLflow, GX, Prefect) happen inside
the command functions so ``kedit --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# the editors as they are, the nightly default first (tests/test_cli_help.py keeps this list equal to METHODS)
EDITORS_HELP = ("memoir (sparse residual memory; the nightly default), AlphaEdit, MEMIT, ROME (weight editors) "
                "and T-Patcher (patch neurons)")
DESCRIPTION = ("kedit keeps a language model's facts up to date: it edits facts into the model with "
               f"{EDITORS_HELP}, gates each edit state against the current champion, and "
               "versions every state so any of them can be audited and rolled back.")
EPILOG = "Run `kedit COMMAND --help` for a command's options; `kedit nightly demo` runs the whole pipeline."

# Command-group modules, in the order they appear in --help. Each owns its sub-commands.
GROUPS = ["model", "stats", "edit", "trace", "calibrate", "evaluate", "feed", "lineage", "bench", "nightly"]


class CLIError(Exception):
    """A user-facing error: printed without a traceback, exit code 2."""


def quiet_env() -> None:
    """Telemetry off and hub offline: kedit runs with no network."""
    for k, v in {"HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
                 "DVC_NO_ANALYTICS": "1", "GX_ANALYTICS_ENABLED": "false",
                 "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ.setdefault(k, v)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kedit", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--workspace", "-w", default=None,
                        help="project folder holding models/, stats/, lineage/ (default: $KEDIT_HOME or cwd)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress and show full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for group in GROUPS:
        try:
            mod = importlib.import_module(f"kedit.cli.{group}")
        except ModuleNotFoundError as exc:
            if exc.name == f"kedit.cli.{group}":
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. A reader that stops early (``kedit lineage log | head``) ends it quietly with
    exit status 1 (as rich's own console does, and Python's documentation recommends), not a traceback."""
    try:
        try:
            return _main(argv)
        finally:
            sys.stdout.flush()  # inside the try: a closed pipe shows up here, not at interpreter exit
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's own final flush must not fail again
        return 1


def _main(argv: list[str] | None) -> int:
    quiet_env()
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        rc = args.func(args)
    except (CLIError, FileNotFoundError, FileExistsError, ValueError, KeyError) as exc:
        if args.verbose:
            raise
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"kedit {args.command}: error: {msg}", file=sys.stderr)
        return 2
    return int(rc or 0)


def workspace(args):
    from kedit.workspace import Workspace

    return Workspace.default(args.workspace)


if __name__ == "__main__":
    sys.exit(main())
