"""Run the numbered notebooks in order, headless, and keep what they showed.

    python scripts/run_notebooks.py                 # all six, at the workbook's default size
    SMOKE=1 python scripts/run_notebooks.py 03 04   # some of them, at CI size

Each notebook runs top to bottom in a fresh kernel whose working folder is notebooks/ (as in
JupyterLab and under nbmake; the notebooks chdir to the repository themselves). The terminal
gets a line as each code cell starts ("[03_training] cell 5/12 at 1:02: result = fit(...)"),
every line the cells print, and, while a progress bar runs, its state every few seconds. The
executed copy and an HTML export go to outputs/notebooks/, with runtimes.json. No cell has a
time limit unless --cell-timeout sets one: a slow machine finishes later, it does not fail. The
first failing notebook stops the run; the message names the notebook, the cell, the reason and
the executed copy, and the exit status is 1.
Kernels talk to the runner over local sockets (IPC), not TCP, so none warns that it runs
over TCP without encryption.

Headless, no widget frontend will ever draw the 3D viewers, so the meshes are shown as static
pictures only (WORKBOOK_STATIC_VIEWER=1, see utils/notebook/viewer.py): saved widget state would
hold every mesh's geometry (tens of MB per notebook). --widgets keeps the widgets as well.
Progress bars are tqdm's text bars in the kernel (KERNEL_SETUP): a widget bar's saved copy shows
its first state (0 %) for ever, a text bar's ends on its last.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError
from nbconvert import HTMLExporter
from traitlets.config import Config

REPO = Path(__file__).resolve().parents[1]
# Run in each kernel before the first cell: every `from tqdm.auto import tqdm` that follows
# gets tqdm's text bar, whose last state the executed copy keeps (coalesce_streams folds the
# carriage-return updates); the widget bar tqdm.auto picks in a kernel would stay at 0 %.
KERNEL_SETUP = (
    "import tqdm.auto, tqdm.std; tqdm.auto.tqdm, tqdm.auto.trange = tqdm.std.tqdm, tqdm.std.trange"
)
PROGRESS_EVERY_S = 15.0  # seconds between terminal lines of a running progress bar
ANSI_COLOUR = re.compile(r"\x1b\[[0-9;]*m")
CELL_FRAME = re.compile(r"Cell In\[\d+\], line (\d+)")  # IPython's name for a cell's frame


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("only", nargs="*", help="notebook numbers or names to run (default: all)")
    parser.add_argument("--notebooks", type=Path, default=REPO / "notebooks")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "notebooks")
    parser.add_argument(
        "--cell-timeout", type=int, default=None,
        help="seconds a cell may run before it fails (default: no limit)",
    )  # fmt: skip
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


def clock(seconds: float) -> str:
    """'1:05' (minutes:seconds), '1:02:05' past an hour."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def first_line(source: str, width: int = 70) -> str:
    line = next((s.strip() for s in source.splitlines() if s.strip()), "")
    return line if len(line) <= width else line[: width - 1] + "…"


@dataclass
class Failure:
    notebook: str
    cell_number: int  # among the code cells, 1-based: the In [n] of the executed copy
    cell_index: int  # position in the notebook, markdown cells included, 0-based
    cell_line: str  # the cell's first source line
    reason: str  # "timeout: ..." or "ExceptionName: message"
    failing_line: str = ""  # "line 4: ...": the cell's line the exception came through

    def message(self, executed_copy: Path) -> str:
        lines = [
            f"FAILED {self.notebook}: code cell {self.cell_number} (In [{self.cell_number}], "
            f"cell index {self.cell_index}): {self.cell_line}",
            *([f"  at {self.failing_line}"] if self.failing_line else []),
            f"  reason: {self.reason}",
            f"  executed copy, with the traceback under that cell: {executed_copy} (and .html)",
        ]
        return "\n".join(lines)


class ReportingClient(NotebookClient):
    """A NotebookClient that says in the terminal which cell runs and what it prints."""

    def __init__(self, notebook, name: str, **kwargs):
        super().__init__(notebook, on_cell_execute=self._cell_starts, **kwargs)
        self.name, self.started = name, time.perf_counter()
        self.n_code = sum(1 for c in notebook.cells if c.cell_type == "code" and c.source.strip())
        self.number, self.index = 0, -1
        self.pending: dict[str, str] = {}  # stream name -> text after its last newline
        self.last_progress_print = 0.0

    def say(self, text: str) -> None:
        print(f"[{self.name}] {text}", flush=True)

    def _cell_starts(self, cell, cell_index: int) -> None:
        self.flush_progress()
        self.number, self.index, self.pending = self.number + 1, cell_index, {}
        at = clock(time.perf_counter() - self.started)
        self.say(f"cell {self.number}/{self.n_code} at {at}: {first_line(cell.source)}")

    def process_message(self, msg, cell, cell_index):
        if msg["msg_type"] == "stream":
            self._echo(msg["content"]["name"], msg["content"]["text"])
        return super().process_message(msg, cell, cell_index)

    def _echo(self, stream: str, text: str) -> None:
        """Every finished line as it would stand in a terminal (after its last carriage
        return); an unfinished one (a progress bar) every PROGRESS_EVERY_S seconds."""
        *lines, self.pending[stream] = (self.pending.get(stream, "") + text).split("\n")
        for line in lines:
            if shown := line.split("\r")[-1].rstrip():
                self.say(f"  {shown}")
        now = time.perf_counter()
        if self._progress() and now - self.last_progress_print >= PROGRESS_EVERY_S:
            self.last_progress_print = now
            self.say(f"  {self._progress()} ({clock(now - self.started)})")

    def _progress(self) -> str:
        tails = [tail.split("\r")[-1].strip() for tail in self.pending.values()]
        return next((tail for tail in reversed(tails) if tail), "")

    def flush_progress(self) -> None:
        """A bar still unfinished when its cell ends: its last state."""
        if self._progress():
            self.say(f"  {self._progress()}")
        self.pending = {}

    def failure(self, error: Exception, timeout: int | None) -> Failure:
        cell = self.nb.cells[self.index] if self.index >= 0 else None
        source = cell.source if cell else ""
        failing_line = ""
        if isinstance(error, CellTimeoutError):
            reason = f"timeout: the cell ran longer than --cell-timeout {timeout} s"
        elif isinstance(error, CellExecutionError):
            reason = f"{error.ename}: {error.evalue}"
            frame = CELL_FRAME.search(ANSI_COLOUR.sub("", error.traceback))
            lines = source.splitlines()
            if frame and 0 < int(frame.group(1)) <= len(lines):
                failing_line = f"line {frame.group(1)}: {lines[int(frame.group(1)) - 1].strip()}"
        else:
            reason = f"{type(error).__name__}: {error}"
        return Failure(self.name, self.number, self.index, first_line(source), reason, failing_line)


def run(path: Path, out: Path, cell_timeout: int | None, kernel: str, keep_widgets: bool = False):
    """Execute one notebook; write the executed copy and HTML.
    -> (seconds, a Failure or None, the executed notebook)"""
    notebook = nbformat.read(path, as_version=4)
    start, failure = time.perf_counter(), None
    with tempfile.TemporaryDirectory(prefix="kernel-") as sockets:
        ipc = Config({"KernelManager": {"transport": "ipc", "ip": str(Path(sockets) / "ipc")}})
        client = ReportingClient(
            notebook, path.stem, timeout=cell_timeout, kernel_name=kernel, config=ipc,
            coalesce_streams=True, extra_arguments=[f"--IPKernelApp.exec_lines={KERNEL_SETUP}"],
            resources={"metadata": {"path": str(path.parent)}},
        )  # fmt: skip
        try:
            client.execute()
        except (CellExecutionError, CellTimeoutError, DeadKernelError) as error:
            failure = client.failure(error, cell_timeout)
    client.flush_progress()
    seconds = time.perf_counter() - start
    if not keep_widgets:
        notebook.metadata.pop("widgets", None)
    out.mkdir(parents=True, exist_ok=True)
    nbformat.write(notebook, out / path.name)
    html, _ = HTMLExporter().from_notebook_node(notebook)
    (out / path.with_suffix(".html").name).write_text(html, encoding="utf-8")
    return seconds, failure, notebook


def slowest_cells(notebook, n: int = 3) -> str:
    """'In [7] 41.2 s, ...': where a notebook spent its time (nbclient records cell timings)."""
    timings = []
    for cell in notebook.cells:
        execution = cell.get("metadata", {}).get("execution", {})
        start, end = execution.get("iopub.execute_input"), execution.get("shell.execute_reply")
        if start and end:
            timings.append((_timestamp(end) - _timestamp(start), cell.get("execution_count")))
    return ", ".join(f"In [{i}] {s:.1f} s" for s, i in sorted(timings, reverse=True)[:n])


def _timestamp(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    notebooks = select(args.notebooks, args.only)
    if not args.widgets:
        os.environ["WORKBOOK_STATIC_VIEWER"] = "1"  # kernels inherit the environment
    # OpenMP threads that spin while waiting for each other are ruinous on a shared or busy CPU:
    # 20 LoRA steps of the shipped model took 86 s with spinning, 1.3 s without (2 cores).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    runtimes, total, failure = {}, time.perf_counter(), None
    for number, path in enumerate(notebooks, 1):
        print(f"[{number}/{len(notebooks)}] {path.name} ...", flush=True)
        seconds, failure, executed = run(
            path, args.out, args.cell_timeout, args.kernel, args.widgets
        )
        runtimes[path.name] = round(seconds, 1)
        status = "FAILED" if failure else "ok"
        print(f"[{number}/{len(notebooks)}] {path.name}: {status} in {clock(seconds)} "
              f"(slowest: {slowest_cells(executed)})", flush=True)  # fmt: skip
        if failure:
            print(failure.message(args.out / path.name), file=sys.stderr, flush=True)
            break
    runtimes["total"] = round(time.perf_counter() - total, 1)
    (args.out / "runtimes.json").write_text(json.dumps(runtimes, indent=1) + "\n")
    n_ok = len(runtimes) - 1 - (failure is not None)
    counts = f"{n_ok} ok, {int(failure is not None)} failed"
    counts += f", {len(notebooks) - len(runtimes) + 1} not run" if failure else ""
    print(f"notebooks: {counts}, in {clock(runtimes['total'])}; executed "
          f"copies and HTML in {args.out}", flush=True)  # fmt: skip
    if failure:
        print(f"the run FAILED in {failure.notebook}, cell {failure.cell_number}: "
              f"{failure.reason}", file=sys.stderr)  # fmt: skip
    return 1 if failure else 0


if __name__ == "__main__":
    sys.exit(main())
