"""The evaluation report's numbers and verdicts on hand-made records with known answers."""

from __future__ import annotations

import math

import pytest

from utils.evaluation.report import compare, markdown_report


def records(object_ids: list[str], **columns: list[float]) -> list[dict]:
    return [
        {"object_id": oid, **{metric: values[i] for metric, values in columns.items()}}
        for i, oid in enumerate(object_ids)
    ]


IDS = ["a", "b", "c", "d"]
BASE = records(
    IDS,
    chamfer_l1=[0.10, 0.20, 0.30, 0.40],
    psnr=[20.0, 21.0, 22.0, 23.0],
    mask_iou=[0.75, 0.75, 0.75, 0.75],
    colour_error=[0.30, 0.30, 0.30, 0.30],
    **{"f@0.05": [0.5, 0.6, 0.7, 0.8]},
)
# per object: Chamfer +0.02 (lower is better: worse), F +0.1 (higher: better), PSNR -1 (worse),
# mask IoU +-0.125 alternating (mean 0: within noise), colour error -0.1 (lower: better)
LORA = records(
    IDS,
    chamfer_l1=[0.12, 0.22, 0.32, 0.42],
    psnr=[19.0, 20.0, 21.0, 22.0],
    mask_iou=[0.875, 0.625, 0.875, 0.625],
    colour_error=[0.20, 0.20, 0.20, 0.20],
    **{"f@0.05": [0.6, 0.7, 0.8, 0.9]},
)


def paired_row(text: str, label: str) -> list[str]:
    """The cells of one metric's row in the paired table: mean ± se, n, verdict."""
    (line,) = [line for line in text.splitlines() if line.startswith(f"| {label} |")]
    return [cell.strip() for cell in line.strip("|").split("|")][1:]


def test_per_model_means_and_standard_errors_by_hand():
    summary = compare({"base": BASE, "lora": LORA})
    chamfer = summary["models"]["base"]["chamfer_l1"]
    # 0.1..0.4: mean 0.25, sample std sqrt(0.05 / 3), standard error that / 2
    assert chamfer["mean"] == pytest.approx(0.25) and chamfer["n"] == 4
    assert chamfer["stderr"] == pytest.approx(math.sqrt(0.05 / 3) / 2)
    iou = summary["models"]["lora"]["mask_iou"]  # 0.75 +- 0.125: std 0.25 / sqrt(3)
    assert iou["mean"] == 0.75 and iou["stderr"] == pytest.approx(0.125 / math.sqrt(3))
    text = markdown_report(summary)
    (base_row,) = [line for line in text.splitlines() if line.startswith("| base |")]
    assert base_row.startswith("| base | 0.2500 ± 0.0645 | 0.6500 ± 0.0645 |")


def test_paired_verdicts_follow_each_metrics_direction():
    summary = compare({"base": BASE, "lora": LORA[::-1]})  # paired by id, not by position
    paired = summary["paired"]["lora - base"]
    assert paired["chamfer_l1"]["mean"] == pytest.approx(0.02)  # lora minus base
    assert paired["psnr"]["mean"] == pytest.approx(-1.0)
    assert paired["mask_iou"]["stderr"] == pytest.approx(0.125 / math.sqrt(3))
    text = markdown_report(summary)
    assert paired_row(text, "Chamfer-L1")[1:] == ["4", "worse"]  # higher distance: worse
    assert paired_row(text, "Chamfer-L1")[0].startswith("+0.0200 ± 0.0000")
    assert paired_row(text, "F@0.05")[1:] == ["4", "better"]  # higher F: better
    assert paired_row(text, "novel-view PSNR (dB)") == ["-1.0000 ± 0.0000", "4", "worse"]
    assert paired_row(text, "mask IoU") == ["+0.0000 ± 0.0722", "4", "within noise"]
    assert paired_row(text, "colour error")[1:] == ["4", "better"]  # lower error: better
    assert paired_row(text, "F@0.1") == ["–", "0", "within noise"]  # not measured


def test_a_difference_inside_two_standard_errors_is_noise_and_nan_objects_drop_out():
    base = records(IDS, psnr=[20.0, 20.0, 20.0, 20.0], chamfer_l1=[0.1, 0.1, 0.1, 0.1])
    # PSNR differences 1, -0.2, 1, -0.2: mean 0.4, deviations +-0.6, sample variance 0.48,
    # se sqrt(0.48) / 2 = 0.3464 -> 0.4 < 2 se: within noise
    # Chamfer: object d's mesh came out empty (NaN): differences -0.05 on the other three
    other = records(IDS, psnr=[21.0, 19.8, 21.0, 19.8], chamfer_l1=[0.05, 0.05, 0.05, math.nan])
    other[3]["empty"] = True
    summary = compare({"base": base, "other": other})
    paired = summary["paired"]["other - base"]
    assert paired["psnr"]["mean"] == pytest.approx(0.4)
    assert paired["psnr"]["stderr"] == pytest.approx(math.sqrt(0.48) / 2)
    assert paired["chamfer_l1"]["n"] == 3 and paired["chamfer_l1"]["mean"] == pytest.approx(-0.05)
    assert summary["models"]["other"]["chamfer_l1"]["n"] == 3
    assert summary["models"]["other"]["empty_meshes"] == 1
    text = markdown_report(summary)
    assert paired_row(text, "novel-view PSNR (dB)") == ["+0.4000 ± 0.3464", "4", "within noise"]
    assert paired_row(text, "Chamfer-L1")[1:] == ["3", "better"]
    # one object alone has no standard error: never a verdict
    single = compare({"base": base[:1], "other": other[:1]})
    assert paired_row(markdown_report(single), "novel-view PSNR (dB)")[2] == "within noise"
