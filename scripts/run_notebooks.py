"""Run the numbered notebooks in order, headless, and keep what they showed.

    python scripts/run_notebooks.py                 # all six, at the workbook's default size
    SMOKE=1 python scripts/run_notebooks.py 03 04   # some of them, at CI size

Each notebook runs top to bottom in a fresh kernel whose working folder is notebooks/ (as in
JupyterLab and under nbmake; the notebooks chdir to the repository themselves). The executed
copy and an HTML export go to outputs/notebooks/, with runtimes.json; a line per notebook
gives its runtime. The first failing notebook stops the run, naming the cell that failed.
Kernels talk to the runner over local sockets (IPC), not TCP, so none warns that it runs
over TCP without encryption.

Headless, no widget frontend will ever draw the 3D viewers, so the meshes are shown as static
pictures only (WORKBOOK_STATIC_VIEWER=1, see utils/notebook/viewer.py): saved widget state would hold
every mesh's geometry (tens of MB per notebook). --widgets keeps the widgets as well.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError
from nbconvert import HTMLExporter
from traitlets.config import Config

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("only", nargs="*", help="notebook numbers or names to run (default: all)")
    parser.add_argument("--notebooks", type=Path, default=REPO / "notebooks")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "notebooks")
    parser.add_argument("--cell-timeout", type=int, default=1800, help="seconds per cell")
    parser.add_argument("--kernel", default="python3", help="Jupyter kernel name")
    parser.add_argument("--widgets", action="store_true", help="also save the 3D widgets")
    return parser.parse_args(argv)


def select(folder: Path, only: list[str]) -> list[Path]:
    """The numbered notebooks in order; with `only`, those whose name starts with an entry."""
    notebooks = sorted(folder.glob("[0-9][0-9]_*.ipynb"))
    if only:
        notebooks = [p for p in notebooks if any(p.name.startswith(o) for o in only)]
    if not notebooks:
        raise SystemExit(f"no notebooks matching {only or 'NN_*.ipynb'} in {folder}")
    return notebooks


def slowest_cells(notebook, n: int = 3) -> str:
    """'cell 7 41.2 s, ...': where a notebook spent its time (nbclient records cell timings)."""
    timings = []
    for index, cell in enumerate(notebook.cells):
        execution = cell.get("metadata", {}).get("execution", {})
        start, end = execution.get("iopub.execute_input"), execution.get("shell.execute_reply")
        if start and end:
            timings.append((_timestamp(end) - _timestamp(start), index))
    return ", ".join(f"cell {i} {s:.1f} s" for s, i in sorted(timings, reverse=True)[:n])


def _timestamp(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
PROGRESS_PARTS = ["HTMLModel", "FloatProgressModel", "HTMLModel"]  # tqdm's notebook bar


def settle_progress_bars(notebook, widget_state: dict, keep_widgets: bool) -> None:
    """A tqdm bar in a notebook is a widget whose text is what it showed when it appeared,
    "0%|", which reads as a hung run in a saved copy. Give each bar the text of its last
    state (from the widget messages), and drop the bars that hid themselves when done."""

    def model(reference: str) -> dict:
        return widget_state.get(reference.removeprefix("IPY_MODEL_"), {})

    for cell in notebook.cells:
        kept = []
        for output in cell.get("outputs", []):
            view = output.get("data", {}).get(WIDGET_VIEW)
            box = widget_state.get(view["model_id"], {}) if view else {}
            parts = [model(child) for child in box.get("children", [])]
            if [part.get("_model_name") for part in parts] != PROGRESS_PARTS:
                kept.append(output)
                continue
            if model(box.get("layout", "")).get("visibility") == "hidden":
                continue
            left, bar, right = parts
            filled = round(10 * bar["value"] / bar["max"]) if bar.get("max") else 0
            text = f"{left['value']}|{'█' * filled}{' ' * (10 - filled)}|{right['value']}"
            output.data["text/plain"] = html.unescape(text).replace("\u2007", " ")
            if not keep_widgets:
                del output.data[WIDGET_VIEW]  # its state is not saved: the text is what shows
            kept.append(output)
        if cell.cell_type == "code":
            cell.outputs = kept


def run(path: Path, out: Path, cell_timeout: int, kernel: str, keep_widgets: bool = False):
    """Execute one notebook; write the executed copy and HTML.
    -> (seconds, the error line or None, the executed notebook)"""
    notebook = nbformat.read(path, as_version=4)
    start, error = time.perf_counter(), None
    with tempfile.TemporaryDirectory(prefix="kernel-") as sockets:
        ipc = Config({"KernelManager": {"transport": "ipc", "ip": str(Path(sockets) / "ipc")}})
        client = NotebookClient(
            notebook, timeout=cell_timeout, kernel_name=kernel, config=ipc,
            resources={"metadata": {"path": str(path.parent)}},
        )  # fmt: skip
        try:
            client.execute()
        except (CellExecutionError, CellTimeoutError) as failure:
            error = str(failure).strip().splitlines()[-1] if str(failure).strip() else repr(failure)
    seconds = time.perf_counter() - start
    settle_progress_bars(notebook, client.widget_state, keep_widgets)
    if not keep_widgets:
        notebook.metadata.pop("widgets", None)
    out.mkdir(parents=True, exist_ok=True)
    nbformat.write(notebook, out / path.name)
    html, _ = HTMLExporter().from_notebook_node(notebook)
    (out / path.with_suffix(".html").name).write_text(html, encoding="utf-8")
    return seconds, error, notebook


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    notebooks = select(args.notebooks, args.only)
    if not args.widgets:
        os.environ["WORKBOOK_STATIC_VIEWER"] = "1"  # kernels inherit the environment
    # OpenMP threads that spin while waiting for each other are ruinous on a shared or busy CPU:
    # 20 LoRA steps of the shipped model took 86 s with spinning, 1.3 s without (2 cores).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    runtimes, total = {}, time.perf_counter()
    for number, path in enumerate(notebooks, 1):
        print(f"[{number}/{len(notebooks)}] {path.name} ...", flush=True)
        seconds, error, executed = run(path, args.out, args.cell_timeout, args.kernel, args.widgets)
        runtimes[path.name] = round(seconds, 1)
        status = "FAILED" if error else "ok"
        print(f"[{number}/{len(notebooks)}] {path.name}: {status} in {seconds:.1f} s "
              f"(slowest: {slowest_cells(executed)})", flush=True)  # fmt: skip
        if error:
            print(f"  {error}\n  see {args.out / path.name}", file=sys.stderr)
            break
    runtimes["total"] = round(time.perf_counter() - total, 1)
    (args.out / "runtimes.json").write_text(json.dumps(runtimes, indent=1) + "\n")
    print(f"{len(runtimes) - 1} notebooks in {runtimes['total']:.0f} s; executed copies and HTML "
          f"in {args.out}")  # fmt: skip
    return 1 if error else 0


if __name__ == "__main__":
    sys.exit(main())
