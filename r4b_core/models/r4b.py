"""R4BForConditionalGeneration: composition of the vision tower, the projector and the Qwen3 decoder.

    pixel_values [N_img, max_views, 3, H, W], image_sizes [N_img, 2] (original height, width)
      -> views actually used per image (1 + tiles; 1 for images of multi-image samples)
      -> vision_tower features at vision_feature_layer            [V, P, Dv]   (before post_layernorm)
      -> multi_modal_projector                                    [V, P, C]
      -> per image: anyres packing (base view, unpadded tile grid, image_newline per row)  [n_i, C]
    input_ids [B, T] -> embed_tokens -> masked_scatter of all packed features, in order, at the
    image-token positions -> Qwen3 decoder (KV cache passed in) -> lm_head -> logits

Only composition and the splice live here; the tiling math is in ``anyres.py``. Parameter names:
``vision_tower.*``, ``multi_modal_projector.*``, ``image_newline``, ``language_model.model.*``,
``language_model.lm_head.*`` (see r4b_weights/names.py for the checkpoint spellings).

Hook points added here (r4b_core/models/hooks.py; the tower's, projector's and decoder's are in their files):
``hook_image_features`` [N_image_tokens, C] (every image's packed features, concatenated in prompt
order) and ``hook_inputs_embeds`` [B, T, C] (the decoder's input after the splice).

``output_hidden_states`` / ``output_attentions`` return transformers 5's LLaVA-OneVision fields:
``hidden_states`` / ``attentions`` of the decoder and ``image_outputs`` (whenever images are given:
``pooler_output`` = the packed features per image; with the flags also the vision tower's
``last_hidden_state``, ``hidden_states`` and ``attentions``). ``image_hidden_states`` is transformers
4.x's name: the packed features of all images concatenated [N_image_tokens, C].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from r4b_core.config import R4BConfig
from r4b_core.models import anyres
from r4b_core.models.hooks import HookPoint
from r4b_core.models.cache_interface import AttentionCache
from r4b_core.models.input_checks import (ImageTokenMismatchError, check_decoder_inputs, check_image_inputs,
                                          check_pixel_values)
from r4b_core.models.pretrained import FromPretrained
from r4b_core.models.projector import MultiModalProjector
from r4b_core.models.qwen3 import CausalLMOutput, Qwen3ForCausalLM
from r4b_core.models.siglip import SiglipVisionTransformer

__all__ = ["ImageOutputs", "ImageTokenMismatchError", "R4BCausalLMOutput", "R4BForConditionalGeneration"]


@dataclass
class ImageOutputs:
    """transformers 5's ``image_outputs`` (a ``BaseModelOutputWithPooling``); None: not requested."""

    pooler_output: tuple[torch.Tensor, ...]  # per image: packed, projected features [n_i, C]
    last_hidden_state: torch.Tensor | None = None  # [V, P, Dv] the tower's last layer after post_layernorm
    hidden_states: tuple[torch.Tensor, ...] | None = None  # L_vision + 1 of [V, P, Dv]
    attentions: tuple[torch.Tensor, ...] | None = None  # L_vision of [V, H, P, P]


@dataclass
class R4BCausalLMOutput(CausalLMOutput):
    """Logits, loss, the decoder's hidden_states / attentions and, when images were given, image_outputs."""

    image_outputs: ImageOutputs | None = None

    @property
    def image_hidden_states(self) -> torch.Tensor | None:
        """transformers 4.x's field: all images' packed features concatenated, [N_image_tokens, C]."""
        return None if self.image_outputs is None else torch.cat(self.image_outputs.pooler_output)


class R4BForConditionalGeneration(FromPretrained, nn.Module):
    def __init__(self, config: R4BConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_tower = SiglipVisionTransformer(config.vision_config)
        self.multi_modal_projector = MultiModalProjector(config)
        self.hook_image_features = HookPoint()  # [N_image_tokens, C] packed features of all images
        self.hook_inputs_embeds = HookPoint()  # [B, T, C] embeddings with the image features spliced in
        self.image_newline = nn.Parameter(torch.zeros(config.text_config.hidden_size))
        self.language_model = Qwen3ForCausalLM(config.text_config)  # ties lm_head per text_config

    # ------------------------------------------------------------------------------------------
    # images

    def views_per_image(self, image_sizes: torch.Tensor, batch_num_images: torch.Tensor | None = None) -> list[int]:
        """Views each image uses: 1 + anyres tiles, or 1 for an image of a multi-image sample."""
        return anyres.views_per_image(self.config, image_sizes, batch_num_images)

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor,
        batch_num_images: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Packed, projected features per image: a list of [n_i, C] tensors (n_i = num_image_tokens)."""
        return list(self.encode_images(pixel_values, image_sizes, batch_num_images).pooler_output)

    def encode_images(
        self,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor,
        batch_num_images: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> ImageOutputs:
        """The vision tower, projector and packing: ``pooler_output`` holds each image's [n_i, C] features."""
        check_pixel_values(self.config, pixel_values, image_sizes, batch_num_images, self.views_per_image)
        return self._encode_images(pixel_values, image_sizes, batch_num_images, output_hidden_states,
                                   output_attentions)

    def _encode_images(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor,
                       batch_num_images: torch.Tensor | None, output_hidden_states: bool = False,
                       output_attentions: bool = False) -> ImageOutputs:
        """``encode_images`` on checked inputs."""
        cfg, vcfg = self.config, self.config.vision_config
        counts = self.views_per_image(image_sizes, batch_num_images)
        views = torch.cat([pv[:n] for pv, n in zip(pixel_values, counts)])  # [V, 3, H, W]
        tower = self.vision_tower(views, cfg.vision_feature_layer, output_hidden_states, output_attentions)
        feats = tower.features  # [V, P, Dv * n_layers]
        if cfg.vision_feature_select_strategy == "default":
            feats = feats[:, 1:]  # drop the first (CLS) position, as transformers does
        feats = self.multi_modal_projector(feats)  # [V, P, C]
        side = vcfg.image_size // vcfg.patch_size
        packed = []
        for image_views, (h, w) in zip(torch.split(feats, counts), image_sizes.tolist()):
            packed.append(anyres.pack_image_features(
                image_views, (int(h), int(w)), self.image_newline, cfg.image_grid_pinpoints, vcfg.image_size,
                side, cfg.vision_aspect_ratio,
            ))
        return ImageOutputs(pooler_output=tuple(packed), last_hidden_state=tower.last_hidden_state,
                            hidden_states=tower.hidden_states, attentions=tower.attentions)

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        batch_num_images: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings [B, T, C] with image features spliced in at the image-token positions."""
        check_decoder_inputs(input_ids, None, None, None, self.config.text_config.vocab_size)
        check_image_inputs(self.config, input_ids, pixel_values, image_sizes, batch_num_images, self.views_per_image,
                           decoding=False)
        return self._embed(input_ids, pixel_values, image_sizes, batch_num_images)[0]

    def _embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None,
        image_sizes: torch.Tensor | None,
        batch_num_images: torch.Tensor | None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, ImageOutputs | None]:
        """``embed`` on checked inputs, plus the image outputs (None without images)."""
        embeds = self.language_model.model.embed_tokens(input_ids)  # [B, T, C]
        if pixel_values is None:
            return self.hook_inputs_embeds(embeds), None
        images = self._encode_images(pixel_values, image_sizes, batch_num_images, output_hidden_states,
                                     output_attentions)
        features = self.hook_image_features(torch.cat(images.pooler_output))  # [N, C]
        is_image = input_ids == self.config.image_token_index  # [B, T]
        n_tokens = int(is_image.sum())
        if n_tokens != features.shape[0]:
            raise ImageTokenMismatchError(
                f"the prompt has {n_tokens} image tokens (id {self.config.image_token_index}) but the images give "
                f"{features.shape[0]} features; expand each <image> to num_image_tokens(...) tokens "
                "(the processor does this)."
            )
        return self.hook_inputs_embeds(embeds.masked_scatter(is_image[..., None], features.to(embeds.dtype))), images

    # ------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kv_cache: AttentionCache | None = None,
        labels: torch.Tensor | None = None,
        batch_num_images: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> R4BCausalLMOutput:
        """Logits [B, T, V] (and the shifted next-token loss when ``labels`` is given, -100 ignored).

        ``output_hidden_states`` / ``output_attentions``: transformers' fields, for the decoder and (in
        ``image_outputs``) the vision tower; see the module docstring. Inputs are checked here, once."""
        check_decoder_inputs(input_ids, None, attention_mask, kv_cache, self.config.text_config.vocab_size)
        check_image_inputs(self.config, input_ids, pixel_values, image_sizes, batch_num_images, self.views_per_image,
                           decoding=kv_cache is not None and input_ids.shape[1] == 1)  # a sampled token fed back
        embeds, images = self._embed(input_ids, pixel_values, image_sizes, batch_num_images, output_hidden_states,
                                     output_attentions)
        out = self.language_model(
            inputs_embeds=embeds, position_ids=position_ids, attention_mask=attention_mask, kv_cache=kv_cache,
            labels=labels, logits_to_keep=logits_to_keep, output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )
        return R4BCausalLMOutput(logits=out.logits, loss=out.loss, hidden_states=out.hidden_states,
                                 attentions=out.attentions, image_outputs=images)

    @classmethod
    def _config_from_hf(cls, raw: dict, source: str) -> R4BConfig:
        return R4BConfig.from_hf_dict(raw, source=source)
