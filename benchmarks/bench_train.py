"""One training step, our default recipe vs the course project's, on the same model and data.

- ours: `utils.training.train.fit` with its defaults: 1024 random rays per object over k views, only
  the LoRA weights get gradients, backbone checkpointing by fit's rule (on for 16 blocks),
  fp32 on the CPU (bf16 autocast on CUDA).
- course: every pixel of k whole views rendered each step (512 x 512), same LoRA (r=16 on the
  128/16 attention Linears), same AdamW and clipping, no checkpointing, loss = MSE with the
  mask multiplied into both images. On CUDA the base model is cast to fp16 under a GradScaler
  as the course did; on the CPU fp16 training is impractical, so it runs in fp32 like ours:
  the CPU comparison is at equal precision (on a GPU the course's fp16 and our bf16 autocast
  would both roughly halve activation memory).

Models: `tiny` (the shipped test model), `mid` (the classroom size of issue 6: 128 px input,
4+4 blocks of width 128, 48 samples per ray) and `official` (full size, random weights; ours
only: one step at batch 1 must stay under 8 GB RSS in fp32). The course recipe climbs image
sizes (size/16 .. size, doubling) and stops when the next one is predicted (pixels x the last
increase) to exceed --memory-budget-gb; a size it cannot afford is extrapolated linearly in
pixels from the two largest measured ones and marked so. Each case is a fresh subprocess: its
peak RSS (ru_maxrss) is its own; "increase" is the peak during the steps minus the RSS before
them. When other processes share the cores, two torch threads wait for each other at every
op (5x slower here): `--threads 1` then gives steadier numbers for both recipes alike.

    .venv/bin/python benchmarks/bench_train.py --threads 1      # tiny, mid, official (ours)
    .venv/bin/python benchmarks/bench_train.py --models tiny --skip-official
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from tsr.cameras import rays_from_c2w
from tsr.config import named_config
from tsr.files import write_text
from tsr.model import TSR
from utils.data.build import prepare_dataset
from utils.data.dataset import MultiViewDataset
from utils.training.config import TrainConfig
from utils.training.lora import add_lora, gradient_checkpointing
from utils.training.setup import return_freed_memory_promptly
from utils.training.train import fit

GB = 1e9


def mid_config():
    """issue 6's classroom size: the same architecture at 2.4 M parameters."""
    config = named_config("tiny")
    config.cond_image_size = 128
    config.image_tokenizer.vit.update(
        hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512
    )
    config.tokenizer = dataclasses.replace(config.tokenizer, plane_size=16, num_channels=128)
    config.backbone = dataclasses.replace(
        config.backbone, in_channels=128, num_attention_heads=4, attention_head_dim=32,
        num_layers=4, cross_attention_dim=128,
    )  # fmt: skip
    config.post_processor = dataclasses.replace(
        config.post_processor, in_channels=128, out_channels=16
    )
    config.decoder = dataclasses.replace(
        config.decoder, in_channels=48, n_neurons=64, n_hidden_layers=4
    )
    config.renderer = dataclasses.replace(config.renderer, num_samples_per_ray=48)
    return config


def build_model(name: str) -> TSR:
    if name == "tiny":
        return TSR.from_pretrained("tiny")
    return TSR.from_config(mid_config() if name == "mid" else "official")


def peak_rss() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB  # Linux: KiB


def current_rss() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / GB


class StepRecorder:
    """fit() callback: CPU seconds and memory peaks of every step."""

    def __init__(self):
        self.peaks: list[tuple[float, float]] = []
        self.cpu_seconds: list[float] = []
        self._last = time.process_time()

    def on_step(self, step: int, metrics: dict) -> None:
        cuda = torch.cuda.max_memory_allocated() / GB if torch.cuda.is_available() else 0.0
        self.peaks.append((peak_rss(), cuda))
        now = time.process_time()
        self.cpu_seconds.append(now - self._last)
        self._last = now


def resized(item: dict, size: int) -> dict:
    """Targets at size x size (area-averaged), for the course recipe below the data size."""
    height = item["mask"].shape[1]
    if size == height:
        return item
    rgb = F.interpolate(item["rgb"].permute(0, 3, 1, 2), size=(size, size), mode="area")
    mask = F.interpolate(item["mask"][:, None], size=(size, size), mode="area")[:, 0]
    return {**item, "rgb": rgb.permute(0, 2, 3, 1), "mask": mask}


def course_steps(model: TSR, items: list[dict], steps: int, size: int, device) -> tuple:
    """The course recipe's step: whole images, all pixels, every step.
    -> wall seconds, CPU seconds, (peak RSS, CUDA peak) per step"""
    fp16 = device.type == "cuda"
    gradient_checkpointing(model, False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=fp16)
    dtype = torch.float16 if fp16 else torch.float32
    model.train()
    seconds, cpu_seconds, peaks = [], [], []
    for step in range(steps):
        item = resized(items[step % len(items)], size)
        started, cpu_started = time.perf_counter(), time.process_time()
        scene_code = model.encode(item["cond_image"][None].to(device, dtype))[0]
        rays_o, rays_d = rays_from_c2w(item["c2w"], size, size, item["fovy_deg"])  # (V,S,S,3)
        loss = 0.0
        for view in range(len(rays_o)):
            rendered = model.render_rays(
                scene_code, rays_o[view].to(device, dtype), rays_d[view].to(device, dtype)
            )
            mask = item["mask"][view, ..., None].to(device)
            loss = loss + F.mse_loss(
                rendered["rgb"].float() * mask, item["rgb"][view].to(device) * mask
            )
        scaler.scale(loss / len(rays_o)).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
        cpu_seconds.append(time.process_time() - cpu_started)
        cuda = torch.cuda.max_memory_allocated() / GB if device.type == "cuda" else 0.0
        peaks.append((peak_rss(), cuda))
    return seconds, cpu_seconds, peaks


def run_case(case: dict) -> dict:
    """One (model, recipe, size) in this process."""
    torch.set_num_threads(case["threads"])
    device = torch.device(case["device"])
    model = build_model(case["model"])
    if case["recipe"] == "course" and device.type == "cuda":
        model.half()  # the course cast the whole base model; the adapter stays fp32 below
    add_lora(model, r=16, alpha=16, dropout=0.05, targets="attn")
    model.to(device)
    dataset = MultiViewDataset(
        case["data"],
        "all",
        n_supervision_views=case["views"],
        cond_size=model.config.cond_image_size,
    )
    items = [dataset[i] for i in range(len(dataset))]  # in memory: no PNG decoding timed
    before = current_rss()
    if case["recipe"] == "ours":
        recorder = StepRecorder()
        config = TrainConfig(
            max_steps=case["steps"], val_every=0, checkpoint_every=10**9, progress=False
        )
        with tempfile.TemporaryDirectory() as run_dir:
            result = fit(model, items, config, callbacks=[recorder], output_dir=run_dir)
        seconds = [r["seconds"] for r in result.history if "seconds" in r]
        cpu_seconds, peaks = recorder.cpu_seconds, recorder.peaks
        rays = config.rays_per_object
    else:
        if device.type == "cpu":  # the allocator setting fit() uses, so both run alike
            return_freed_memory_promptly()
        seconds, cpu_seconds, peaks = course_steps(
            model, items, case["steps"], case["size"], device
        )
        rays = case["views"] * case["size"] ** 2

    def median_after_first(values: list[float]) -> float:  # the first step pays one-time costs
        timed = sorted(values[1:] or values)
        return timed[len(timed) // 2]

    return {
        **{k: case[k] for k in ("model", "recipe", "size", "views", "device")},
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "rays_per_step": rays,
        "samples_per_ray": model.config.renderer.num_samples_per_ray,
        "step_seconds": median_after_first(seconds),
        "step_cpu_seconds": median_after_first(cpu_seconds),
        "peak_rss_gb": max(p[0] for p in peaks),
        "rss_increase_gb": max(p[0] for p in peaks) - before,
        "cuda_peak_gb": max(p[1] for p in peaks),
        "steps": len(seconds),
        "extrapolated": False,
    }


def run_subprocess(case: dict) -> dict:
    command = [sys.executable, __file__, "--case", json.dumps(case)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"case {case} failed:\n{done.stderr[-3000:]}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  {row['model']:8} {row['recipe']:6} {row['size']:4} px: {row['step_seconds']:.3f} s, "
          f"peak {row['peak_rss_gb']:.2f} GB", flush=True)  # fmt: skip
    return row


def extrapolate(rows: list[dict], size: int) -> dict:
    """Line through the two largest measured sizes, in pixels, for time and memory."""
    small, large = rows[-2], rows[-1]
    scale = (size**2 - large["size"] ** 2) / (large["size"] ** 2 - small["size"] ** 2)
    row = {**large, "size": size, "rays_per_step": large["views"] * size**2, "extrapolated": True}
    for key in (
        "step_seconds",
        "step_cpu_seconds",
        "peak_rss_gb",
        "rss_increase_gb",
        "cuda_peak_gb",
    ):
        row[key] = large[key] + scale * (large[key] - small[key])
    return row


def course_ladder(base: dict, size: int, budget_gb: float) -> list[dict]:
    rows = []
    for candidate in (size // 16, size // 8, size // 4, size // 2, size):
        if rows:
            last = rows[-1]
            growth = (candidate / last["size"]) ** 2
            if base["device"].startswith("cuda"):  # activations on the GPU: at most x pixels
                predicted = last["cuda_peak_gb"] * growth
            else:
                predicted = last["peak_rss_gb"] + last["rss_increase_gb"] * (growth - 1)
            if predicted > budget_gb:
                print(
                    f"  {base['model']} course {candidate} px: predicted {predicted:.1f} GB > budget, extrapolated"
                )
                break
        rows.append(
            run_subprocess(
                {
                    **base,
                    "recipe": "course",
                    "size": candidate,
                    "steps": 3 if candidate < size else 2,
                }
            )
        )
    if rows[-1]["size"] != size:
        if len(rows) < 2:
            raise SystemExit(f"--memory-budget-gb {budget_gb}: too small to measure two sizes")
        rows.append(extrapolate(rows, size))
    return rows


def print_table(rows: list[dict], ratios: list[dict]) -> None:
    print(f"\n{'model':8} {'params':>11} {'recipe':6} {'size':>5} {'rays/step':>10} {'step s':>9} {'CPU s':>9} "
          f"{'peak RSS GB':>11} {'increase GB':>11} {'CUDA GB':>8}")  # fmt: skip
    for r in rows:
        mark = " (extrapolated)" if r["extrapolated"] else ""
        print(f"{r['model']:8} {r['parameters']:>11,} {r['recipe']:6} {r['size']:>5} {r['rays_per_step']:>10,} "
              f"{r['step_seconds']:>9.3f} {r['step_cpu_seconds']:>9.3f} {r['peak_rss_gb']:>11.2f} {r['rss_increase_gb']:>11.2f} "
              f"{r['cuda_peak_gb']:>8.2f}{mark}")  # fmt: skip
    for q in ratios:
        print(f"{q['model']}: course/ours at {q['size']} px: step time x{q['time_ratio']:.1f} "
              f"(CPU time x{q['cpu_time_ratio']:.1f}), peak RSS "
              f"x{q['peak_ratio']:.1f}, RSS increase x{q['increase_ratio']:.1f}"
              f"{' (course extrapolated)' if q['extrapolated'] else ''}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=["tiny", "mid"], choices=["tiny", "mid"])
    parser.add_argument("--size", type=int, default=512, help="view size (the course's 512)")
    parser.add_argument("--views", type=int, default=4, help="supervision views per object (k)")
    parser.add_argument(
        "--memory-budget-gb", type=float, default=10.0, help="RSS on the CPU, CUDA peak on a GPU"
    )
    parser.add_argument("--skip-official", action="store_true", help="no full-size step")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", type=Path, default=Path("outputs/bench_train.json"))
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        print(f"rendering 2 objects x {args.views} views at {args.size} px", flush=True)
        prepare_dataset(
            data,
            families=("primitives",),
            n_objects=2,
            n_views=args.views,
            size=args.size,
            workers=1,
        )
        common = {
            "views": args.views,
            "device": args.device,
            "threads": args.threads,
            "data": str(data),
        }
        rows, ratios = [], []
        for model in args.models:
            ours = run_subprocess(
                {**common, "model": model, "recipe": "ours", "size": args.size, "steps": 10}
            )
            course = course_ladder({**common, "model": model}, args.size, args.memory_budget_gb)
            rows += [ours, *course]
            target = course[-1]
            ratios.append({
                "model": model, "size": args.size, "extrapolated": target["extrapolated"],
                "time_ratio": target["step_seconds"] / ours["step_seconds"],
                "cpu_time_ratio": target["step_cpu_seconds"] / ours["step_cpu_seconds"],
                "peak_ratio": target["peak_rss_gb"] / ours["peak_rss_gb"],
                "increase_ratio": target["rss_increase_gb"] / max(ours["rss_increase_gb"], 1e-3),
                "cuda_ratio": target["cuda_peak_gb"] / ours["cuda_peak_gb"] if ours["cuda_peak_gb"] else None,
            })  # fmt: skip
        if not args.skip_official:
            rows.append(
                run_subprocess(
                    {**common, "model": "official", "recipe": "ours", "size": args.size, "steps": 2}
                )
            )
    print_table(rows, ratios)
    official = [r for r in rows if r["model"] == "official"]
    if official:
        verdict = "OK" if official[0]["peak_rss_gb"] <= 8 else "OVER"
        print(
            f"full-size config, our step at batch 1: peak RSS {official[0]['peak_rss_gb']:.2f} GB ({verdict}, limit 8 GB)"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "threads": args.threads, "device": args.device}
    write_text(args.json, json.dumps({"meta": meta, "rows": rows, "ratios": ratios}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
