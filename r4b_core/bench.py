"""``r4b bench``: prefill and decode speed, ours vs transformers on the same weights, in one process.

What is measured (batch 1), after a warm-up round, in alternating rounds (ours eager, ours
compiled, transformers, then again), medians with min-max:
- prefill time of a text prompt and of an image prompt (a 640x480 picture: 5 views with R-4B's tiles);
- decode tokens/s = (N - 1) / (t(N new tokens) - t(1 new token)), the same external clock for every
  variant, so prefill, vision and set-up cancel out; eos is ignored (exactly N tokens);
- the memory-bandwidth limit of decoding: bytes read per token (every decoder and lm_head weight,
  plus the K/V of the mean context) / the device's copy bandwidth measured here (read + write bytes of
  a large tensor copy), and the fraction of it each variant reaches;
- peak memory (CUDA: max allocated; CPU: the process's max resident set).
"""

from __future__ import annotations

import resource
import statistics
import time
from dataclasses import dataclass

import torch

from r4b_core.config import R4BConfig, preset
from r4b_core.generate import generate, prefill
from r4b_core.kv_cache import KVCache


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clock(fn, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


@dataclass
class Timing:
    values: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def as_dict(self) -> dict:
        return {"median": self.median, "min": min(self.values), "max": max(self.values), "runs": len(self.values)}


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 5) -> float:
    """Bytes per second moved by a large device copy (bytes read + bytes written)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(_clock(lambda: dst.copy_(src), device) for _ in range(repeats))
    return 2 * nbytes / best


def decode_bytes_per_token(model: torch.nn.Module, context: int) -> int:
    """Weights one decode step reads (decoder + final norm + lm_head; one embedding row) plus K/V at ``context``."""
    lm = model.language_model
    tied = lm.lm_head.weight is lm.model.embed_tokens.weight
    decoder = sum(p.numel() * p.element_size() for name, p in lm.named_parameters() if "embed_tokens" not in name)
    head = lm.lm_head.weight.numel() * lm.lm_head.weight.element_size() if tied else 0  # counted above if untied
    cfg = model.config.text_config
    element = lm.lm_head.weight.element_size()
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * context * element
    return decoder + head + kv


def _image_prompt(config: R4BConfig, device: torch.device, dtype: torch.dtype, text_tokens: int):
    from r4b_core.anyres import num_image_tokens
    from r4b_core.image_processing import ImageProcessorConfig, preprocess_images
    from r4b_core.synthetic import synthetic_picture

    picture = synthetic_picture(640, 480, seed=0)
    inputs = preprocess_images([picture], ImageProcessorConfig.for_model(config))
    n_image = num_image_tokens((picture.height, picture.width), config)
    gen = torch.Generator().manual_seed(1)
    ids = torch.cat([torch.randint(0, 1000, (1, text_tokens // 2), generator=gen),
                     torch.full((1, n_image), config.image_token_index),
                     torch.randint(0, 1000, (1, text_tokens - text_tokens // 2), generator=gen)], dim=1)
    return ids.to(device), {"pixel_values": inputs["pixel_values"].to(device, dtype), "image_sizes": inputs["image_sizes"]}


@torch.inference_mode()
def run_bench(
    config_name: str | None = "small",
    model_dir: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    prompt_tokens: int = 128,
    new_tokens: int = 32,
    repeats: int = 3,
    compile: bool = True,
    transformers_reference: bool = True,
    progress=print,
) -> dict:
    """Measure and return a dict of results (see the module docstring)."""
    from r4b_core.model import R4BForConditionalGeneration
    from r4b_core.synthetic import build_synthetic_model

    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    if model_dir is not None:
        model = R4BForConditionalGeneration.from_pretrained(model_dir, dtype=dtype, device=device)
        label = model_dir
    else:
        progress(f"building a random-init '{config_name}' model ({dtype}) ...")
        model = build_synthetic_model(preset(config_name), seed=0, dtype=dtype).to(dev)
        label = f"preset {config_name} (random init)"
    config = model.config
    ref = None
    if transformers_reference:
        from r4b_core.parity import reference_from_tensors
        from r4b_weights.names import R4B, ours_to_hf

        progress("building the transformers reference from the same weights ...")
        tensors = {ours_to_hf(n, R4B): t for n, t in model.state_dict().items()
                   if not (config.tie_lm_head and n == "language_model.lm_head.weight")}
        ref = reference_from_tensors(config, tensors, dtype=dtype, device=device)
        del tensors

    gen = torch.Generator().manual_seed(0)
    text_ids = torch.randint(0, 1000, (1, prompt_tokens), generator=gen).to(dev)
    image_ids, image_inputs = _image_prompt(config, dev, dtype, prompt_tokens // 4)

    def ours_prefill(ids, **inputs):
        cache = KVCache.for_model(config.text_config, 1, ids.shape[1], dtype=dtype, device=dev)
        prefill(model, ids, cache, **inputs)

    caches = {}  # one cache per variant, reset between runs: fixed addresses for CUDA graphs

    def ours_decode(n, compiled):
        cache = caches.setdefault(compiled, KVCache.for_model(config.text_config, 1, prompt_tokens + new_tokens,
                                                              dtype=dtype, device=dev))
        cache.reset()
        generate(model, text_ids, max_new_tokens=n, eos_token_ids=(), compile=compiled, kv_cache=cache)

    def ref_decode(n):
        ref.generate(input_ids=text_ids, attention_mask=torch.ones_like(text_ids), do_sample=False,
                     max_new_tokens=n, min_new_tokens=n, pad_token_id=0)

    variants = {"ours_eager": lambda n: ours_decode(n, False)}
    if compile:
        variants["ours_compiled"] = lambda n: ours_decode(n, True)
    if ref is not None:
        variants["transformers"] = ref_decode
    progress("warming up" + (" (compiling the decode step)" if compile else "") + " ...")
    ours_prefill(text_ids)
    ours_prefill(image_ids, **image_inputs)
    for fn in variants.values():
        fn(1)
        fn(new_tokens)

    prefill_text, prefill_image, ref_prefill_text = [], [], []
    t1 = {k: [] for k in variants}
    tn = {k: [] for k in variants}
    for r in range(repeats):
        progress(f"round {r + 1}/{repeats} ...")
        prefill_text.append(_clock(lambda: ours_prefill(text_ids), dev))
        prefill_image.append(_clock(lambda: ours_prefill(image_ids, **image_inputs), dev))
        if ref is not None:
            ref_prefill_text.append(_clock(lambda: ref(input_ids=text_ids, logits_to_keep=1), dev))
        for name, fn in variants.items():
            t1[name].append(_clock(lambda: fn(1), dev))
            tn[name].append(_clock(lambda: fn(new_tokens), dev))

    decode = {}
    for name in variants:
        rates = [(new_tokens - 1) / max(b - a, 1e-9) for a, b in zip(t1[name], tn[name])]
        decode[name] = Timing(rates)
    bandwidth = copy_bandwidth(dev, 256 * 1024**2 if dev.type == "cpu" else 2 * 1024**3)
    per_token = decode_bytes_per_token(model, prompt_tokens + new_tokens // 2)
    limit = bandwidth / per_token
    peak = (torch.cuda.max_memory_allocated(dev) if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    result = {
        "model": label, "device": str(dev), "dtype": str(dtype).removeprefix("torch."), "batch": 1,
        "prompt_tokens": prompt_tokens, "image_prompt_tokens": int(image_ids.shape[1]), "new_tokens": new_tokens,
        "prefill_text_s": Timing(prefill_text).as_dict(), "prefill_image_s": Timing(prefill_image).as_dict(),
        "decode_tokens_per_s": {k: v.as_dict() for k, v in decode.items()},
        "copy_bandwidth_GBps": bandwidth / 1e9, "decode_bytes_per_token": per_token,
        "bandwidth_limit_tokens_per_s": limit,
        "fraction_of_limit": {k: v.median / limit for k, v in decode.items()},
        "peak_memory_bytes": peak,
    }
    if ref is not None:
        result["transformers_prefill_text_s"] = Timing(ref_prefill_text).as_dict()
        ours_best = max(v.median for k, v in decode.items() if k != "transformers")
        result["ratio_ours_vs_transformers"] = ours_best / decode["transformers"].median
    return result


def format_table(result: dict) -> str:
    def span(t: dict, scale: float = 1.0, unit: str = "") -> str:
        return f"{t['median'] * scale:9.2f}{unit}  ({t['min'] * scale:.2f}–{t['max'] * scale:.2f})"

    lines = [f"r4b bench · {result['model']} · {result['device']} · {result['dtype']} · batch 1",
             f"prefill  text  {result['prompt_tokens']:5d} tokens   {span(result['prefill_text_s'], 1e3, ' ms')}",
             f"prefill  image {result['image_prompt_tokens']:5d} tokens   {span(result['prefill_image_s'], 1e3, ' ms')}"]
    if "transformers_prefill_text_s" in result:
        lines.append(f"prefill  text  (transformers)       {span(result['transformers_prefill_text_s'], 1e3, ' ms')}")
    lines.append(f"decode ({result['new_tokens']} new tokens)        tokens/s (min–max)      of limit")
    for name, t in result["decode_tokens_per_s"].items():
        lines.append(f"  {name:<16}               {span(t)}   {100 * result['fraction_of_limit'][name]:5.1f} %")
    lines.append(f"bandwidth limit   {result['bandwidth_limit_tokens_per_s']:9.2f} tokens/s  "
                 f"({result['decode_bytes_per_token'] / 1e6:.0f} MB/token at {result['copy_bandwidth_GBps']:.1f} GB/s copy)")
    if "ratio_ours_vs_transformers" in result:
        lines.append(f"ours / transformers (decode)  {result['ratio_ours_vs_transformers']:.2f}x")
    lines.append(f"peak memory       {result['peak_memory_bytes'] / 1024**3:.2f} GiB")
    return "\n".join(lines)
