"""One ``from_pretrained`` for the model classes: checkpoint -> config -> layer-count check -> meta build ->
weights (r4b_weights.loader does the reading; see there for what is checked and how names map)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TypeVar

import torch

M = TypeVar("M", bound="FromPretrained")


class FromPretrained:
    """Mixin for an ``nn.Module`` built from a config: a class sets how it reads its config
    (``_config_from_hf``); r4b_weights.loader.load_weights fills its weights by what that config is."""

    @classmethod
    def _config_from_hf(cls, raw: dict, source: str):  # -> the class's config dataclass
        raise NotImplementedError

    @classmethod
    def from_pretrained(
        cls: type[M],
        path_or_repo: str | Path,
        dtype: torch.dtype | str = torch.float32,
        device: torch.device | str = "cpu",
        revision: str | None = None,
        progress: bool = False,
        check_finite: bool = False,
    ) -> M:
        """Load a checkpoint (local directory or hub id) strictly; see r4b_weights.loader.

        dtype: a torch dtype, 'float32' / 'bfloat16' / 'float16', or 'auto' (config.json's dtype).
        device: checked before anything is read or downloaded (a ValueError naming it and the devices this
        torch offers). check_finite: refuse NaN / Inf weights, naming the first tensor and its file (one
        extra pass over the weights).
        """
        from r4b_core.devices import check_device
        from r4b_weights.loader import check_layer_counts, load_weights, open_checkpoint  # the layer below, on use

        started = time.perf_counter()  # the progress line's load time counts the meta build too (one figure)
        device = check_device(device)
        directory, config_path, raw = open_checkpoint(path_or_repo, revision)
        config = cls._config_from_hf(raw, str(config_path))
        check_layer_counts(directory, config, config_path, raw)  # before building that many layers
        with torch.device("meta"):
            model = cls(config)
        return load_weights(model, directory, config_path, raw, dtype, device, progress and started, check_finite).eval()
