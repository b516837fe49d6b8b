"""Sampling parameters and the checkpoint's generation defaults (``generation_config.json``).

``generation_config.json`` is read once per checkpoint, here, with one validation::

    generation_config.json ──GenerationConfig.from_pretrained──► eos_token_id (as a list), pad_token_id,
                                                                do_sample, temperature, top_k, top_p
        R4BProcessor.from_pretrained keeps it (``processor.generation_config``): its eos ids are the stop ids
        generate / chat: its eos and pad ids, and ``sampling()``, unless the caller passes others

Every key r4b uses is type-checked, with an error naming the file and the key (``"temperature": "hot"``
-> ``ValueError: .../generation_config.json: key 'temperature' = 'hot' should be of type float.``);
other keys (``bos_token_id``, ``transformers_version``, ...) are ignored. The value rules are the ones
``SamplingParams`` applies to a caller's own values (``check_sampling``): temperature finite and >= 0
(0 = greedy), top_k an integer >= 0 (0 = off), top_p in (0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from r4b_core.json_io import MANUAL, is_int, is_number, read_fields, read_json_if_present

FILE_NAME = "generation_config.json"


def check_sampling(temperature: Any, top_k: Any, top_p: Any) -> None:
    """ValueError naming the value unless temperature is a finite number >= 0, top_k an int >= 0 and
    top_p a number in (0, 1]; None means "not set" and passes."""
    if temperature is not None and not (is_number(temperature) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature = {temperature!r} should be a finite number >= 0 (0 = greedy).")
    if top_k is not None and not (is_int(top_k) and top_k >= 0):
        raise ValueError(f"top_k = {top_k!r} should be an integer >= 0 (0 = off).")
    if top_p is not None and not (is_number(top_p) and 0 < top_p <= 1):
        raise ValueError(f"top_p = {top_p!r} should be a number in (0, 1] (1 = off).")


@dataclass
class SamplingParams:
    """How the next token is drawn: greedy at ``temperature == 0``, else temperature, top-k, top-p."""

    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1: no nucleus filter
    seed: int | None = None

    def __post_init__(self) -> None:
        check_sampling(self.temperature, self.top_k, self.top_p)
        if self.seed is not None and not (is_int(self.seed) and 0 <= self.seed < 2**64):
            raise ValueError(f"seed = {self.seed!r} should be an integer from 0 to 2**64 - 1 (what torch.Generator "
                             "takes).")


@dataclass
class GenerationConfig:
    """What ``generation_config.json`` says (only the keys r4b uses); absent keys are None / empty."""

    eos_token_id: list[int] = field(default_factory=list, metadata=MANUAL)  # one id or None is normalised
    pad_token_id: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    do_sample: bool | None = None

    def __post_init__(self) -> None:
        eos = self.eos_token_id
        ids = [] if eos is None else eos if isinstance(eos, list) else [eos]
        if not all(is_int(i) and i >= 0 for i in ids):
            raise ValueError(f"eos_token_id = {eos!r} should be an id or a list of ids.")
        self.eos_token_id = list(ids)
        if self.pad_token_id is not None and not (is_int(self.pad_token_id) and self.pad_token_id >= 0):
            raise ValueError(f"pad_token_id = {self.pad_token_id!r} should be a token id (an integer >= 0).")
        check_sampling(self.temperature, self.top_k, self.top_p)

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = FILE_NAME) -> GenerationConfig:
        """Parse a ``generation_config.json`` dict; every error names ``source`` and the key."""
        try:
            rest = dict(d)
            eos = rest.pop("eos_token_id", None)
            return cls(eos_token_id=eos, **read_fields(cls, rest, error=ValueError))
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> GenerationConfig:
        """Read ``directory/generation_config.json``; an absent file gives an empty config."""
        path = Path(directory) / FILE_NAME
        d = read_json_if_present(path, what="the generation defaults")
        return cls() if d is None else cls.from_hf_dict(d, source=str(path))

    def sampling(self, seed: int | None = None, *, temperature: float | None = None, top_k: int | None = None,
                 top_p: float | None = None) -> SamplingParams:
        """The checkpoint's default sampling with a caller's overrides (``r4b generate``'s flags, a served
        request's fields; None = not given, the default stays). Defaults: greedy unless the file sets
        ``do_sample``; unset values mean temperature 1, no top-k and no top-p. A temperature of 0 is greedy,
        as in ``SamplingParams``, whose checks (ValueError naming the value) run on the merged values."""
        if self.do_sample:
            defaults = SamplingParams(temperature=1.0 if self.temperature is None else self.temperature,
                                      top_k=self.top_k or 0, top_p=1.0 if self.top_p is None else self.top_p)
        else:
            defaults = SamplingParams()
        return SamplingParams(temperature=defaults.temperature if temperature is None else temperature,
                              top_k=defaults.top_k if top_k is None else top_k,
                              top_p=defaults.top_p if top_p is None else top_p, seed=seed)
