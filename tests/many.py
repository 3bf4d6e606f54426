"""`python tests/many.py ARGS... -- ARGS... -- ...`: several `hpcfl.main` runs, one after another,
in one process (under mpiexec: in one job), so that a test comparing many configurations on 1
and 2 ranks pays for two process starts, not two per configuration. Each run is what
`python -m hpcfl.main ARGS` does (its own World, results file and signal handlers). Exit code:
the first run's that was not 0 (the later runs are not started)."""
import sys

from hpcfl.main import main


def runs(argv: list[str]) -> list[list[str]]:
    out = [[]]
    for a in argv:
        if a == "--":
            out.append([])
        else:
            out[-1].append(a)
    return [r for r in out if r]


if __name__ == "__main__":
    for args in runs(sys.argv[1:]):
        code = main(args)
        if code:
            sys.exit(code)
