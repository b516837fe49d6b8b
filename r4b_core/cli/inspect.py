"""``r4b inspect``: describe a checkpoint without reading its tensors, or run a random-init preset decoder.

    r4b inspect CHECKPOINT | --model CHECKPOINT [--load]
        config.json and the safetensors headers: architecture, shapes, dtypes, parameters per part;
        --load also loads the model strictly (every tensor checked for NaN / Inf, the first one named by
        its HF name and file) and runs it (R-4B: one forward on a generated picture)
    r4b inspect --preset NAME [--prompt-tokens N] [--max-new-tokens N]
        a random-init text decoder of a preset: prefill, greedy cached decoding, and a check that the
        cached tokens equal the uncached ones (exit 1 if not)
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path

import torch

from r4b_core.cli.common import UsageError, add_max_new_tokens, compute_dtype, positive_int, seed_int, torch_device


def add_parser(subparsers: argparse._SubParsersAction,
               parents: list[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "inspect", parents=parents, help="describe a checkpoint, or run a random-init preset decoder",
        description="Describe a checkpoint (config.json + safetensors headers, no tensor data read), or build and "
                    "run a random-init preset text decoder.")
    p.add_argument("checkpoint", nargs="?", metavar="CHECKPOINT",
                   help="checkpoint directory or hub id (owner/name); the same as --model")
    p.add_argument("--preset", choices=["tiny", "small", "r4b"], help="run a random-init text decoder of this preset")
    p.add_argument("--load", action="store_true", help="also load the model strictly (reads all its tensors, "
                                                       "checking each for NaN / Inf) and run it")
    p.add_argument("--prompt-tokens", type=positive_int, default=32, metavar="N",
                   help="random prompt length for --preset (default 32)")
    add_max_new_tokens(p, 16, "greedy tokens to decode for --preset")
    p.add_argument("--seed", type=seed_int, default=0, help="random seed for --preset weights (default 0)")
    return p


def run(args: argparse.Namespace) -> int:
    if args.checkpoint and args.model and args.checkpoint != args.model:
        raise UsageError(f"two checkpoints given ({args.checkpoint} and --model {args.model}); give one.")
    checkpoint = args.checkpoint or args.model
    if (checkpoint is None) == (args.preset is None):
        raise UsageError("give a CHECKPOINT (or --model) or --preset NAME, one of them.")
    device = torch_device(args.device)
    if args.preset:
        return _run_preset(args, device)
    return _describe_checkpoint(checkpoint, args, device)


def _count_by_part(infos: dict) -> dict[str, int]:
    """Parameters per model part (vision_tower, text decoder, lm_head, ...) from the tensor headers."""
    from r4b_weights.names import UnknownTensorName, hf_to_ours

    parts: Counter[str] = Counter()
    for hf, info in infos.items():
        n = 1
        for d in info.shape:
            n *= d
        try:
            ours = hf_to_ours(hf)
        except UnknownTensorName:
            ours = "?"
        if ours is None:
            part = "dropped (unused)"
        elif ours.startswith("language_model.lm_head"):
            part = "lm_head"
        elif ours.startswith("language_model."):
            part = "text decoder"
        elif ours == "?":
            part = "unknown names"
        else:
            part = ours.split(".")[0]
        parts[part] += n
    return dict(parts)


def _describe_checkpoint(checkpoint: str, args: argparse.Namespace, device: torch.device) -> int:
    from r4b_core.config import R4BConfig, read_config_json, text_config_from_dict
    from r4b_core.models.qwen3 import Qwen3ForCausalLM
    from r4b_weights import resolve_checkpoint
    from r4b_weights.safetensors_io import find_weight_files, read_headers

    directory = resolve_checkpoint(checkpoint, args.revision)
    config_path, raw = read_config_json(directory)
    text = text_config_from_dict(raw, source=str(config_path))
    print(f"checkpoint   {directory}")
    if "text_config" in raw:
        cfg = R4BConfig.from_hf_dict(raw, source=str(config_path))
        v = cfg.vision_config
        print(f"kind         R-4B ({', '.join(cfg.architectures)})")
        print(f"vision       {v.num_hidden_layers} layers, width {v.hidden_size}, {v.num_attention_heads} heads, "
              f"{v.image_size}px tiles, patch {v.patch_size}; feature layer {cfg.vision_feature_layer}")
        print(f"anyres       {cfg.vision_aspect_ratio}, pinpoints {cfg.image_grid_pinpoints}; "
              f"image token {cfg.image_token_index}")
    else:
        print(f"kind         text-only ({raw.get('model_type', 'qwen3')})")
    print(f"text         {text.num_hidden_layers} layers, width {text.hidden_size}, heads {text.num_attention_heads}/"
          f"{text.num_key_value_heads} x {text.head_dim}, vocab {text.vocab_size}, RoPE {text.rope_type} "
          f"theta {text.rope_theta:g} ({text.rope_form} form); "
          f"lm_head {'tied' if text.tie_word_embeddings else 'separate'}")
    files, index = find_weight_files(directory)
    infos = read_headers(files, index)
    dtypes = Counter(info.dtype for info in infos.values())
    print(f"weights      {len(infos)} tensors in {len(files)} file(s){' (sharded)' if index else ''}; "
          f"dtypes {dict(dtypes)}")
    parts = _count_by_part(infos)
    for part, n in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"  {part:<22} {n:>15,d} parameters")
    print(f"  {'total':<22} {sum(parts.values()):>15,d} parameters")
    if not args.load:
        return 0
    dtype = compute_dtype(args.dtype, directory)
    if "text_config" in raw:
        _load_and_run_r4b(directory, dtype, device)
    else:
        t0 = time.perf_counter()
        model = Qwen3ForCausalLM.from_pretrained(directory, dtype=dtype, device=device, progress=True,
                                                 check_finite=True)
        print(f"loaded       text model strictly in {time.perf_counter() - t0:.2f} s "
              f"({sum(p.numel() for p in model.parameters()):,d} parameters, {_name(dtype)} on {device})")
    return 0


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@torch.no_grad()
def _load_and_run_r4b(directory: Path, dtype: torch.dtype, device: torch.device) -> None:
    """Load the full model strictly and run one forward on the generated 640x480 picture."""
    from r4b_core.models.anyres import num_image_tokens
    from r4b_core.processing.image_processing import ImageProcessorConfig, preprocess_images
    from r4b_core.models.r4b import R4BForConditionalGeneration
    from r4b_core.reference.synthetic import synthetic_picture

    t0 = time.perf_counter()
    model = R4BForConditionalGeneration.from_pretrained(directory, dtype=dtype, device=device, progress=True,
                                                        check_finite=True)
    t1 = time.perf_counter()
    print(f"loaded       full model strictly in {t1 - t0:.2f} s "
          f"({sum(p.numel() for p in model.parameters()):,d} parameters, {_name(dtype)} on {device})")
    width, height = 640, 480
    picture = synthetic_picture(width, height, seed=0)
    inputs = preprocess_images([picture], ImageProcessorConfig.from_pretrained(directory))
    n_image = num_image_tokens((height, width), model.config)
    # <|im_start|> <image> x n_image <|im_end|>: Qwen3's ids around the image tokens
    ids = torch.tensor([[151644, *[model.config.image_token_index] * n_image, 151645]], device=device)
    t2 = time.perf_counter()
    logits = model(ids, pixel_values=inputs["pixel_values"].to(device, dtype),
                   image_sizes=inputs["image_sizes"], logits_to_keep=1).logits
    t3 = time.perf_counter()
    print(f"forward      {width}x{height} picture -> {inputs['pixel_values'].shape[1]} views, {n_image} image tokens; "
          f"{ids.shape[1]}-token prompt in {t3 - t2:.2f} s; next-token argmax {int(logits[0, -1].argmax())}")


@torch.no_grad()
def _run_preset(args: argparse.Namespace, device: torch.device) -> int:
    from r4b_core.config import preset
    from r4b_core.generation.generate import generate
    from r4b_core.models.kv_cache import KVCache
    from r4b_core.models.qwen3 import Qwen3ForCausalLM

    if args.load or args.revision:
        raise UsageError("--load and --revision apply to a CHECKPOINT, not to --preset.")
    dtype = compute_dtype(args.dtype)
    config = preset(args.preset).text_config
    prompt_tokens, new_tokens = args.prompt_tokens, args.max_new_tokens
    torch.manual_seed(args.seed)
    print(f"preset {args.preset}: random-init text decoder, {config.num_hidden_layers} layers, width "
          f"{config.hidden_size}, heads {config.num_attention_heads}/{config.num_key_value_heads} x {config.head_dim}")
    model = Qwen3ForCausalLM(config).to(device=device, dtype=dtype).eval()
    print(f"parameters   {sum(p.numel() for p in model.parameters()):,d} ({_name(dtype)}, {device})")
    prompt = torch.randint(0, config.vocab_size, (1, prompt_tokens), device=device)
    cache = KVCache.for_model(config, 1, prompt_tokens + new_tokens, dtype=dtype, device=device)
    out = generate(model, prompt, max_new_tokens=new_tokens, kv_cache=cache)  # greedy, cached
    tokens = out.tokens[0]
    # the same greedy continuation without the cache, one full forward per token
    seq = prompt
    for _ in range(new_tokens):
        nxt = model(seq, logits_to_keep=1).logits[0, -1].argmax()
        seq = torch.cat([seq, nxt.view(1, 1)], dim=1)  # [1, T + 1]
    same = seq[0, prompt_tokens:].tolist() == tokens
    rate = out.decode_tokens_per_s
    print(f"prefill      {prompt_tokens} tokens, first token after {1e3 * out.time_to_first_token_s:.1f} ms")
    print(f"decode       {new_tokens - 1} cached steps at "
          f"{'n/a' if rate is None else f'{rate:.1f}'} tokens/s")
    print(f"greedy ids   {tokens[:12]}{' ...' if len(tokens) > 12 else ''}")
    print(f"check        cached decode {'equals' if same else 'DIFFERS FROM'} uncached decode")
    return 0 if same else 1
