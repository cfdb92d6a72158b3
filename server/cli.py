"""`fedpath-server`: the consortium admin's command.

Certificates, hospital registration, the SuperLink and federated runs come with the federation
and security work; today this command only describes itself.
"""

from __future__ import annotations

import argparse
import sys

from shared.cli import run_cli


def build_parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog="fedpath-server", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
