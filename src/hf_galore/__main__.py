"""`python -m hf_galore SCRIPT.py ARGS…` (also under `accelerate launch -m` and `torchrun -m`): run a script with
hf_galore registered. `python -m hf_galore -m MODULE ARGS…` runs a module; `python -m hf_galore run|estimate …`
is the CLI.
"""

import sys

from .cli import main, run_script

USAGE = "usage: python -m hf_galore SCRIPT.py [ARGS...] | -m MODULE [ARGS...] | run ... | estimate ..."


def dispatch(argv: list[str]) -> None:
    """Run what `python -m hf_galore ARGV…` names; no target (or `-h`) exits with the usage line."""
    if not argv or argv[0] in ("-h", "--help"):
        raise SystemExit(USAGE)
    if argv[0] in ("run", "estimate"):
        main(argv)
    elif argv[0] == "-m":
        if len(argv) < 2:
            raise SystemExit(USAGE)
        run_script(argv[1], argv[2:], module=True)
    else:
        run_script(argv[0], argv[1:])


if __name__ == "__main__":
    dispatch(sys.argv[1:])
