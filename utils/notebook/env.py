"""What this machine has for the workbook: one row per component, OK / warn / missing /
optional, with the version found and the command that fixes it. Never touches the network."""

from __future__ import annotations

import html
import importlib
import importlib.metadata
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

OFFICIAL_REPO = "stabilityai/TripoSR"
WEIGHT_FILES = ("config.yaml", "model.ckpt")  # what the official repo ships
# optional: absent, and nothing needs it by default (LPIPS, rembg, the real TripoSR weights):
# grey, not the red of a missing piece that breaks a notebook.
STATUS_COLORS = {"OK": "#1a7f37", "warn": "#9a6700", "missing": "#cf222e", "optional": "#6e7781"}


@dataclass(frozen=True)
class EnvRow:
    component: str
    status: str  # a key of STATUS_COLORS
    details: str  # version, device, what was found
    fix: str  # what to run or change; empty when OK

    def _repr_html_(self) -> str:  # a row shown alone in a notebook reads as the report does
        return render_report_html([self])


def _version(distribution: str) -> str | None:
    """Installed version of a pip distribution, without importing it; None if absent."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _package_row(name: str, distribution: str, purpose: str, optional: bool = False) -> EnvRow:
    version = _version(distribution)
    if version is not None and importlib.util.find_spec(name) is not None:
        return EnvRow(name, "OK", version, "")
    status = "optional" if optional else "missing"
    details = f"not installed ({'optional: ' if optional else ''}{purpose})"
    return EnvRow(name, status, details, f"pip install {distribution}")


def _cpu_row() -> EnvRow:
    import psutil

    memory_gib = psutil.virtual_memory().total / 2**30
    return EnvRow("CPU", "OK", f"{os.cpu_count()} cores, {memory_gib:.1f} GiB RAM", "")


def _torch_rows() -> list[EnvRow]:
    try:
        import torch
    except ImportError:
        fix = "pip install -c constraints-cpu.txt torch (CPU) or see environment.yml (GPU)"
        return [EnvRow("torch", "missing", "not installed", fix)]
    rows = [EnvRow("torch", "OK", torch.__version__, "")]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gib = props.total_memory / 2**30
        details = f"{props.name}, {gib:.1f} GiB, CUDA {torch.version.cuda}"
        rows.append(EnvRow("CUDA", "OK", details, ""))
        if torch.cuda.is_bf16_supported():
            rows.append(EnvRow("bf16", "OK", "supported on the GPU", ""))
        else:
            rows.append(EnvRow("bf16", "warn", "not supported by this GPU", "use float16"))
    else:
        mps = getattr(torch.backends, "mps", None)
        where = "Apple MPS available" if mps is not None and mps.is_available() else "CPU only"
        fix = "fine for the tiny model; the real model at full size wants a CUDA GPU"
        rows.append(EnvRow("CUDA", "warn", f"no CUDA GPU ({where})", fix))
        rows.append(EnvRow("bf16", "warn", "no GPU: bf16 on the CPU is slow", "use float32"))
    return rows


def _transformers_row() -> EnvRow:
    version = _version("transformers")
    if version is None:
        return EnvRow("transformers", "missing", "not installed", "pip install 'transformers<5'")
    if int(version.split(".")[0]) != 4:
        details = f"{version}: 5.x renames the ViT parameters of the official checkpoint"
        return EnvRow("transformers", "warn", details, "pip install 'transformers>=4.46,<5'")
    return EnvRow("transformers", "OK", version, "")


def _marching_cubes_row() -> EnvRow:
    """Every marching-cubes library that imports; torchmcubes (GPU, not on PyPI) is optional."""
    backends = {"torchmcubes": "torchmcubes", "mcubes": "PyMCubes", "skimage": "scikit-image"}
    found = []
    for module, distribution in backends.items():
        try:
            importlib.import_module(module)
        except (ImportError, OSError):  # OSError: a compiled extension that cannot load
            continue
        found.append(f"{distribution} {_version(distribution) or ''}".strip())
    if not found:
        return EnvRow("marching cubes", "missing", "no backend imports", "pip install PyMCubes")
    return EnvRow("marching cubes", "OK", ", ".join(found), "")


def _labextension_present(name: str) -> bool:
    """Whether JupyterLab can load a prebuilt extension (the widget frontend half)."""
    from jupyter_core.paths import jupyter_path

    return any((Path(root) / name).is_dir() for root in jupyter_path("labextensions"))


def _widget_rows() -> list[EnvRow]:
    rows = [
        _package_row("ipywidgets", "ipywidgets", "interactive controls"),
        _package_row("pythreejs", "pythreejs", "the 3D viewer"),
        _package_row("jupyterlab", "jupyterlab", "running the notebooks"),
    ]
    if rows[1].status == "OK" and importlib.util.find_spec("jupyter_core") is not None:
        if not _labextension_present("jupyter-threejs"):
            fix = "pip install --force-reinstall pythreejs, then restart JupyterLab"
            details = f"{rows[1].details}, but JupyterLab has no jupyter-threejs extension"
            rows[1] = EnvRow("pythreejs", "warn", details, fix)
    return rows


def weights_status(path_or_repo: str | Path = OFFICIAL_REPO, required: bool = True) -> EnvRow:
    """Whether real TripoSR weights are on disk: in a local folder, or for a Hub repo id in
    the Hugging Face cache (looked up with try_to_load_from_cache, no network). Absent weights
    are "missing" when `required` (MODEL names them), else "optional"."""
    row = _weights_row(path_or_repo)
    if row.status == "missing" and not required:
        details = f"{row.details} (optional: the notebooks use the shipped model by default)"
        return EnvRow(row.component, "optional", details, row.fix)
    return row


def _weights_row(path_or_repo: str | Path) -> EnvRow:
    path = Path(path_or_repo)
    if path.exists():
        missing = [name for name in WEIGHT_FILES if not (path / name).is_file()]
        if missing:
            fix = f"put {' and '.join(WEIGHT_FILES)} in {path}"
            return EnvRow("TripoSR weights", "missing", f"{path} lacks {', '.join(missing)}", fix)
        return EnvRow("TripoSR weights", "OK", f"folder {path}", "")
    repo_id = str(path_or_repo)
    if repo_id.count("/") != 1:
        fix = f"pass a folder holding {' and '.join(WEIGHT_FILES)} or a Hub id like {OFFICIAL_REPO}"
        return EnvRow("TripoSR weights", "missing", f"{repo_id}: no such folder", fix)
    from huggingface_hub import try_to_load_from_cache

    cached = {name: try_to_load_from_cache(repo_id, name) for name in WEIGHT_FILES}
    missing = [name for name, hit in cached.items() if not isinstance(hit, str)]
    if missing:
        files = ", ".join(repr(name) for name in missing)
        fix = f"python -c \"import huggingface_hub as h; [h.hf_hub_download('{repo_id}', f) for f in [{files}]]\""
        details = f"{repo_id} not in the Hugging Face cache (lacks {', '.join(missing)})"
        return EnvRow("TripoSR weights", "missing", details, fix)
    folder = Path(cached[WEIGHT_FILES[0]]).parent
    return EnvRow("TripoSR weights", "OK", f"{repo_id} cached in {folder}", "")


def environment_report(
    weights: str | Path = OFFICIAL_REPO, weights_required: bool = False
) -> list[EnvRow]:
    """One row per thing the workbook uses, in the order a reader would fix them."""
    python = ".".join(map(str, sys.version_info[:3]))
    python_ok = sys.version_info >= (3, 10)
    rows = [
        EnvRow(
            "Python",
            "OK" if python_ok else "missing",
            python,
            "" if python_ok else "use Python >= 3.10",
        )
    ]
    rows.append(_cpu_row())
    rows += _torch_rows()
    rows.append(_transformers_row())
    rows.append(_package_row("peft", "peft", "LoRA adapters"))
    rows.append(_package_row("huggingface_hub", "huggingface_hub", "downloading weights"))
    rows.append(_package_row("trimesh", "trimesh", "meshes"))
    rows.append(_marching_cubes_row())
    rows += _widget_rows()
    rows.append(_package_row("lpips", "lpips", "the LPIPS metric", optional=True))
    rows.append(_package_row("rembg", "rembg", "removing photo backgrounds", optional=True))
    rows.append(weights_status(weights, required=weights_required))
    return rows


def render_report_html(rows: list[EnvRow]) -> str:
    """The report as an HTML table with coloured statuses (no pandas needed)."""
    header = "".join(
        f"<th style='text-align:left'>{h}</th>"
        for h in ("component", "status", "details", "how to fix")
    )
    body = []
    for row in rows:
        color = STATUS_COLORS.get(row.status, "inherit")
        cells = [
            html.escape(row.component),
            f"<b style='color:{color}'>{html.escape(row.status)}</b>",
            html.escape(row.details),
            f"<code>{html.escape(row.fix)}</code>" if row.fix else "",
        ]
        body.append(
            "<tr>" + "".join(f"<td style='text-align:left'>{c}</td>" for c in cells) + "</tr>"
        )
    return f"<table><thead><tr>{header}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def format_report_text(rows: list[EnvRow]) -> str:
    """The report as aligned plain text, for terminals and CLIs."""
    width = max(len(row.component) for row in rows)
    lines = []
    for row in rows:
        fix = f"  -> {row.fix}" if row.fix else ""
        lines.append(f"{row.component:<{width}}  {row.status:<7}  {row.details}{fix}")
    return "\n".join(lines)


def show_environment_report(rows: list[EnvRow] | None = None) -> list[EnvRow]:
    """Display the report: an HTML table in a notebook, text elsewhere."""
    rows = environment_report() if rows is None else rows
    try:
        from IPython import get_ipython
        from IPython.display import HTML, display
    except ImportError:
        get_ipython = None
    if get_ipython is not None and get_ipython() is not None:
        display(HTML(render_report_html(rows)))
    else:
        print(format_report_text(rows))
    return rows


if __name__ == "__main__":
    show_environment_report()
