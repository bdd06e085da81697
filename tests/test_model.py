"""The model against the official implementation's numbers and checkpoint format."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from tsr import TSR
from tsr.config import named_config
from tsr.errors import UserInputError
from tsr.preprocess import prepare_images

FIXTURES = Path(__file__).parent / "fixtures" / "triposr"
RTOL = 1e-5


def relative_error(actual: torch.Tensor | np.ndarray, expected: np.ndarray) -> float:
    actual = actual.detach().numpy() if isinstance(actual, torch.Tensor) else np.asarray(actual)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    with np.load(FIXTURES / "tiny_s0_ref.npz") as data:
        return {key: data[key] for key in data.files}


@pytest.fixture(scope="module")
def tiny() -> TSR:
    return TSR.from_pretrained("tiny")


@pytest.fixture(scope="module")
def scene_codes(tiny, reference) -> torch.Tensor:
    with torch.no_grad():
        return tiny(reference["input_image"])


def test_preprocessing_matches_official(reference):
    assert (
        relative_error(prepare_images(reference["input_image"], 64), reference["rgb_cond"]) < RTOL
    )


def test_image_tokens_match_transformers_4_35(tiny, reference):
    """Fails if a transformers upgrade changes ViT numbers or the position interpolation."""
    rgb = torch.from_numpy(reference["rgb_cond"]).permute(0, 3, 1, 2)
    with torch.no_grad():
        tokens = tiny.image_tokenizer(rgb)  # (1, C, N)
    assert tokens.shape == (1, 64, 17)
    assert relative_error(tokens, reference["image_tokens"][:, 0]) < RTOL


def test_vit_parameter_names_are_the_checkpoints(tiny):
    expected = {
        line.split("\t")[0]
        for line in (FIXTURES / "official_state_dict.tsv").read_text().splitlines()
        if line.startswith("image_tokenizer.model.encoder.layer.0.")
    }
    ours = {k for k in tiny.state_dict() if k.startswith("image_tokenizer.model.encoder.layer.0.")}
    assert ours == expected, f"transformers {transformers.__version__} renamed ViT parameters"


def test_backbone_and_scene_codes_match(tiny, reference, scene_codes):
    tokens = tiny.tokenizer(1)
    assert relative_error(tokens, reference["triplane_tokens_in"]) < RTOL
    image_tokens = torch.from_numpy(reference["image_tokens"][:, 0]).transpose(1, 2)
    with torch.no_grad():
        out = tiny.backbone(tokens, image_tokens)
    assert relative_error(out, reference["backbone_out"]) < RTOL
    assert scene_codes.shape == (1, 3, 8, 16, 16)
    assert relative_error(scene_codes, reference["scene_codes"]) < RTOL


def test_decoder_outputs_match(tiny, reference, scene_codes):
    points = torch.from_numpy(reference["points"])
    with torch.no_grad():
        decoded = tiny.renderer.query_triplane(tiny.decoder, points, scene_codes[0])
    for key in ("density", "features", "density_act", "color"):
        assert relative_error(decoded[key], reference[key]) < RTOL, key


def test_render_matches(tiny, reference, scene_codes):
    views = tiny.render(scene_codes, 2, elevation_deg=20, height=32, width=32, return_type="np")
    assert relative_error(np.stack(views[0]), reference["render"]) < RTOL


def test_half_precision_model_renders_like_float32(tiny, scene_codes):
    """The course's fp16 recipe casts the whole model; rendering must not mix dtypes."""
    half = TSR.from_pretrained("tiny").half()
    origins = torch.tensor([0.0, 0.0, 1.9]).expand(64, 3)
    directions = torch.nn.functional.normalize(
        torch.randn(64, 3, generator=torch.Generator().manual_seed(0)) * 0.2
        + torch.tensor([0.0, 0.0, -1.0]),
        dim=-1,
    )
    with torch.no_grad():
        full = tiny.render_rays(scene_codes[0], origins, directions)
        halved = half.render_rays(scene_codes[0].half(), origins.half(), directions.half())
    for key in ("rgb", "opacity", "depth"):
        assert torch.allclose(halved[key].float(), full[key], atol=1e-2), key


def test_render_return_types(tiny, scene_codes):
    pil = tiny.render(scene_codes, 1, height=16, width=16)[0][0]
    assert isinstance(pil, Image.Image) and pil.size == (16, 16)
    tensor = tiny.render(scene_codes, 1, height=16, width=16, return_type="pt")[0][0]
    assert tensor.shape == (16, 16, 3)
    with pytest.raises(ValueError, match="return_type"):
        tiny.render(scene_codes, 1, return_type="gif")


def test_input_types_give_the_same_codes(tiny, reference):
    image = reference["input_image"]
    with torch.no_grad():
        from_array = tiny(image)
        from_pil = tiny(Image.fromarray(image))
        from_float = tiny(torch.from_numpy(image).float() / 255)
        batch = tiny([image, image])
    assert torch.allclose(from_array, from_pil) and torch.allclose(
        from_array, from_float, atol=1e-6
    )
    assert batch.shape[0] == 2 and torch.allclose(batch[1], from_array[0], atol=1e-5)


def test_rgba_is_composited_on_grey(tiny):
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)  # fully transparent
    grey = np.full((32, 32, 3), 0.5, dtype=np.float32)
    assert torch.allclose(prepare_images(Image.fromarray(rgba, "RGBA"), 32), torch.from_numpy(grey))


def test_chunked_query_equals_unchunked(tiny, scene_codes):
    points = torch.rand(1000, 3) * 1.74 - 0.87
    outputs = []
    for chunk in (0, 7, 333, 8192):
        tiny.renderer.set_chunk_size(chunk)
        with torch.no_grad():
            outputs.append(tiny.renderer.query_triplane(tiny.decoder, points, scene_codes[0]))
    tiny.renderer.set_chunk_size(8192)
    for other in outputs[1:]:  # BLAS may block differently by row count: float-eps equal
        assert torch.allclose(other["density_act"], outputs[0]["density_act"], rtol=1e-6, atol=0)
    with pytest.raises(ValueError):
        tiny.renderer.set_chunk_size(-1)


def test_official_config_has_the_checkpoints_549_tensors():
    expected = {}
    for line in (FIXTURES / "official_state_dict.tsv").read_text().splitlines():
        name, shape, dtype = line.split("\t")
        expected[name] = (ast.literal_eval(shape), dtype)
    with torch.device("meta"):
        model = TSR(named_config("official"))
    state = model.state_dict()
    assert len(expected) == 549
    assert list(state) == list(expected)
    for name, tensor in state.items():
        assert tuple(tensor.shape) == expected[name][0], name
        assert str(tensor.dtype).removeprefix("torch.") == expected[name][1]
    assert sum(t.numel() for t in state.values()) == 419_275_628


def test_full_size_round_trip(tmp_path):
    model = TSR.from_config("official", seed=1)
    model.save_pretrained(tmp_path)
    loaded = TSR.from_pretrained(tmp_path)
    for (key, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), key


def test_tiny_round_trip_both_formats(tmp_path, tiny):
    for safe in (True, False):
        folder = tiny.save_pretrained(tmp_path / str(safe), safe_serialization=safe)
        loaded = TSR.from_pretrained(folder)
        for key, value in tiny.state_dict().items():
            assert torch.equal(value, loaded.state_dict()[key]), key
        assert loaded.config == tiny.config


def test_from_config_is_seeded():
    a, b = TSR.from_config("tiny", seed=3), TSR.from_config("tiny", seed=3)
    c = TSR.from_config("tiny", seed=4)
    assert torch.equal(a.tokenizer.embeddings, b.tokenizer.embeddings)
    assert not torch.equal(a.tokenizer.embeddings, c.tokenizer.embeddings)


# ---- bad checkpoints give clear errors -----------------------------------------------------
@pytest.fixture()
def tiny_folder(tmp_path, tiny) -> Path:
    return tiny.save_pretrained(tmp_path / "model", safe_serialization=False)


def test_missing_key_is_named(tiny_folder):
    state = torch.load(tiny_folder / "model.ckpt", weights_only=True)
    del state["decoder.layers.0.weight"]
    torch.save(state, tiny_folder / "model.ckpt")
    with pytest.raises(ValueError, match=r"missing: decoder\.layers\.0\.weight"):
        TSR.from_pretrained(tiny_folder)


def test_wrong_shape_is_named(tiny_folder):
    state = torch.load(tiny_folder / "model.ckpt", weights_only=True)
    state["tokenizer.embeddings"] = torch.zeros(3, 64, 4, 4)
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tiny_folder / "model.ckpt")
    with pytest.raises(ValueError, match=r"mis-shaped: tokenizer\.embeddings.*") as error:
        TSR.from_pretrained(tiny_folder)
    assert "unexpected: extra.weight" in str(error.value)


def test_not_a_state_dict(tiny_folder):
    torch.save([torch.zeros(1)], tiny_folder / "model.ckpt")
    with pytest.raises(ValueError, match="not a state dict"):
        TSR.from_pretrained(tiny_folder)
    (tiny_folder / "model.ckpt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match=r"model\.ckpt"):
        TSR.from_pretrained(tiny_folder)


class _Payload:
    """Stands for arbitrary pickled code, which weights_only loading must refuse."""


def test_pickle_refused_by_weights_only(tiny_folder):
    torch.save({"decoder.layers.0.weight": _Payload()}, tiny_folder / "model.ckpt")
    with pytest.raises(ValueError, match="weights_only"):
        TSR.from_pretrained(tiny_folder)


def test_missing_weights_say_where_to_put_them(tmp_path, monkeypatch):
    with pytest.raises(UserInputError, match=r"config\.yaml.*model\.ckpt|tiny"):
        TSR.from_pretrained(tmp_path)
    # huggingface_hub reads HF_HUB_OFFLINE / HF_HOME at import; set what they set.
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(UserInputError, match="tiny"):
        TSR.from_pretrained("stabilityai/TripoSR")


def test_foreign_architecture_is_refused(tmp_path, tiny):
    folder = tiny.save_pretrained(tmp_path / "m")
    text = (folder / "config.yaml").read_text()
    (folder / "config.yaml").write_text(text.replace("NeRFMLP", "OtherMLP"))
    with pytest.raises(ValueError, match="different architecture"):
        TSR.from_pretrained(folder)


def test_mesh_matches_official(tiny, reference, scene_codes):
    """Same backend as the reference (PyMCubes): same vertices, faces and vertex colours."""
    mesh = tiny.extract_mesh(
        scene_codes,
        has_vertex_color=True,
        resolution=32,
        threshold=float(reference["mc_threshold"]),
        backend="pymcubes",
        method="dense",
    )[0]
    assert len(mesh.vertices) == len(reference["mesh_verts"])
    assert len(mesh.faces) == len(reference["mesh_faces"])
    np.testing.assert_allclose(mesh.vertices, reference["mesh_verts"], atol=1e-5)
    np.testing.assert_array_equal(mesh.faces, reference["mesh_faces"])
    np.testing.assert_array_equal(mesh.visual.vertex_colors, reference["mesh_vertex_colors_u8"])


def test_empty_mesh_with_colours_does_not_crash(tiny, scene_codes):
    with pytest.warns(UserWarning):
        mesh = tiny.extract_mesh(scene_codes, has_vertex_color=True, resolution=16, threshold=1e9)[
            0
        ]
    assert len(mesh.faces) == 0
