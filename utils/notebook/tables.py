"""Records as Markdown tables for the notebooks."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None, digits: int = 3):
    """Records as a Markdown table for display (floats rounded to `digits` significant)."""
    from IPython.display import Markdown

    columns = list(columns or dict.fromkeys(key for row in rows for key in row))

    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.{digits}g}"
        return (
            f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)
        )

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return Markdown("\n".join(lines))


def files_table(folder: str | Path):
    """Every file under `folder` with its size, as a Markdown table."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return markdown_table(
        [{"file": str(p.relative_to(folder)), "kB": p.stat().st_size // 1024} for p in files]
    )


def parameter_table(models: dict[str, torch.nn.Module]):
    """Parameters per top-level component (image_tokenizer, backbone, ...), a column per model."""

    def count(module: torch.nn.Module | None) -> int:
        return 0 if module is None else sum(p.numel() for p in module.parameters())

    parts = dict.fromkeys(name for m in models.values() for name, _ in m.named_children())
    rows = [
        {"component": part, **{label: count(getattr(m, part, None)) for label, m in models.items()}}
        for part in parts
    ]
    rows.append({"component": "total", **{label: count(m) for label, m in models.items()}})
    return markdown_table(rows)


def split_counts(statistics: dict) -> list[dict]:
    """Objects per split and family from `utils.data.dataset_statistics`. -> table rows"""
    objects = statistics["objects"]
    rows = []
    for split in ("train", "val", "test"):
        families = [o["family"] for o in objects if o["split"] == split]
        counts = {f: families.count(f) for f in sorted({o["family"] for o in objects})}
        rows.append({"split": split, **counts, "total": len(families)})
    return rows


def most_changed(records: dict[str, list[dict]], metric: str, base: str, other: str) -> int:
    """Index of the object whose `metric` differs most between two models (finite values)."""
    changes = [
        abs(b[metric] - o[metric]) if math.isfinite(b[metric] - o[metric]) else -1.0
        for b, o in zip(records[base], records[other], strict=True)
    ]
    return int(np.argmax(changes))
