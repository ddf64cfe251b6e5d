"""The LeptonJob field reference in Markdown, generated from the CRD (and so from the models).

The README carries it between two marker lines; `lepton-operator reference --write-readme`
refreshes it and a unit test fails when it drifts. Reading the CRD schema rather than the
pydantic models keeps the reference identical to what `kubectl explain lj.spec` shows.

Pure: imports neither kopf nor the Kubernetes client.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from .crd import build_crd

README = Path(__file__).resolve().parents[3] / "README.md"
BEGIN = "<!-- BEGIN GENERATED REFERENCE (lepton-operator reference --write-readme) -->"
END = "<!-- END GENERATED REFERENCE -->"


def _type(schema: dict) -> str:
    kind = schema.get("type", "object")
    if kind == "array":
        return f"[]{_type(schema.get('items', {}))}"
    if kind == "object" and "additionalProperties" in schema:
        return f"map[string]{_type(schema['additionalProperties'])}"
    return kind


def _bounds(schema: dict) -> str:
    parts = []
    if "enum" in schema:
        parts.append(" \\| ".join(f"`{v}`" for v in schema["enum"]))
    for key, label in (
        ("minimum", ">="),
        ("maximum", "<="),
        ("minLength", "len >="),
        ("maxLength", "len <="),
        ("maxItems", "items <="),
        ("maxProperties", "keys <="),
    ):
        if key in schema:
            parts.append(f"{label} {schema[key]}")
    if "pattern" in schema:
        # A `|` would end the Markdown table cell, even inside backticks.
        parts.append(f"pattern `{schema['pattern']}`".replace("|", "\\|"))
    return ", ".join(parts)


def _rows(schema: dict, path: str) -> list[tuple[str, str, str, str, str]]:
    rows = []
    required = set(schema.get("required", []))
    for name, prop in schema.get("properties", {}).items():
        field_path = f"{path}.{name}"
        default = json.dumps(prop["default"]) if "default" in prop else ("required" if name in required else "")
        description = re.sub(r"\s+", " ", prop.get("description", "")).replace("|", "\\|")
        rows.append((field_path, _type(prop), default, _bounds(prop), description))
        child = prop.get("items", prop) if prop.get("type") == "array" else prop
        if child.get("properties"):
            rows.extend(_rows(child, field_path + ("[]" if prop.get("type") == "array" else "")))
    return rows


def reference_markdown() -> str:
    """Markdown tables of every spec and status field: path, type, default, bounds, description."""
    schema = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    out = []
    for part in ("spec", "status"):
        out.append(f"#### `{part}`\n")
        out.append("| field | type | default | bounds | description |")
        out.append("|---|---|---|---|---|")
        for field_path, kind, default, bounds, description in _rows(schema["properties"][part], part):
            out.append(f"| `{field_path}` | {kind} | {f'`{default}`' if default else ''} | {bounds} | {description} |")
        out.append("")
    return "\n".join(out)


def readme_section() -> str:
    return f"{BEGIN}\n{reference_markdown()}{END}"


def readme_with_reference(text: str) -> str:
    """`text` with the generated block replaced; raises if the markers are missing."""
    start, end = text.index(BEGIN), text.index(END) + len(END)
    return text[:start] + readme_section() + text[end:]


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("reference", help="print the LeptonJob field reference (Markdown)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write-readme", action="store_true", help=f"refresh the block in {README}")
    mode.add_argument("--check-readme", action="store_true", help="exit 1 when the README's block is stale")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not (args.write_readme or args.check_readme):
        print(reference_markdown())
        return 0
    text = README.read_text()
    fresh = readme_with_reference(text)
    if args.check_readme:
        if fresh != text:
            print(f"{README}: the LeptonJob reference is stale; run `lepton-operator reference --write-readme`")
            return 1
        return 0
    README.write_text(fresh)
    print(f"refreshed the reference in {README}")
    return 0
