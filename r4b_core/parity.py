"""The transformers reference for R-4B, built independently of r4b's model and loader code.

R-4B's own modelling code is remote code that is not public, so the reference is transformers'
in-library ``LlavaOnevisionForConditionalGeneration`` (Qwen3 text config, SigLIP vision config) with
R-4B's projector grafted on (``pre_norm`` LayerNorm in front of ``linear_1``). Its weights are read
with plain ``safetensors.torch.load_file`` from the same checkpoint directory and matched to the
reference's own parameter names; only the ``vision_model.`` nesting of the vision tower is
adapted, since transformers versions disagree on it.

Divergence handled here: stock transformers parses ``vision_aspect_ratio`` with
``int(s.strip("anyres_max_"))`` and crashes on plain ``"anyres"`` (no downscale). The reference is
given ``"anyres_max_<huge>"`` instead, which never downscales: the same semantics.

Requires transformers (the ``parity`` extra).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from r4b_core.config import R4BConfig
from r4b_core.projector import PRE_NORM_EPS, projector_input_size

NO_DOWNSCALE_ASPECT_RATIO = "anyres_max_1000000000"


class GraftedR4BProjector(nn.Module):
    """R-4B's projector in transformers terms: pre_norm -> linear_1 -> GELU(erf) -> linear_2."""

    def __init__(self, config: R4BConfig) -> None:
        super().__init__()
        d_in, d_out = projector_input_size(config), config.text_config.hidden_size
        self.pre_norm = nn.LayerNorm(d_in, eps=PRE_NORM_EPS)
        self.linear_1 = nn.Linear(d_in, d_out, bias=config.multimodal_projector_bias)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(d_out, d_out, bias=config.multimodal_projector_bias)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(self.pre_norm(image_features))))


def reference_config(config: R4BConfig):
    """A transformers ``LlavaOnevisionConfig`` equivalent to ``config``."""
    import transformers

    text = config.text_config.to_hf_dict()
    text["model_type"] = "qwen3"
    vision = config.vision_config.to_hf_dict()
    vision["model_type"] = "siglip_vision_model"
    vision["vision_use_head"] = False
    ratio = config.vision_aspect_ratio
    return transformers.LlavaOnevisionConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=config.image_token_index,
        image_grid_pinpoints=config.image_grid_pinpoints,
        vision_aspect_ratio=NO_DOWNSCALE_ASPECT_RATIO if ratio == "anyres" else ratio,
        vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        projector_hidden_act=config.projector_hidden_act,
        multimodal_projector_bias=config.multimodal_projector_bias,
        # transformers 4.5x ties from text_config; 5.x from the top level: give both the text value
        tie_word_embeddings=config.tie_lm_head,
        attn_implementation="sdpa",
    )


def _read_checkpoint_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        tensors.update(load_file(str(directory / name)))
    return tensors


def _checkpoint_name(ref_name: str, available: dict[str, torch.Tensor]) -> str | None:
    """The checkpoint spelling of a reference parameter name (vision_model nesting may differ)."""
    candidates = [ref_name]
    tower = "model.vision_tower."
    if ref_name.startswith(tower):
        rest = ref_name[len(tower):]
        candidates += [tower + "vision_model." + rest, tower + rest.removeprefix("vision_model.")]
    return next((c for c in candidates if c in available), None)


def build_reference_model(
    checkpoint_dir: str | Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False
) -> nn.Module:
    """transformers' LLaVA-OneVision with R-4B's projector, loaded from ``checkpoint_dir``'s safetensors.

    With ``trust_remote_code`` the checkpoint's own modelling code is used instead (it runs code
    shipped with the checkpoint: only for checkpoints you trust).
    """
    import transformers

    directory = Path(checkpoint_dir)
    if trust_remote_code:
        model = transformers.AutoModel.from_pretrained(str(directory), trust_remote_code=True, dtype=dtype)
        return model.eval()
    config = R4BConfig.from_hf_dict(json.loads((directory / "config.json").read_text()), str(directory / "config.json"))
    return reference_from_tensors(config, _read_checkpoint_tensors(directory), dtype, source=str(directory))


def reference_from_tensors(
    config: R4BConfig, tensors: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu", source: str = "the given tensors",
) -> nn.Module:
    """The reference built from ``config`` and checkpoint-named tensors (R-4B spelling)."""
    import transformers

    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build directly in the target dtype and place: no full-size fp32 copy
    try:
        with torch.device(device):
            ref = transformers.LlavaOnevisionForConditionalGeneration(reference_config(config))
            ref.model.multi_modal_projector = GraftedR4BProjector(config)
    finally:
        torch.set_default_dtype(default_dtype)
    state, used = {}, set()
    tied = config.tie_lm_head
    for name in ref.state_dict():
        hf = _checkpoint_name(name, tensors)
        if hf is None and name == "lm_head.weight" and tied:
            hf = _checkpoint_name("model.language_model.embed_tokens.weight", tensors)
        if hf is None:
            raise KeyError(f"reference parameter {name!r} has no tensor in {source}")
        state[name] = tensors[hf].to(device=device, dtype=dtype)
        used.add(hf)
    unused = [n for n in tensors if n not in used and ".head." not in n]
    if unused:
        raise KeyError(f"tensors in {source} the reference does not use: {unused[:8]}")
    ref.load_state_dict(state, strict=True)
    if tied:
        ref.tie_weights()
    return ref.eval()


# ---------------------------------------------------------------------------------------------
# stage-by-stage comparison (the `r4b parity` command)


def reference_image_processor(checkpoint_dir: str | Path):
    """transformers' PIL-based LLaVA-OneVision image processor, configured from preprocessor_config.json."""
    try:  # transformers 5.x names the PIL backend explicitly
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil as ImageProcessor,
        )
    except ImportError:  # 4.x: the slow class is the PIL one
        from transformers import LlavaOnevisionImageProcessor as ImageProcessor
    return ImageProcessor.from_pretrained(str(checkpoint_dir))


@dataclass
class Stage:
    name: str
    max_abs_diff: float
    tolerance: float
    skipped: str | None = None  # why the reference could not give this stage (remote code only)

    @property
    def passed(self) -> bool:
        return self.skipped is not None or self.max_abs_diff <= self.tolerance  # NaN never passes

    def as_dict(self) -> dict:
        d = {"name": self.name, "max_abs_diff": self.max_abs_diff, "tolerance": self.tolerance, "passed": self.passed}
        if self.skipped:
            d["skipped"] = self.skipped
        return d


@dataclass
class ParityReport:
    checkpoint: str
    dtype: str
    stages: list[Stage]

    @property
    def passed(self) -> bool:
        return all(s.passed for s in self.stages)

    @property
    def first_divergence(self) -> str | None:
        return next((s.name for s in self.stages if not s.passed), None)

    @property
    def logits_max_abs_diff(self) -> float:
        return next(s.max_abs_diff for s in self.stages if s.name == "logits")

    def as_dict(self) -> dict:
        return {"passed": self.passed, "checkpoint": self.checkpoint, "dtype": self.dtype,
                "first_divergence": self.first_divergence, "logits_max_abs_diff": self.logits_max_abs_diff,
                "stages": [s.as_dict() for s in self.stages]}

    def table(self) -> str:
        lines = [f"{'stage':<28} {'max abs diff':>14} {'tolerance':>11}  result"]
        for s in self.stages:
            if s.skipped:
                value = "n/a" if s.max_abs_diff != s.max_abs_diff else f"{s.max_abs_diff:.3e}"  # NaN: n/a
                lines.append(f"{s.name:<28} {value:>14} {s.tolerance:>11.1e}  skipped: {s.skipped}")
                continue
            lines.append(f"{s.name:<28} {s.max_abs_diff:>14.3e} {s.tolerance:>11.1e}  {'ok' if s.passed else 'FAIL'}")
        verdict = "PASSED: every stage within tolerance" if self.passed else (
            f"FAILED: first divergence at '{self.first_divergence}'")
        return "\n".join(lines + [verdict])


# Tolerances per compute dtype: (activations, logits). Pixel values and greedy tokens must be exact.
TOLERANCES = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (5e-2, 2.5e-1), torch.float16: (1e-2, 5e-2)}


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


def _layer_outputs(layers: nn.ModuleList) -> tuple[list[torch.Tensor], list]:
    """Forward hooks that record each decoder layer's output hidden state."""
    outputs: list[torch.Tensor] = []

    def hook(module, args, output):
        outputs.append((output[0] if isinstance(output, tuple) else output).detach())

    return outputs, [layer.register_forward_hook(hook) for layer in layers]


@torch.no_grad()
def run_parity(
    checkpoint_dir: str | Path,
    image=None,
    prompt: str = "Describe this image.",
    dtype: torch.dtype = torch.float32,
    ours: nn.Module | None = None,
    greedy_tokens: int = 16,
    trust_remote_code: bool = False,
) -> ParityReport:
    """Compare r4b with the transformers reference on one image prompt, stage by stage.

    Stages: pixel values (ours vs transformers' image processor), vision features, projected features,
    packed features, the spliced input embeddings, every decoder layer's output, logits, greedy tokens.
    Both models get the same pixel values and ids, so each stage isolates its own computation as far as
    the models allow. ``ours`` may be passed in (e.g. a deliberately perturbed model).

    With ``trust_remote_code`` the reference is the checkpoint's own modelling code; intermediate
    stages it does not expose under LLaVA-OneVision's module names are reported as skipped, while
    logits and greedy tokens are always compared.
    """
    from r4b_core.generate import generate
    from r4b_core.model import R4BForConditionalGeneration
    from r4b_core.processor import R4BProcessor

    directory = Path(checkpoint_dir)
    act_tol, logit_tol = TOLERANCES[dtype]
    ours = ours if ours is not None else R4BForConditionalGeneration.from_pretrained(directory, dtype=dtype)
    ref = build_reference_model(directory, dtype=dtype, trust_remote_code=trust_remote_code)
    processor = R4BProcessor.from_pretrained(directory)
    image = image if image is not None else default_picture()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    inputs = processor(messages=messages, images=[image])
    ids, sizes = inputs["input_ids"], inputs["image_sizes"]
    pixels = inputs["pixel_values"]
    stages = []

    theirs = reference_image_processor(directory)(images=[image], return_tensors="pt")["pixel_values"]
    stages.append(Stage("pixel_values", _max_diff(pixels, theirs), 0.0))

    pixels = pixels.to(dtype)
    try:
        stages += _vision_stages(ours, ref, pixels, sizes, act_tol)
    except (AttributeError, TypeError) as e:
        if not trust_remote_code:
            raise
        stages += [Stage(n, float("nan"), act_tol, skipped=f"remote code: {e}")
                   for n in ("vision_features", "projected_features", "packed_features")]

    ours_decoder = ours.language_model.model.layers
    ref_decoder = getattr(getattr(getattr(ref, "model", None), "language_model", None), "layers", None)
    embeds: list[torch.Tensor] = []

    def record_input(module, args, kwargs):
        embeds.append((args[0] if args else kwargs["hidden_states"]).detach())

    ours_layers, hooks = _layer_outputs(ours_decoder)
    hooks.append(ours_decoder[0].register_forward_pre_hook(record_input, with_kwargs=True))
    ref_layers: list[torch.Tensor] = []
    if ref_decoder is not None:
        ref_layers, ref_hooks = _layer_outputs(ref_decoder)
        hooks += ref_hooks + [ref_decoder[0].register_forward_pre_hook(record_input, with_kwargs=True)]
    try:
        ours_logits = ours(ids, pixel_values=pixels, image_sizes=sizes).logits
        ref_logits = ref(input_ids=ids, pixel_values=pixels, image_sizes=sizes).logits
    finally:
        for h in hooks:
            h.remove()
    if ref_decoder is None:
        why = "remote code: no model.language_model.layers"
        stages.append(Stage("input_embeddings", float("nan"), act_tol, skipped=why))
        stages += [Stage(f"decoder_layer_{i}", float("nan"), act_tol, skipped=why) for i in range(len(ours_layers))]
    else:
        stages.append(Stage("input_embeddings", _max_diff(embeds[0], embeds[1]), act_tol))
        for i, (a, b) in enumerate(zip(ours_layers, ref_layers)):
            stages.append(Stage(f"decoder_layer_{i}", _max_diff(a, b), act_tol * (1 + i)))
    stages.append(Stage("logits", _max_diff(ours_logits, ref_logits), logit_tol))

    eos = processor.eos_token_ids
    ours_tokens = generate(ours, ids, max_new_tokens=greedy_tokens, eos_token_ids=eos,
                           pixel_values=pixels, image_sizes=sizes).tokens[0]
    ref_out = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels, image_sizes=sizes,
                           do_sample=False, max_new_tokens=greedy_tokens, eos_token_id=eos or None,
                           pad_token_id=processor.pad_token_id)
    ref_tokens = ref_out[0, ids.shape[1]:].tolist()
    mismatches = sum(a != b for a, b in zip(ours_tokens, ref_tokens)) + abs(len(ours_tokens) - len(ref_tokens))
    # In 16-bit, rounding differences of either side's kernels flip near-tied argmaxes and the two
    # continuations then part ways: the count is shown but only float32 asks for equality.
    skipped = None if dtype == torch.float32 else "informational in 16-bit; compare tokens in float32"
    stages.append(Stage("greedy_tokens", float(mismatches), 0.0, skipped=skipped))
    return ParityReport(str(directory), str(dtype).removeprefix("torch."), stages)


def _vision_stages(ours: nn.Module, ref: nn.Module, pixels: torch.Tensor, sizes: torch.Tensor,
                   tol: float) -> list[Stage]:
    """Vision features, projected features and packed features, each from identical inputs."""
    cfg = ours.config
    views = pixels[0, : ours.views_per_image(sizes)[0]]
    ours_feats = ours.vision_tower(views, cfg.vision_feature_layer)
    ref_tower = ref.model.vision_tower(views, output_hidden_states=True)
    layers = cfg.vision_feature_layer if isinstance(cfg.vision_feature_layer, list) else [cfg.vision_feature_layer]
    ref_feats = torch.cat([ref_tower.hidden_states[i] for i in layers], dim=-1)
    ours_packed = ours.get_image_features(pixels, sizes)[0]
    ref_packed = ref.model.get_image_features(pixels, sizes).pooler_output[0]
    return [
        Stage("vision_features", _max_diff(ours_feats, ref_feats), tol),
        Stage("projected_features", _max_diff(ours.multi_modal_projector(ours_feats),
                                             ref.model.multi_modal_projector(ref_feats)), tol),
        Stage("packed_features", _max_diff(ours_packed, ref_packed), tol),
    ]


def default_picture():
    """A deterministic 640x480 test picture: noise with a few solid shapes."""
    import numpy as np
    from PIL import Image, ImageDraw

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8))
    draw = ImageDraw.Draw(img)
    draw.ellipse([80, 60, 300, 260], fill=(220, 30, 30))
    draw.rectangle([340, 200, 600, 440], fill=(30, 160, 60))
    return img
