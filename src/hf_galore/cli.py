"""`hf-galore`: a small dispatcher; each subcommand module adds its parser (accelerate's CLI layout)."""

from __future__ import annotations

import argparse
import os
import runpy
import sys

from .estimate import estimate_command_parser


def run_script(target: str, script_args: list[str], *, module: bool = False) -> None:
    """Run a training script (or `-m` module) as `__main__` with hf_galore registered, argv as it expects."""
    from .integration import register

    register()
    if module:
        sys.argv = [target, *script_args]
        runpy.run_module(target, run_name="__main__", alter_sys=True)
        return
    if not os.path.isfile(target):
        raise SystemExit(f"hf-galore run: no such script {target!r}. Usage: hf-galore run SCRIPT.py [ARGS...]")
    sys.argv = [target, *script_args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
    runpy.run_path(target, run_name="__main__")


def run_command_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run a Hugging Face training script with --optim galore_* served by hf_galore",
        description="Run SCRIPT.py (or -m MODULE) with hf_galore registered; ARGS go to the script unchanged.",
    )
    parser.add_argument("-m", dest="module", action="store_true", help="TARGET is a module name, as python -m")
    parser.add_argument("target", metavar="SCRIPT.py|MODULE")
    parser.add_argument("script_args", nargs=argparse.REMAINDER, metavar="ARGS")
    parser.set_defaults(func=lambda args: run_script(args.target, args.script_args, module=args.module))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="hf-galore", description="GaLore for Hugging Face training scripts.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    run_command_parser(subparsers)
    estimate_command_parser(subparsers)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
