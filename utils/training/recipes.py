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


LORA_STEPS = 800  # at most; ~10 min on 2 CPU cores


# CI sizes for SMOKE=1: built in about a second on 2 cores.
SMOKE_DATASET = {"families": ("parts",), "n_objects": 6, "n_views": 4, "size": 64, "seed": 1,
                 "occupancy_points": 256}  # fmt: skip
