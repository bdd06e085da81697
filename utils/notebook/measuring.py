"""Measuring time and peak memory of a piece of work (notebook 04 and the benchmarks), and
short LoRA runs side by side (notebook 03)."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import re
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import psutil
import torch

from tsr import mesh as mesh_extraction
from tsr.model import TSR, surface_band
from utils.training import lora

SAMPLE_EVERY_S = 0.002  # RSS sampling period where the kernel's peak counter cannot be reset


# The columns of mesh_extraction_benchmark's records worth a table.
BENCHMARK_COLUMNS = ("method", "resolution", "chunk_size", "seconds", "peak_memory_mb", "volume_mb",
                     "n_queries", "n_faces", "memory_measure")  # fmt: skip


# ---- measuring mesh extraction ---------------------------------------------------------------
def _status_mb(field: str) -> float:
    """A memory line of /proc/self/status (VmRSS, VmHWM) in MB."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE).group(1)) / 1024


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (Linux >= 4.0); False where that is impossible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_mb("VmHWM") >= 0
    except (OSError, AttributeError):  # no /proc, or no VmHWM line
        return False


def _return_freed_memory() -> None:
    """Hand memory freed by earlier work back to the OS, so the next baseline is honest."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@contextlib.contextmanager
def peak_memory(device: str | torch.device = "cpu") -> Iterator[dict]:
    """Peak memory of the block in MB above its start, put in the yielded dict as `peak_mb`,
    with `how` it was measured: CUDA: max_memory_allocated (tensors only, exact). CPU on
    Linux: the kernel's peak-RSS counter, reset at the start (whole process, exact).
    Elsewhere: RSS sampled every 2 ms by a thread (can miss peaks shorter than that)."""
    device = torch.device(device)
    result: dict = {}
    _return_freed_memory()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        yield result
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        result.update(peak_mb=(peak - start) / 2**20, how="CUDA max_memory_allocated")
        return
    process = psutil.Process()
    start = process.memory_info().rss / 2**20
    if _reset_peak_rss():
        yield result
        result.update(peak_mb=_status_mb("VmHWM") - start, how="peak RSS (Linux VmHWM)")
        return
    samples, done = [start], threading.Event()

    def sample() -> None:
        while not done.wait(SAMPLE_EVERY_S):
            samples.append(process.memory_info().rss / 2**20)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield result
    finally:
        done.set()
        sampler.join()
    samples.append(process.memory_info().rss / 2**20)
    result.update(peak_mb=max(samples) - start, how="RSS sampled every 2 ms")


def mesh_extraction_benchmark(
    model: TSR,
    scene_code: torch.Tensor,
    threshold: float,
    resolutions: Sequence[int] = (64, 128),
    chunk_sizes: Sequence[int] | None = None,
    methods: Sequence[str] = ("dense",),
    repeats: int = 1,
) -> list[dict]:
    """Time and peak memory of one extraction (grid queries + marching cubes) for every
    (method, resolution, chunk size); chunk_sizes None: the device's default. The grid's
    chunk is what the decoder sees (the renderer's own chunking is off meanwhile). `seconds`
    is the best of `repeats` runs (others' work on a shared CPU only ever adds time), its split
    into queries and marching cubes the last run's. scene_code (3, C, H, W). -> a record each"""
    device = scene_code.device
    chunk_sizes = chunk_sizes or [mesh_extraction.default_chunk_size(device)]
    previous_chunk = model.renderer.chunk_size
    model.renderer.set_chunk_size(0)

    def density(points: torch.Tensor) -> torch.Tensor:  # (N, 3) -> (N,)
        return model.renderer.query_triplane(model.decoder, points, scene_code)["density_act"][:, 0]

    records = []
    try:
        for method in methods:
            for resolution in resolutions:
                for chunk_size in chunk_sizes:
                    seconds, extraction = math.inf, None
                    with peak_memory(device) as memory:
                        for _ in range(repeats):
                            extraction = None  # the last run's mesh must not count in this one
                            start = time.perf_counter()
                            extraction = mesh_extraction.extract_isosurface(
                                density, resolution, threshold, model.config.renderer.radius,
                                chunk_size, device=device,
                                **surface_band(resolution, scene_code.shape[-1], threshold, method),
                            )  # fmt: skip
                            seconds = min(seconds, time.perf_counter() - start)
                    records.append({
                        "method": extraction.method, "resolution": resolution,
                        "chunk_size": chunk_size, "seconds": seconds,
                        "query_seconds": extraction.query_seconds,
                        "marching_seconds": extraction.marching_seconds,
                        "peak_memory_mb": memory["peak_mb"],
                        "volume_mb": 4 * resolution**3 / 2**20,  # one float32 level volume
                        "n_queries": extraction.n_queries, "n_faces": len(extraction.faces),
                        "memory_measure": memory["how"],
                    })  # fmt: skip
    finally:
        model.renderer.set_chunk_size(previous_chunk)
    return records


# ---- comparing LoRA settings ------------------------------------------------------------------
def compare_lora_settings(
    model_name: str,
    train,
    val,
    variants: dict[str, dict],
    config,
    device: str = "cpu",
    output_dir: str | Path = "outputs/lora_variants",
) -> list[dict]:
    """One short LoRA run per variant (keyword arguments of `lora.add_lora`: r, alpha,
    targets), each from the same base weights with the same data, steps, seed and validation
    objects. -> a record per variant: its trainable parameters, validation loss and PSNR at
    step 0 and at the end and their changes, seconds. `config` (a TrainConfig) sets the run; it validates
    at the start and the end only, with no early stopping, so every variant runs as long."""
    import dataclasses

    from utils.training.train import fit  # the training loop only when needed

    config = dataclasses.replace(config, val_every=config.max_steps, early_stopping_patience=0)
    rows = []
    for name, settings in variants.items():
        model = lora.add_lora(TSR.from_pretrained(model_name), **settings).to(device)
        trainable = lora.trainable_parameter_report(model)["trainable"]
        start = time.perf_counter()
        # throwaway runs: a second run of the notebook replaces them (overwrite)
        result = fit(
            model, train, config, val_dataset=val, output_dir=Path(output_dir) / name,
            overwrite=True,
        )  # fmt: skip
        seconds = time.perf_counter() - start
        first, *_, last = [record for record in result.history if "val_loss" in record]
        rows.append({
            "variant": name, "trainable": trainable, "steps": last["step"],
            "val_loss at 0": first["val_loss"], "val_loss": last["val_loss"],
            "val_psnr at 0": first["val_psnr"], "val_psnr": last["val_psnr"],
            # the differences themselves: 3 significant digits of the values would hide them
            "val_loss change %": 100 * (last["val_loss"] / first["val_loss"] - 1),
            "PSNR gain (dB)": last["val_psnr"] - first["val_psnr"], "seconds": seconds,
        })  # fmt: skip
    return rows
