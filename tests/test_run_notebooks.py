"""scripts/run_notebooks.py (behind `make demo`) on throwaway notebooks written here: one that
passes with a progress bar, one that raises, one never reached, one that runs out of time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
RUNNER = REPO / "scripts" / "run_notebooks.py"


def write_notebooks(folder: Path, sources: dict[str, list[str]]) -> None:
    """One notebook per name; each starts with a markdown cell, then its code cells."""
    folder.mkdir()
    for name, cells in sources.items():
        notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(f"# {name}")])
        notebook.cells += [nbformat.v4.new_code_cell(source) for source in cells]
        nbformat.write(notebook, folder / f"{name}.ipynb")


def run_runner(folder: Path, out: Path, *flags: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(RUNNER), "--notebooks", str(folder), "--out", str(out), *flags]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def failed_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run") / "notebooks"
    write_notebooks(
        folder,
        {
            "00_passes": [
                "from tqdm.auto import tqdm\nopen('order.txt', 'a').write('a')",
                "for _ in tqdm(range(40), desc='counting'):\n    pass\nprint('counted')",
            ],
            "01_raises": [
                "open('order.txt', 'a').write('b')",
                "DATA = 'data/no-such-set'  # a bad path\nopen(DATA + '/split.json')",
                "print('after the failure')",
            ],
            "02_never": ["open('order.txt', 'a').write('c')"],
        },
    )
    out = folder.parent / "out"
    return folder, out, run_runner(folder, out)


def test_a_failure_fails_the_run_and_stops_it(failed_run):
    folder, out, done = failed_run
    assert done.returncode == 1, done.stdout + done.stderr[-2000:]
    assert (folder / "order.txt").read_text() == "ab"  # in order, in their folder, 02 not run
    assert "notebooks: 1 ok, 1 failed, 1 not run, in " in done.stdout
    assert {p.name for p in out.iterdir()} == {
        "00_passes.ipynb", "00_passes.html", "01_raises.ipynb", "01_raises.html", "runtimes.json"
    }  # fmt: skip
    assert "without encryption" not in done.stderr  # kernels on local sockets, not TCP
    assert set(json.loads((out / "runtimes.json").read_text())) == {
        "00_passes.ipynb", "01_raises.ipynb", "total"
    }  # fmt: skip


def test_the_failure_names_notebook_cell_reason_and_executed_copy(failed_run):
    _, out, done = failed_run
    # the second code cell (In [2]) is the notebook's third cell (index 2, after the markdown)
    assert (
        "FAILED 01_raises: code cell 2 (In [2], cell index 2): "
        "DATA = 'data/no-such-set'  # a bad path"
    ) in done.stderr
    assert "  at line 2: open(DATA + '/split.json')\n" in done.stderr  # where in the cell
    assert "reason: FileNotFoundError: [Errno 2] No such file or directory: " in done.stderr
    assert f"executed copy, with the traceback under that cell: {out / '01_raises.ipynb'}" in (
        done.stderr
    )
    failed = nbformat.read(out / "01_raises.ipynb", as_version=4)
    assert failed.cells[2].outputs[-1].output_type == "error"  # the copy shows what failed
    assert not failed.cells[3].get("outputs")  # and that nothing ran after it


def test_progress_is_shown_cell_by_cell_and_the_copy_keeps_the_final_bar(failed_run):
    _, out, done = failed_run
    for line in (
        "[00_passes] cell 1/2 at ", "[00_passes] cell 2/2 at ", "[00_passes]   counted",
        "[01_raises] cell 2/3 at ",
    ):  # fmt: skip
        assert line in done.stdout, done.stdout
    assert "counting: 100%" in done.stdout  # the bar's last state, not only its start
    executed = nbformat.read(out / "00_passes.ipynb", as_version=4)
    text = "".join(o.get("text", "") for o in executed.cells[2].outputs)
    bar_lines = [line for line in text.splitlines() if line.startswith("counting:")]
    assert len(bar_lines) == 1 and "100%" in bar_lines[0] and "40/40" in bar_lines[0], text
    assert "\r" not in text  # the updates are folded into the final line
    html = (out / "00_passes.html").read_text()
    assert "40/40" in html and "0/40" not in html.replace("40/40", "")


def test_a_cell_past_the_timeout_fails_with_the_reason(tmp_path):
    folder = tmp_path / "notebooks"
    write_notebooks(folder, {"00_slow": ["import time", "time.sleep(60)  # far past the limit"]})
    done = run_runner(folder, tmp_path / "out", "--cell-timeout", "2")
    assert done.returncode == 1, done.stdout + done.stderr[-2000:]
    assert "FAILED 00_slow: code cell 2 (In [2], cell index 2): time.sleep(60)" in done.stderr
    assert "reason: timeout: the cell ran longer than --cell-timeout 2 s" in done.stderr
    assert "notebooks: 0 ok, 1 failed, 0 not run, in " in done.stdout
