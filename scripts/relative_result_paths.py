"""Rewrite the machine's paths in the committed result files (results/**/*.json, *.jsonl).

    python scripts/relative_result_paths.py           # rewrite in place, print what changed
    python scripts/relative_result_paths.py --check   # exit 1 if any such path is left

Only the values of ``out_dir`` and ``data_dir`` hold paths; every other byte of a file is kept.

* ``out_dir``: the run's output folder on the machine that ran it (``/work/runs/paper/...``,
  ``/tmp/gpu/bf-table1``, or ``runs/...`` in the working copy, never committed) becomes the folder
  under ``results/`` that now holds the copy, relative to the repository root: its last component
  is matched to the nearest folder of that name above the file (BMRS runs record their run
  folder, Bayes-factor runs the ``--out-dir``/bf-table1 root).
* ``data_dir``: ``/work/shared/datasets`` becomes ``../shared/datasets`` (the same folder, seen
  from the repository root); a device's scratch copy of the data sets (``/tmp/...``) becomes null.

The numbers are not touched: the script checks that each rewritten file parses to the same JSON
apart from those two keys.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
KEYS = ("out_dir", "data_dir")
MACHINE_PATH = re.compile(r'"(out_dir|data_dir)": "(/[^"]*|runs/[^"]*)"')
SHARED_DATA = "/work/shared/datasets"


def _out_dir(value: str, file: Path) -> str:
    name = Path(value).name
    for folder in file.parents:
        if folder == RESULTS.parent:
            break
        if folder.name == name:
            return folder.relative_to(ROOT).as_posix()
    raise ValueError(f"{file}: out_dir {value!r} names no folder above the file")


def _data_dir(value: str, file: Path) -> str | None:
    if value.rstrip("/") == SHARED_DATA:
        return "../shared/datasets"
    if value.startswith("/tmp/"):
        return None
    raise ValueError(f"{file}: data_dir {value!r} is neither {SHARED_DATA} nor a /tmp scratch copy")


def rewrite(text: str, file: Path) -> str:
    def sub(m: re.Match) -> str:
        key, value = m.group(1), m.group(2)
        new = _out_dir(value, file) if key == "out_dir" else _data_dir(value, file)
        return f'"{key}": {json.dumps(new)}'
    return MACHINE_PATH.sub(sub, text)


def _parse(text: str, file: Path):
    if file.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return json.loads(text)


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in KEYS}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only report files that still hold such paths")
    args = ap.parse_args()
    changed = 0
    for file in sorted(p for p in RESULTS.rglob("*") if p.suffix in (".json", ".jsonl") and p.is_file()):
        text = file.read_text()
        new = rewrite(text, file)
        if new == text:
            continue
        changed += 1
        if args.check:
            print(f"machine path in {file.relative_to(ROOT)}")
            continue
        if _strip(_parse(new, file)) != _strip(_parse(text, file)):
            raise AssertionError(f"{file}: rewriting changed more than {KEYS}")
        file.write_text(new)
    print(f"{changed} file(s) {'with machine paths' if args.check else 'rewritten'}")
    return 1 if args.check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
