"""Loss curves: the live plot a notebook redraws during `fit()`, and loss_curves.png.

Every function builds a `matplotlib.figure.Figure` directly (not through pyplot), so nothing
is shown twice by the inline backend and everything also works headless (Agg).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from tsr.files import write_bytes
from utils.figures import figure_png

# Logged validation metrics carry one of these prefixes; the curve is named without it.
VALIDATION_PREFIXES = ("val_", "val/", "validation_", "validation/")


def _in_notebook() -> bool:
    """True inside a Jupyter kernel, where a display handle can be updated in place."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and hasattr(shell, "kernel")


def _as_number(value) -> float | None:
    """A float from a Python/NumPy number or a one-element tensor; None for anything else."""
    if isinstance(value, bool | str):
        return None
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):  # torch raises RuntimeError for many elements
        return None


def _loss_name(key: str) -> str:
    """'val_loss', 'val/loss' and 'loss' all name the same curve."""
    for prefix in VALIDATION_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


# Validation renders rays only, so its "loss" is the render loss; training's "loss" adds the
# 3D terms. Each validation curve is drawn beside the training curve of the same quantity.
SAME_QUANTITY = {"loss": "loss_render"}  # validation name -> training name


class LivePlot:
    """Training callback: loss curves, redrawn in place in a notebook.

    Left panel: what training and validation both measure (the render loss), so the two
    curves can be compared. Right panel: the training loss and its other terms (the 3D
    occupancy term, ...), which validation does not measure. In a notebook the figure is one
    display output whose PNG is replaced at most every `min_interval_s` seconds (no flicker,
    no growing output); `show=False` never displays it (a figure only written to disk).
    Elsewhere nothing is shown and `on_end` writes `out_png` if given.
    Plotted keys: `keys`, or every key ending in "loss" or starting with "loss_".
    """

    def __init__(
        self,
        keys: Sequence[str] | None = None,
        out_png: str | Path | None = None,
        title: str = "training",
        log_y: bool = True,
        min_interval_s: float = 1.0,
        show: bool = True,
    ):
        self.keys = list(keys) if keys is not None else None
        self.out_png = Path(out_png) if out_png is not None else None
        self.title = title
        self.log_y = log_y
        self.min_interval_s = min_interval_s
        self.show = show
        self.train: dict[str, list[tuple[int, float]]] = {}  # key -> [(step, value)]
        self.validation: dict[str, list[tuple[int, float]]] = {}
        self._handle = None  # IPython display handle, created on the first draw
        self._last_draw = -math.inf  # the first step is always drawn

    def _record(self, history: dict, step: int, metrics: dict) -> None:
        for key, value in metrics.items():
            name = _loss_name(key)
            wanted = (
                name in self.keys
                if self.keys is not None
                else name.endswith("loss") or name.startswith("loss_")
            )
            number = _as_number(value)
            if wanted and number is not None and math.isfinite(number):
                history.setdefault(name, []).append((int(step), number))

    def on_step(self, step: int, metrics: dict) -> None:
        self._record(self.train, step, metrics)
        self._maybe_draw()

    def on_validation(self, step: int, metrics: dict) -> None:
        self._record(self.validation, step, metrics)
        self._maybe_draw(force=True)

    def on_end(self) -> None:
        self._maybe_draw(force=True)
        if self.out_png is not None:
            self.savefig(self.out_png)

    def pairs(self) -> list[tuple[str | None, str]]:
        """(training name, validation name) of the curves drawn together; None where training
        logged no curve of the same quantity (then none is drawn beside it)."""
        partners = [(SAME_QUANTITY.get(name, name), name) for name in sorted(self.validation)]
        return [(train if train in self.train else None, val) for train, val in partners]

    def figure(self) -> Figure:
        """Solid = train, dots and dashes = validation; one colour per quantity."""
        fig = Figure(figsize=(10.0, 3.6), layout="constrained")
        compared, terms = fig.subplots(1, 2)
        paired = set()
        for index, (train_name, val_name) in enumerate(self.pairs()):
            color = f"C{index}"
            if train_name is not None:
                paired.add(train_name)
                steps, values = zip(*self.train[train_name], strict=True)
                compared.plot(steps, values, color=color, lw=1.2, label=f"train {train_name}")
            steps, values = zip(*self.validation[val_name], strict=True)
            compared.plot(steps, values, "o--", color=color, ms=4, label=f"val {val_name}")
        for index, name in enumerate(sorted(set(self.train) - paired)):
            steps, values = zip(*self.train[name], strict=True)
            terms.plot(steps, values, color=f"C{index + len(paired) + 1}", lw=1.2, label=name)
        titles = ("train vs validation: the same quantity", "training loss and its terms")
        for ax, title in zip((compared, terms), titles, strict=True):
            if ax.lines:
                ax.legend(loc="upper right", fontsize="small")
                lowest = min(float(np.min(line.get_ydata())) for line in ax.lines)
                if self.log_y and lowest > 0:
                    ax.set_yscale("log")
            ax.set_xlabel("step")
            ax.set_ylabel("loss")
            ax.set_title(f"{self.title}: {title}", fontsize="medium")
            ax.grid(alpha=0.3)
        return fig

    def savefig(self, path: str | Path) -> Path:
        return write_bytes(path, figure_png(self.figure()))

    def _maybe_draw(self, force: bool = False) -> None:
        if not self.show or not _in_notebook():
            return
        now = time.monotonic()
        if not force and now - self._last_draw < self.min_interval_s:
            return
        self._last_draw = now
        from IPython.display import Image, display

        image = Image(data=figure_png(self.figure()))
        if self._handle is None:
            self._handle = display(image, display_id=True)
        else:
            self._handle.update(image)


def read_metrics(source: str | Path | Iterable[dict]) -> list[dict]:
    """Records from a metrics.jsonl file (one JSON object a line) or an iterable of dicts."""
    if isinstance(source, str | Path):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"metrics file not found: {path}; pass a metrics.jsonl path")
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return list(source)


def plot_loss_curves(source: str | Path | Iterable[dict], out_png: str | Path) -> Path:
    """Loss curves from logged records to a PNG. A record is validation when its `split` is
    'val'/'validation' or a key starts with 'val_'/'val/'; every record needs a `step`.
    Nothing is displayed: fit() calls this at its end, below the live plot of the same run."""
    plot = LivePlot(out_png=out_png, show=False)
    for record in read_metrics(source):
        is_validation = record.get("split") in ("val", "validation") or any(
            key.startswith(VALIDATION_PREFIXES) for key in record
        )
        metrics = {k: v for k, v in record.items() if k not in ("step", "split")}
        (plot.on_validation if is_validation else plot.on_step)(record["step"], metrics)
    return plot.savefig(out_png)
