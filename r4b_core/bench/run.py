"""``r4b bench``: decode, prefill and load speed of r4b against transformers and against physics.

What one run measures, on one set of weights (a random-init preset, or a checkpoint):
- decode (r4b_core/bench/decode.py): per-step times of r4b's decode variants at batch 1 (default
  float32, float32-plain, bfloat16, int8), of the compiled step in the main dtype, and of r4b vs
  transformers' ``generate`` at batch 1, 4 and 8, all alternating in one process; each with its share
  of its own bandwidth limit;
- prefill (r4b_core/bench/prefill.py): a text prompt, an image prompt and the vision stage, r4b vs
  transformers;
- load (r4b_core/bench/load.py): load time and peak RSS, r4b vs transformers' ``from_pretrained``, each
  in a fresh process;
- the logit error of every variant against float32-plain on the prompt (max abs, relative to max |logit|).

A variant is a dtype and what ``--quantize`` makes of its linears (r4b_core/models/fast_linears.py): ``float32`` /
``bfloat16`` are what ``r4b generate --dtype ...`` runs (``--quantize auto``: oneDNN-prepacked weights on
a CPU), ``float32-plain`` / ``bfloat16-plain`` the weights as loaded (``--quantize none``, transformers'
``F.linear``), ``int8`` is ``--dtype bfloat16 --quantize int8``. The main variant (``--dtype`` with
``--quantize``) is the one compared with transformers; the compiled step runs its dtype as loaded (packed
weights cannot be traced). The top level of the result holds the headline figures; every ratio or share
has ``ratio`` or ``share`` in its key.
"""

from __future__ import annotations

import copy
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from r4b_core.bench.decode import decode_bytes_per_step, ours_variant, run_rounds, transformers_variant
from r4b_core.config import preset
from r4b_core.models.fast_linears import fast_linears

DEFAULT_VARIANTS = ("float32", "float32-plain", "bfloat16", "int8")
VARIANTS = ("float32", "float32-plain", "bfloat16", "bfloat16-plain", "float16", "int8")


@dataclass
class BenchOptions:
    """What ``run_bench`` measures; the CLI's flags map onto these fields one to one."""

    preset: str = "small"  # used when model_dir is None
    model_dir: str | None = None
    dtype: torch.dtype = torch.float32  # the main dtype: compiled, batched, prefill and transformers runs
    quantize: str = "auto"  # the main variant's linears: "auto", "none" or "int8" (as --quantize)
    device: str = "cpu"
    prompt_tokens: int = 128
    max_new_tokens: int = 32
    repeats: int = 3  # rounds at least
    max_repeats: int = 9  # rounds at most, while the spread is above max_spread
    max_spread: float = 0.10
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    batch_sizes: tuple[int, ...] = (1, 4, 8)
    compile: bool = True
    transformers: bool = True
    prefill: bool = True
    load: bool = True
    load_repeats: int = 2


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def variant_spec(name: str) -> tuple[torch.dtype, str]:
    """A variant's (dtype, --quantize): 'float32' -> (float32, auto), 'bfloat16-plain' -> (bfloat16, none),
    'int8' -> (bfloat16, int8)."""
    if name not in VARIANTS:
        raise ValueError(f"unknown bench variant {name!r}; choose from {', '.join(VARIANTS)}.")
    if name == "int8":
        return torch.bfloat16, "int8"
    dtype_name, _, plain = name.partition("-")
    return getattr(torch, dtype_name), "none" if plain else "auto"


def variant_name(dtype: torch.dtype, quantize: str) -> str:
    """The inverse of ``variant_spec`` (int8 over a dtype other than bf16 is '<dtype>-int8')."""
    if quantize == "int8":
        return "int8" if dtype == torch.bfloat16 else f"{_dtype_name(dtype)}-int8"
    return _dtype_name(dtype) + ("-plain" if quantize == "none" else "")


def _variant_model(source: torch.nn.Module, source_dtype: torch.dtype, dtype: torch.dtype, quantize: str,
                   compile: bool = False) -> tuple[torch.nn.Module, str]:
    """``source`` in ``dtype`` with ``fast_linears(quantize)``; returns (model, the linear mode applied). The
    source itself when nothing changes, else a copy (int8 quantizes the source's weights before any cast)."""
    if dtype == source_dtype and fast_linears_mode(source, quantize, compile) == "none":
        return source, "none"
    model = copy.deepcopy(source)
    if quantize == "int8":
        fast_linears(model, "int8")  # from the source's weights, before any rounding to the target dtype
        return model.to(dtype), "int8"
    model = model.to(dtype)
    return model, fast_linears(model, quantize, compile=compile)


def fast_linears_mode(model: torch.nn.Module, quantize: str, compile: bool) -> str:
    """The mode ``fast_linears`` would apply to ``model`` (without applying it)."""
    from r4b_core.models.fast_linears import prepack_available

    if quantize == "auto":
        return "prepacked" if not compile and prepack_available(model) else "none"
    return quantize


def _logit_error(reference: torch.nn.Module, other: torch.nn.Module, ids: torch.Tensor) -> dict:
    """Last-position logits of ``other`` against ``reference`` on the prompt ``ids`` [1, T]."""
    with torch.inference_mode():
        a = reference(ids, logits_to_keep=1).logits[0, -1].float()
        b = other(ids, logits_to_keep=1).logits[0, -1].float()
    max_abs = float((a - b).abs().max())
    return {"max_abs": max_abs, "relative_to_max_logit": max_abs / float(a.abs().max()),
            "same_argmax": bool(a.argmax() == b.argmax())}


def _load_source(options: BenchOptions, dtype: torch.dtype, device: torch.device,
                 progress: Callable[[str], None]) -> tuple[torch.nn.Module, str]:
    from r4b_core.models.r4b import R4BForConditionalGeneration
    from r4b_core.reference.synthetic import build_synthetic_model

    if options.model_dir is not None:
        progress(f"loading {options.model_dir} ({_dtype_name(dtype)}) ...")
        model = R4BForConditionalGeneration.from_pretrained(options.model_dir, dtype=dtype, device=device)
        return model, options.model_dir
    progress(f"building a random-init '{options.preset}' model ({_dtype_name(dtype)}) ...")
    model = build_synthetic_model(preset(options.preset), seed=0, dtype=dtype).to(device)
    return model, f"preset {options.preset} (random init)"


@torch.inference_mode()
def run_bench(options: BenchOptions, progress: Callable[[str], None] = print) -> dict:
    """Measure everything ``options`` asks for; a JSON-ready dict (see the module docstring)."""
    device = torch.device(options.device)
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    main_name = _dtype_name(options.dtype)
    specs = {name: variant_spec(name) for name in options.variants}
    main_key = variant_name(options.dtype, options.quantize)
    specs.setdefault(main_key, (options.dtype, options.quantize))
    needs_fp32 = any(d == torch.float32 or q == "int8" for d, q in specs.values())
    source_dtype = torch.float32 if needs_fp32 else options.dtype
    source, label = _load_source(options, source_dtype, device, progress)

    models: dict[str, torch.nn.Module] = {}
    modes: dict[str, str] = {}
    for name, (dtype, quantize) in specs.items():
        models[name], modes[name] = _variant_model(source, source_dtype, dtype, quantize)
    compiled_model = None
    if options.compile:  # the main dtype as it would be compiled (prepacked weights cannot be traced)
        compiled_model, _ = _variant_model(source, source_dtype, options.dtype, options.quantize, compile=True)
    gen = torch.Generator().manual_seed(0)
    text_ids = torch.randint(0, 1000, (max(options.batch_sizes + (1,)), options.prompt_tokens), generator=gen)
    text_ids = text_ids.to(device)  # [B_max, T]; batch b uses the first b rows
    ref = _transformers_reference(options, source, device, progress) if options.transformers else None

    variants, batch_names = _decode_variants(options, models, compiled_model, ref, source, source_dtype, text_ids)
    decode = run_rounds(variants, device, options.max_new_tokens, options.repeats,
                        max(options.max_repeats, options.repeats), options.max_spread, progress)
    results = decode["variants"]
    for name, v in results.items():
        progress(f"  {name}: {v['tokens_per_s']:.2f} tokens/s, {100 * v['share_of_limit']:.1f} % of its limit "
                 f"({v['rounds']} rounds, per-round spread {100 * v['round_spread']:.0f} %)")
    result: dict = {
        "model": label, "device": str(device), "dtype": main_name, "quantize": options.quantize,
        "threads": torch.get_num_threads(), "load_average_1min_start": load_start,
        "prompt_tokens": options.prompt_tokens, "max_new_tokens": options.max_new_tokens, "linear_modes": modes,
        "copy_bandwidth": decode["copy_bandwidth"], "decode": results,
    }
    result.update(_decode_ratios(options, results, batch_names))
    if "float32-plain" in models:
        result["logit_error_vs_float32_plain"] = {
            name: _logit_error(models["float32-plain"], models[name], text_ids[:1])
            for name in models if name != "float32-plain"}
    if options.prefill:
        result.update(_prefill_result(options, models[main_key], ref, text_ids, device, progress))

    del ref, models, source, compiled_model, variants  # free the weights before timing fresh-process loads
    if options.load:
        result.update(_load_result(options, progress))
    result["peak_memory_bytes"] = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                                   else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    result["load_average_1min_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    result["finished_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
    return result


def _transformers_reference(options: BenchOptions, source: torch.nn.Module, device: torch.device,
                            progress: Callable[[str], None]):
    """transformers' R-4B built from the same weights as ``source``, in the main dtype."""
    from r4b_core.reference.parity import reference_from_tensors
    from r4b_weights.names import R4B, ours_to_hf

    progress("building the transformers reference from the same weights ...")
    config = source.config
    tensors = {ours_to_hf(k, R4B): t for k, t in source.state_dict().items()
               if not (config.tie_lm_head and k == "language_model.lm_head.weight")}
    return reference_from_tensors(config, tensors, dtype=options.dtype, device=device)


def _decode_variants(options: BenchOptions, models: dict[str, torch.nn.Module], compiled_model, ref,
                     source: torch.nn.Module, source_dtype: torch.dtype,
                     text_ids: torch.Tensor) -> tuple[list, dict[int, tuple[str, str | None]]]:
    """The timed decode runs: each variant at batch 1, the compiled main model, the main model at each
    batch size and transformers beside it; and per batch size, the names of (ours, transformers or None)."""
    main_name = _dtype_name(options.dtype)
    main_key = variant_name(options.dtype, options.quantize)
    context = options.prompt_tokens + options.max_new_tokens // 2
    n = options.max_new_tokens
    variants = [ours_variant(name, models[name], text_ids[:1], n, compile=False, context=context)
                for name in options.variants]
    by_name = {v.name: v for v in variants}
    if compiled_model is not None:
        variants.append(ours_variant(f"{main_name} compiled", compiled_model, text_ids[:1], n, compile=True,
                                     context=context))
    batch_names: dict[int, tuple[str, str | None]] = {}
    for b in options.batch_sizes:
        ours_name = main_key if b == 1 and main_key in by_name else f"{main_key} batch {b}"
        if ours_name not in by_name:
            by_name[ours_name] = ours_variant(ours_name, models[main_key], text_ids[:b], n, compile=False,
                                              context=context)
            variants.append(by_name[ours_name])
        ref_name = None
        if ref is not None:
            ref_name = f"transformers {main_name} batch {b}"
            # transformers reads the unquantized weights in the main dtype: the source's bytes, rescaled
            ref_bytes = (decode_bytes_per_step(source, b, context) * options.dtype.itemsize) // source_dtype.itemsize
            variants.append(transformers_variant(ref_name, ref, text_ids[:b], ref_bytes))
        batch_names[b] = (ours_name, ref_name)
    return variants, batch_names


def _decode_ratios(options: BenchOptions, results: dict[str, dict],
                   batch_names: dict[int, tuple[str, str | None]]) -> dict:
    """The decode figures as flat keys (tokens/s, share of the limit, speed ratios) and per batch size."""
    main_name = _dtype_name(options.dtype)
    main_key = variant_name(options.dtype, options.quantize)
    out: dict = {}
    for name in list(options.variants) + ([f"{main_name} compiled"] if options.compile else []):
        key = name.replace(" ", "_").replace("-", "_")
        out[f"decode_tokens_per_s_{key}"] = results[name]["tokens_per_s"]
        out[f"decode_share_of_limit_{key}"] = results[name]["share_of_limit"]
    for base in ("float32", "float32-plain"):
        for name in options.variants:
            if base in results and name != base and name in results and name not in ("float32", "float32-plain"):
                out[f"decode_speed_ratio_{name.replace('-', '_')}_vs_{base.replace('-', '_')}"] = (
                    results[name]["tokens_per_s"] / results[base]["tokens_per_s"])
    if "float32" in results and "float32-plain" in results:
        out["decode_speed_ratio_float32_vs_float32_plain"] = (results["float32"]["tokens_per_s"]
                                                              / results["float32-plain"]["tokens_per_s"])
    if options.compile and main_key in results:
        out["decode_speed_ratio_compiled_vs_eager"] = (results[f"{main_name} compiled"]["tokens_per_s"]
                                                       / results[main_key]["tokens_per_s"])
    out["batches"] = {}
    for b, (ours_name, ref_name) in batch_names.items():
        entry = {"ours": results[ours_name]}
        if ref_name is not None:
            entry["transformers"] = results[ref_name]
            ratio = results[ours_name]["tokens_per_s"] / results[ref_name]["tokens_per_s"]
            entry["throughput_ratio_ours_vs_transformers"] = ratio
            out[f"batch{b}_throughput_ratio_ours_vs_transformers"] = ratio
        out["batches"][str(b)] = entry
    return out


def _prefill_result(options: BenchOptions, model: torch.nn.Module, ref, text_ids: torch.Tensor,
                    device: torch.device, progress: Callable[[str], None]) -> dict:
    """Prefill timings (text prompt, image prompt, vision stage), ours and transformers' when given."""
    from r4b_core.bench.prefill import image_prompt, prefill_stages, time_prefill

    image_ids, image_inputs = image_prompt(model.config, device, options.dtype, options.prompt_tokens // 4)
    stages = prefill_stages(model, ref, text_ids[:1], image_ids, image_inputs)
    prefill = time_prefill(stages, device, options.repeats, max(options.max_repeats, options.repeats),
                           options.max_spread, progress)
    prefill["image_prompt_tokens"] = int(image_ids.shape[1])
    out = {"prefill": prefill}
    for stage in ("prefill_text", "prefill_image", "vision"):
        if "time_ratio_ours_vs_transformers" in prefill[stage]:
            out[f"{stage}_time_ratio_ours_vs_transformers"] = prefill[stage]["time_ratio_ours_vs_transformers"]
    return out


def _load_result(options: BenchOptions, progress: Callable[[str], None]) -> dict:
    """Load timings in fresh processes, ours and transformers' when given."""
    from r4b_core.bench.load import time_loads
    from r4b_core.reference.synthetic import cached_synthetic_checkpoint

    directory = options.model_dir or str(cached_synthetic_checkpoint(options.preset))
    loads = time_loads(directory, _dtype_name(options.dtype), options.load_repeats,
                       sides=("ours", "transformers") if options.transformers else ("ours",), progress=progress)
    out = {"load": loads}
    for key in ("load_time_ratio_ours_vs_transformers", "peak_rss_ratio_ours_vs_transformers"):
        if key in loads:
            out[key] = loads[key]
    return out


def format_table(result: dict) -> str:
    """The human-readable report of ``run_bench``'s result."""
    def ms(t: dict) -> str:
        return f"{1e3 * t['median_s']:9.1f} ms ({1e3 * t['min_s']:.1f}-{1e3 * t['max_s']:.1f}, {t['runs']} runs)"

    bw = result["copy_bandwidth"]
    lines = [f"r4b bench · {result['model']} · {result['device']} · {result['dtype']}"
             f"{' + int8' if result['quantize'] == 'int8' else ''} · {result['threads']} threads · "
             f"load average {result['load_average_1min_start']}",
             f"copy bandwidth {bw['GBps_median']:.1f} GB/s (median of {bw['rounds']}; "
             f"{bw['GBps_min']:.1f}-{bw['GBps_max']:.1f})",
             f"decode, {result['max_new_tokens']} new tokens per run; tokens/s from the median step "
             "(per-round min-max)        share of its limit"]
    for name, v in result["decode"].items():
        lines.append(f"  {name:<28} {v['tokens_per_s']:9.2f}  ({v['round_tokens_per_s_min']:.2f}-"
                     f"{v['round_tokens_per_s_max']:.2f}, {v['rounds']} rounds)   {100 * v['share_of_limit']:5.1f} % "
                     f"of {v['limit_tokens_per_s']:.1f} ({v['bytes_per_step'] / 1e6:.0f} MB/step)")
    for key, value in result.items():
        if ("ratio" in key or "share" in key) and isinstance(value, float) and not key.startswith("decode_share"):
            lines.append(f"  {key:<52} {value:8.3f}")
    if "logit_error_vs_float32_plain" in result:
        for name, e in result["logit_error_vs_float32_plain"].items():
            lines.append(f"logits {name} vs float32-plain: max abs {e['max_abs']:.3g} "
                         f"({100 * e['relative_to_max_logit']:.2f} % of max |logit|), same argmax: {e['same_argmax']}")
    if "prefill" in result:
        pre = result["prefill"]
        for stage in ("prefill_text", "prefill_image", "vision"):
            for side, t in pre[stage].items():
                if isinstance(t, dict):
                    lines.append(f"{stage:<14} {side:<13} {ms(t)}")
        lines.append(f"(image prompt: {pre['image_prompt_tokens']} tokens; text prompt: {result['prompt_tokens']})")
    if "load" in result:
        for side in ("ours", "transformers"):
            if side in result["load"]:
                v = result["load"][side]
                lines.append(f"load {side:<13} {v['load_s_median']:7.2f} s ({v['load_s_min']:.2f}-"
                             f"{v['load_s_max']:.2f}, {v['runs']} fresh processes), peak RSS "
                             f"{v['peak_rss_bytes'] / 2**20:.0f} MiB ({v['rss_after_import_bytes'] / 2**20:.0f} MiB "
                             "after imports)")
    lines.append(f"peak memory of this process {result['peak_memory_bytes'] / 2**30:.2f} GiB; load average at the end "
                 f"{result['load_average_1min_end']}")
    return "\n".join(lines)
