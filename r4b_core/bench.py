"""``r4b bench``: decode, prefill and load speed of r4b against transformers and against physics.

What one run measures, on one set of weights (a random-init preset, or a checkpoint):
- decode (r4b_core/bench_decode.py): per-step times of r4b in float32, bfloat16 and int8 (batch 1), of
  the compiled step in the main dtype, and of r4b vs transformers' ``generate`` at batch 1, 4 and 8,
  all alternating in one process; each with its share of its own bandwidth limit;
- prefill (r4b_core/bench_prefill.py): a text prompt, an image prompt and the vision stage, r4b vs
  transformers;
- load (r4b_core/bench_load.py): load time and peak RSS, r4b vs transformers' ``from_pretrained``, each
  in a fresh process;
- the logit error of bfloat16 and int8 against float32 on the prompt (max abs, relative to max |logit|).

The bfloat16 variant is what ``r4b generate --dtype bfloat16`` runs (on a CPU with oneDNN bf16:
prepacked weights, r4b_core/quantize.py); int8 is ``--dtype bfloat16 --quantize int8``. The main dtype
(``--dtype``, with ``--quantize``) is the one compared with transformers. The top level of the result
holds the headline figures; every ratio or share has ``ratio`` or ``share`` in its key.
"""

from __future__ import annotations

import copy
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from r4b_core.bench_decode import decode_bytes_per_step, ours_variant, run_rounds, transformers_variant
from r4b_core.config import preset
from r4b_core.quantize import fast_linears, quantize_model

LOW_PRECISION_VARIANTS = ("float32", "bfloat16", "int8")


@dataclass
class BenchOptions:
    """What ``run_bench`` measures; the CLI's flags map onto these fields one to one."""

    preset: str = "small"  # used when model_dir is None
    model_dir: str | None = None
    dtype: torch.dtype = torch.float32  # the main dtype: compiled, batched, prefill and transformers runs
    quantize: str = "none"  # the main variant's linears: "none" or "int8"
    device: str = "cpu"
    prompt_tokens: int = 128
    max_new_tokens: int = 32
    repeats: int = 3  # rounds at least
    max_repeats: int = 9  # rounds at most, while the spread is above max_spread
    max_spread: float = 0.10
    variants: tuple[str, ...] = LOW_PRECISION_VARIANTS
    batch_sizes: tuple[int, ...] = (1, 4, 8)
    compile: bool = True
    transformers: bool = True
    prefill: bool = True
    load: bool = True
    load_repeats: int = 2


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _variant_model(source: torch.nn.Module, source_dtype: torch.dtype, name: str,
                   quantize: str = "none") -> tuple[torch.nn.Module, str]:
    """``source`` as decode variant ``name`` ('float32', 'bfloat16', 'float16' or 'int8' = bf16 activations,
    int8 weights) with the CLI's linear speed-up; returns (model, the linear mode applied). A copy, except
    for a variant that is the source as it is (its dtype, nothing to swap)."""
    if name == "int8":
        name, quantize = "bfloat16", "int8"
    dtype = getattr(torch, name)
    if dtype == source_dtype and quantize == "none" and dtype != torch.bfloat16:
        return source, fast_linears(source)
    model = copy.deepcopy(source)
    if quantize == "int8":
        quantize_model(model, "int8")  # from the source weights, before any rounding to bf16
        return model.to(dtype), "int8"
    model = model.to(dtype)
    return model, fast_linears(model)


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
    from r4b_core.model import R4BForConditionalGeneration
    from r4b_core.synthetic import build_synthetic_model

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
    from r4b_core.bench_load import time_loads
    from r4b_core.bench_prefill import image_prompt, prefill_stages, time_prefill

    device = torch.device(options.device)
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    main_name = _dtype_name(options.dtype)
    wanted = set(options.variants) | {main_name}
    source_dtype = torch.float32 if wanted & {"float32", "int8"} else options.dtype
    source, label = _load_source(options, source_dtype, device, progress)
    config = source.config

    models: dict[str, torch.nn.Module] = {}
    modes: dict[str, str] = {}
    for name in options.variants:
        models[name], modes[name] = _variant_model(source, source_dtype, name)
    main_key = "int8" if options.quantize == "int8" else main_name
    if main_key not in models:
        models[main_key], modes[main_key] = _variant_model(source, source_dtype, main_name, options.quantize)

    gen = torch.Generator().manual_seed(0)
    text_ids = torch.randint(0, 1000, (max(options.batch_sizes + (1,)), options.prompt_tokens), generator=gen)
    text_ids = text_ids.to(device)  # [B_max, T]; batch b uses the first b rows
    context = options.prompt_tokens + options.max_new_tokens // 2
    n = options.max_new_tokens

    ref = None
    if options.transformers:
        from r4b_core.parity import reference_from_tensors
        from r4b_weights.names import R4B, ours_to_hf

        progress("building the transformers reference from the same weights ...")
        tensors = {ours_to_hf(k, R4B): t for k, t in source.state_dict().items()
                   if not (config.tie_lm_head and k == "language_model.lm_head.weight")}
        ref = reference_from_tensors(config, tensors, dtype=options.dtype, device=device)
        del tensors

    variants = [ours_variant(name, models[name], text_ids[:1], n, compile=False, context=context)
                for name in options.variants]
    by_name = {v.name: v for v in variants}
    main_model = models[main_key]
    if options.compile:
        variants.append(ours_variant(f"{main_key} compiled", main_model, text_ids[:1], n, compile=True,
                                     context=context))
    batch_names: dict[int, tuple[str, str | None]] = {}
    for b in options.batch_sizes:
        ours_name = main_key if b == 1 and main_key in by_name else f"{main_key} batch {b}"
        if ours_name not in by_name:
            by_name[ours_name] = ours_variant(ours_name, main_model, text_ids[:b], n, compile=False, context=context)
            variants.append(by_name[ours_name])
        ref_name = None
        if ref is not None:
            ref_name = f"transformers {main_name} batch {b}"
            # transformers reads the unquantized weights in the main dtype: the source's bytes, rescaled
            ref_bytes = (decode_bytes_per_step(source, b, context) * options.dtype.itemsize) // source_dtype.itemsize
            variants.append(transformers_variant(ref_name, ref, text_ids[:b], ref_bytes))
        batch_names[b] = (ours_name, ref_name)

    decode = run_rounds(variants, device, n, options.repeats, max(options.max_repeats, options.repeats),
                        options.max_spread, progress)
    results = decode["variants"]
    for name, v in results.items():
        progress(f"  {name}: {v['tokens_per_s']:.2f} tokens/s, {100 * v['share_of_limit']:.1f} % of its limit "
                 f"({v['rounds']} rounds, per-round spread {100 * v['round_spread']:.0f} %)")
    result: dict = {
        "model": label, "device": str(device), "dtype": main_name, "quantize": options.quantize,
        "threads": torch.get_num_threads(), "load_average_1min_start": load_start,
        "prompt_tokens": options.prompt_tokens, "max_new_tokens": n, "linear_modes": modes,
        "copy_bandwidth": decode["copy_bandwidth"], "decode": results,
    }
    for name in list(options.variants) + ([f"{main_key} compiled"] if options.compile else []):
        key = name.replace(" ", "_")
        result[f"decode_tokens_per_s_{key}"] = results[name]["tokens_per_s"]
        result[f"decode_share_of_limit_{key}"] = results[name]["share_of_limit"]
    if "float32" in results:
        for name in ("bfloat16", "int8"):
            if name in results:
                result[f"decode_speed_ratio_{name}_vs_float32"] = (results[name]["tokens_per_s"]
                                                                   / results["float32"]["tokens_per_s"])
    if options.compile and main_key in results:
        result["decode_speed_ratio_compiled_vs_eager"] = (results[f"{main_key} compiled"]["tokens_per_s"]
                                                          / results[main_key]["tokens_per_s"])
    result["batches"] = {}
    for b, (ours_name, ref_name) in batch_names.items():
        entry = {"ours": results[ours_name]}
        if ref_name is not None:
            entry["transformers"] = results[ref_name]
            ratio = results[ours_name]["tokens_per_s"] / results[ref_name]["tokens_per_s"]
            entry["throughput_ratio_ours_vs_transformers"] = ratio
            result[f"batch{b}_throughput_ratio_ours_vs_transformers"] = ratio
        result["batches"][str(b)] = entry

    if "float32" in models:
        result["logit_error_vs_float32"] = {name: _logit_error(models["float32"], models[name], text_ids[:1])
                                            for name in models if name != "float32"}

    if options.prefill:
        image_ids, image_inputs = image_prompt(config, device, options.dtype, options.prompt_tokens // 4)
        stages = prefill_stages(main_model, ref, text_ids[:1], image_ids, image_inputs)
        prefill = time_prefill(stages, device, options.repeats, max(options.max_repeats, options.repeats),
                               options.max_spread, progress)
        prefill["image_prompt_tokens"] = int(image_ids.shape[1])
        result["prefill"] = prefill
        for stage in ("prefill_text", "prefill_image", "vision"):
            if "time_ratio_ours_vs_transformers" in prefill[stage]:
                result[f"{stage}_time_ratio_ours_vs_transformers"] = prefill[stage]["time_ratio_ours_vs_transformers"]

    del ref, models, source, main_model, variants, by_name
    if options.load:
        from r4b_core.synthetic import cached_synthetic_checkpoint

        directory = options.model_dir or str(cached_synthetic_checkpoint(options.preset))
        loads = time_loads(directory, main_name, options.load_repeats,
                           sides=("ours", "transformers") if options.transformers else ("ours",), progress=progress)
        result["load"] = loads
        for key in ("load_time_ratio_ours_vs_transformers", "peak_rss_ratio_ours_vs_transformers"):
            if key in loads:
                result[key] = loads[key]

    result["peak_memory_bytes"] = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                                   else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    result["load_average_1min_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    result["finished_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
    return result


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
    if "logit_error_vs_float32" in result:
        for name, e in result["logit_error_vs_float32"].items():
            lines.append(f"logits {name} vs float32: max abs {e['max_abs']:.3g} ({100 * e['relative_to_max_logit']:.2f} % "
                         f"of max |logit|), same argmax: {e['same_argmax']}")
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
                lines.append(f"load {side:<13} {v['load_s_median']:7.2f} s ({v['load_s_min']:.2f}-{v['load_s_max']:.2f}, "
                             f"{v['runs']} fresh processes), peak RSS {v['peak_rss_bytes'] / 2**20:.0f} MiB "
                             f"({v['rss_after_import_bytes'] / 2**20:.0f} MiB after imports)")
    lines.append(f"peak memory of this process {result['peak_memory_bytes'] / 2**30:.2f} GiB; load average at the end "
                 f"{result['load_average_1min_end']}")
    return "\n".join(lines)
