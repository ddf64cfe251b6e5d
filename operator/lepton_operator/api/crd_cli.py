"""`lepton-operator crd`: print, write or check the generated LeptonJob CRD.

    lepton-operator crd                      # print the CRD YAML
    lepton-operator crd --write              # regenerate crds/leptonjobs.lepton.ai.yaml
    lepton-operator crd --check              # exit 1 when the committed file drifted
    lepton-operator crd --server-version 1.20  # the variant to install on that server

Also runnable as `python -m lepton_operator.api.crd_cli`.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path
from typing import Optional

from .crd import crd_for_server, yaml_dump_crd

# The committed CRD, found relative to the source tree (editable installs, CI, the repo).
REPO_ROOT = Path(__file__).resolve().parents[3]
CRD_FILE = REPO_ROOT / "crds" / "leptonjobs.lepton.ai.yaml"

HELP = "print the LeptonJob CRD generated from the models (or --check/--write the committed file)"


def drift(path: Path = CRD_FILE) -> list[str]:
    """Unified diff between the committed CRD file and the generated one (empty: in sync)."""
    expected = yaml_dump_crd()
    try:
        actual = path.read_text()
    except FileNotFoundError:
        return [f"{path} does not exist; run `lepton-operator crd --write`\n"]
    if actual == expected:
        return []
    return list(
        difflib.unified_diff(
            actual.splitlines(keepends=True),
            expected.splitlines(keepends=True),
            fromfile=f"{path} (committed)",
            tofile="generated from models.py",
        )
    )


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `crd` on the CLI's subparsers; the parser's `func` runs it."""
    parser = subparsers.add_parser("crd", help=HELP, description=HELP)
    _add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 (printing a diff) when --file differs")
    mode.add_argument("--write", action="store_true", help="write the generated CRD to --file")
    mode.add_argument(
        "--server-version",
        metavar="VERSION",
        help="print the CRD for a server of this version, e.g. 1.20 (CEL rules stripped before 1.25)",
    )
    parser.add_argument("--file", type=Path, default=CRD_FILE, help=f"committed CRD file (default {CRD_FILE})")


def run(args: argparse.Namespace) -> int:
    """Run the subcommand; returns the exit status."""
    if args.check:
        diff = drift(args.file)
        if diff:
            sys.stdout.writelines(diff)
            print(f"\n{args.file} is out of date: run `lepton-operator crd --write`", file=sys.stderr)
            return 1
        print(f"{args.file} is up to date")
        return 0
    if args.write:
        args.file.parent.mkdir(parents=True, exist_ok=True)
        args.file.write_text(yaml_dump_crd())
        print(f"wrote {args.file}")
        return 0
    if args.server_version:
        sys.stdout.write(yaml_dump_crd(crd_for_server(args.server_version)))
        return 0
    sys.stdout.write(yaml_dump_crd())
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="lepton-operator crd", description=HELP)
    _add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
