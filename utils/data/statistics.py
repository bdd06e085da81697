"""Numbers about a prepared dataset (notebook 01 prints and plots them)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from utils.data.dataset import DEPTH_BACKGROUND, SPLITS, read_object


def dataset_statistics(root: str | Path) -> dict:
    """Numbers about a prepared dataset, as data (notebook 01 plots and prints them).

    -> {"summary": {...}, "objects": [one dict per object]}
    """
    root = Path(root)
    dataset_path = root / "dataset.json"
    if not dataset_path.exists():
        raise FileNotFoundError(
            f"no dataset at {root} (no dataset.json): run prepare_data.py --out {root}"
        )
    dataset = json.loads(dataset_path.read_text())
    splits = json.loads((root / "split.json").read_text())
    split_of = {object_id: s for s in SPLITS[:3] for object_id in splits[s]}
    rows = []
    for object_id in dataset["objects"]:
        views = read_object(root / object_id)
        meta, alpha, depth = views["meta"], views["rgba"][..., 3], views["depth"]
        hits = depth[depth != DEPTH_BACKGROUND]
        rows.append({
            "object_id": object_id, "split": split_of.get(object_id, "none"),
            "family": meta.get("family", "meshes"), "kind": meta.get("kind", ""),
            "n_faces": meta["n_faces"], "watertight": meta["watertight"], "scale": meta["scale"],
            "framing": meta["framing"], "view0_foreground_ratio": meta["view0_foreground_ratio"],
            "foreground_fraction": float((alpha / 255.0).mean()),
            "depth_min": float(hits.min()) if hits.size else float("nan"),
            "depth_max": float(hits.max()) if hits.size else float("nan"),
            "max_abs_coordinate": float(np.abs(meta["bounds"]).max()),
        })  # fmt: skip
    numeric = (
        "n_faces",
        "scale",
        "view0_foreground_ratio",
        "foreground_fraction",
        "depth_min",
        "depth_max",
        "max_abs_coordinate",
    )

    def count(key: str) -> dict:
        values = [row[key] for row in rows]
        return {value: values.count(value) for value in sorted(set(values))}

    summary = {
        "root": str(root), "n_objects": len(rows), "settings": dataset["settings"],
        "n_images": len(rows) * dataset["settings"]["n_views"], "split": count("split"),
        "family": count("family"), "kind": count("kind"), "framing": count("framing"),
        "watertight": sum(row["watertight"] for row in rows), "skipped_files": dataset["skipped"],
        "bytes_on_disk": sum(p.stat().st_size for p in root.rglob("*") if p.is_file()),
        **{f"{key}_mean_min_max": [float(np.mean(c)), float(np.min(c)), float(np.max(c))]
           for key in numeric if len(c := [row[key] for row in rows])},
    }  # fmt: skip
    return {"summary": summary, "objects": rows}
