"""The evaluation report: per-model means with standard errors, paired differences with a
verdict, and metrics.json / metrics.md / metrics.png."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from tsr.files import write_bytes, write_text
from utils.evaluation.metrics import mean_stderr, paired_difference
from utils.figures import figure_png

# metric key -> (label, which way is better); the order of the report's columns
METRICS = {
    "chamfer_l1": ("Chamfer-L1", "lower"),
    "f@0.05": ("F@0.05", "higher"),
    "f@0.1": ("F@0.1", "higher"),
    "psnr": ("novel-view PSNR (dB)", "higher"),
    "mask_iou": ("mask IoU", "higher"),
    "colour_error": ("colour error", "lower"),
    "course_chamfer": ("course Chamfer", "lower"),
    "course_f@0.1": ("course F@0.1", "higher"),
    "course_f@0.2": ("course F@0.2", "higher"),
    "course_f@0.5": ("course F@0.5", "higher"),
    "paper_chamfer": ("paper Chamfer", "lower"),
    "paper_f@0.1": ("paper F@0.1", "higher"),
    "paper_f@0.2": ("paper F@0.2", "higher"),
    "paper_f@0.5": ("paper F@0.5", "higher"),
}


PROTOCOLS_PARAGRAPH = (
    "'paper' columns follow the TripoSR and SF3D evaluation (utils/evaluation/paper_protocol.py): "
    "both clouds scaled to the unit bounding box, the prediction turned about the vertical axis "
    "to its best angle and refined by ICP, then Chamfer and F@0.1/0.2/0.5 on 10,000 points. "
    "They show the shape alone and compare with the papers' tables; they hide errors of size, "
    "position and turn about the vertical axis, which TripoSR's fixed camera and framing "
    "determine and which our world-frame columns count. Their unit is the unit box (the object "
    "spans 1; about 1.5 in ours): compare models within a protocol, not numbers across them. "
    "–: not computed (evaluate.py --no-paper-protocol)."
)

PLOTTED = ("chamfer_l1", "f@0.05", "f@0.1", "psnr", "mask_iou", "colour_error")


def compare(records: dict[str, list[dict]], base: str = "base") -> dict:
    """Per-model means with standard errors, and every other model minus `base`, paired by
    object (so differences between objects do not count as noise). -> summary dict"""
    if base not in records:
        raise ValueError(f"no records for the base model {base!r}; models: {sorted(records)}")
    base_ids = [r["object_id"] for r in records[base]]
    summary = {"metrics": METRICS, "base": base, "models": {}, "paired": {}, "objects": records}
    for model, rows in records.items():
        summary["models"][model] = {m: mean_stderr([r.get(m) for r in rows]) for m in METRICS}
        summary["models"][model]["empty_meshes"] = sum(bool(r.get("empty")) for r in rows)
        if model == base:
            continue
        by_id = {r["object_id"]: r for r in rows}
        if sorted(by_id) != sorted(base_ids):
            raise ValueError(f"{model!r} and {base!r} were evaluated on different objects")
        summary["paired"][f"{model} - {base}"] = {
            m: paired_difference(
                [r.get(m, math.nan) for r in records[base]],
                [by_id[i].get(m, math.nan) for i in base_ids],
            )
            for m in METRICS
        }
    return summary


def _cell(stats: dict, signed: bool = False) -> str:
    if not stats["n"]:
        return "–"
    mean = f"{stats['mean']:+.4f}" if signed else f"{stats['mean']:.4f}"
    return mean if math.isnan(stats["stderr"]) else f"{mean} ± {stats['stderr']:.4f}"


def _verdict(stats: dict, better: str) -> str:
    """'better'/'worse' only when the paired mean is more than 2 standard errors from zero."""
    if not stats["n"] or math.isnan(stats["stderr"]) or abs(stats["mean"]) <= 2 * stats["stderr"]:
        return "within noise"
    improved = stats["mean"] < 0 if better == "lower" else stats["mean"] > 0
    return "better" if improved else "worse"


def markdown_report(summary: dict, settings: dict | None = None) -> str:
    """Tables: mean ± standard error per model, then paired differences with a verdict."""
    header = "| model | " + " | ".join(f"{label} ({b})" for label, b in METRICS.values()) + " |"
    lines = ["# Evaluation", "", header, "|---" * (len(METRICS) + 1) + "|"]
    for model, stats in summary["models"].items():
        lines.append(f"| {model} | " + " | ".join(_cell(stats[m]) for m in METRICS) + " |")
    lines += ["", "Mean ± standard error over objects (n in metrics.json)."]
    for pair, stats in summary["paired"].items():
        lines += [
            "",
            f"## Paired per-object difference: {pair}",
            "",
            "| metric | mean ± se | n | verdict |",
            "|---|---|---|---|",
        ]
        for metric, (label, better) in METRICS.items():
            s = stats[metric]
            lines.append(
                f"| {label} | {_cell(s, signed=True)} | {s['n']} | {_verdict(s, better)} |"
            )
    lines += [
        "",
        "Chamfer-L1 = ½(mean nearest-neighbour distance predicted→truth + truth→predicted) on "
        "surface points (10,000 unless the settings say otherwise) in the shared world frame; "
        "F@τ on the same points. Colour error: mean L1 between the chromaticities "
        "rgb / (r + g + b) of render and truth on the true object's pixels of the novel "
        "views (hue, not brightness). 'course' columns normalise each cloud by itself (centroid, "
        "max |coordinate|) as the course project did, which hides scale and offset errors. The "
        "sphere is the best origin-centred sphere per object, in its mean view-0 colour. "
        "'better'/'worse': the paired mean is more than 2 standard errors from zero.",
        "",
        PROTOCOLS_PARAGRAPH,
    ]
    if settings:
        lines += ["", "Settings: `" + json.dumps(settings, default=str) + "`"]
    return "\n".join(lines) + "\n"


def write_report(
    summary: dict, out_dir: str | Path, settings: dict | None = None
) -> dict[str, Path]:
    """metrics.json (everything, per object included), metrics.md and metrics.png."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / "metrics.json",
        "markdown": out_dir / "metrics.md",
        "plot": out_dir / "metrics.png",
    }
    document = {
        **summary,
        "metrics": {k: list(v) for k, v in METRICS.items()},
        "settings": settings or {},
    }
    write_text(paths["json"], json.dumps(document, indent=2, default=str, allow_nan=True))
    write_text(paths["markdown"], markdown_report(summary, settings))
    table = {
        model: {
            m: (stats[m]["mean"], 0.0 if math.isnan(stats[m]["stderr"]) else stats[m]["stderr"])
            for m in PLOTTED
        }
        for model, stats in summary["models"].items()
    }
    write_bytes(paths["plot"], figure_png(metrics_bar_plot(table, PLOTTED)))
    return paths


def _value_and_stderr(metrics: dict, metric: str) -> tuple[float, float]:
    """A metric given as a number, (value, stderr), or a number plus a sibling '<metric>_stderr'."""
    value = metrics.get(metric, np.nan)
    if isinstance(value, tuple | list):
        return float(value[0]), float(value[1])
    return float(value), float(metrics.get(f"{metric}_stderr", 0.0))


def metrics_bar_plot(table: dict[str, dict], metrics: Sequence[str] | None = None) -> Figure:
    """One panel per metric (own scale), one bar per model, stderr as error bars.
    table: model -> metric -> value | (value, stderr); '<metric>_stderr' keys also work."""
    models = list(table)
    if metrics is None:
        names = [k for row in table.values() for k in row if not k.endswith("_stderr")]
        metrics = list(dict.fromkeys(names))
    fig = Figure(figsize=(2.6 * len(metrics), 3.0), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics, strict=True):
        values, errors = zip(*(_value_and_stderr(table[m], metric) for m in models), strict=True)
        positions = np.arange(len(models))
        ax.bar(positions, values, yerr=errors, capsize=4, color=[f"C{i}" for i in positions])
        ax.set_xticks(positions, models, rotation=20)
        ax.set_title(metric)
        ax.grid(axis="y", alpha=0.3)
    return fig
