"""The ``difflab`` command line: thin, it only parses arguments and calls the library.

    difflab train / train-classifier / train-vae / distill   one command per training task (cli/train.py, difflab.tasks.TASKS)
    difflab sample / samplers           cli/sample.py
    difflab eval / eval-vae             cli/evaluate.py
    difflab export                      cli/export.py
    difflab serve                       cli/serve.py

Exit codes: 0 done, 2 a user mistake or a damaged file (one line on stderr), 130 interrupted (Ctrl-C, SIGTERM),
1 a bug (a stack trace); see difflab.errors.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import warnings

from difflab import __version__
from difflab.cli import evaluate, export, sample, serve, train
from difflab.errors import DifflabError, Interrupted


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="difflab", description="Denoising diffusion models: train, sample, evaluate.",
                                     epilog="run 'difflab COMMAND --help' for the options of each command")
    parser.add_argument("--version", action="version", version=f"difflab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    train.add_parsers(sub)
    sample.add_parser(sub)
    sample.add_samplers_parser(sub)
    evaluate.add_parser(sub)
    evaluate.add_vae_parser(sub)
    export.add_parser(sub)
    serve.add_parser(sub)
    return parser


def _terminate(signum, frame):
    raise KeyboardInterrupt


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings from the library read as one line on the command line, as errors do (no file and line)."""
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = _format_warning
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    rank = os.environ.get("RANK", "0")  # under torchrun only rank 0 talks; the others report their own errors
    previous = None
    if threading.current_thread() is threading.main_thread():  # SIGTERM as Ctrl-C: exit code 130, whatever runs
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        if rank != "0":
            with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
                return args.handler(args)
        return args.handler(args)
    except DifflabError as e:
        if rank == "0" or not e.all_ranks:
            kind = "stopped" if isinstance(e, Interrupted) else "error"
            print(f"difflab: {kind}{'' if rank == '0' else f' (rank {rank})'}: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # a folder that cannot be written, a full disk, a file that vanished: not a bug
        where = f"{e.filename}: " if e.filename else ""
        print(f"difflab: error{'' if rank == '0' else f' (rank {rank})'}: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("difflab: interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
