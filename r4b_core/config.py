"""Model configuration as data.

Three dataclasses whose field names are the keys of the checkpoint's ``config.json``:

- ``TextConfig``   the Qwen3 decoder (``text_config`` of R-4B, or a plain Qwen3 ``config.json``);
- ``VisionConfig`` the SigLIP vision tower (``vision_config``);
- ``R4BConfig``    the top level (LLaVA-OneVision keys: image token, pinpoints, feature layer, ...).

``from_hf_dict(d, source=...)`` parses and validates; ``to_hf_dict()`` writes the same dict back
(keys we do not interpret are kept in ``extra`` so the round trip is exact, and the RoPE keys are
written in the form they were read in). Errors are ``ConfigError`` (a ``ValueError``) naming the key
and the file.

RoPE comes in two spellings and both are accepted:
- transformers 4.x: ``rope_theta`` plus ``rope_scaling`` (null or ``{"rope_type"|"type": ..., ...}``);
- transformers 5.x: ``rope_parameters = {"rope_type": ..., "rope_theta": ..., ...}``.
Supported RoPE types: ``default`` and ``linear``.

Presets: ``r4b`` (the full R-4B shape, see shared/reference/r4b_spec.md §1), ``small`` (the real
attention geometry — head_dim 128, 32/8 heads — with few layers and a narrow width, for CPU
benchmarks) and ``tiny`` (unit tests).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

SUPPORTED_ROPE_TYPES = ("default", "linear")


class ConfigError(ValueError):
    """A config.json that is missing a key or asks for something we do not implement."""


# ---------------------------------------------------------------------------------------------
# helpers


_REQUIRED = object()


def _take(d: dict, key: str, where: str, expected: type | tuple[type, ...], default: Any = _REQUIRED) -> Any:
    """Pop ``key`` from ``d`` and check its type. Without ``default`` the key is required.

    ``where`` is the section prefix used in messages ("" or "text_config.").
    """
    value = d.pop(key, None)
    if value is None:
        if default is _REQUIRED:
            raise ConfigError(f"required key '{where}{key}' is missing; add it to config.json.")
        return default
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    wrong_bool = isinstance(value, bool) and bool not in _as_tuple(expected)
    if wrong_bool or not isinstance(value, expected):
        raise ConfigError(f"key '{where}{key}' = {value!r} should be of type {_type_names(expected)}.")
    return value


def _as_tuple(t: type | tuple[type, ...]) -> tuple[type, ...]:
    return t if isinstance(t, tuple) else (t,)


def _type_names(t: type | tuple[type, ...]) -> str:
    return " or ".join(x.__name__ for x in _as_tuple(t))


def _positive(obj: Any, keys: tuple[str, ...], where: str = "") -> None:
    for key in keys:
        value = getattr(obj, key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"key '{where}{key}' = {value!r} must be a positive integer.")


def _with_source(source: str, build):
    """Run ``build()``; prefix any ConfigError with the file it came from."""
    try:
        return build()
    except ConfigError as e:
        if not source:
            raise
        raise ConfigError(f"{source}: {e}") from None


def _parse_rope(d: dict, where: str) -> tuple[float, dict | None, str]:
    """Pop either RoPE form from ``d``; return (theta, scaling or None, form).

    ``scaling`` is normalised to ``{"rope_type": ..., **params}``; form is "rope_theta" (4.x) or
    "rope_parameters" (5.x) so that ``to_hf_dict`` writes the keys back as they were.
    """
    if d.get("rope_parameters") is not None:
        params = d.pop("rope_parameters")
        d.pop("rope_scaling", None)  # transformers 5 may mirror it; rope_parameters wins
        key = f"{where}rope_parameters"
        if not isinstance(params, dict) or not ({"rope_type", "type"} & params.keys()):
            raise ConfigError(
                f"key '{key}' = {params!r} should be a dict with 'rope_type' and 'rope_theta' "
                "(per-layer-type RoPE is not supported)."
            )
        params = dict(params)
        theta = params.pop("rope_theta", d.pop("rope_theta", 10000.0))
        rope_type = params.pop("rope_type", params.pop("type", "default"))
        form = "rope_parameters"
    else:
        key = f"{where}rope_scaling"
        theta = d.pop("rope_theta", 10000.0)  # transformers' default when the key is absent
        params = d.pop("rope_scaling", None)
        if params is not None and not isinstance(params, dict):
            raise ConfigError(f"key '{key}' = {params!r} should be null or a dict.")
        params = dict(params or {})
        rope_type = params.pop("rope_type", params.pop("type", "default"))
        form = "rope_theta"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"key '{key}.rope_type' = {rope_type!r} is not implemented; supported: {', '.join(SUPPORTED_ROPE_TYPES)}."
        )
    if rope_type == "linear" and not isinstance(params.get("factor"), (int, float)):
        raise ConfigError(f"key '{key}.factor' = {params.get('factor')!r}: linear RoPE scaling needs a number.")
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
        raise ConfigError(f"key '{where}rope_theta' = {theta!r} must be a positive number.")
    scaling = None if rope_type == "default" and not params else {"rope_type": rope_type, **params}
    return float(theta), scaling, form


# ---------------------------------------------------------------------------------------------
# text


@dataclass
class TextConfig:
    """Qwen3 decoder hyper-parameters (transformers' ``Qwen3Config`` keys)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int = 128  # transformers' Qwen3 default when absent; note 32 * 128 != 2560 in Qwen3-4B
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # normalised: None or {"rope_type": ..., **params}
    hidden_act: str = "silu"
    attention_bias: bool = False
    attention_dropout: float = 0.0
    tie_word_embeddings: bool = False  # Qwen3Config's default in transformers 4.x and 5.x
    use_sliding_window: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    model_type: str = "qwen3"
    extra: dict = field(default_factory=dict)  # keys we do not interpret, written back by to_hf_dict
    rope_form: str = field(default="rope_theta", repr=False)  # how config.json spelled RoPE

    def __post_init__(self) -> None:
        _positive(self, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                         "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"))
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}."
            )
        if self.head_dim % 2:
            raise ConfigError(f"key 'head_dim' = {self.head_dim} must be even for RoPE.")
        if self.hidden_act != "silu":
            raise ConfigError(f"key 'hidden_act' = {self.hidden_act!r} is not supported (Qwen3 uses 'silu').")
        if self.use_sliding_window:
            raise ConfigError("key 'use_sliding_window' = true is not supported (R-4B uses full attention).")
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(f"RoPE type {self.rope_type!r} is not implemented; supported: {SUPPORTED_ROPE_TYPES}.")

    @property
    def rope_type(self) -> str:
        return self.rope_scaling["rope_type"] if self.rope_scaling else "default"

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json", section: str = "") -> "TextConfig":
        """Parse a Qwen3 config dict; ``section`` ("text_config") is only used in messages."""
        where = f"{section}." if section else ""

        def build() -> TextConfig:
            rest = copy.deepcopy(d)
            theta, scaling, form = _parse_rope(rest, where)
            heads = _take(rest, "num_attention_heads", where, int)
            kwargs = dict(
                vocab_size=_take(rest, "vocab_size", where, int),
                hidden_size=_take(rest, "hidden_size", where, int),
                intermediate_size=_take(rest, "intermediate_size", where, int),
                num_hidden_layers=_take(rest, "num_hidden_layers", where, int),
                num_attention_heads=heads,
                num_key_value_heads=_take(rest, "num_key_value_heads", where, int, heads),
                head_dim=_take(rest, "head_dim", where, int, 128),
                max_position_embeddings=_take(rest, "max_position_embeddings", where, int, 32768),
                rms_norm_eps=_take(rest, "rms_norm_eps", where, float, 1e-6),
                hidden_act=_take(rest, "hidden_act", where, str, "silu"),
                attention_bias=_take(rest, "attention_bias", where, bool, False),
                attention_dropout=_take(rest, "attention_dropout", where, float, 0.0),
                tie_word_embeddings=_take(rest, "tie_word_embeddings", where, bool, False),
                use_sliding_window=_take(rest, "use_sliding_window", where, bool, False),
                sliding_window=_take(rest, "sliding_window", where, int, None),
                bos_token_id=_take(rest, "bos_token_id", where, int, None),
                eos_token_id=_take(rest, "eos_token_id", where, (int, list), None),
                pad_token_id=_take(rest, "pad_token_id", where, int, None),
                model_type=_take(rest, "model_type", where, str, "qwen3"),
            )
            return cls(**kwargs, rope_theta=theta, rope_scaling=scaling, rope_form=form, extra=rest)

        return _with_source(source, build)

    def to_hf_dict(self) -> dict:
        skip = ("extra", "rope_form", "rope_theta", "rope_scaling")
        out: dict[str, Any] = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name not in skip}
        if self.rope_form == "rope_parameters":
            params = {k: v for k, v in (self.rope_scaling or {}).items() if k != "rope_type"}
            out["rope_parameters"] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta, **params}
        else:
            out["rope_theta"] = self.rope_theta
            out["rope_scaling"] = copy.deepcopy(self.rope_scaling)
        out.update(copy.deepcopy(self.extra))
        return out


# ---------------------------------------------------------------------------------------------
# vision


@dataclass
class VisionConfig:
    """SigLIP vision tower hyper-parameters (transformers' ``SiglipVisionConfig`` keys).

    Divergence from transformers: the shape keys are required here (transformers would silently
    fall back to SigLIP-base defaults, which never match an R-4B checkpoint).
    """

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    vision_use_head: bool | None = None  # the pooling head never feeds the features R-4B uses
    model_type: str = "siglip_vision_model"
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = "vision_config."
        _positive(self, ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                         "image_size", "patch_size", "num_channels"), where)
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"key '{where}hidden_size' = {self.hidden_size} is not a multiple of "
                f"num_attention_heads = {self.num_attention_heads}."
            )
        if self.hidden_act not in ("gelu_pytorch_tanh", "gelu"):
            raise ConfigError(f"key '{where}hidden_act' = {self.hidden_act!r} is not supported.")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches(self) -> int:
        """Patches per view. The Conv2d has kernel = stride = patch_size and no padding: 384 // 14 = 27."""
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json") -> "VisionConfig":
        where = "vision_config."

        def build() -> VisionConfig:
            rest = copy.deepcopy(d)
            kwargs = dict(
                hidden_size=_take(rest, "hidden_size", where, int),
                intermediate_size=_take(rest, "intermediate_size", where, int),
                num_hidden_layers=_take(rest, "num_hidden_layers", where, int),
                num_attention_heads=_take(rest, "num_attention_heads", where, int),
                image_size=_take(rest, "image_size", where, int),
                patch_size=_take(rest, "patch_size", where, int),
                num_channels=_take(rest, "num_channels", where, int, 3),
                hidden_act=_take(rest, "hidden_act", where, str, "gelu_pytorch_tanh"),
                layer_norm_eps=_take(rest, "layer_norm_eps", where, float, 1e-6),
                attention_dropout=_take(rest, "attention_dropout", where, float, 0.0),
                vision_use_head=_take(rest, "vision_use_head", where, bool, None),
                model_type=_take(rest, "model_type", where, str, "siglip_vision_model"),
            )
            return cls(**kwargs, extra=rest)

        return _with_source(source, build)

    def to_hf_dict(self) -> dict:
        out = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name != "extra"}
        if out["vision_use_head"] is None:
            del out["vision_use_head"]
        out.update(copy.deepcopy(self.extra))
        return out


# ---------------------------------------------------------------------------------------------
# top level


@dataclass
class R4BConfig:
    """Top-level R-4B config: LLaVA-OneVision keys plus the nested text and vision configs."""

    text_config: TextConfig
    vision_config: VisionConfig
    image_token_index: int
    image_grid_pinpoints: list[list[int]]
    vision_aspect_ratio: str = "anyres_max_9"
    vision_feature_layer: int | list[int] = -1
    vision_feature_select_strategy: str = "full"
    projector_hidden_act: str = "gelu"
    multimodal_projector_bias: bool = True
    tie_word_embeddings: bool = False
    architectures: list[str] = field(default_factory=lambda: ["RForConditionalGeneration"])
    model_type: str | None = None
    extra: dict = field(default_factory=dict)
    # which spelling(s) of the image token key config.json used: image_token_index and/or its alias image_token_id
    image_token_keys: tuple[str, ...] = field(default=("image_token_index",), repr=False)

    def __post_init__(self) -> None:
        ratio = self.vision_aspect_ratio
        n = ratio[len("anyres_max_"):] if ratio.startswith("anyres_max_") else ""
        if ratio != "anyres" and not (n.isdigit() and int(n) > 0):
            raise ConfigError(f"key 'vision_aspect_ratio' = {ratio!r} is not supported; use 'anyres' or 'anyres_max_N'.")
        if self.vision_feature_select_strategy not in ("full", "default"):
            raise ConfigError(
                f"key 'vision_feature_select_strategy' = {self.vision_feature_select_strategy!r}; expected 'full' or 'default'."
            )
        if self.projector_hidden_act != "gelu":
            raise ConfigError(f"key 'projector_hidden_act' = {self.projector_hidden_act!r} is not supported (R-4B: 'gelu').")
        pins, tile = self.image_grid_pinpoints, self.vision_config.image_size
        ok = bool(pins) and all(
            isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in p)
            for p in pins
        )
        if not ok:
            raise ConfigError(f"key 'image_grid_pinpoints' = {pins!r} should be a non-empty list of [height, width].")
        for h, w in pins:
            if h % tile or w % tile:
                raise ConfigError(f"pinpoint [{h}, {w}] in 'image_grid_pinpoints' is not a multiple of the tile size {tile}.")
        n_layers = self.vision_config.num_hidden_layers
        layers = self.vision_feature_layer if isinstance(self.vision_feature_layer, list) else [self.vision_feature_layer]
        for layer in layers:
            if not isinstance(layer, int) or not -(n_layers + 1) <= layer <= n_layers:
                raise ConfigError(
                    f"key 'vision_feature_layer' = {self.vision_feature_layer!r} is out of range for {n_layers} "
                    f"vision layers (hidden_states has {n_layers + 1} entries)."
                )
        if not 0 <= self.image_token_index < self.text_config.vocab_size:
            raise ConfigError(
                f"key '{self.image_token_keys[0]}' = {self.image_token_index} is outside the vocabulary "
                f"(text_config.vocab_size = {self.text_config.vocab_size})."
            )

    @property
    def image_token_id(self) -> int:
        """transformers' alias for ``image_token_index`` (LLaVA-OneVision's attribute_map)."""
        return self.image_token_index

    @property
    def tie_lm_head(self) -> bool:
        """Whether lm_head shares embed_tokens' weight.

        Decided as transformers 4.5x decides it for LLaVA-OneVision-style models (R-4B's remote code
        targets 4.55): ``tie_weights`` reads ``get_text_config(decoder=True).tie_word_embeddings``,
        i.e. ``text_config.tie_word_embeddings``; the top-level key is not consulted (r4b_spec.md §1.5).
        """
        return self.text_config.tie_word_embeddings

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json") -> "R4BConfig":
        def build() -> R4BConfig:
            rest = copy.deepcopy(d)
            for key in ("text_config", "vision_config"):
                if not isinstance(rest.get(key), dict):
                    raise ConfigError(f"required key '{key}' is missing or not a dict; is this an R-4B config.json?")
            text = TextConfig.from_hf_dict(rest.pop("text_config"), source="", section="text_config")
            vision = VisionConfig.from_hf_dict(rest.pop("vision_config"), source="")
            keys = tuple(k for k in ("image_token_index", "image_token_id") if rest.get(k) is not None)
            if len(keys) == 2 and rest["image_token_index"] != rest["image_token_id"]:
                raise ConfigError(
                    f"'image_token_index' = {rest['image_token_index']} and its alias 'image_token_id' = "
                    f"{rest['image_token_id']} disagree."
                )
            image_token = _take(rest, keys[0] if keys else "image_token_index", "", int)
            for k in keys[1:]:
                rest.pop(k)
            return cls(
                text_config=text,
                vision_config=vision,
                image_token_index=image_token,
                image_token_keys=keys,
                image_grid_pinpoints=_take(rest, "image_grid_pinpoints", "", list),
                vision_aspect_ratio=_take(rest, "vision_aspect_ratio", "", str, "anyres_max_9"),
                vision_feature_layer=_take(rest, "vision_feature_layer", "", (int, list), -1),
                vision_feature_select_strategy=_take(rest, "vision_feature_select_strategy", "", str, "full"),
                projector_hidden_act=_take(rest, "projector_hidden_act", "", str, "gelu"),
                multimodal_projector_bias=_take(rest, "multimodal_projector_bias", "", bool, True),
                tie_word_embeddings=_take(rest, "tie_word_embeddings", "", bool, False),
                architectures=_take(rest, "architectures", "", list, ["RForConditionalGeneration"]),
                model_type=_take(rest, "model_type", "", str, None),
                extra=rest,
            )

        return _with_source(source, build)

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str | Path) -> "R4BConfig":
        """Read ``checkpoint_dir/config.json``."""
        path, d = read_config_json(checkpoint_dir)
        return cls.from_hf_dict(d, source=str(path))

    def to_hf_dict(self) -> dict:
        out: dict[str, Any] = {
            "architectures": list(self.architectures),
            "text_config": self.text_config.to_hf_dict(),
            "vision_config": self.vision_config.to_hf_dict(),
            "image_grid_pinpoints": copy.deepcopy(self.image_grid_pinpoints),
            "vision_aspect_ratio": self.vision_aspect_ratio,
            "vision_feature_layer": copy.deepcopy(self.vision_feature_layer),
            "vision_feature_select_strategy": self.vision_feature_select_strategy,
            "projector_hidden_act": self.projector_hidden_act,
            "multimodal_projector_bias": self.multimodal_projector_bias,
            "tie_word_embeddings": self.tie_word_embeddings,
        }
        for key in self.image_token_keys or ("image_token_index",):
            out[key] = self.image_token_index
        if self.model_type is not None:
            out["model_type"] = self.model_type
        out.update(copy.deepcopy(self.extra))
        return out


# ---------------------------------------------------------------------------------------------
# reading config.json


def read_config_json(checkpoint_dir: str | Path) -> tuple[Path, dict]:
    """Return (path, parsed dict) of ``checkpoint_dir/config.json`` with clear errors."""
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config.json in the checkpoint directory {checkpoint_dir}.")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e}).") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level.")
    return path, d


def text_config_from_dict(d: dict, source: str = "config.json") -> TextConfig:
    """The decoder config of an R-4B ``config.json`` (its ``text_config``) or of a plain Qwen3 one."""
    if "text_config" in d:
        if not isinstance(d["text_config"], dict):
            raise ConfigError(f"{source}: key 'text_config' should be a dict.")
        return TextConfig.from_hf_dict(d["text_config"], source, "text_config")
    return TextConfig.from_hf_dict(d, source)


# ---------------------------------------------------------------------------------------------
# presets

_R4B_PINPOINTS = [[384, 768], [768, 384], [768, 768], [1152, 384], [384, 1152]]  # r4b_spec.md §1.1 [I]


def _preset_r4b() -> R4BConfig:
    text = TextConfig(
        vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
        rms_norm_eps=1e-6, rope_theta=1_000_000.0, tie_word_embeddings=False,
        bos_token_id=151643, eos_token_id=151645,
    )
    vision = VisionConfig(
        hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
        image_size=384, patch_size=14, vision_use_head=False,
    )
    return R4BConfig(text_config=text, vision_config=vision, image_token_index=151669,
                     image_grid_pinpoints=copy.deepcopy(_R4B_PINPOINTS))


def _preset_small() -> R4BConfig:
    """Real attention geometry (32/8 heads x 128, real vocabulary and tile size), 4 narrow layers."""
    cfg = _preset_r4b()
    cfg.text_config = TextConfig(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=4,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
        rope_theta=1_000_000.0, bos_token_id=151643, eos_token_id=151645,
    )
    cfg.vision_config = VisionConfig(
        hidden_size=384, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=6,
        image_size=384, patch_size=14, vision_use_head=False,
    )
    return cfg


def _preset_tiny() -> R4BConfig:
    """For unit tests: the real vocabulary (so real special-token ids work), tiny widths, 56-pixel tiles."""
    text = TextConfig(
        vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
        rope_theta=1_000_000.0, bos_token_id=151643, eos_token_id=151645,
    )
    vision = VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=56, patch_size=14, vision_use_head=False,
    )
    pins = [[h * 56 // 384, w * 56 // 384] for h, w in _R4B_PINPOINTS]
    return R4BConfig(text_config=text, vision_config=vision, image_token_index=151669, image_grid_pinpoints=pins)


PRESETS = {"r4b": _preset_r4b, "small": _preset_small, "tiny": _preset_tiny}


def preset(name: str) -> R4BConfig:
    """A fresh config for a named preset: 'r4b', 'small' or 'tiny'."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}.")
    return PRESETS[name]()
