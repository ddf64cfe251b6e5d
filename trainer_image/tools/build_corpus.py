"""Assemble the trainer's bundled text corpus from CPython standard-library docstrings.

Run once, by hand, with a CPython 3.11 interpreter; the output is committed as
``lepton_trainer/data/corpus.txt`` so that training never downloads anything.

The docstrings are part of CPython, distributed under the Python Software Foundation
License Version 2 (a permissive, GPL-compatible licence); see data/README.txt.

    python trainer_image/tools/build_corpus.py > trainer_image/lepton_trainer/data/corpus.txt
"""

import ast
import pathlib
import sys
import sysconfig

# Modules with long, well-written prose docstrings; a fixed list keeps the corpus stable.
MODULES = [
    "argparse",
    "asyncio/events",
    "asyncio/tasks",
    "asyncio/streams",
    "base64",
    "bisect",
    "calendar",
    "collections/__init__",
    "configparser",
    "contextlib",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "email/message",
    "enum",
    "fractions",
    "ftplib",
    "functools",
    "gettext",
    "heapq",
    "http/client",
    "http/cookiejar",
    "imaplib",
    "inspect",
    "ipaddress",
    "json/__init__",
    "json/decoder",
    "json/encoder",
    "locale",
    "logging/__init__",
    "logging/handlers",
    "mailbox",
    "nntplib",
    "optparse",
    "os",
    "pathlib",
    "pickle",
    "pickletools",
    "pydoc",
    "queue",
    "random",
    "re/__init__",
    "sched",
    "shlex",
    "shutil",
    "smtplib",
    "socket",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "timeit",
    "traceback",
    "turtle",
    "typing",
    "unittest/case",
    "urllib/parse",
    "urllib/request",
    "uuid",
    "warnings",
    "weakref",
    "zipfile",
]
LIMIT = 600_000  # bytes: well under the 1 MB budget for package data


def docstrings(path: pathlib.Path):
    """Yield the module, class and function docstrings of one source file, in order."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) > 80 and doc.isascii():
                yield doc


def main() -> None:
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    out, size = [], 0
    for name in MODULES:
        for doc in docstrings(stdlib / f"{name}.py"):
            if size + len(doc) > LIMIT:
                break
            out.append(doc)
            size += len(doc) + 2
    sys.stdout.write("\n\n".join(out) + "\n")


if __name__ == "__main__":
    main()
