"""The full-size rehearsal: every notebook and CLI against a full-size TripoSR checkpoint, on
the CPU, at the smallest sizes that still run every cell.

    python scripts/rehearse.py                      # make rehearse
    python scripts/rehearse.py --model path/to/TripoSR-folder   # the real weights instead

1. A full-size checkpoint folder in the official format (config.yaml + model.ckpt, what
   `TSR.from_pretrained` reads from the Hub), random weights, unless --model names one.
2. The six notebooks with SMOKE=1 and WORKBOOK_MODEL=<folder> (scripts/run_notebooks.py):
   the official profile's CI sizes (6 objects at 64², 2 + 2 training steps, meshes at 32-48³).
3. The CLIs against the same folder: prepare_data.py, fine_tuning.py (1 step of the official
   profile's CPU recipe), inference_lora.py, evaluate.py (both protocols), python -m tsr
   (with run.py's flag names).

Random weights make no meaningful mesh: the rehearsal proves that everything runs and how much
time and memory it takes, not what it learns. Each step's wall time and peak RSS go to
<out>/rehearsal.json; the first failure stops it (exit status 1).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a full-size checkpoint folder (default: build)")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "rehearsal")
    parser.add_argument("--device", default="cpu", help="the CLIs' device (notebooks pick theirs)")
    return parser.parse_args(argv)


def full_size_checkpoint(folder: Path) -> Path:
    """Random full-size weights saved as the Hub's files (model.ckpt, not safetensors)."""
    if not (folder / "model.ckpt").is_file():
        from tsr.model import TSR  # only here: the rehearsal's own process stays small

        print(f"building a full-size random-init checkpoint in {folder} (1.7 GB)", flush=True)
        TSR.from_config("official", seed=0).save_pretrained(folder, safe_serialization=False)
    return folder


def run_step(name: str, command: list[str], env: dict, log: Path) -> dict:
    """Run one command, its output into log; -> wall time, peak RSS, exit status."""
    print(f"=== {name}: {' '.join(command)}", flush=True)
    started = time.perf_counter()
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)  # usage covers its waited-for children too
    record = {
        "step": name, "seconds": round(time.perf_counter() - started, 1),
        "peak_rss_gb": round(usage.ru_maxrss / 2**20, 2), "exit_status": os.waitstatus_to_exitcode(status),
        "log": str(log),
    }  # fmt: skip
    print(f"=== {name}: exit {record['exit_status']} in {record['seconds']} s, "
          f"peak RSS {record['peak_rss_gb']} GB", flush=True)  # fmt: skip
    return record


def steps(model: Path, out: Path, device: str) -> list[tuple[str, list[str]]]:
    """Each notebook (its own step, so its own time and peak RSS), then each CLI at the
    official profile's CI sizes."""
    python, data, adapter = sys.executable, out / "data", out / "lora" / "cli" / "adapter"
    image = ["--image_path", "examples/sphere.png"]
    notebooks = [
        (f"notebook {number}", [python, "scripts/run_notebooks.py", number, "--out",
                                str(out / "notebooks")])
        for number in ("00", "01", "02", "03", "04", "05")
    ]  # fmt: skip
    return [
        *notebooks,
        ("prepare_data", [python, "prepare_data.py", "--out", str(data), "--family", "parts",
                          "--n", "6", "--views", "4", "--size", "64", "--seed", "1", "--force"]),
        ("fine_tuning", [python, "fine_tuning.py", "--input_folder", str(data), "--pretrained",
                         str(model), "--output_dir", str(out / "lora"), "--run_name", "cli",
                         "--max_steps", "1", "--patch", "32", "--batch_size", "1", "--lr", "1e-4",
                         "--grad_checkpointing", "--lambda_lpips", "2", "--lambda_mask", "0.05",
                         "--val_objects", "1", "--overwrite", "--device", device]),
        ("inference_lora", [python, "inference_lora.py", *image, "--lora_path", str(adapter),
                            "--repo_root", str(model), "--mc-resolution", "32",
                            "--no-remove-bg", "--output", str(out / "sphere_lora.obj"),
                            "--device", device]),
        ("evaluate", [python, "evaluate.py", "--data", str(data), "--pretrained", str(model),
                      "--adapter", str(adapter), "--mc-resolution", "32", "--n-points", "2000",
                      "--output-dir", str(out / "eval"), "--device", device]),
        # run.py's flag names, as the official README writes them
        ("python -m tsr", [python, "-m", "tsr", "examples/sphere.png", "--output-dir",
                           f"{out / 'tsr'}/", "--pretrained-model-name-or-path", str(model),
                           "--model-save-format", "obj", "--mc-resolution", "32",
                           "--chunk-size", "8192", "--foreground-ratio", "0.85",
                           "--no-remove-bg", "--device", device]),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model = full_size_checkpoint(args.model or args.out / "model").resolve()
    env = {**os.environ, "SMOKE": "1", "WORKBOOK_MODEL": str(model)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # threads that spin are ruinous on a busy CPU
    records = []
    for name, command in steps(model, args.out, args.device):
        records.append(run_step(name, command, env, args.out / f"{name.replace(' ', '_')}.log"))
        if records[-1]["exit_status"] != 0:
            break
    summary = {
        "model": str(model), "seconds": round(time.perf_counter() - started, 1),
        "peak_rss_gb": max(r["peak_rss_gb"] for r in records), "steps": records,
    }  # fmt: skip
    (args.out / "rehearsal.json").write_text(json.dumps(summary, indent=1) + "\n")
    failed = [r["step"] for r in records if r["exit_status"] != 0]
    print(f"rehearsal {'FAILED at ' + failed[0] if failed else 'passed'} in "
          f"{summary['seconds']:.0f} s, peak RSS {summary['peak_rss_gb']} GB; {args.out}")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
