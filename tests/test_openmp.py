"""Idle OpenMP threads sleep: tsr sets OMP_WAIT_POLICY before torch loads, in every CLI."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CLIS = ["fine_tuning.py", "inference_lora.py", "evaluate.py", "prepare_data.py", "pretrain.py"]
SHOW = "import os, tsr; print(os.environ.get('OMP_WAIT_POLICY'))"


def _environment(**changes: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env.update({k: v for k, v in changes.items() if v is not None})
    return env


@pytest.mark.parametrize(("chosen", "seen"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_importing_tsr_makes_threads_sleep_unless_the_user_chose(chosen, seen):
    env = _environment(OMP_WAIT_POLICY=chosen)
    done = subprocess.run([sys.executable, "-c", SHOW], env=env, cwd=ROOT, capture_output=True)
    assert done.stdout.decode().strip() == seen


@pytest.mark.parametrize("cli", CLIS)
def test_every_cli_imports_tsr_before_anything_else(cli):
    """OpenMP reads the variable when torch loads it: too late once any import pulled it in."""
    imports = [
        node
        for node in ast.parse((ROOT / cli).read_text()).body
        if isinstance(node, ast.Import | ast.ImportFrom)
        and not (isinstance(node, ast.ImportFrom) and node.module == "__future__")
    ]
    first = imports[0]
    assert isinstance(first, ast.Import) and [a.name for a in first.names] == ["tsr"]
