"""Generic JSON -> tables, for results whose exact shape the report does not pin down.

Fine-tuning and comparison results grow new columns over time; the report renders any
list of flat objects as a table and any object's scalar fields as a key/value table, so a
new column shows up without a report change.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from whylook._checks import is_number

__all__ = ["Table", "tables"]

_MAX_DEPTH = 3
_MAX_ROWS = 500


@dataclass
class Table:
    """A titled table of display strings, plus the raw rows for plotting."""

    title: str
    columns: list[str]
    rows: list[list[str]]
    records: list[dict[str, Any]] = field(default_factory=list)
    note: str = ""

    def mean_std_columns(self) -> tuple[str | None, list[tuple[str, str, str | None]]]:
        """(label column, [(what, mean column, std column or None)]) worth a bar chart."""
        label = next(
            (c for c in self.columns
             if self.records and all(isinstance(r.get(c), str) for r in self.records)),
            None,
        )
        pairs = []
        for c in self.columns:
            if c.endswith("_mean") and all(is_number(r.get(c)) for r in self.records):
                std = c[: -len("_mean")] + "_std"
                pairs.append((c[: -len("_mean")], c, std if std in self.columns else None))
        return label, pairs


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, str | int | float | bool)


def _flat(v: Any) -> bool:
    """A value that fits in one cell: a scalar or a short list of scalars."""
    return _scalar(v) or (isinstance(v, list) and len(v) <= 20 and all(_scalar(x) for x in v))


def fmt(v: Any) -> str:
    """One cell's display string (the template escapes it)."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list) and all(_scalar(x) for x in v):
        return ", ".join(fmt(x) for x in v)
    if isinstance(v, str | int):
        return str(v)
    text = json.dumps(v, sort_keys=True, default=str)
    return text if len(text) <= 200 else text[:199] + "…"


def _records_table(title: str, records: list[dict[str, Any]]) -> Table:
    columns: list[str] = []
    for r in records:
        for key in r:
            if key not in columns:
                columns.append(str(key))
    shown = records[:_MAX_ROWS]
    note = f"first {_MAX_ROWS} of {len(records)} rows" if len(records) > _MAX_ROWS else ""
    rows = [[fmt(r.get(c)) for c in columns] for r in shown]
    return Table(title, columns, rows, records=shown, note=note)


def tables(obj: Any, title: str, depth: int = 0) -> list[Table]:
    """All tables in a JSON value, titled after the path that leads to them."""
    if isinstance(obj, list) and obj and all(isinstance(r, dict) for r in obj):
        if all(_flat(v) for r in obj for v in r.values()):
            return [_records_table(title, obj)]
        flat = [{k: v for k, v in r.items() if _flat(v)} for r in obj]
        out = [_records_table(title, flat)]
        if depth < _MAX_DEPTH:
            for i, r in enumerate(obj[:20]):
                for key, v in r.items():
                    if not _flat(v):
                        out += tables(v, f"{title} [{i}]: {key}", depth + 1)
        return out
    if isinstance(obj, dict):
        scalars = [[str(k), fmt(v)] for k, v in obj.items() if _flat(v)]
        out = [Table(title, ["field", "value"], scalars)] if scalars else []
        for key, v in obj.items():
            if _flat(v):
                continue
            if depth < _MAX_DEPTH:
                out += tables(v, f"{title}: {key}", depth + 1)
            else:
                out.append(Table(f"{title}: {key}", ["value"], [[fmt(v)]]))
        return out
    if isinstance(obj, list):
        if not obj:
            return [Table(title, ["value"], [], note="empty")]
        return [Table(title, ["value"], [[fmt(v)] for v in obj[:_MAX_ROWS]])]
    return [Table(title, ["value"], [[fmt(obj)]])]
