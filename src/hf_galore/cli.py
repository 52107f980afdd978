"""Running a training script with hf_galore registered (`hf-galore run`, `python -m hf_galore`).

The `hf-galore` dispatcher and its parsers live in the top-level module `hf_galore_cli`, so that `--help` imports
neither torch nor transformers; `main` is re-exported here for `python -m hf_galore.cli` and older entry points.
"""

from __future__ import annotations

import importlib.util
import os
import runpy
import sys

from hf_galore_cli import main

__all__ = ["main", "run_script"]


def run_script(target: str, script_args: list[str], *, module: bool = False) -> None:
    """Run a training script (or `-m` module) as `__main__` with hf_galore registered, argv as it expects."""
    from .integration import register

    register()
    if module:
        if sys.path[:1] != [os.getcwd()]:
            sys.path.insert(0, os.getcwd())  # as `python -m` does: a module in the current folder is found
        try:
            found = importlib.util.find_spec(target) is not None
        except ImportError:  # its package is missing
            found = False
        if not found:
            raise SystemExit(
                f"hf-galore run: no module named {target!r} (looked in the current folder {os.getcwd()!r} and on "
                f"sys.path). Run from the folder that holds {target.split('.')[0]!r}, or pass a script: "
                "hf-galore run SCRIPT.py [ARGS...]"
            )
        sys.argv = [target, *script_args]
        runpy.run_module(target, run_name="__main__", alter_sys=True)
        return
    if not os.path.isfile(target):
        raise SystemExit(f"hf-galore run: no such script {target!r}. Usage: hf-galore run SCRIPT.py [ARGS...]")
    sys.argv = [target, *script_args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
    runpy.run_path(target, run_name="__main__")


if __name__ == "__main__":
    main()
