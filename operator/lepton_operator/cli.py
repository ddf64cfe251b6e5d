"""``lepton-operator`` command line.

Each subcommand lives in its own module, listed in :data:`SUBCOMMAND_MODULES`. A module
exposes ``add_parser(subparsers)``, which adds its parser(s) and sets
``func=<handler>`` as a default; the handler takes the parsed ``argparse.Namespace`` and
returns an exit code. To add a subcommand, add one line to the table.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMAND_MODULES = [
    "lepton_operator.reconcile.cli",  # run: the operator (kopf)
    "lepton_operator.api.crd_cli",  # crd: print, --write or --check the generated CRD
    "lepton_operator.scaling.simulate",  # simulate: autoscaling policy on a throughput curve
    "lepton_operator.api.reference",  # reference: the LeptonJob field reference (README)
]


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="lepton-operator",
        description="Kubernetes operator for elastic distributed PyTorch training.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in SUBCOMMAND_MODULES:
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lepton-operator`` script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    return int(func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
