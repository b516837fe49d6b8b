"""Checks of user input, run once where input enters the model, never inside a submodule's forward.

The entry points call these before any compute: ``Qwen3ForCausalLM.forward`` (``check_decoder_inputs``), ``R4BForConditionalGeneration.forward`` / ``embed`` (``check_token_ids``,
``check_image_inputs``) and ``encode_images`` / ``get_image_features`` (``check_pixel_values``); the
generation loop checks its prompt with ``check_prompt_ids`` and the request lengths before it allocates a
cache. Every error names the value it refused and says what was expected.

None of them syncs with the device inside ``torch.compile``: the checks that read a tensor's values
(``check_token_ids``, image tokens without images) are skipped while compiling and on meta tensors; the
compiled decode step feeds back sampled tokens, which are in the vocabulary and embedded as text.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from r4b_core.config import R4BConfig

if TYPE_CHECKING:
    from r4b_core.models.cache_interface import AttentionCache


ViewCounter = Callable[[torch.Tensor, "torch.Tensor | None"], list[int]]


class ImageTokenMismatchError(ValueError):
    """The prompt's image tokens and the images' packed features differ in number."""


def _reads_values(t: torch.Tensor) -> bool:
    """Whether a check may read ``t``'s values here (not while compiling, not on meta tensors)."""
    return not torch.compiler.is_compiling() and t.device.type != "meta"


def check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """A ValueError naming the first id outside ``0 .. vocab_size - 1`` (or a non-integer dtype). Such an id
    would index past the embedding table: an IndexError on the CPU, a device-side assert that breaks the
    whole CUDA context on a GPU.

    It reads one flag back to the host, so it is skipped while torch.compile traces: the compiled decode
    step stays free of host syncs (its tokens come from sampling over the vocabulary, so they are in range)
    and the prompt is checked by the eager prefill before it. Meta tensors (shape-only runs) are skipped.
    """
    if not _reads_values(input_ids):
        return
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids should be integer token ids (int64); got dtype {input_ids.dtype}.")
    bad = (input_ids < 0) | (input_ids >= vocab_size)
    if bool(bad.any()):
        where = tuple(bad.nonzero()[0].tolist())
        raise ValueError(
            f"input_ids holds token id {int(input_ids[where])} at position {where}, outside the vocabulary of "
            f"{vocab_size} ids (0..{vocab_size - 1}); was it made by another tokenizer, or padded with -100?"
        )


def check_prompt_ids(input_ids: torch.Tensor) -> None:
    """A prompt for generation: a non-empty [B, T] tensor of integer ids."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or 0 in input_ids.shape:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids should be a non-empty [batch, tokens] tensor of token ids; got {shape}.")


def check_decoder_inputs(
    input_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    kv_cache: AttentionCache | None,
    vocab_size: int,
) -> None:
    """The decoder's inputs agree: one of ids [B, T] (in the vocabulary) / embeddings [B, T, C], a mask
    [B, T], the cache's batch size."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids [B, T] or inputs_embeds [B, T, C].")
    shape = tuple(input_ids.shape) if input_ids is not None else tuple(inputs_embeds.shape)
    if len(shape) != (2 if input_ids is not None else 3) or shape[1] == 0:
        what = "input_ids [B, T] of token ids" if input_ids is not None else "embeddings [B, T, C]"
        raise ValueError(f"expected a non-empty batch of {what}, got shape {shape}.")
    if input_ids is not None:
        check_token_ids(input_ids, vocab_size)
    batch, n_new = shape[:2]
    if kv_cache is not None and kv_cache.batch_size != batch:
        raise ValueError(f"kv_cache holds {kv_cache.batch_size} sequences but the input has batch size {batch}.")
    if attention_mask is not None and tuple(attention_mask.shape) != (batch, n_new):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected (batch, tokens) = "
                         f"{(batch, n_new)}.")


def check_pixel_values(config: R4BConfig, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None,
                       batch_num_images: torch.Tensor | None, count_views: ViewCounter) -> None:
    """pixel_values [N_images, max_views, C, tile, tile] floats holding every view the images need;
    ``count_views(image_sizes, batch_num_images)``: the views each image uses (the model's
    ``views_per_image``, anyres tiling)."""
    if image_sizes is None:
        raise ValueError("pixel_values needs image_sizes (the original (height, width) of each image).")
    vcfg = config.vision_config
    tile, channels = vcfg.image_size, vcfg.num_channels
    if (pixel_values.ndim != 5 or pixel_values.shape[0] != len(image_sizes)
            or tuple(pixel_values.shape[2:]) != (channels, tile, tile)):
        raise ValueError(
            f"pixel_values should be [N_images, max_views, {channels}, {tile}, {tile}] (N_images = "
            f"len(image_sizes) = {len(image_sizes)}; {channels} channels and {tile}x{tile} tiles from "
            f"vision_config) as the processor makes them; got shape {tuple(pixel_values.shape)}."
        )
    if not pixel_values.is_floating_point():
        raise ValueError(f"pixel_values should be a floating-point tensor (normalised pixels, as the processor "
                         f"makes them); got dtype {pixel_values.dtype}.")
    counts = count_views(image_sizes, batch_num_images)
    if max(counts) > pixel_values.shape[1]:
        raise ValueError(f"an image needs {max(counts)} views but pixel_values holds {pixel_values.shape[1]}.")


def check_image_inputs(config: R4BConfig, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
                       image_sizes: torch.Tensor | None, batch_num_images: torch.Tensor | None,
                       count_views: ViewCounter, decoding: bool) -> None:
    """Images and image tokens go together. ``decoding``: a one-token step through a cache, whose token was
    sampled and fed back; a sampled image-token id is then embedded as text, as transformers does."""
    if pixel_values is not None:
        check_pixel_values(config, pixel_values, image_sizes, batch_num_images, count_views)
        return
    if decoding or not _reads_values(input_ids):
        return
    n_tokens = int((input_ids == config.image_token_index).sum())
    if n_tokens:
        # image tokens with no images would run as text and give wrong logits silently
        raise ImageTokenMismatchError(
            f"the prompt has {n_tokens} image tokens (id {config.image_token_index}) but no pixel_values were "
            "given; pass the images (the processor's pixel_values and image_sizes), or remove the image tokens."
        )
