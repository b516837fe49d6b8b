"""The logit lens: what each decoder layer's residual stream would predict if the model stopped there.

For every chosen layer the residual after the block (``language_model.model.layers.{i}.hook_resid_post``
for R-4B, ``model.layers.{i}.hook_resid_post`` for a text-only decoder; before the final norm) at the
chosen positions goes through the model's own final RMSNorm and ``lm_head``; a softmax gives the
distribution, of which the top-k tokens are kept. At the last layer this is the model's real next-token
distribution. ``r4b lens`` prints it; ``logit_lens`` is the function.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from r4b_core.interp.indices import check_positions
from r4b_core.models.hooks import run_with_cache

RESID_POST_HOOK = "model.layers.{}.hook_resid_post"  # [B, T, C] before the final norm (relative to the decoder)


@dataclass
class LensResult:
    """Top-k next-token predictions per layer and position: ``token_ids`` / ``probs`` [L, P, k]
    (rows follow ``layers``, columns ``positions``, most likely first)."""

    layers: list[int]
    positions: list[int]
    token_ids: torch.Tensor
    probs: torch.Tensor
    input_ids: list[int]

    def as_dict(self, decode: Callable[[list[int]], str]) -> dict:
        """A JSON-ready dict: per position the input token there and, per layer, the top tokens."""
        out = []
        for j, position in enumerate(self.positions):
            rows = [{"layer": layer,
                     "top": [{"id": int(t), "text": decode([int(t)]), "prob": float(p)}
                             for t, p in zip(self.token_ids[i, j], self.probs[i, j])]}
                    for i, layer in enumerate(self.layers)]
            out.append({"position": position, "input_id": self.input_ids[position],
                        "input_text": decode([self.input_ids[position]]), "layers": rows})
        return {"positions": out}

    def table(self, decode: Callable[[list[int]], str]) -> str:
        """Plain-text table: one block per position, one line per layer, ``'text' (id) prob`` per entry."""
        lines = []
        width = len(str(max(self.layers))) if self.layers else 1
        for j, position in enumerate(self.positions):
            token = self.input_ids[position]
            lines.append(f"position {position} (input {decode([token])!r}, id {token}): next-token top "
                         f"{self.token_ids.shape[-1]} per layer")
            for i, layer in enumerate(self.layers):
                cells = [f"{decode([int(t)])!r} ({int(t)}) {float(p):.3f}"
                         for t, p in zip(self.token_ids[i, j], self.probs[i, j])]
                lines.append(f"  layer {layer:>{width}}  " + "   ".join(cells))
        return "\n".join(lines)


@torch.no_grad()
def logit_lens(
    model: torch.nn.Module,
    inputs: dict,
    positions: Sequence[int] | None = None,
    top_k: int = 5,
    layers: Sequence[int] | None = None,
) -> LensResult:
    """The logit lens over one sequence: ``inputs`` are the model's keyword arguments (``input_ids`` [1, T]
    and, for images, ``pixel_values`` / ``image_sizes`` / ``batch_num_images``). ``positions``: which
    positions (default the last; negative from the end); ``layers``: which decoder layers (default all;
    negative from the end), in the order given."""
    input_ids = inputs["input_ids"]
    if input_ids.ndim != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"the logit lens takes one sequence: input_ids [1, T]; got shape {tuple(input_ids.shape)}.")
    decoder = model.language_model if hasattr(model, "language_model") else model
    n_layers = decoder.config.num_hidden_layers
    if layers is None:
        layers = list(range(n_layers))
    bad = [i for i in layers if not -n_layers <= i < n_layers]
    if bad or not layers:
        raise ValueError(f"layers {list(layers)}: give indices of the decoder's {n_layers} layers (0..{n_layers - 1}, "
                         f"or -{n_layers}..-1 from the end).")
    layers = [i % n_layers for i in layers]
    vocab = decoder.config.vocab_size
    if not 1 <= top_k <= vocab:
        raise ValueError(f"top_k = {top_k} must be between 1 and the vocabulary size {vocab}.")
    chosen = check_positions(positions, input_ids.shape[1])
    prefix = "language_model." if decoder is not model else ""  # R-4B, or a text-only Qwen3ForCausalLM
    names = [prefix + RESID_POST_HOOK.format(i) for i in layers]
    _, cache = run_with_cache(model, names, **inputs, logits_to_keep=1)
    index = torch.tensor(chosen, device=input_ids.device)
    resid = torch.stack([cache[name][0, index] for name in names])  # [L, P, C]
    logits = decoder.lm_head(decoder.model.norm(resid)).float()  # [L, P, V]
    probs, ids = logits.softmax(-1).topk(top_k, dim=-1)
    return LensResult(layers=list(layers), positions=chosen, token_ids=ids.cpu(), probs=probs.cpu(),
                      input_ids=input_ids[0].tolist())


def lens_for_prompt(model: torch.nn.Module, processor, prompt: str, images: Sequence = (), *,
                    positions: Sequence[int] | None = None, top_k: int = 5, thinking_mode: str = "auto",
                    layers: Sequence[int] | None = None) -> LensResult:
    """``logit_lens`` on the chat prompt of one user turn: the images (each an ``<image>``) then ``prompt``,
    followed by the assistant's generation prompt (as ``r4b generate`` builds it)."""
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
    inputs = processor(messages=[{"role": "user", "content": content}], images=list(images) or None,
                       thinking_mode=thinking_mode)
    parameter = next(model.parameters())
    model_inputs = {"input_ids": inputs["input_ids"].to(parameter.device)}
    if "pixel_values" in inputs:
        model_inputs.update(pixel_values=inputs["pixel_values"].to(parameter.device, parameter.dtype),
                            image_sizes=inputs["image_sizes"], batch_num_images=inputs["batch_num_images"])
    return logit_lens(model, model_inputs, positions, top_k, layers)
