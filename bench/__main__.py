"""``python -m bench``: run the benchmarks (see :mod:`bench.benchmarks`)."""

from bench.benchmarks import main
from experiments import cli

if __name__ == "__main__":
    raise SystemExit(cli(main))
