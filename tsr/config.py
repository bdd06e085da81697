"""Model configuration: one dataclass per component, read from the official `config.yaml`.

The official yaml names a Python class per component (`*_cls`). We check those strings
against the architecture we implement and never import them: a checkpoint made for another
architecture fails here, with a message, instead of deep inside `load_state_dict`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import yaml

from .errors import UserInputError

ASSETS = Path(__file__).parent / "assets"

# The classes the official config names, mapped to the config field each one fills.
OFFICIAL_CLASSES = {
    "image_tokenizer_cls": "tsr.models.tokenizers.image.DINOSingleImageTokenizer",
    "tokenizer_cls": "tsr.models.tokenizers.triplane.Triplane1DTokenizer",
    "backbone_cls": "tsr.models.transformer.transformer_1d.Transformer1D",
    "post_processor_cls": "tsr.models.network_utils.TriplaneUpsampleNetwork",
    "decoder_cls": "tsr.models.network_utils.NeRFMLP",
    "renderer_cls": "tsr.models.nerf_renderer.TriplaneNeRFRenderer",
}

# The official config names the ViT by Hub id; we ship its config.json so nothing is fetched.
SHIPPED_VIT_CONFIGS = {"facebook/dino-vitb16": ASSETS / "dino-vitb16-config.json"}


@dataclasses.dataclass
class ImageTokenizerConfig:
    vit: dict[str, Any]  # a transformers ViTConfig as a dict (hidden_size, num_hidden_layers, ...)
    vit_name: str = "facebook/dino-vitb16"  # where `vit` came from, for messages and metadata


@dataclasses.dataclass
class TriplaneTokenizerConfig:
    plane_size: int = 32  # P: each learned plane is P x P tokens
    num_channels: int = 1024  # C: token width, also the backbone's in/out width


@dataclasses.dataclass
class BackboneConfig:
    in_channels: int = 1024  # = tokenizer.num_channels
    num_attention_heads: int = 16
    attention_head_dim: int = 64  # inner width = heads * head_dim
    num_layers: int = 16  # transformer blocks; LoRA targets 8 Linear layers in each
    cross_attention_dim: int = 768  # = ViT hidden size (image tokens)
    norm_num_groups: int = 32  # GroupNorm groups on the input tokens


@dataclasses.dataclass
class PostProcessorConfig:
    in_channels: int = 1024
    out_channels: int = 40  # triplane feature channels per plane, after 2x upsampling


@dataclasses.dataclass
class DecoderConfig:
    in_channels: int = 120  # 3 planes x post_processor.out_channels, concatenated
    n_neurons: int = 64
    n_hidden_layers: int = 9  # Linear+SiLU layers before the output Linear
    activation: str = "silu"  # the only one the official checkpoint uses


@dataclasses.dataclass
class RendererConfig:
    radius: float = 0.87  # the object lives in [-radius, radius]^3 (just over 0.5*sqrt(3))
    feature_reduction: str = "concat"  # plane features are concatenated, not summed
    density_activation: str = "exp"
    density_bias: float = -1.0  # density_act = exp(density + bias)
    num_samples_per_ray: int = 128


@dataclasses.dataclass
class TSRConfig:
    cond_image_size: int
    image_tokenizer: ImageTokenizerConfig
    tokenizer: TriplaneTokenizerConfig
    backbone: BackboneConfig
    post_processor: PostProcessorConfig
    decoder: DecoderConfig
    renderer: RendererConfig
    # Marching-cubes level in density_act units. 25 is the official default; a model trained
    # here records the one chosen on its validation data.
    mc_threshold: float = 25.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """The config in the official yaml layout (`*_cls` included), ViT config inlined."""
        out: dict[str, Any] = {"cond_image_size": self.cond_image_size}
        for cls_key, cls_name in OFFICIAL_CLASSES.items():
            field = cls_key.removesuffix("_cls")
            out[cls_key] = cls_name
            if field == "image_tokenizer" and self.image_tokenizer.vit_name in SHIPPED_VIT_CONFIGS:
                out[field] = {"pretrained_model_name_or_path": self.image_tokenizer.vit_name}
            elif field == "image_tokenizer":  # inline, so the folder needs no second file
                out[field] = {
                    "vit_config": self.image_tokenizer.vit,
                    "vit_name": self.image_tokenizer.vit_name,
                }
            else:
                out[field] = dataclasses.asdict(getattr(self, field))
        if self.mc_threshold != 25.0:
            out["mc_threshold"] = self.mc_threshold
        return yaml.safe_dump(out, sort_keys=False)


_REFERENCE = re.compile(r"^\$\{([\w.]+)\}$")


def _resolve_references(node: Any, root: dict[str, Any]) -> Any:
    """Resolve the `${a.b}` references OmegaConf would resolve (the official config uses one)."""
    if isinstance(node, dict):
        return {key: _resolve_references(value, root) for key, value in node.items()}
    if isinstance(node, str) and (match := _REFERENCE.match(node)):
        value: Any = root
        for part in match.group(1).split("."):
            value = value[part]
        return value
    return node


def _component(cls: type, values: dict[str, Any], where: str) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(
            f"{where}: unknown keys {unknown}; this TripoSR implementation knows {sorted(names)}"
        )
    return cls(**values)


def _vit_config(value: dict[str, Any], config_dir: Path | None) -> ImageTokenizerConfig:
    if "vit_config" in value:  # written by `TSRConfig.to_yaml`
        return ImageTokenizerConfig(
            vit=dict(value["vit_config"]), vit_name=value.get("vit_name", "inline")
        )
    name = value.get("pretrained_model_name_or_path")
    if name is None:
        raise ValueError("image_tokenizer needs pretrained_model_name_or_path (a ViT config)")
    if name in SHIPPED_VIT_CONFIGS:
        path = SHIPPED_VIT_CONFIGS[name]
    elif name.endswith(".json"):
        path = Path(name) if Path(name).is_absolute() or config_dir is None else config_dir / name
    else:
        raise ValueError(
            f"image_tokenizer.pretrained_model_name_or_path={name!r}: only "
            f"{sorted(SHIPPED_VIT_CONFIGS)} or a path to a ViT config .json are supported "
            "(nothing is downloaded at build time)"
        )
    if not path.is_file():
        raise FileNotFoundError(f"ViT config {path} (named by the model config) does not exist")
    vit = json.loads(path.read_text())
    vit.setdefault("qkv_bias", True)  # the DINO config has no key: transformers' default applies
    return ImageTokenizerConfig(vit=vit, vit_name=name)


def config_from_dict(raw: dict[str, Any], config_dir: Path | None = None) -> TSRConfig:
    """Build a TSRConfig from the official yaml's dict; `config_dir` resolves relative paths."""
    raw = _resolve_references(raw, raw)
    for cls_key, expected in OFFICIAL_CLASSES.items():
        found = raw.get(cls_key, expected)
        if found != expected:
            raise ValueError(
                f"config names {cls_key}={found!r}, but this implementation builds {expected!r}: "
                "the checkpoint is for a different architecture"
            )
    missing = [
        k.removesuffix("_cls") for k in OFFICIAL_CLASSES if k.removesuffix("_cls") not in raw
    ]
    if missing or "cond_image_size" not in raw:
        raise ValueError(
            f"config is missing {missing or ['cond_image_size']}: is it a TripoSR config.yaml?"
        )
    backbone = dict(raw["backbone"])
    return TSRConfig(
        cond_image_size=int(raw["cond_image_size"]),
        image_tokenizer=_vit_config(raw["image_tokenizer"], config_dir),
        tokenizer=_component(TriplaneTokenizerConfig, raw["tokenizer"], "tokenizer"),
        backbone=_component(BackboneConfig, backbone, "backbone"),
        post_processor=_component(PostProcessorConfig, raw["post_processor"], "post_processor"),
        decoder=_component(DecoderConfig, raw["decoder"], "decoder"),
        renderer=_component(RendererConfig, raw["renderer"], "renderer"),
        mc_threshold=float(raw.get("mc_threshold", 25.0)),
    )


def load_config(path: str | Path) -> TSRConfig:
    """Read an official-format `config.yaml`."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError("model config not found", path, "put the model's config.yaml there")
    fix = "restore the config.yaml that came with the weights (the official one for TripoSR)"
    try:
        raw = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        where = getattr(error, "problem_mark", None)  # 0-based line and column
        place = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(error, "problem", None) or type(error).__name__
        raise UserInputError(f"not valid YAML{place}: {problem}", path, fix) from error
    if not isinstance(raw, dict):
        raise UserInputError("not a TripoSR config.yaml (expected a mapping)", path, fix)
    try:
        return config_from_dict(raw, config_dir=path.parent)
    except (ValueError, KeyError, TypeError, FileNotFoundError) as error:
        raise UserInputError(f"not a usable TripoSR config ({error})", path, fix) from error


def named_config(name: str) -> TSRConfig:
    """Configs shipped with the package: `official` (full size) and `tiny` (tests)."""
    files = {"official": ASSETS / "official-config.yaml", "tiny": ASSETS / "tiny" / "config.yaml"}
    if name not in files:
        raise ValueError(f"unknown config {name!r}; choose one of {sorted(files)} or pass a path")
    return load_config(files[name])
