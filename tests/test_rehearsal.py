"""The full-size rehearsal (scripts/rehearse.py): every notebook and CLI against a full-size
checkpoint on the CPU. Minutes long, so `slow`: make test-slow or make rehearse."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_every_notebook_and_cli_runs_against_a_full_size_checkpoint(tmp_path):
    command = [sys.executable, str(REPO / "scripts" / "rehearse.py"), "--out", str(tmp_path)]
    built = REPO / "outputs" / "rehearsal" / "model"  # make rehearse's checkpoint, if there
    if (built / "model.ckpt").is_file():
        command += ["--model", str(built)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "rehearsal.json").read_text())
    notebooks = [f"notebook {number:02d}" for number in range(6)]
    assert [step["step"] for step in summary["steps"]] == [
        *notebooks, "prepare_data", "fine_tuning", "inference_lora", "evaluate", "python -m tsr"
    ]  # fmt: skip
    executed = sorted(p.name for p in (tmp_path / "notebooks").glob("*.ipynb"))
    assert len(executed) == 6
    report = (tmp_path / "eval" / "metrics.md").read_text()
    assert "paper Chamfer" in report  # evaluate.py scored both protocols
