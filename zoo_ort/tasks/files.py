"""Reading task data: TSV, CSV and JSONL files, GLUE-style split folders, the shipped sets.

Every problem is a one-line :class:`ZooError` naming the file and, for a bad row, its line.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

from zoo_ort.errors import ZooError

FORMATS = {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl"}
# GLUE calls the validation split "dev", SuperGLUE "val", Hugging Face "validation".
SPLIT_ALIASES = {
    "dev": ("dev", "validation", "val"),
    "validation": ("validation", "dev", "val"),
    "val": ("val", "dev", "validation"),
}


@dataclass(frozen=True)
class Record:
    """One example as read: its fields by name and where it came from (``path:line``)."""

    values: dict[str, Any]
    where: str


def shipped_sets() -> list[str]:
    root = files("zoo_ort") / "data"
    if not root.is_dir():
        return []
    return sorted(
        p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))
    )


def resolve_data(path_or_name: str | Path) -> Path:
    """A data file or folder: an existing path, or the name of a set shipped with zoo-ort."""
    path = Path(path_or_name)
    if path.exists():
        return path
    name = str(path_or_name)
    if name in shipped_sets():
        return Path(str(files("zoo_ort") / "data" / name))
    shipped = ", ".join(shipped_sets()) or "none"
    raise ZooError(f"{path}: no such data file or folder (shipped sets: {shipped})")


def split_file(data: Path, split: str) -> Path:
    """The file of ``split`` in a GLUE-style folder (``train.tsv``, ``dev.jsonl``, ...); a file
    given directly is its own split."""
    if data.is_file():
        return data
    if not data.is_dir():
        raise ZooError(f"{data}: no such data file or folder")
    found: list[Path] = []
    for stem in SPLIT_ALIASES.get(split, (split,)):
        found = [data / f"{stem}{ext}" for ext in FORMATS if (data / f"{stem}{ext}").is_file()]
        if found:
            break
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise ZooError(f"{data}: split {split!r} is ambiguous ({names}); keep one")
    if not found:
        have = sorted(p.name for p in data.iterdir() if p.suffix in FORMATS)
        raise ZooError(
            f"{data}: no {split!r} split (expected {split}.tsv, .csv or .jsonl; "
            f"found: {', '.join(have) or 'no data files'})"
        )
    return found[0]


def read_records(path: Path) -> list[Record]:
    """All rows of a TSV/CSV (with a header row) or JSONL file, format chosen by extension."""
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ZooError(f"{path}: unknown data format (use .tsv, .csv or .jsonl)")
    try:
        # utf-8-sig: spreadsheet exports often start with a byte-order mark.
        with path.open(encoding="utf-8-sig", newline="") as f:
            records = _read_jsonl(f, path) if fmt == "jsonl" else _read_table(f, path, fmt)
    except FileNotFoundError:
        raise ZooError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise ZooError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not records:
        raise ZooError(f"{path}: no examples")
    return records


def _read_table(f: Any, path: Path, fmt: str) -> list[Record]:
    if fmt == "tsv":
        # GLUE TSVs are not CSV-quoted: a '"' is text, so quoting must be off.
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        reader = csv.reader(f)
    records: list[Record] = []
    header: list[str] | None = None
    try:
        for row in reader:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if header is None:
                header = [h.strip() for h in row]
                dup = sorted({h for h in header if header.count(h) > 1})
                if dup:
                    raise ZooError(f"{path}:{reader.line_num}: header repeats {', '.join(dup)}")
                continue
            if len(row) != len(header):
                raise ZooError(
                    f"{path}:{reader.line_num}: expected {len(header)} columns "
                    f"({', '.join(header)}), found {len(row)}"
                )
            records.append(Record(dict(zip(header, row, strict=True)), f"{path}:{reader.line_num}"))
    except csv.Error as e:
        raise ZooError(f"{path}:{reader.line_num}: malformed {fmt.upper()} ({e})") from None
    return records


def _read_jsonl(f: Any, path: Path) -> list[Record]:
    records: list[Record] = []
    for number, line in enumerate(f, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ZooError(f"{path}:{number}: bad JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise ZooError(f"{path}:{number}: expected a JSON object, found {type(obj).__name__}")
        records.append(Record(obj, f"{path}:{number}"))
    return records


def field_text(record: Record, name: str) -> str:
    """A text field of a record, whitespace-stripped; missing or non-text is an error."""
    if name not in record.values:
        have = ", ".join(record.values) or "none"
        raise ZooError(f"{record.where}: missing field {name!r} (fields: {have})")
    value = record.values[name]
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise ZooError(f"{record.where}: field {name!r} is {type(value).__name__}, expected text")
