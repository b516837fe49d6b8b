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
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from r4b_core.config import R4BConfig
from r4b_core.models.projector import PRE_NORM_EPS, projector_input_size
from r4b_core.reference.parity_report import TOLERANCES, ParityReport, Stage

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
    checkpoint_dir: str | Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """transformers' LLaVA-OneVision with R-4B's projector, loaded from ``checkpoint_dir``'s safetensors.

    With ``trust_remote_code`` the checkpoint's own modelling code is used instead (it runs code
    shipped with the checkpoint: only for checkpoints you trust).
    """
    import transformers

    directory = Path(checkpoint_dir)
    if trust_remote_code:
        model = transformers.AutoModel.from_pretrained(str(directory), trust_remote_code=True, dtype=dtype)
        return model.to(device).eval()
    config = R4BConfig.from_hf_dict(json.loads((directory / "config.json").read_text()), str(directory / "config.json"))
    return reference_from_tensors(config, _read_checkpoint_tensors(directory), dtype, device, source=str(directory))


def load_reference_pretrained(checkpoint_dir: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The same reference as ``build_reference_model``, loaded by transformers' own ``from_pretrained`` (its
    fast path: no random init, lazy safetensors reads), then R-4B's projector grafted on. ``r4b bench``
    times this against r4b's loader."""
    import transformers
    from safetensors import safe_open

    directory = Path(checkpoint_dir)
    config = R4BConfig.from_hf_dict(json.loads((directory / "config.json").read_text()), str(directory / "config.json"))
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # its load report lists pre_norm as unexpected: grafted below
    try:
        ref = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(
            str(directory), config=reference_config(config), dtype=dtype)
    finally:
        transformers.logging.set_verbosity(verbosity)
    projector = GraftedR4BProjector(config).to(dtype)
    prefix = "model.multi_modal_projector."
    state = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            state.update({k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)})
    projector.load_state_dict(state, strict=True)
    ref.model.multi_modal_projector = projector
    return ref.eval()


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
            raise ValueError(f"reference parameter {name!r} has no tensor in {source}; the reference needs every "
                             "tensor of R-4B's layout (list them with: r4b inspect CHECKPOINT).")
        state[name] = tensors[hf].to(device=device, dtype=dtype)
        used.add(hf)
    unused = [n for n in tensors if n not in used and ".head." not in n]
    if unused:
        raise ValueError(f"tensors in {source} the reference does not use: {unused[:8]}; is this an R-4B "
                         "checkpoint (see: r4b inspect CHECKPOINT)?")
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


def _submodule(model: nn.Module, path: str) -> nn.Module | None:
    """``model.<path>`` (dotted), or None where a remote-code reference names its parts differently."""
    for name in path.split("."):
        model = getattr(model, name, None)
        if model is None:
            return None
    return model


@dataclass
class ForwardTrace:
    """What one forward of a model with an image prompt recorded: every activation a stage compares.

    The vision features are what the projector receives (the vision tower's output at
    ``vision_feature_layer``, after the feature-select strategy); the packed features are read from the
    input embeddings at the image-token positions, where the splice put them. None: not exposed.
    """

    vision_features: torch.Tensor | None = None  # [V, P, Dv * n_feature_layers]
    projected_features: torch.Tensor | None = None  # [V, P, C]
    input_embeddings: torch.Tensor | None = None  # [B, T, C], the first decoder layer's input
    layer_outputs: list[torch.Tensor] = field(default_factory=list)  # each [B, T, C]
    logits: torch.Tensor | None = None  # [B, T, V]

    def packed_features(self, input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor | None:
        if self.input_embeddings is None:
            return None
        return self.input_embeddings[input_ids == image_token_id]  # [N_image_tokens, C]


def traced_forward(model: nn.Module, projector: nn.Module | None, decoder_layers: nn.ModuleList | None,
                   **inputs) -> ForwardTrace:
    """One ``model(**inputs)`` (the vision tower runs once) with hooks recording a ``ForwardTrace``."""
    trace = ForwardTrace()

    def record_projector(module, args, output):
        if trace.vision_features is None:  # one image prompt: the projector runs once
            trace.vision_features, trace.projected_features = args[0].detach(), output.detach()

    def record_input(module, args, kwargs):
        trace.input_embeddings = (args[0] if args else kwargs["hidden_states"]).detach()

    def record_output(module, args, output):
        trace.layer_outputs.append((output[0] if isinstance(output, tuple) else output).detach())

    hooks = []
    if projector is not None:
        hooks.append(projector.register_forward_hook(record_projector))
    if decoder_layers is not None:
        hooks.append(decoder_layers[0].register_forward_pre_hook(record_input, with_kwargs=True))
        hooks += [layer.register_forward_hook(record_output) for layer in decoder_layers]
    try:
        trace.logits = model(**inputs).logits
    finally:
        for h in hooks:
            h.remove()
    return trace


class _PromptEmbeddingsFirst(nn.Module):
    """An r4b model whose first forward (the prefill) reads given input embeddings [B, T, C] instead
    of embedding ids and images, so greedy decoding reuses the traced forward's vision work."""

    def __init__(self, model: nn.Module, inputs_embeds: torch.Tensor) -> None:
        super().__init__()
        self.model, self.config = model, model.config
        self.pending: torch.Tensor | None = inputs_embeds

    def forward(self, input_ids: torch.Tensor, **kwargs):
        if self.pending is None:
            return self.model(input_ids, **kwargs)
        embeds, self.pending = self.pending, None
        return self.model.language_model(inputs_embeds=embeds, **kwargs)


@torch.no_grad()
def run_parity(
    checkpoint_dir: str | Path,
    image=None,
    prompt: str = "Describe this image.",
    dtype: torch.dtype = torch.float32,
    ours: nn.Module | None = None,
    greedy_tokens: int = 16,
    trust_remote_code: bool = False,
    device: torch.device | str = "cpu",
    max_image_pixels: int | None = None,
) -> ParityReport:
    """Compare r4b with the transformers reference on one image prompt, stage by stage.

    Stages: pixel values (ours vs transformers' image processor), vision features, projected features,
    packed features, the spliced input embeddings, every decoder layer's output, logits, greedy tokens.
    Both models get the same pixel values and ids. Each side runs its vision tower once: one traced
    forward gives every stage up to the logits, and greedy decoding starts from that forward's input
    embeddings. ``ours`` may be passed in (e.g. a deliberately perturbed model; it stays where it is,
    otherwise both models are built on ``device``). Each stage counts the NaN / Inf values on both sides:
    a checkpoint holding a non-finite tensor gives the whole table with the stage where they first appear
    as the first divergence (greedy decoding is then not run: it would stop at the first token).

    With ``trust_remote_code`` the reference is the checkpoint's own modelling code; intermediate
    stages it does not expose under LLaVA-OneVision's module names are reported as skipped, while
    logits and greedy tokens are always compared (a reference without LLaVA-OneVision's decoder layers
    decodes from ids and pixels, running its vision tower a second time). ``max_image_pixels``: the
    processor's image size limit (None: its default, PIL's).
    """
    from r4b_core.models.r4b import R4BForConditionalGeneration
    from r4b_core.processing.processor import R4BProcessor
    from r4b_core.reference.synthetic import synthetic_picture

    directory = Path(checkpoint_dir)
    if ours is None:
        ours = R4BForConditionalGeneration.from_pretrained(directory, dtype=dtype, device=device)
    device = next(ours.parameters()).device
    ref = build_reference_model(directory, dtype=dtype, trust_remote_code=trust_remote_code, device=device)
    processor = R4BProcessor.from_pretrained(directory)
    if max_image_pixels is not None:
        processor.max_image_pixels = max_image_pixels
    image = image if image is not None else synthetic_picture(640, 480, seed=0)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    inputs = processor(messages=messages, images=[image])
    ids, sizes, pixels = inputs["input_ids"], inputs["image_sizes"], inputs["pixel_values"]
    theirs = reference_image_processor(directory)(images=[image], return_tensors="pt")["pixel_values"]
    stages = [Stage.compared("pixel_values", pixels, theirs, 0.0)]

    ids, pixels = ids.to(device), pixels.to(device, dtype)
    ours_trace = traced_forward(ours, ours.multi_modal_projector, ours.language_model.model.layers,
                                input_ids=ids, pixel_values=pixels, image_sizes=sizes)
    ref_trace = traced_forward(ref, _submodule(ref, "model.multi_modal_projector"),
                               _submodule(ref, "model.language_model.layers"),
                               input_ids=ids, pixel_values=pixels, image_sizes=sizes)
    stages += activation_stages(ours_trace, ref_trace, ids, ours.config.image_token_index, TOLERANCES[dtype],
                                trust_remote_code)
    stages.append(greedy_stage(ours, ref, ours_trace, ref_trace, ids, pixels, sizes, processor, greedy_tokens,
                               dtype))
    return ParityReport(str(directory), str(dtype).removeprefix("torch."), stages)


def activation_stages(ours: ForwardTrace, ref: ForwardTrace, ids: torch.Tensor, image_token: int,
                      tolerances: tuple[float, float], trust_remote_code: bool) -> list[Stage]:
    """The stages from the vision features to the logits, from the two traced forwards."""
    act_tol, logit_tol = tolerances

    def compare(name: str, a: torch.Tensor | None, b: torch.Tensor | None, tol: float, missing: str) -> Stage:
        if b is None:
            if not trust_remote_code:
                import transformers

                raise ValueError(f"the transformers reference has no {missing}: transformers "
                                 f"{transformers.__version__} names its modules differently from what parity.py "
                                 "expects.")
            return Stage(name, float("nan"), tol, skipped=f"remote code: no {missing}")
        return Stage.compared(name, a, b, tol)

    no_projector, no_layers = "model.multi_modal_projector", "model.language_model.layers"
    stages = [
        compare("vision_features", ours.vision_features, ref.vision_features, act_tol, no_projector),
        compare("projected_features", ours.projected_features, ref.projected_features, act_tol, no_projector),
        compare("packed_features", ours.packed_features(ids, image_token), ref.packed_features(ids, image_token),
                act_tol, no_layers),
        compare("input_embeddings", ours.input_embeddings, ref.input_embeddings, act_tol, no_layers),
    ]
    for i, a in enumerate(ours.layer_outputs):
        b = ref.layer_outputs[i] if i < len(ref.layer_outputs) else None
        stages.append(compare(f"decoder_layer_{i}", a, b, act_tol * (1 + i), no_layers))
    stages.append(Stage.compared("logits", ours.logits, ref.logits, logit_tol))
    return stages


def greedy_stage(ours: nn.Module, ref: nn.Module, ours_trace: ForwardTrace, ref_trace: ForwardTrace,
                 ids: torch.Tensor, pixels: torch.Tensor, sizes, processor, greedy_tokens: int,
                 dtype: torch.dtype) -> Stage:
    """Greedy continuations of both models from the traced prompt; the stage counts differing tokens."""
    from r4b_core.generation.generate import generate

    last_logits = [t.logits[:, -1] for t in (ours_trace, ref_trace) if t.logits is not None]
    if any(not torch.isfinite(t).all() for t in last_logits):
        return Stage("greedy_tokens", float("nan"), 0.0, note="not run: the prompt's last logits hold NaN or Inf")
    eos = processor.eos_token_ids
    ours_tokens = generate(_PromptEmbeddingsFirst(ours, ours_trace.input_embeddings), ids,
                           max_new_tokens=greedy_tokens, eos_token_ids=eos).tokens[0]
    prompt_inputs = ({"inputs_embeds": ref_trace.input_embeddings} if ref_trace.input_embeddings is not None
                     else {"pixel_values": pixels, "image_sizes": sizes})
    ref_out = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **prompt_inputs, do_sample=False,
                           max_new_tokens=greedy_tokens, eos_token_id=eos or None, pad_token_id=processor.pad_token_id)
    ref_tokens = ref_out[0, ids.shape[1]:].tolist()
    mismatches = sum(a != b for a, b in zip(ours_tokens, ref_tokens)) + abs(len(ours_tokens) - len(ref_tokens))
    # In 16-bit, rounding differences of either side's kernels flip near-tied argmaxes and the two
    # continuations then part ways: the count is shown but only float32 asks for equality.
    skipped = None if dtype == torch.float32 else "informational in 16-bit; compare tokens in float32"
    return Stage("greedy_tokens", float(mismatches), 0.0, skipped=skipped)
