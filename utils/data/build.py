"""Many meshes -> a dataset folder, objects rendered in parallel.

Sources are procedural shapes (`utils.data.shapes`) or a folder of mesh files (searched
recursively). Each object goes through `prepare_object` (atomic, skipped when already built);
then two small files describe the set:

    data/<set>/split.json     seeded train/val/test object ids, stratified by family
    data/<set>/dataset.json   settings, object ids, skipped files and why, how occupancy
                              points were labelled (objects without trustworthy ones listed)
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from tsr.errors import UserInputError
from tsr.files import write_text
from utils.data.materials import UNTEXTURED_COLOUR, untextured_setting
from utils.data.meshes import MESH_SUFFIXES, MeshLoadError, geometry_problem, input_up_axis, read_mesh
from utils.data.prepare_object import prepare_object
from utils.data.shapes import FAMILIES, make_shape


MIN_VIEWS = 2  # view 0 conditions; at least one more view supervises and scores
MIN_SIZE = 16  # render side in pixels: smaller renders hold no recognisable picture


@dataclass(frozen=True)
class ObjectJob:
    object_id: str  # folder name under the dataset root
    family: str  # shape family, or "meshes" for files
    source: str  # what meta.json records: "primitives/3" or a path relative to the input
    index: int = -1  # shape index (procedural only)
    path: str = ""  # mesh file (files only)


def procedural_jobs(families: list[str], n_objects: int) -> list[ObjectJob]:
    """`n_objects` shapes shared evenly over `families` (the first ones get the remainder)."""
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or not families:
        raise UserInputError(
            f"unknown shape families {unknown}", "--family", f"choose from {sorted(FAMILIES)}"
        )
    jobs = []
    for rank, family in enumerate(families):
        count = n_objects // len(families) + (rank < n_objects % len(families))
        jobs += [
            ObjectJob(f"{family}_{i:03d}", family, f"{family}/{i}", index=i) for i in range(count)
        ]
    return jobs


def folder_jobs(folder: str | Path) -> list[ObjectJob]:
    """One job per mesh file under `folder`; ids from the relative path, made unique."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserInputError("no such folder", folder, "pass a folder of mesh files")
    files = sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in MESH_SUFFIXES
    )
    if not files:
        raise UserInputError(
            f"no mesh files ({', '.join(MESH_SUFFIXES)}) in it", folder,
            "put meshes there, or leave out --input-folder to build procedural shapes",
        )  # fmt: skip
    jobs, used = [], set()
    for path in files:
        relative = path.relative_to(folder)
        object_id = re.sub(r"[^A-Za-z0-9_-]+", "_", str(relative.with_suffix(""))).strip("_")
        if object_id in used:  # chair.obj and chair.stl
            object_id += "_" + path.suffix.lower().lstrip(".")
        used.add(object_id)
        jobs.append(ObjectJob(object_id, "meshes", str(relative), path=str(path)))
    return jobs


def make_split(
    families: dict[str, str], seed: int, val_fraction: float = 0.1, test_fraction: float = 0.1
) -> dict[str, list[str]]:
    """Seeded train/val/test ids. Families are shuffled and interleaved before cutting, so each
    split gets its share of every family; val and test get one object each from 3 objects on."""
    rng = np.random.default_rng(seed)
    groups = [
        sorted(i for i in families if families[i] == f) for f in sorted(set(families.values()))
    ]
    groups = [list(rng.permutation(group)) for group in groups]
    interleaved = [
        g[k] for k in range(max(map(len, groups), default=0)) for g in groups if k < len(g)
    ]
    n = len(interleaved)
    n_test = max(round(n * test_fraction), 1) if n >= 3 else 0
    n_val = max(round(n * val_fraction), 1) if n >= 3 else 0
    return {
        "test": sorted(interleaved[:n_test]),
        "val": sorted(interleaved[n_test : n_test + n_val]),
        "train": sorted(interleaved[n_test + n_val :]),
    }


def _build(job: ObjectJob, out: Path, options: dict) -> dict:
    """Worker: make or load one mesh and prepare it. -> a status row"""
    try:
        if job.path:
            mesh, appearance = read_mesh(job.path, input_up_axis(job.path, options["input_up"]))
        else:
            mesh, appearance = make_shape(job.family, job.index, options["seed"]), None
            if problem := geometry_problem(mesh):
                raise MeshLoadError(f"{job.source}: {problem}")
    except MeshLoadError as error:
        return {"object_id": job.object_id, "skipped": str(error), "file": job.source}
    meta = prepare_object(
        mesh, out / job.object_id, options["n_views"], options["size"], options["seed"],
        source=job.source, axis_views=options["axis_views"],
        occupancy_points=options["occupancy_points"], force=True, appearance=appearance,
        untextured=options["untextured"],
    )  # fmt: skip
    return {"object_id": job.object_id, "n_views": meta["settings"]["n_views"], "meta": meta}


def prepare_dataset(
    out: str | Path,
    families: tuple[str, ...] = ("primitives", "parts"),
    n_objects: int = 48,
    n_views: int = 8,
    size: int = 256,
    seed: int = 0,
    input_folder: str | Path | None = None,
    input_up: str = "z",
    axis_views: bool = False,
    occupancy_points: int = 0,
    force: bool = False,
    workers: int | None = None,
    untextured: str | tuple = UNTEXTURED_COLOUR,
) -> dict:
    """Build (or complete) a dataset folder. -> summary: counts, skipped files, timing, how
    occupancy points were labelled. `input_up`: files other than glTF (y-up by
    specification); `untextured`: colour of faces without one, or "palette" (prepare_object)."""
    out = Path(out)
    _check_settings(
        n_views=(axis_views or n_views >= MIN_VIEWS, f"an integer >= {MIN_VIEWS}"),
        size=(size >= MIN_SIZE, f"an integer >= {MIN_SIZE}"),
        n_objects=(input_folder is not None or n_objects >= 1, "an integer >= 1"),
        seed=(seed >= 0, "an integer >= 0"),
        occupancy_points=(occupancy_points >= 0, "an integer >= 0 (0: none)"),
        workers=(workers is None or workers >= 1, "an integer >= 1, or None for all cores"),
        input_up=(input_up in ("z", "y"), "'z' or 'y'"),
        values=locals(),
    )
    jobs = folder_jobs(input_folder) if input_folder else procedural_jobs(list(families), n_objects)
    options = {
        "n_views": n_views,
        "size": size,
        "seed": seed,
        "axis_views": axis_views,
        "input_up": input_up,
        "occupancy_points": occupancy_points,
        "untextured": untextured,
    }
    wanted = {
        "n_views": 6 if axis_views else n_views,
        "size": size,
        "axis_views": axis_views,
        "occupancy_points": occupancy_points,
        "untextured": untextured_setting(untextured),
    }
    existing, mismatched = {}, []
    for job in jobs:
        meta_path = out / job.object_id / "meta.json"
        if meta_path.exists() and not force:
            try:
                meta = json.loads(meta_path.read_text())
                # older builds did not record untextured: their procedural sets have colours
                settings = {"occupancy_points": 0, "untextured": wanted["untextured"]}
                settings.update(meta["settings"])
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                continue  # a damaged object: built again below
            if any(settings[k] != v for k, v in wanted.items()) or meta.get("seed") != seed:
                mismatched.append(job.object_id)
            existing[job.object_id] = meta
    if mismatched:
        raise UserInputError(
            f"{len(mismatched)} objects were built with other settings (e.g. {mismatched[0]})",
            out, "pass --force to rebuild them or choose another --out",
        )  # fmt: skip
    todo = [job for job in jobs if job.object_id not in existing]
    out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    workers = max(1, min(workers or os.cpu_count() or 1, len(todo)))
    # closed on any way out (an error included), so a message is not glued to the bar
    with tqdm(total=len(todo), desc=f"rendering {out.name}", unit="object") as progress:
        if workers == 1:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # small tensors: threads cost more than they give (10x)
            try:
                rows = _collect((_build(job, out, options) for job in todo), progress, start)
            finally:
                torch.set_num_threads(threads)
        else:  # fork: workers inherit the imported modules instead of importing torch again
            context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
            with context.Pool(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
                jobs_args = [(job, out, options) for job in todo]
                rows = _collect(pool.imap_unordered(_build_star, jobs_args), progress, start)
    views_done = sum(row.get("n_views", 0) for row in rows)
    seconds = time.perf_counter() - start

    skipped = sorted(
        ({"file": r["file"], "reason": r["skipped"]} for r in rows if "skipped" in r), key=str
    )
    metas = {**existing, **{r["object_id"]: r["meta"] for r in rows if "meta" in r}}
    if not metas:
        raise UserInputError(
            f"none of the {len(jobs)} inputs could be used (skipped: {skipped})",
            input_folder or "--family", "see why each was skipped, and pass usable meshes",
        )  # fmt: skip
    family_of = {job.object_id: job.family for job in jobs if job.object_id in metas}
    split = make_split(family_of, seed)
    _write_json(out / "split.json", {"seed": seed, **split})
    occupancy = occupancy_summary(metas)
    _write_json(
        out / "dataset.json",
        {
            "settings": next(iter(metas.values()))["settings"], "seed": seed,
            "source": str(Path(input_folder).name) if input_folder else ",".join(families),
            "objects": sorted(metas), "skipped": skipped, "occupancy_labels": occupancy,
        },
    )  # fmt: skip
    return {
        "out": str(out), "n_objects": len(metas), "built": len(rows) - len(skipped),
        "already_built": len(existing), "skipped": skipped, "views_rendered": views_done,
        "seconds": seconds, "views_per_second": views_done / seconds if seconds > 0 else 0.0,
        "occupancy_labels": occupancy,
    }  # fmt: skip


def _check_settings(values: dict, **rules: tuple[bool, str]) -> None:
    """Refuse every setting out of range at once, before anything is built."""
    wrong = [name for name, (ok, _) in rules.items() if not ok]
    if wrong:
        raise UserInputError(
            "dataset settings out of range: "
            + "; ".join(f"{n}={values[n]!r} (must be {rules[n][1]})" for n in wrong),
            ", ".join(wrong), "change them to values in range",
        )  # fmt: skip


def occupancy_summary(metas: dict[str, dict]) -> dict:
    """Objects per way of labelling occupancy points, and those left without points and why.
    -> {"counts": {"ray parity": n, "ray votes": n, "withheld": n}, "withheld": [{id, reason}]}"""
    labels = {i: m["occupancy_labels"] for i, m in sorted(metas.items()) if "occupancy_labels" in m}
    counts = {method: 0 for method in ("ray parity", "ray votes", "withheld")}
    for record in labels.values():
        counts[record["method"]] += 1
    withheld = [
        {"object_id": i, "reason": r["reason"]}
        for i, r in labels.items()
        if r["method"] == "withheld"
    ]
    return {"counts": counts, "withheld": withheld}


def _build_star(arguments: tuple) -> dict:
    return _build(*arguments)


def _collect(results, progress: tqdm, start: float) -> list[dict]:
    """Drain worker results into rows, showing objects done and views per second."""
    rows, views = [], 0
    for row in results:
        rows.append(row)
        views += row.get("n_views", 0)
        progress.update()
        progress.set_postfix(views_per_s=f"{views / (time.perf_counter() - start):.1f}")
    return rows


def _write_json(path: Path, value: object) -> None:
    write_text(path, json.dumps(value, indent=1, sort_keys=True) + "\n")
