"""The chart's values reference, generated from the `# --` comments of helm/moeserve/values.yaml (helm-docs'
convention: a comment that starts `# --` documents the key below it; following `#` lines continue it). Writes the
table into README.md between the `values-reference` markers.

    python tools/helm_docs.py           # rewrite the table in README.md
    python tools/helm_docs.py --check   # exit 1 if README.md's table is not what values.yaml gives
"""
import argparse
import json
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
VALUES = ROOT / "helm" / "moeserve" / "values.yaml"
README = ROOT / "README.md"
BEGIN, END = "<!-- values-reference:begin -->", "<!-- values-reference:end -->"
KEY = re.compile(r"^( *)([A-Za-z0-9_-]+):")


def documented(text: str) -> list[tuple[str, str]]:
    """(dotted key, description) for every key a `# --` comment documents, in file order."""
    rows, path, comment = [], [], None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("# --"):
            comment = [stripped[4:].strip()]
            continue
        if stripped.startswith("#") and comment is not None:
            comment.append(stripped[1:].strip())
            continue
        match = KEY.match(line)
        if match:
            depth = len(match.group(1)) // 2
            path = path[:depth] + [match.group(2)]
            if comment is not None:
                rows.append((".".join(path), " ".join(comment)))
        comment = None
    return rows


def default_of(values: dict, dotted: str) -> str:
    value = values
    for part in dotted.split("."):
        value = value[part]
    if isinstance(value, (dict, list)) and len(json.dumps(value)) > 60:
        return "see values.yaml"
    return f"`{json.dumps(value)}`"


def table() -> str:
    text = VALUES.read_text()
    values = yaml.safe_load(text)
    lines = ["| key | default | description |", "|---|---|---|"]
    for key, description in documented(text):
        lines.append(f"| `{key}` | {default_of(values, key)} | {description.replace('|', '/')} |")
    return "\n".join(lines)


def with_table(readme: str) -> str:
    start, end = readme.index(BEGIN) + len(BEGIN), readme.index(END)
    return readme[:start] + "\n" + table() + "\n" + readme[end:]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="compare instead of writing")
    a = p.parse_args()
    readme = README.read_text()
    if a.check:
        if with_table(readme) != readme:
            print("README.md's values reference is out of date: run python tools/helm_docs.py", file=sys.stderr)
            return 1
        return 0
    README.write_text(with_table(readme))
    print(f"wrote the values reference into {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
