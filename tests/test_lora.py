"""LoRA adapters: targets, counts, training properties, file formats, merging."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import (
    LoraConfig,
    PeftModel,
    inject_adapter_in_model,
    load_peft_weights,
    set_peft_model_state_dict,
)

from tsr.config import named_config
from tsr.errors import UserInputError
from tsr.model import TSR
from utils.training.adapters import (
    base_fingerprint,
    export_course_adapter,
    load_adapter,
    save_adapter,
)
from utils.training.lora import (
    add_lora,
    gradient_checkpointing,
    lora_size_table,
    lora_state_dict,
    merge_adapter,
    resolve_targets,
    trainable_parameter_report,
)


@pytest.fixture
def image() -> torch.Tensor:
    return torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))  # (B, H, W, 3)


def tiny() -> TSR:
    return TSR.from_pretrained("tiny")


def trained_adapter(r: int = 4, alpha: float = 8) -> TSR:
    """A tiny model whose adapter is non-zero, as after training (B = 0 at init is invisible)."""
    model = add_lora(tiny(), r=r, alpha=alpha)
    generator = torch.Generator().manual_seed(1)
    for name, parameter in model.named_parameters():
        if "lora_" in name:  # seeded, so two calls give the same adapter
            parameter.data = torch.randn(parameter.shape, generator=generator) * 0.1
    return model


def test_full_size_attn_r16_trains_exactly_4063232_parameters():
    with torch.device("meta"):  # the architecture without allocating 1.7 GB of weights
        model = TSR(named_config("official"))
    base_total = sum(p.numel() for p in model.parameters())
    add_lora(model, r=16, alpha=16, targets="attn")
    report = trainable_parameter_report(model)
    assert report["n_targets"] == 128
    assert report["trainable"] == 4_063_232
    assert report["total"] == base_total + 4_063_232
    # 16 blocks x 16 x (1024 + 1024), except attn2.to_k/to_v read 768-wide image tokens
    assert report["by_kind"]["attn2.to_k"] == {"modules": 16, "params": 16 * 16 * (768 + 1024)}
    assert report["by_kind"]["attn1.to_q"] == {"modules": 16, "params": 16 * 16 * 2048}
    assert "| 16 | 4,063,232 |" in lora_size_table(model, ranks=(4, 8, 16, 32))


def test_presets_regex_and_lists_resolve_to_linear_layers():
    model = tiny()  # 2 blocks
    assert len(resolve_targets(model, "attn")) == 16
    assert len(resolve_targets(model, "self")) == 8
    assert all(".attn2." in n for n in resolve_targets(model, "cross"))
    assert len(resolve_targets(model, "attn+ff")) == 20
    assert resolve_targets(model, "re:.*attn1\\.to_q") == [
        "backbone.transformer_blocks.0.attn1.to_q",
        "backbone.transformer_blocks.1.attn1.to_q",
    ]
    assert len(resolve_targets(model, ["to_q", "backbone.proj_in"])) == 5
    with pytest.raises(ValueError, match="unknown LoRA target preset"):
        resolve_targets(model, "attention")
    with pytest.raises(ValueError, match="match no Linear"):
        resolve_targets(model, ["to_qq"])
    with pytest.raises(ValueError, match="match no Linear"):
        resolve_targets(model, "re:nothing.*")


def test_lora_starts_as_identity_and_freezes_the_base(image):
    model = tiny()
    before = model.encode(image)
    add_lora(model, r=4, alpha=8, dropout=0.05)
    assert not model.training  # the new dropouts follow the model's eval mode
    assert torch.equal(model.encode(image), before)  # B = 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if n in trainable)
    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora(model)


def test_only_adapter_weights_get_gradients_and_change(image):
    model = add_lora(tiny(), r=4, alpha=8, dropout=0.0)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):  # B moves on step 1; A only gets a gradient once B is non-zero
        optimiser.zero_grad()
        model.encode(image).square().mean().backward()
        optimiser.step()
    for name, parameter in model.named_parameters():
        if name in base:
            assert parameter.grad is None and torch.equal(parameter, base[name]), name
    adapter = lora_state_dict(model)
    assert len(adapter) == 32
    assert all(value.abs().sum() > 0 for key, value in adapter.items() if "lora_B" in key)


def test_gradient_checkpointing_gives_the_same_gradients(image):
    grads = []
    for enabled in (False, True):
        model = trained_adapter()
        gradient_checkpointing(model, enabled)
        assert model.backbone.gradient_checkpointing is enabled
        model.encode(image).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    torch.testing.assert_close(grads[0], grads[1])


def test_save_load_round_trip_ours_and_plain_peft(tmp_path, image):
    model = trained_adapter(r=4, alpha=8)
    expected = model.encode(image)
    folder = save_adapter(model, tmp_path / "adapter", {"training": {"lr": 1e-4}})
    save_adapter(model, folder)  # overwriting is atomic and leaves no temporary folders
    folder = save_adapter(model, folder, {"training": {"lr": 1e-4}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    metadata = json.loads((folder / "tsr_adapter.json").read_text())
    assert metadata["base_fingerprint"] == tiny().weights_fingerprint() == base_fingerprint(model)
    assert (metadata["r"], metadata["alpha"], metadata["training"]) == (4, 8, {"lr": 1e-4})
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 4

    alone = tmp_path / "elsewhere" / "weights.safetensors"  # no adapter_config.json beside it:
    alone.parent.mkdir()  # r and alpha come from the safetensors header
    shutil.copy(folder / "adapter_model.safetensors", alone)
    for source in (folder, folder / "adapter_model.safetensors", alone):
        torch.testing.assert_close(load_adapter(tiny(), source).encode(image), expected)
    # Plain peft, way 1: PeftModel wraps our custom nn.Module and forwards attributes to it.
    peft_model = PeftModel.from_pretrained(tiny(), str(folder))
    torch.testing.assert_close(peft_model.encode(image), expected)
    # Plain peft, way 2: inject from the saved config, then set the saved weights.
    plain = inject_adapter_in_model(LoraConfig.from_pretrained(str(folder)), tiny()).eval()
    result = set_peft_model_state_dict(plain, load_peft_weights(str(folder)))
    assert not result.unexpected_keys
    torch.testing.assert_close(plain.encode(image), expected)


def test_course_pth_converts_in_and_out(tmp_path, image):
    # The course project's LoRALinear: base(x) + B(A(x)) * alpha / r with alpha = r = 16 hard-coded,
    # saved as model.state_dict() entries `backbone.transformer_blocks.N.attnX.to_Y.A.weight`.
    model = tiny()
    generator = torch.Generator().manual_seed(2)
    course = {}
    for name in resolve_targets(model, "attn"):
        layer = model.get_submodule(name)
        course[f"{name}.A.weight"] = torch.randn(16, layer.in_features, generator=generator)
        course[f"{name}.B.weight"] = torch.randn(layer.out_features, 16, generator=generator) * 0.01
    torch.save(course, tmp_path / "lora_weights.pth")
    loaded = load_adapter(tiny(), tmp_path / "lora_weights.pth")

    x = torch.randn(5, 48, generator=generator)  # (N, C): attention inner width is 48
    name = "backbone.transformer_blocks.1.attn1.to_out.0"
    a, b = course[f"{name}.A.weight"], course[f"{name}.B.weight"]
    manual = model.get_submodule(name)(x) + x @ a.T @ b.T
    torch.testing.assert_close(loaded.get_submodule(name)(x), manual)

    export_course_adapter(loaded, tmp_path / "out.pth")
    exported = torch.load(tmp_path / "out.pth", weights_only=True)
    assert exported.keys() == course.keys()
    assert all(torch.equal(exported[k], course[k]) for k in course)

    # Ours with alpha != 16 -> course file -> ours: the same outputs (alpha folded into B).
    ours = trained_adapter(r=4, alpha=8)
    export_course_adapter(ours, tmp_path / "ours.pth")
    again = load_adapter(tiny(), tmp_path / "ours.pth")
    torch.testing.assert_close(again.encode(image), ours.encode(image))


def test_adapters_that_do_not_fit_fail_naming_the_file(tmp_path):
    folder = save_adapter(trained_adapter(r=4), tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"rank 4.*rank 8"):
        load_adapter(add_lora(tiny(), r=8), folder)
    bad_target = {"backbone.transformer_blocks.7.attn1.to_q.A.weight": torch.zeros(4, 64)}
    bad_target["backbone.transformer_blocks.7.attn1.to_q.B.weight"] = torch.zeros(48, 4)
    torch.save(bad_target, tmp_path / "blocks.pth")
    with pytest.raises(UserInputError, match=r"transformer_blocks\.7.*blocks\.pth"):
        load_adapter(tiny(), tmp_path / "blocks.pth")
    bad_shape = {
        "transformer_blocks.0.attn1.to_q.A.weight": torch.zeros(16, 1024),
        "transformer_blocks.0.attn1.to_q.B.weight": torch.zeros(1024, 16),
    }
    torch.save(bad_shape, tmp_path / "full_size.pth")
    with pytest.raises(UserInputError, match=r"full_size\.pth.*another size"):
        load_adapter(tiny(), tmp_path / "full_size.pth")
    with pytest.raises(UserInputError, match=r"missing\.safetensors"):
        load_adapter(tiny(), tmp_path / "missing.safetensors")


def test_fingerprint_mismatch_warns(tmp_path):
    folder = save_adapter(trained_adapter(), tmp_path / "adapter")
    with pytest.warns(UserWarning, match="trained on base weights"):
        load_adapter(TSR.from_config("tiny", seed=1), folder)


def test_merge_equals_unmerged_and_leaves_a_plain_model(image):
    model = trained_adapter()
    expected = model.encode(image)
    keys = set(tiny().state_dict())
    merge_adapter(model)
    assert set(model.state_dict()) == keys and not hasattr(model, "peft_config")
    torch.testing.assert_close(model.encode(image), expected, atol=1e-5, rtol=0)


def test_fingerprint_sees_every_byte_of_every_tensor():
    """One value changed deep inside the largest tensor (past any prefix) changes the
    fingerprint; the same weights give the same fingerprint."""
    model = tiny()
    name, largest = max(model.state_dict().items(), key=lambda kv: kv[1].numel())
    before = model.weights_fingerprint()
    assert tiny().weights_fingerprint() == before
    with torch.no_grad():
        largest.view(-1)[-1] += 1.0  # the last value: beyond the first 4 KB of any tensor
    assert largest.numel() * largest.element_size() > 4096, name
    assert model.weights_fingerprint() != before


@pytest.mark.parametrize("r, alpha", [(4, 8), (2, 16)])
def test_adapted_layer_is_base_plus_alpha_over_r_times_b_a(tmp_path, r, alpha):
    """W x + b + (alpha / r) B A x, computed by hand from the layer's own tensors, for the
    adapter as trained and as saved and loaded again (alpha comes back from the files)."""
    name = "backbone.transformer_blocks.1.attn1.to_out.0"  # a Linear with a bias
    trained = trained_adapter(r=r, alpha=alpha)
    folder = save_adapter(trained, tmp_path / "adapter")
    for model in (trained, load_adapter(tiny(), folder)):
        layer = model.get_submodule(name)
        weight, bias = layer.base_layer.weight, layer.base_layer.bias  # (out, in), (out,)
        lora_a, lora_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert lora_a.shape == (r, weight.shape[1]) and lora_b.shape == (weight.shape[0], r)
        x = torch.randn(5, weight.shape[1], generator=torch.Generator().manual_seed(2))
        expected = x @ weight.T + bias + (alpha / r) * (x @ lora_a.T @ lora_b.T)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(expected, x @ weight.T + bias + x @ lora_a.T @ lora_b.T)
