"""What a LoRA adapter learned: the per-layer update (alpha / r) B A, its norm and spectrum."""

import copy

import matplotlib
import numpy as np
import pytest
import torch

matplotlib.use("Agg")

from tsr.model import TSR
from utils.notebook import plots
from utils.training import lora


def adapted(r: int = 4, alpha: float = 8.0) -> TSR:
    """The tiny model with a LoRA whose B is drawn at random (B = 0 at init: no update yet),
    one layer's B made 10x larger so it is the one that 'moved most'."""
    model = lora.add_lora(TSR.from_config("tiny", seed=0), r=r, alpha=alpha, dropout=0.0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for index, layer in enumerate(lora.lora_layers(model).values()):
            weight = layer.lora_B["default"].weight
            weight.copy_(0.01 * torch.randn(weight.shape, generator=generator))
            if index == 3:
                weight.mul_(10.0)
    return model


def test_update_norms_match_the_dense_update_computed_by_hand():
    model = adapted(r=4, alpha=8.0)
    rows = lora.update_norms(model)
    layers = lora.lora_layers(model)
    assert [row["layer"] for row in rows] == list(layers)
    for row, layer in zip(rows, layers.values(), strict=True):
        up, down = layer.lora_B["default"].weight.detach(), layer.lora_A["default"].weight.detach()
        dense = (8.0 / 4) * up @ down  # (d_out, d_in), the update by its definition
        expected = torch.linalg.svdvals(dense)[:4]  # rank <= r: the rest are ~0
        np.testing.assert_allclose(row["singular_values"], expected.numpy(), rtol=1e-4)
        assert row["update_norm"] == pytest.approx(float(dense.norm()), rel=1e-5)
        base = layer.get_base_layer().weight.detach()
        assert row["relative"] == pytest.approx(float(dense.norm() / base.norm()), rel=1e-5)
        assert row["kind"] in row["layer"] and row["layer"].endswith(row["kind"])
        assert f"transformer_blocks.{row['block']}." in row["layer"]
    assert max(range(len(rows)), key=lambda i: rows[i]["update_norm"]) == 3


def test_update_norms_equal_what_merging_adds_to_the_weights():
    """A second route to dW: peft's own merge writes W + dW into the base layer."""
    model = adapted()
    before = {name: layer.get_base_layer().weight.detach().clone()
              for name, layer in lora.lora_layers(model).items()}  # fmt: skip
    rows = lora.update_norms(model)
    merged = lora.merge_adapter(copy.deepcopy(model))
    for row in rows:
        added = merged.get_submodule(row["layer"]).weight.detach() - before[row["layer"]]
        assert row["update_norm"] == pytest.approx(float(added.norm()), rel=1e-4)
    with pytest.raises(ValueError, match="no LoRA layers"):
        lora.update_norms(merged)


def test_a_fresh_adapter_has_learned_nothing():
    model = lora.add_lora(TSR.from_config("tiny", seed=0), r=4, alpha=4)  # B = 0
    assert all(row["update_norm"] == 0.0 for row in lora.update_norms(model))


def test_the_update_plot_maps_each_layer_to_its_block_and_kind():
    rows = lora.update_norms(adapted())
    figure = plots.lora_update_plot(rows, top=2)
    heat = figure.axes[0].images[0].get_array()  # (kinds, blocks)
    kinds = [label.get_text() for label in figure.axes[0].get_yticklabels()]
    blocks = sorted({row["block"] for row in rows})
    assert heat.shape == (len(kinds), len(blocks))
    for row in rows:
        assert heat[kinds.index(row["kind"]), blocks.index(row["block"])] == pytest.approx(
            row["update_norm"]
        )
    spectra = figure.axes[1]  # [2] is the colour bar
    largest = sorted(rows, key=lambda row: -row["update_norm"])[:2]
    labels = [f"block {row['block']} {row['kind']}" for row in largest]
    assert [line.get_label() for line in spectra.lines] == labels
    np.testing.assert_allclose(spectra.lines[0].get_ydata(), largest[0]["singular_values"])
