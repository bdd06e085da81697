"""The training loop on the tiny model and a tiny rendered dataset (6 objects, 32 px)."""

from __future__ import annotations

import dataclasses
import json
import math
import sys

import pytest
import torch

from tsr.config import named_config
from tsr.files import save_torch
from tsr.model import TSR
from utils.data.build import prepare_dataset
from utils.data.dataset import MultiViewDataset, sample_rays
from utils.evaluation import metrics
from utils.training import adapters, checkpoint, losses, setup, train
from utils.training.adapters import load_adapter
from utils.training.bookkeeping import BestWeights
from utils.training.config import TrainConfig
from utils.training.lora import add_lora, lora_state_dict
from utils.training.train import fit


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model's ops are too small to gain from a second thread, which only waits for
    a free core when the machine is busy (5x slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "tiny"
    prepare_dataset(root, families=("primitives",), n_objects=6, n_views=4, size=32, workers=1)
    return root


@pytest.fixture(scope="module")
def datasets(dataset_root):
    cond_size = TSR.from_pretrained("tiny").config.cond_image_size
    return {
        split: MultiViewDataset(dataset_root, split, n_supervision_views=3, cond_size=cond_size)
        for split in ("train", "val")
    }


def lora_model(seed: int = 0, dropout: float = 0.05) -> TSR:
    return add_lora(TSR.from_pretrained("tiny"), r=4, alpha=4, dropout=dropout, seed=seed)


def quick_config(**overrides) -> TrainConfig:
    values = dict(
        max_steps=3, rays_per_object=128, val_every=0, val_objects=1, val_rays_per_view=64,
        checkpoint_every=100, progress=False,
    )  # fmt: skip
    return TrainConfig(**{**values, **overrides})


def test_only_adapter_weights_change_and_get_gradients(datasets, tmp_path):
    model = lora_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit(model, datasets["train"], quick_config(max_steps=2, lr=1e-2), output_dir=tmp_path)
    after = model.state_dict()
    for key, value in after.items():
        if "lora_" in key:
            assert not torch.equal(value, before[key]), f"{key} did not train"
        else:
            assert torch.equal(value, before[key]), f"base weight {key} changed"
    # after a step B != 0, so every adapter matrix (A and B) now gets a non-zero gradient
    model.train()
    item = datasets["train"][0]
    target = sample_rays(item, 256, torch.Generator().manual_seed(0))
    code = model.encode(item["cond_image"][None])[0]
    rendered = model.render_rays(code, target["rays_o"], target["rays_d"])
    losses.render_loss(rendered, target, TrainConfig().loss_weights())["loss"].backward()
    for name, parameter in model.named_parameters():
        if "lora_" in name:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        else:
            assert parameter.grad is None and not parameter.requires_grad, name


class InterruptAt:
    """A callback that stops a run like Ctrl-C would, when step `at` has been logged."""

    def __init__(self, at: int):
        self.at = at

    def on_step(self, step: int, metrics: dict) -> None:
        if step == self.at:
            raise KeyboardInterrupt


def test_resume_ends_with_the_same_adapter(datasets, tmp_path):
    config = quick_config(max_steps=6, checkpoint_every=3, lr=1e-2)
    straight = lora_model()
    fit(straight, datasets["train"], config, output_dir=tmp_path / "straight")

    interrupted = lora_model()
    with pytest.raises(KeyboardInterrupt):
        fit(
            interrupted,
            datasets["train"],
            config,
            callbacks=[InterruptAt(4)],
            output_dir=tmp_path / "run",
        )
    assert checkpoint.load_checkpoint(tmp_path / "run")["step"] == 3
    resumed = lora_model(seed=123)  # a different init: everything must come from the checkpoint
    result = fit(
        resumed, datasets["train"], dataclasses.replace(config, resume_from=str(tmp_path / "run")),
        output_dir=tmp_path / "run",
    )  # fmt: skip
    assert result.steps == 6
    expected, actual = lora_state_dict(straight), lora_state_dict(resumed)
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=1e-7)
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert steps == [1, 2, 3, 4, 5, 6]  # the lost step 4 is dropped, then logged once


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(datasets, tmp_path, monkeypatch):
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        terms = losses.render_loss(*args, **kwargs)
        return {**terms, "loss": terms["loss"] * math.nan} if calls["n"] == 5 else terms

    monkeypatch.setattr(train, "render_loss", poisoned)
    model = lora_model()
    with pytest.raises(FloatingPointError, match=r"at step 5.*last good checkpoint.*step 4"):
        fit(
            model,
            datasets["train"],
            quick_config(max_steps=8, checkpoint_every=2),
            output_dir=tmp_path,
        )
    saved = checkpoint.load_checkpoint(tmp_path)
    assert saved["step"] == 4
    assert all(torch.isfinite(v).all() for v in saved["trainable"].values())
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the bad step never applied


def test_run_folder_metrics_and_callbacks(datasets, tmp_path):
    class Recorder:
        def __init__(self):
            self.events = []

        def on_step(self, step, metrics):
            self.events.append(("step", step))

        def on_validation(self, step, metrics):
            assert {"val_loss", "val_psnr", "val_mask_iou"} <= metrics.keys()
            self.events.append(("val", step))

        def on_end(self):
            self.events.append(("end", None))

    recorder = Recorder()
    config = quick_config(max_steps=4, val_every=2)
    result = fit(
        lora_model(), datasets["train"], config, val_dataset=datasets["val"],
        callbacks=[recorder, object()], output_dir=tmp_path,
    )  # fmt: skip
    assert recorder.events == [
        ("val", 0), ("step", 1), ("step", 2), ("val", 2), ("step", 3), ("step", 4), ("val", 4),
        ("end", None),
    ]  # fmt: skip
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    assert records == result.history
    assert all(
        math.isfinite(r["loss"]) and 0 < r["lr"] <= config.lr for r in records if "loss" in r
    )
    assert (tmp_path / "loss.png").stat().st_size > 0
    resolved = json.loads((tmp_path / "config.json").read_text())
    assert resolved["max_steps"] == 4 and resolved["grad_checkpointing"] is False  # 2 blocks
    assert (result.artefact / "adapter_model.safetensors").is_file()


def test_epochs_set_the_number_of_steps(datasets, tmp_path):
    n_train = len(datasets["train"])
    config = quick_config(max_steps=None, epochs=2, batch_size=2, grad_accum_steps=1)
    result = fit(lora_model(), datasets["train"], config, output_dir=tmp_path)
    assert result.steps == 2 * math.ceil(n_train / 2)


def test_accumulation_equals_a_bigger_batch(datasets, tmp_path):
    """2 objects in one micro-batch == 2 micro-batches of 1 (same objects, rays, no dropout)."""
    batched, accumulated = lora_model(dropout=0.0), lora_model(dropout=0.0)
    fit(
        batched,
        datasets["train"],
        quick_config(max_steps=2, batch_size=2, lr=1e-2),
        output_dir=tmp_path / "a",
    )
    fit(
        accumulated, datasets["train"], quick_config(max_steps=2, grad_accum_steps=2, lr=1e-2),
        output_dir=tmp_path / "b",
    )  # fmt: skip
    for key, value in lora_state_dict(batched).items():
        torch.testing.assert_close(lora_state_dict(accumulated)[key], value, rtol=1e-4, atol=1e-6)


def test_full_mode_trains_every_weight_and_saves_a_loadable_model(datasets, tmp_path):
    model = TSR.from_pretrained("tiny")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = quick_config(train_mode="full", max_steps=2, lr=1e-3)
    result = fit(model, datasets["train"], config, output_dir=tmp_path)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    for prefix in (
        "image_tokenizer.model.encoder",
        "tokenizer",
        "backbone",
        "post_processor",
        "decoder",
    ):
        assert any(k.startswith(prefix) for k in changed), f"nothing under {prefix} trained"
    reloaded = TSR.from_pretrained(result.artefact)
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key


def test_head_learning_rate_scale_reaches_only_decoder_and_upsampler(datasets, tmp_path):
    model = TSR.from_pretrained("tiny")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = quick_config(train_mode="full", max_steps=2, lr=1e-3, lr_scale_head=0.0)
    fit(model, datasets["train"], config, output_dir=tmp_path)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert not any(k.startswith(("decoder", "post_processor")) for k in changed)
    assert any(k.startswith("backbone") for k in changed)


def scripted_validation(monkeypatch, values: list[float], metric: str = "val_loss") -> None:
    """validate() returns these values of `metric` in turn (step 0 first)."""
    remaining = list(values)

    def scripted(model, dataset, n_objects, rays_per_view, loss_fn):
        return {"val_loss": 0.0, "val_psnr": 0.0, "val_mask_iou": 0.0, metric: remaining.pop(0)}

    monkeypatch.setattr(train, "validate", scripted)


class AdapterSnapshots:
    def __init__(self, model):
        self.model, self.by_step = model, {}

    def on_validation(self, step, metrics):
        self.by_step[step] = {k: v.clone() for k, v in lora_state_dict(self.model).items()}


def test_early_stopping_ends_on_the_best_validation(datasets, tmp_path, monkeypatch):
    scripted_validation(monkeypatch, [1.0, 0.5, 0.7, 0.8, 0.1, 0.1])
    model = lora_model(dropout=0.0)
    snapshots = AdapterSnapshots(model)
    config = quick_config(max_steps=10, val_every=1, lr=1e-2, early_stopping_patience=2)
    result = fit(
        model, datasets["train"], config, val_dataset=datasets["val"],
        callbacks=[snapshots], output_dir=tmp_path,
    )  # fmt: skip
    assert (result.steps, result.best_step, result.stopped_by) == (3, 1, "early_stopping")
    assert sorted(snapshots.by_step) == [0, 1, 2, 3]  # never saw the 0.1 of step 4
    final = lora_state_dict(model)
    for key, value in snapshots.by_step[1].items():
        assert torch.equal(final[key], value), key
    assert not torch.equal(final[key], snapshots.by_step[3][key])
    saved = checkpoint.load_checkpoint(tmp_path)
    assert saved["step"] == 3 and saved["best"]["step"] == 1  # a resume keeps the best
    reloaded = load_adapter(TSR.from_pretrained("tiny"), result.artefact)
    for key, value in lora_state_dict(reloaded).items():
        assert torch.equal(value, final[key]), key


def test_an_adapter_that_never_helps_ends_as_the_base_model(datasets, tmp_path, monkeypatch):
    scripted_validation(monkeypatch, [0.5, 0.6, 0.7, 0.8])
    model = lora_model(dropout=0.0)
    snapshots = AdapterSnapshots(model)
    config = quick_config(max_steps=3, val_every=1, lr=1e-2, early_stopping_patience=5)
    result = fit(
        model, datasets["train"], config, val_dataset=datasets["val"],
        callbacks=[snapshots], output_dir=tmp_path,
    )  # fmt: skip
    assert (result.steps, result.best_step, result.stopped_by) == (3, 0, "max_steps")
    lora_b = [v for k, v in lora_state_dict(model).items() if "lora_B" in k]
    assert lora_b and all(not v.any() for v in lora_b)  # B = 0: the adapter adds nothing


@pytest.mark.parametrize(
    "metric, values",
    [
        ("val_loss", [1.0, 0.5, 0.7, 0.5, 0.1]),  # lower is better
        ("val_psnr", [10.0, 12.0, 11.0, 12.0, 30.0]),  # higher is better
        ("val_mask_iou", [0.1, 0.5, 0.3, 0.5, 0.9]),
    ],
)
def test_best_weights_follow_the_metrics_direction_and_stop_after_patience(metric, values):
    """Step 1 is the best; steps 2 and 3 (a tie is no improvement) use up a patience of 2,
    so step 4's better value is never seen, and restoring puts step 1's weights back."""
    model = torch.nn.Linear(1, 1)
    best = BestWeights(metric, patience=2)
    stops = []
    for step, value in enumerate(values[:4]):
        with torch.no_grad():
            model.weight.fill_(step)  # the weights of each step: their step number
        stops.append(best.update({metric: value}, step, model, world=1))
    assert stops == [False, False, False, True]
    assert best.step == 1 and best.state["value"] == values[1]
    best.restore(model, step=3)
    assert model.weight.item() == 1.0
    # a resumed run starts from the saved best: only a better value replaces it
    resumed = BestWeights(metric, patience=0, state=best.state)
    assert not resumed.update({metric: values[2]}, 5, model, world=1)  # patience 0: no stop
    assert resumed.step == 1
    resumed.update({metric: values[4]}, 6, model, world=1)
    assert resumed.step == 6


def test_early_stopping_on_psnr_ends_on_the_highest(datasets, tmp_path, monkeypatch):
    scripted_validation(monkeypatch, [10.0, 12.0, 11.0, 11.5, 30.0], metric="val_psnr")
    model = lora_model(dropout=0.0)
    snapshots = AdapterSnapshots(model)
    config = quick_config(
        max_steps=10, val_every=1, lr=1e-2, early_stopping_patience=2,
        early_stopping_metric="val_psnr",
    )  # fmt: skip
    result = fit(
        model, datasets["train"], config, val_dataset=datasets["val"],
        callbacks=[snapshots], output_dir=tmp_path,
    )  # fmt: skip
    assert (result.steps, result.best_step, result.stopped_by) == (3, 1, "early_stopping")
    final = lora_state_dict(model)
    for key, value in snapshots.by_step[1].items():
        assert torch.equal(final[key], value), key


def test_a_resumed_run_keeps_the_best_validation_from_before_the_interruption(
    datasets, tmp_path, monkeypatch
):
    """Validations 10, 15, 11 (steps 0-2), interrupted during step 3 (checkpoint at 2);
    resumed, 12, 13, 14 never beat step 1's 15: the run ends on step 1's weights."""
    config = quick_config(
        max_steps=5, val_every=1, lr=1e-2, checkpoint_every=1, early_stopping_metric="val_psnr"
    )
    scripted_validation(monkeypatch, [10.0, 15.0, 11.0], metric="val_psnr")
    first = lora_model(dropout=0.0)
    snapshots = AdapterSnapshots(first)
    with pytest.raises(KeyboardInterrupt):
        fit(
            first, datasets["train"], config, val_dataset=datasets["val"],
            callbacks=[snapshots, InterruptAt(3)], output_dir=tmp_path,
        )  # fmt: skip
    assert checkpoint.load_checkpoint(tmp_path)["step"] == 2
    scripted_validation(monkeypatch, [12.0, 13.0, 14.0], metric="val_psnr")
    resumed = lora_model(seed=123, dropout=0.0)
    result = fit(
        resumed, datasets["train"], dataclasses.replace(config, resume_from=str(tmp_path)),
        val_dataset=datasets["val"], output_dir=tmp_path,
    )  # fmt: skip
    assert (result.steps, result.best_step) == (5, 1)
    final = lora_state_dict(resumed)
    for key, value in snapshots.by_step[1].items():
        assert torch.equal(final[key], value), key


class StepClock:
    """A clock for fit() that only moves when a step ends: `seconds_per_step` each time."""

    def __init__(self, seconds_per_step: float):
        self.now, self.seconds_per_step = 0.0, seconds_per_step

    def perf_counter(self) -> float:
        return self.now

    def on_step(self, step, metrics):
        self.now += self.seconds_per_step


def test_time_budget_ends_the_run_with_a_final_validation_on_the_best_weights(
    datasets, tmp_path, monkeypatch, capsys
):
    # Steps end at 10, 20, 30 s: a 25 s budget is spent after step 3, a step boundary. The
    # final validation (0.6) comes after it; step 2's (0.4) stays the best and is kept.
    scripted_validation(monkeypatch, [1.0, 0.4, 0.6, 0.9, 0.9, 0.9, 0.9])  # enough for 10 steps
    clock = StepClock(seconds_per_step=10.0)
    monkeypatch.setattr(train, "time", clock)
    model = lora_model(dropout=0.0)
    snapshots = AdapterSnapshots(model)
    config = quick_config(max_steps=10, val_every=2, lr=1e-2, time_budget_s=25.0)
    result = fit(
        model, datasets["train"], config, val_dataset=datasets["val"],
        callbacks=[clock, snapshots], output_dir=tmp_path,
    )  # fmt: skip
    assert (result.steps, result.best_step, result.stopped_by) == (3, 2, "time_budget")
    assert sorted(snapshots.by_step) == [0, 2, 3]  # the final validation ran, off-schedule
    final = lora_state_dict(model)
    assert all(torch.equal(final[k], v) for k, v in snapshots.by_step[2].items())
    assert checkpoint.load_checkpoint(tmp_path)["step"] == 3  # a resume continues from here
    metadata = json.loads((result.artefact / adapters.TSR_METADATA).read_text())
    assert metadata["stopped_by"] == "time_budget" and metadata["steps"] == 3
    assert "time budget of 25 s spent at step 3 of 10" in capsys.readouterr().out


def test_a_budget_longer_than_the_run_changes_nothing(datasets, tmp_path, monkeypatch):
    clock = StepClock(seconds_per_step=10.0)
    monkeypatch.setattr(train, "time", clock)
    config = quick_config(max_steps=3, time_budget_s=30.0)  # spent exactly at the last step
    result = fit(lora_model(), datasets["train"], config, callbacks=[clock], output_dir=tmp_path)
    assert (result.steps, result.stopped_by) == (3, "max_steps")


@pytest.mark.parametrize("budget", [0.0, -5.0, math.nan, math.inf])
def test_time_budget_must_be_a_positive_number_of_seconds(budget):
    with pytest.raises(ValueError, match=r"time_budget_s=.* \(must be a number of seconds > 0"):
        TrainConfig(time_budget_s=budget)


def test_early_stopping_metric_is_checked(datasets, tmp_path):
    with pytest.raises(ValueError, match="early_stopping_metric"):
        fit(
            lora_model(), datasets["train"], quick_config(early_stopping_metric="psnr"),
            output_dir=tmp_path,
        )  # fmt: skip


def test_lora_mode_needs_an_adapter(datasets, tmp_path):
    with pytest.raises(ValueError, match="add_lora"):
        fit(TSR.from_pretrained("tiny"), datasets["train"], quick_config(), output_dir=tmp_path)


def test_gradient_checkpointing_is_on_for_a_full_depth_backbone(datasets, tmp_path):
    config = named_config("tiny")
    config.backbone.num_layers = 16  # the official depth, at the tiny width
    model = TSR.from_config(config)
    add_lora(model, r=2, alpha=2)
    fit(model, datasets["train"], quick_config(max_steps=1), output_dir=tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["grad_checkpointing"] is True


def test_learning_rate_warms_up_then_follows_a_cosine():
    config = TrainConfig(warmup_fraction=0.1, min_lr_ratio=0.1)
    factors = [setup.lr_factor(step, 100, config) for step in range(100)]
    assert factors[:10] == sorted(factors[:10]) and factors[9] == 1.0
    assert factors[10:] == sorted(factors[10:], reverse=True)
    assert factors[-1] == pytest.approx(0.1, abs=1e-3)


def test_render_loss_terms():
    target = {
        "rgb": torch.rand(8, 3),
        "mask": (torch.rand(8) > 0.5).float(),
        "depth": torch.rand(8) + 1,
    }
    perfect = {
        "rgb": target["rgb"].clone(), "opacity": target["mask"][:, None].clone(),
        "depth": target["depth"][:, None].clone(),
    }  # fmt: skip
    weights = {"rgb": 1.0, "mask": 0.05, "depth": 0.5, "lpips": 2.0}
    terms = losses.render_loss(perfect, target, weights, lpips_network=None)
    assert terms["loss_rgb"] == 0 and terms["loss_depth"] == 0 and terms["loss_mask"] < 1e-3
    assert "loss_lpips" not in terms  # no network: the term is off, not zero-weighted
    wrong = {**perfect, "opacity": 1 - perfect["opacity"]}
    assert losses.render_loss(wrong, target, weights)["loss_mask"] > 1
    background_depth = {**target, "depth": torch.where(target["mask"] > 0.5, target["depth"], 0)}
    assert losses.render_loss(perfect, background_depth, weights)["loss_depth"] == 0


def test_metrics():
    rgb = torch.rand(100, 3)
    assert metrics.psnr(rgb, rgb) > 90
    assert metrics.psnr(torch.zeros(10, 3), torch.ones(10, 3)) == pytest.approx(0.0)
    mask = torch.tensor([1.0, 1.0, 0.0, 0.0])
    assert metrics.mask_iou(mask[:, None], mask) == 1
    assert metrics.mask_iou(torch.tensor([[1.0], [0.0], [1.0], [0.0]]), mask) == pytest.approx(
        1 / 3
    )


def test_lpips_off_with_one_message(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lpips", None)  # importing it now raises ImportError
    monkeypatch.setattr(losses, "_LPIPS_STATE", {})
    assert losses.load_lpips("cpu") is None and losses.load_lpips("cpu") is None
    assert capsys.readouterr().out.count("LPIPS loss off: the `lpips` package") == 1
    assert losses.load_lpips("cpu", on_patches=False) is None
    assert losses.load_lpips("cpu", on_patches=False) is None
    assert capsys.readouterr().out.count("LPIPS loss off: it needs image patches") == 1


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    path = save_torch({"step": 1}, tmp_path / "last.pt")

    def crash(obj, file):
        file.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_torch({"step": 2}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary left behind


def test_loss_goes_down_on_train_and_val(datasets, tmp_path):
    """A short run (the few-hundred-step numbers are in the report): both losses drop."""
    model = lora_model()
    config = quick_config(max_steps=30, lr=1e-2, rays_per_object=128, val_objects=4)
    start = {s: train._validate(model, datasets[s], config)["val_loss"] for s in datasets}
    fit(model, datasets["train"], config, output_dir=tmp_path)
    end = {s: train._validate(model, datasets[s], config)["val_loss"] for s in datasets}
    assert end["train"] < 0.9 * start["train"] and end["val"] < 0.9 * start["val"], (start, end)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_autocast_keeps_fp32_master_weights(datasets, tmp_path):
    model = lora_model().cuda()
    fit(model, datasets["train"], quick_config(max_steps=2), output_dir=tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["bf16_autocast"] is True
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def test_occupancy_loss_puts_the_surface_at_the_level():
    """logit = log(density_act / level): BCE against inside labels, with gradients."""
    import torch.nn.functional as F

    model = TSR.from_config("tiny", seed=0)
    code = model(torch.zeros(32, 32, 3))[0].detach()
    points = torch.rand(64, 3) * 1.6 - 0.8
    item = {"occupancy_points": points, "occupancy": (points.norm(dim=-1) < 0.5).float()}
    generator = torch.Generator().manual_seed(0)
    loss = losses.occupancy_losses(model, code, item, 64, 2.0, generator)["occupancy"]
    chosen = torch.randint(64, (64,), generator=torch.Generator().manual_seed(0))
    density_act = model.renderer.query_triplane(model.decoder, points[chosen], code)["density_act"]
    logit = torch.log(density_act[:, 0] / 2.0)
    expected = F.binary_cross_entropy_with_logits(logit, item["occupancy"][chosen])
    assert math.isclose(float(loss.detach()), float(expected.detach()), rel_tol=1e-5)
    loss.backward()
    assert model.decoder.layers[0].weight.grad.abs().sum() > 0


def sphere_item(n_points: int = 256) -> dict:
    """Labelled points of a sphere of radius 0.5 coloured (0.2, 0.4, 0.8) at the surface."""
    points = torch.rand(n_points, 3, generator=torch.Generator().manual_seed(1)) * 1.6 - 0.8
    sdf = points.norm(dim=-1) - 0.5
    return {
        "occupancy_points": points, "occupancy": (sdf < 0).float(), "occupancy_sdf": sdf,
        "occupancy_colour": torch.tensor([0.2, 0.4, 0.8]).expand(n_points, 3),
    }  # fmt: skip


def test_signed_distance_target_is_zero_at_the_surface_and_saturates_away_from_it():
    model = TSR.from_config("tiny", seed=0)
    code = model(torch.zeros(32, 32, 3))[0].detach()
    item = sphere_item()
    scale, level = 20.0, 2.0

    def terms(generator_seed: int = 0) -> dict:
        generator = torch.Generator().manual_seed(generator_seed)
        return losses.occupancy_losses(
            model, code, item, 256, level, generator, sdf_scale=scale, colour_band=0.05
        )

    terms_now = terms()
    assert set(terms_now) == {"occupancy", "surface_colour"}
    assert terms_now["occupancy"] > 0 and terms_now["surface_colour"] > 0
    # fit the tiny decoder to the targets: both terms fall
    optimizer = torch.optim.Adam(model.decoder.parameters(), lr=1e-2)
    for _ in range(150):
        optimizer.zero_grad()
        loss = sum(terms().values())
        loss.backward()
        optimizer.step()
    terms_fitted = terms()
    assert terms_fitted["occupancy"] < 0.5 * terms_now["occupancy"], (terms_now, terms_fitted)
    assert terms_fitted["surface_colour"] < 0.2 * terms_now["surface_colour"]
    # the fitted field crosses density_act = level at the sphere, and saturates (not beyond
    # e^5 x level) away from it
    with torch.no_grad():
        decoded = model.renderer.query_triplane(model.decoder, item["occupancy_points"], code)
    logit = torch.log(decoded["density_act"][:, 0] / level)
    sdf = item["occupancy_sdf"]
    clear = sdf.abs() > 0.1
    assert ((logit[clear] > 0) == (sdf[clear] < 0)).float().mean() > 0.9
    far = sdf.abs() > 0.3  # -scale * sdf beyond the clamp
    assert abs(float(logit[far].abs().median()) - losses.SDF_LOGIT_CLAMP) < 1.5


def test_training_on_3d_points_alone_needs_them(datasets, tmp_path):
    model = TSR.from_config("tiny", seed=0)
    with pytest.raises(ValueError, match=r"rays_per_object=0.*lambda_occupancy > 0"):
        quick_config(train_mode="full", rays_per_object=0, max_steps=1)  # refused at once
    config = quick_config(train_mode="full", rays_per_object=0, lambda_occupancy=1.0, max_steps=1)
    with pytest.raises(ValueError, match="--occupancy-points"):
        fit(model, datasets["train"], config, output_dir=tmp_path / "b")


def test_occupancy_level_defaults_to_the_models_marching_cubes_threshold(tmp_path, monkeypatch):
    """Fine-tuning with 3D points moves the surface to where the model's meshes are cut."""
    root = tmp_path / "points"
    prepare_dataset(
        root, families=("primitives",), n_objects=3, n_views=2, size=32, workers=1,
        occupancy_points=32,
    )  # fmt: skip
    model = TSR.from_config("tiny", seed=0)
    model.config.mc_threshold = 7.0
    data = MultiViewDataset(root, "all", cond_size=model.config.cond_image_size)
    levels = []
    measured = losses.occupancy_losses

    def recording(model, scene_code, item, n_points, level, *args, **kwargs):
        levels.append(level)
        return measured(model, scene_code, item, n_points, level, *args, **kwargs)

    monkeypatch.setattr(train, "occupancy_losses", recording)
    points_only = dict(train_mode="full", rays_per_object=0, lambda_occupancy=1.0, max_steps=1)
    fit(model, data, quick_config(**points_only), output_dir=tmp_path / "own")
    assert levels and set(levels) == {7.0}
    levels.clear()
    fit(model, data, quick_config(**points_only, occupancy_level=3.0), output_dir=tmp_path / "set")
    assert levels and set(levels) == {3.0}
