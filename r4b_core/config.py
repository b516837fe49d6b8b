"""Model configuration as data.

Three dataclasses whose field names are the keys of the checkpoint's ``config.json``:

- ``TextConfig``   the Qwen3 decoder (``text_config`` of R-4B, or a plain Qwen3 ``config.json``);
- ``VisionConfig`` the SigLIP vision tower (``vision_config``);
- ``R4BConfig``    the top level (LLaVA-OneVision keys: image token, pinpoints, feature layer, ...).

Each default is written once, in its dataclass field: ``from_hf_dict(d, source=...)`` walks the
fields (``json_io.read_fields``: absent or null key -> the default, no default -> required key, values
type-checked against the annotation) and keeps the keys it does not interpret in ``extra``, which
``to_hf_dict()`` writes back, so the round trip is exact. ``MANUAL`` fields are read and written by the
class's own hooks: both RoPE spellings, the ``image_token_id`` alias, the nested configs, bookkeeping.
Errors are ``ConfigError`` (a ``ValueError``) naming the key and the file. RoPE is read in both
spellings (transformers 4.x ``rope_theta`` + ``rope_scaling``, 5.x ``rope_parameters``; see TextConfig).

Also here, the one place for two rules that anyres.py and image_processing.py use too: ``max_tiles``
(the N of ``"anyres_max_N"``) and ``check_pinpoints`` (an ``image_grid_pinpoints`` list). Presets:
``r4b`` (r4b_spec.md §1), ``small`` (CPU benchmarks) and ``tiny`` (unit tests).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from r4b_core.json_io import MANUAL, OMIT_NONE, is_int, read_fields, read_json, write_fields

SUPPORTED_ROPE_TYPES = ("default", "linear")


class ConfigError(ValueError):
    """A config.json that is missing a key or asks for something we do not implement."""


# ---------------------------------------------------------------------------------------------
# shared rules: anyres_max_N, pinpoints


def max_tiles(vision_aspect_ratio: str) -> int | None:
    """N of ``"anyres_max_N"``; None for plain ``"anyres"`` (never downscale); ConfigError otherwise.

    transformers parses N with ``int(s.strip("anyres_max_"))``, which turns plain "anyres" into
    ``int("")`` and crashes; here "anyres" means "no downscale" (a deliberate divergence).
    """
    if vision_aspect_ratio == "anyres":
        return None
    prefix = "anyres_max_"
    has_prefix = isinstance(vision_aspect_ratio, str) and vision_aspect_ratio.startswith(prefix)
    n = vision_aspect_ratio[len(prefix):] if has_prefix else ""
    if not (n.isdigit() and int(n) > 0):
        raise ConfigError(
            f"key 'vision_aspect_ratio' = {vision_aspect_ratio!r} is not supported; use 'anyres' or "
            "'anyres_max_N' with N a positive integer."
        )
    return int(n)


def check_pinpoints(pinpoints: Any, tile_size: int | None = None) -> list[tuple[int, int]]:
    """``image_grid_pinpoints`` as [(height, width), ...] of Python ints; ConfigError unless it is a
    non-empty list of positive [height, width] pairs, each a multiple of ``tile_size`` when given
    (a partial last tile could not be reshaped into the feature grid)."""
    if hasattr(pinpoints, "tolist"):  # a tensor or an array
        pinpoints = pinpoints.tolist()
    ok = isinstance(pinpoints, (list, tuple)) and len(pinpoints) > 0
    pinpoints = [p.tolist() if hasattr(p, "tolist") else p for p in pinpoints] if ok else pinpoints
    ok = ok and all(isinstance(p, (list, tuple)) and len(p) == 2 and all(is_int(x) and x > 0 for x in p)
                    for p in pinpoints)
    if not ok:
        raise ConfigError(
            f"key 'image_grid_pinpoints' = {pinpoints!r} should be a non-empty list of [height, width] pairs "
            "of positive integers."
        )
    pins = [(int(h), int(w)) for h, w in pinpoints]
    if tile_size is not None:
        if not is_int(tile_size) or tile_size <= 0:
            raise ConfigError(f"tile size {tile_size!r} must be a positive integer.")
        for h, w in pins:
            if h % tile_size or w % tile_size:
                raise ConfigError(
                    f"pinpoint [{h}, {w}] in 'image_grid_pinpoints' is not a multiple of the tile size {tile_size}."
                )
    return pins


# ---------------------------------------------------------------------------------------------
# parsing helpers


def _positive(obj: Any, keys: tuple[str, ...], where: str = "") -> None:
    for key in keys:
        value = getattr(obj, key)
        if not is_int(value) or value <= 0:
            raise ConfigError(f"key '{where}{key}' = {value!r} must be a positive integer.")
        if value >= 2**31:  # torch sizes are int64; no real model comes near this (and products must fit)
            raise ConfigError(f"key '{where}{key}' = {value!r} is too large (the limit is 2**31 - 1).")


class _HFConfig:
    """What the three configs share: ``from_hf_dict`` walks the dataclass fields and ``to_hf_dict``
    writes them back. A subclass pops the keys of its ``MANUAL`` fields in ``_read_manual`` (returning
    constructor kwargs) and writes them in ``_write_manual``."""

    _section = ""  # the config.json section, for messages: "text_config", "vision_config"

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json", section: str | None = None) -> Self:
        """Parse a config.json dict; errors name ``source`` (the file; "" leaves it out) and the key."""
        section = cls._section if section is None else section
        where = f"{section}." if section else ""
        try:
            rest = copy.deepcopy(d)
            manual = cls._read_manual(rest, where)
            return cls(**manual, **read_fields(cls, rest, where, error=ConfigError), extra=rest)
        except ConfigError as e:
            if not source:
                raise
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def _read_manual(cls, rest: dict, where: str) -> dict[str, Any]:
        return {}

    def _write_manual(self) -> dict[str, Any]:
        return {}

    def to_hf_dict(self) -> dict:
        """The config.json dict: the manual keys, the walked fields, then the keys we do not interpret."""
        return {**self._write_manual(), **write_fields(self), **copy.deepcopy(self.extra)}


# ---------------------------------------------------------------------------------------------
# text


@dataclass
class TextConfig(_HFConfig):
    """Qwen3 decoder hyper-parameters (transformers' ``Qwen3Config`` keys)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None  # None: num_attention_heads (transformers' rule; no GQA)
    head_dim: int = 128  # transformers' Qwen3 default when absent; note 32 * 128 != 2560 in Qwen3-4B
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = field(default=10000.0, metadata=MANUAL)  # transformers' default when absent
    rope_scaling: dict | None = field(default=None, metadata=MANUAL)  # None or {"rope_type": ..., **params}
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
    extra: dict = field(default_factory=dict, metadata=MANUAL)  # keys we do not interpret, written back
    rope_form: str = field(default="rope_theta", repr=False, metadata=MANUAL)  # how config.json spelled RoPE

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        _positive(self, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                         "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"))
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads={self.num_key_value_heads}.")
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
    def _read_manual(cls, rest: dict, where: str) -> dict[str, Any]:
        """RoPE in either spelling, remembered in ``rope_form`` so that ``to_hf_dict`` writes it back as read:
        transformers 4.x ``rope_theta`` plus ``rope_scaling`` (null or ``{"rope_type"|"type": ..., ...}``), or
        5.x ``rope_parameters = {"rope_type": ..., "rope_theta": ..., ...}``. ``rope_scaling`` is normalised
        to None (default RoPE) or ``{"rope_type": ..., **params}``."""
        if rest.get("rope_parameters") is not None:
            key, form, params = f"{where}rope_parameters", "rope_parameters", rest.pop("rope_parameters")
            rest.pop("rope_scaling", None)  # transformers 5 may mirror it; rope_parameters wins
            if not isinstance(params, dict) or not ({"rope_type", "type"} & params.keys()):
                raise ConfigError(f"key '{key}' = {params!r} should be a dict with 'rope_type' and 'rope_theta' "
                                  "(per-layer-type RoPE is not supported).")
            params = dict(params)
            theta = params.pop("rope_theta", rest.pop("rope_theta", cls.rope_theta))  # a 4.x copy is dropped
        else:
            key, form = f"{where}rope_scaling", "rope_theta"
            params, theta = rest.pop("rope_scaling", None), rest.pop("rope_theta", cls.rope_theta)
            if params is not None and not isinstance(params, dict):
                raise ConfigError(f"key '{key}' = {params!r} should be null or a dict.")
            params = dict(params or {})
        rope_type = params.pop("rope_type", params.pop("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(f"key '{key}.rope_type' = {rope_type!r} is not implemented; supported: "
                              f"{', '.join(SUPPORTED_ROPE_TYPES)}.")
        if rope_type == "linear" and not isinstance(params.get("factor"), (int, float)):
            raise ConfigError(f"key '{key}.factor' = {params.get('factor')!r}: linear RoPE scaling needs a number.")
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
            raise ConfigError(f"key '{where}rope_theta' = {theta!r} must be a positive number.")
        scaling = None if rope_type == "default" and not params else {"rope_type": rope_type, **params}
        return {"rope_theta": float(theta), "rope_scaling": scaling, "rope_form": form}

    def _write_manual(self) -> dict[str, Any]:
        if self.rope_form == "rope_theta":
            return {"rope_theta": self.rope_theta, "rope_scaling": copy.deepcopy(self.rope_scaling)}
        params = {k: copy.deepcopy(v) for k, v in (self.rope_scaling or {}).items() if k != "rope_type"}
        return {"rope_parameters": {"rope_type": self.rope_type, "rope_theta": self.rope_theta, **params}}


# ---------------------------------------------------------------------------------------------
# vision


@dataclass
class VisionConfig(_HFConfig):
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
    vision_use_head: bool | None = field(default=None, metadata=OMIT_NONE)  # the head never feeds R-4B
    model_type: str = "siglip_vision_model"
    extra: dict = field(default_factory=dict, metadata=MANUAL)
    _section = "vision_config"

    def __post_init__(self) -> None:
        where = "vision_config."
        _positive(self, ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                         "image_size", "patch_size", "num_channels"), where)
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"key '{where}hidden_size' = {self.hidden_size} is not a multiple of "
                              f"num_attention_heads = {self.num_attention_heads}.")
        if self.hidden_act not in ("gelu_pytorch_tanh", "gelu"):
            raise ConfigError(f"key '{where}hidden_act' = {self.hidden_act!r} is not supported.")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches(self) -> int:
        """Patches per view. The Conv2d has kernel = stride = patch_size and no padding: 384 // 14 = 27."""
        return (self.image_size // self.patch_size) ** 2


# ---------------------------------------------------------------------------------------------
# top level


_IMAGE_TOKEN_KEYS = ("image_token_index", "image_token_id")  # the key and transformers' alias for it


@dataclass
class R4BConfig(_HFConfig):
    """Top-level R-4B config: LLaVA-OneVision keys plus the nested text and vision configs."""

    text_config: TextConfig = field(metadata=MANUAL)
    vision_config: VisionConfig = field(metadata=MANUAL)
    image_token_index: int = field(metadata=MANUAL)  # also spelled image_token_id
    image_grid_pinpoints: list[list[int]]
    vision_aspect_ratio: str = "anyres_max_9"
    vision_feature_layer: int | list[int] = -1
    vision_feature_select_strategy: str = "full"
    projector_hidden_act: str = "gelu"
    multimodal_projector_bias: bool = True
    tie_word_embeddings: bool = False
    architectures: list[str] = field(default_factory=lambda: ["RForConditionalGeneration"])
    model_type: str | None = field(default=None, metadata=OMIT_NONE)
    extra: dict = field(default_factory=dict, metadata=MANUAL)
    # which spelling(s) of the image token key config.json used: image_token_index and/or its alias image_token_id
    image_token_keys: tuple[str, ...] = field(default=_IMAGE_TOKEN_KEYS[:1], repr=False, metadata=MANUAL)

    def __post_init__(self) -> None:
        max_tiles(self.vision_aspect_ratio)
        strategy, act, layer = self.vision_feature_select_strategy, self.projector_hidden_act, self.vision_feature_layer
        if strategy not in ("full", "default"):
            raise ConfigError(f"key 'vision_feature_select_strategy' = {strategy!r}; expected 'full' or 'default'.")
        if act != "gelu":
            raise ConfigError(f"key 'projector_hidden_act' = {act!r} is not supported (R-4B: 'gelu').")
        check_pinpoints(self.image_grid_pinpoints, self.vision_config.image_size)
        n = self.vision_config.num_hidden_layers
        if not all(is_int(i) and -(n + 1) <= i <= n for i in (layer if isinstance(layer, list) else [layer])):
            raise ConfigError(f"key 'vision_feature_layer' = {layer!r} is out of range for {n} vision layers "
                              f"(hidden_states has {n + 1} entries).")
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

    @property
    def projector_input_size(self) -> int:
        """Width of the projector's input: vision hidden_size x the number of feature layers concatenated."""
        layers = self.vision_feature_layer
        return self.vision_config.hidden_size * (len(layers) if isinstance(layers, list) else 1)

    @classmethod
    def _read_manual(cls, rest: dict, where: str) -> dict[str, Any]:
        for key in ("text_config", "vision_config"):
            if not isinstance(rest.get(key), dict):
                raise ConfigError(f"required key '{key}' is missing or not a dict; is this an R-4B config.json?")
        text = TextConfig.from_hf_dict(rest.pop("text_config"), source="", section="text_config")
        vision = VisionConfig.from_hf_dict(rest.pop("vision_config"), source="")
        keys = tuple(k for k in _IMAGE_TOKEN_KEYS if rest.get(k) is not None)  # a null one stays in extra
        if not keys:
            raise ConfigError("required key 'image_token_index' is missing.")
        image_token, *alias = (rest.pop(k) for k in keys)
        if alias and alias[0] != image_token:
            raise ConfigError(f"'image_token_index' = {image_token} and its alias 'image_token_id' = {alias[0]} disagree.")
        if not is_int(image_token):
            raise ConfigError(f"key '{keys[0]}' = {image_token!r} should be of type int.")
        return {"text_config": text, "vision_config": vision, "image_token_index": image_token, "image_token_keys": keys}

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str | Path) -> "R4BConfig":
        """Read ``checkpoint_dir/config.json``."""
        path, d = read_config_json(checkpoint_dir)
        return cls.from_hf_dict(d, source=str(path))

    def _write_manual(self) -> dict[str, Any]:
        out = {"text_config": self.text_config.to_hf_dict(), "vision_config": self.vision_config.to_hf_dict()}
        return out | {key: self.image_token_index for key in self.image_token_keys or _IMAGE_TOKEN_KEYS[:1]}


# ---------------------------------------------------------------------------------------------
# reading config.json


def read_config_json(checkpoint_dir: str | Path) -> tuple[Path, dict]:
    """Return (path, parsed dict) of ``checkpoint_dir/config.json`` with clear errors."""
    path = Path(checkpoint_dir) / "config.json"
    return path, read_json(path, what=f"the model's config.json in checkpoint directory {checkpoint_dir}",
                           error=ConfigError)


def text_config_from_dict(d: dict, source: str = "config.json") -> TextConfig:
    """The decoder config of an R-4B ``config.json`` (its ``text_config``) or of a plain Qwen3 one."""
    if "text_config" in d:
        if not isinstance(d["text_config"], dict):
            raise ConfigError(f"{source}: key 'text_config' should be a dict.")
        return TextConfig.from_hf_dict(d["text_config"], source, "text_config")
    kind = d.get("model_type")
    if kind is not None and kind != "qwen3":  # say what the checkpoint is, not which of its keys differs
        architectures = d.get("architectures")
        named = f" (architectures {', '.join(map(str, architectures))})" if isinstance(architectures, list) else ""
        raise ConfigError(f"{source}: model_type {kind!r}{named} is not an R-4B or Qwen3 checkpoint; r4b reads R-4B "
                          "checkpoints (text_config + vision_config) and Qwen3 ones (model_type 'qwen3').")
    return TextConfig.from_hf_dict(d, source)


# ---------------------------------------------------------------------------------------------
# presets

_R4B_PINPOINTS = [[384, 768], [768, 384], [768, 768], [1152, 384], [384, 1152]]  # r4b_spec.md §1.1 [I]


def _preset_r4b() -> R4BConfig:
    """The full R-4B shape (r4b_spec.md §1)."""
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
    """The real attention geometry (32/8 heads x 128, real vocabulary and tile size), 4 narrow layers: CPU benchmarks."""
    r4b = _preset_r4b()
    text = dataclasses.replace(r4b.text_config, hidden_size=1024, intermediate_size=3072, num_hidden_layers=4)
    vision = dataclasses.replace(r4b.vision_config, hidden_size=384, intermediate_size=1536, num_hidden_layers=4,
                                 num_attention_heads=6)
    return dataclasses.replace(r4b, text_config=text, vision_config=vision)


def _preset_tiny() -> R4BConfig:
    """For unit tests: the real vocabulary (so real special-token ids work), tiny widths, 56-pixel tiles."""
    r4b = _preset_r4b()
    text = dataclasses.replace(r4b.text_config, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096)
    vision = dataclasses.replace(r4b.vision_config, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, image_size=56)
    pins = [[h * 56 // 384, w * 56 // 384] for h, w in _R4B_PINPOINTS]
    return dataclasses.replace(r4b, text_config=text, vision_config=vision, image_grid_pinpoints=pins)


PRESETS = {"r4b": _preset_r4b, "small": _preset_small, "tiny": _preset_tiny}


def preset(name: str) -> R4BConfig:
    """A fresh config for a named preset: 'r4b', 'small' or 'tiny'."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}.")
    return PRESETS[name]()
