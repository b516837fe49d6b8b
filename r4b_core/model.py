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
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from r4b_core import anyres
from r4b_core.config import R4BConfig
from r4b_core.kv_cache import KVCache
from r4b_core.projector import MultiModalProjector
from r4b_core.qwen3 import CausalLMOutput, Qwen3ForCausalLM
from r4b_core.siglip import SiglipVisionTransformer


class ImageTokenMismatchError(ValueError):
    """The prompt's image tokens and the images' packed features differ in number."""


class R4BForConditionalGeneration(nn.Module):
    def __init__(self, config: R4BConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_tower = SiglipVisionTransformer(config.vision_config)
        self.multi_modal_projector = MultiModalProjector(config)
        self.image_newline = nn.Parameter(torch.zeros(config.text_config.hidden_size))
        self.language_model = Qwen3ForCausalLM(config.text_config)  # ties lm_head per text_config

    # ------------------------------------------------------------------------------------------
    # images

    def views_per_image(self, image_sizes: torch.Tensor, batch_num_images: torch.Tensor | None = None) -> list[int]:
        """Views each image uses: 1 + anyres tiles, or 1 for an image of a multi-image sample."""
        cfg = self.config
        tiled = [True] * len(image_sizes) if batch_num_images is None else [
            int(n) == 1 for n in batch_num_images.tolist() for _ in range(int(n))
        ]
        if len(tiled) != len(image_sizes):
            raise ValueError(
                f"batch_num_images sums to {len(tiled)} images but image_sizes has {len(image_sizes)} rows."
            )
        return [
            anyres.num_views((int(h), int(w)), cfg.image_grid_pinpoints, cfg.vision_config.image_size) if t else 1
            for (h, w), t in zip(image_sizes.tolist(), tiled)
        ]

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor,
        batch_num_images: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Packed, projected features per image: a list of [n_i, C] tensors (n_i = num_image_tokens)."""
        cfg, vcfg = self.config, self.config.vision_config
        if pixel_values.ndim != 5 or pixel_values.shape[0] != len(image_sizes):
            raise ValueError(
                f"pixel_values should be [N_images, max_views, 3, H, W] with N_images = len(image_sizes) = "
                f"{len(image_sizes)}; got shape {tuple(pixel_values.shape)}."
            )
        counts = self.views_per_image(image_sizes, batch_num_images)
        if max(counts) > pixel_values.shape[1]:
            raise ValueError(f"an image needs {max(counts)} views but pixel_values holds {pixel_values.shape[1]}.")
        views = torch.cat([pv[:n] for pv, n in zip(pixel_values, counts)])  # [V, 3, H, W]
        feats = self.vision_tower(views, cfg.vision_feature_layer)  # [V, P, Dv * n_layers]
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
        return packed

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        batch_num_images: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings [B, T, C] with image features spliced in at the image-token positions."""
        embeds = self.language_model.model.embed_tokens(input_ids)
        if pixel_values is None:
            return embeds
        if image_sizes is None:
            raise ValueError("pixel_values needs image_sizes (the original (height, width) of each image).")
        features = torch.cat(self.get_image_features(pixel_values, image_sizes, batch_num_images))  # [N, C]
        is_image = input_ids == self.config.image_token_index  # [B, T]
        n_tokens = int(is_image.sum())
        if n_tokens != features.shape[0]:
            raise ImageTokenMismatchError(
                f"the prompt has {n_tokens} image tokens (id {self.config.image_token_index}) but the images give "
                f"{features.shape[0]} features; expand each <image> to num_image_tokens(...) tokens "
                "(the processor does this)."
            )
        return embeds.masked_scatter(is_image[..., None], features.to(embeds.dtype))

    # ------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        labels: torch.Tensor | None = None,
        batch_num_images: torch.Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> CausalLMOutput:
        """Logits [B, T, V] (and the shifted next-token loss when ``labels`` is given, -100 ignored)."""
        embeds = self.embed(input_ids, pixel_values, image_sizes, batch_num_images)
        return self.language_model(
            inputs_embeds=embeds, position_ids=position_ids, attention_mask=attention_mask, kv_cache=kv_cache,
            labels=labels, logits_to_keep=logits_to_keep,
        )

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo: str | Path,
        dtype: torch.dtype | str = torch.float32,
        device: torch.device | str = "cpu",
        revision: str | None = None,
        progress: bool = False,
    ) -> "R4BForConditionalGeneration":
        """Load an R-4B checkpoint (local directory or hub id) strictly; see r4b_weights.loader."""
        from r4b_weights import load_r4b_model  # weights I/O depends on this module, not the reverse

        return load_r4b_model(path_or_repo, dtype=dtype, device=device, revision=revision, progress=progress)
