"""What config.json implies about the checkpoint's tensors, checked from the safetensors headers alone
(before any tensor is read, and for the layer counts before the model is built): the shapes of layer 0's
tensors, and the layer indices present (``r4b_weights/loader.py`` runs them)."""

from __future__ import annotations

import re
from collections.abc import Iterable

from r4b_core.config import R4BConfig, TextConfig
from r4b_weights.errors import ConfigMismatchError
from r4b_weights.safetensors_io import TensorInfo

# A layer-count rule is (regex of the tensor names with the layer index as group 1, config key, count).
LayerCountRule = tuple[str, str, int]


def layer_count_rules(config: R4BConfig | TextConfig, in_r4b: bool, full_names: bool) -> list[LayerCountRule]:
    """The layer-count rules of ``config``: the decoder's, and the vision tower's for an R-4B config.
    ``in_r4b``: the text config sits under config.json's ``text_config`` (an R-4B checkpoint);
    ``full_names``: the names are the full model's (``language_model.model.layers.N``), not the text
    model's (``model.layers.N``)."""
    text_prefix = r"language_model\.model\." if full_names else r"model\."
    if isinstance(config, R4BConfig):
        return [(text_prefix + r"layers\.(\d+)\.", "text_config.num_hidden_layers", config.text_config.num_hidden_layers),
                (r"vision_tower\.encoder\.layers\.(\d+)\.", "vision_config.num_hidden_layers",
                 config.vision_config.num_hidden_layers)]
    key = "text_config.num_hidden_layers" if in_r4b else "num_hidden_layers"
    return [(text_prefix + r"layers\.(\d+)\.", key, config.num_hidden_layers)]


# A check is (model tensor name, dimension, config key, value config.json gives it).
ConfigCheck = tuple[str, int, str, int]


def text_config_checks(config: TextConfig, prefix: str, section: str) -> list[ConfigCheck]:
    """What a Qwen3 config implies for layer-0 tensor shapes; ``prefix`` is the decoder's name prefix."""
    key = (section + ".") if section else ""
    layer0 = f"{prefix}layers.0."
    q_rows = config.num_attention_heads * config.head_dim
    kv_rows = config.num_key_value_heads * config.head_dim
    return [
        (f"{prefix}embed_tokens.weight", 0, f"{key}vocab_size", config.vocab_size),
        (f"{prefix}embed_tokens.weight", 1, f"{key}hidden_size", config.hidden_size),
        (f"{layer0}self_attn.q_norm.weight", 0, f"{key}head_dim", config.head_dim),
        (f"{layer0}self_attn.q_proj.weight", 0, f"{key}num_attention_heads * head_dim", q_rows),
        (f"{layer0}self_attn.k_proj.weight", 0, f"{key}num_key_value_heads * head_dim", kv_rows),
        (f"{layer0}mlp.gate_proj.weight", 0, f"{key}intermediate_size", config.intermediate_size),
    ]


def r4b_config_checks(config: R4BConfig) -> list[ConfigCheck]:
    """Text checks (under ``language_model.model.``) plus what the vision and projector keys imply."""
    v = config.vision_config
    layer0 = "vision_tower.encoder.layers.0."
    return text_config_checks(config.text_config, "language_model.model.", "text_config") + [
        ("vision_tower.embeddings.patch_embedding.weight", 0, "vision_config.hidden_size", v.hidden_size),
        ("vision_tower.embeddings.patch_embedding.weight", 1, "vision_config.num_channels", v.num_channels),
        ("vision_tower.embeddings.patch_embedding.weight", 2, "vision_config.patch_size", v.patch_size),
        ("vision_tower.embeddings.position_embedding.weight", 0, "(vision_config.image_size // patch_size)^2",
         v.num_patches),
        (f"{layer0}mlp.fc1.weight", 0, "vision_config.intermediate_size", v.intermediate_size),
        ("multi_modal_projector.linear_1.weight", 0, "text_config.hidden_size", config.text_config.hidden_size),
        ("multi_modal_projector.linear_1.weight", 1, "vision_config.hidden_size x len(vision_feature_layer)",
         config.projector_input_size),
    ]


def check_config(
    checks: list[ConfigCheck], layer_counts: list[LayerCountRule], shapes: dict[str, tuple[int, ...]],
    hf_name: dict[str, str], infos: dict[str, TensorInfo], config_path: str,
) -> None:
    problems = []
    for name, dim, key, value in checks:
        if name in shapes and len(shapes[name]) > dim and shapes[name][dim] != value:
            hf = hf_name[name]
            problems.append(
                f"{key} = {value}, but tensor '{hf}' in {infos[hf].file.name} has shape {list(shapes[name])} "
                f"(dimension {dim} is {shapes[name][dim]})"
            )
    problems += layer_count_problems(layer_counts, shapes)
    if problems:
        raise ConfigMismatchError(f"{config_path} disagrees with the checkpoint's tensors: " + "; ".join(problems) + ".")


def layer_count_problems(layer_counts: list[LayerCountRule], names: Iterable[str]) -> list[str]:
    """For each (regex with the layer index as group 1, config key, count): a message when the layer indices
    in ``names`` are not exactly 0..count-1."""
    problems = []
    for pattern, key, value in layer_counts:
        found = {int(m.group(1)) for n in names if (m := re.match(pattern, n))}
        if found and found != set(range(value)):
            problems.append(f"{key} = {value}, but the checkpoint has layers {min(found)}..{max(found)} ({len(found)} layers)")
    return problems
