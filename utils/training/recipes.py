"""Recipes as data: the datasets and the LoRA recipe the notebooks use, with the reason for
each value."""

from __future__ import annotations

# Notebook 01's dataset: the family the LoRA story adapts the classroom model to (it was
# pretrained on primitives only), with occupancy points for the 3D losses; ~1 min.
WORKBOOK_DATASET = {"families": ("parts",), "n_objects": 600, "n_views": 5, "size": 128,
                    "seed": 1, "occupancy_points": 2048}  # fmt: skip


# Notebook 03's LoRA recipe for parts on the classroom model (measured: README, "The
# classroom model"): rays plus the occupancy loss the model was pretrained with, no LPIPS
# (its VGG weights are a download), early stopping on the validation loss.
LORA_RECIPE = {"batch_size": 4, "rays_per_object": 1024, "lr": 1e-3, "lambda_mask": 0.1,
               "lambda_lpips": 0.0, "lambda_occupancy": 1.0, "occupancy_sdf_scale": 100.0,
               "early_stopping_patience": 4}  # fmt: skip


# How long notebook 03 trains: at most LORA_STEPS steps and at most LORA_TIME_BUDGET_S seconds,
# whichever ends first. The budget is what `make demo` can afford: the six notebooks in about 12
# minutes on 2 idle CPU cores, where the rest (dataset, meshes, evaluation, the resumed and the
# compared runs) takes about 8. A step with its share of validation takes about 0.7 s there,
# so 180 s is about 250 steps; a slower or busier machine trains fewer steps, not longer. The
# README's 800-step runs are what a longer budget gives.
LORA_STEPS = 600
LORA_TIME_BUDGET_S = 180.0


# CI sizes for SMOKE=1: built in about a second on 2 cores.
SMOKE_DATASET = {"families": ("parts",), "n_objects": 6, "n_views": 4, "size": 64, "seed": 1,
                 "occupancy_points": 256}  # fmt: skip
