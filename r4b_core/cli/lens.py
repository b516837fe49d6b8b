"""``r4b lens``: the logit lens (r4b_core/interp/logit_lens.py) on a chat prompt with optional pictures.

For each decoder layer, the final norm and lm_head applied to that layer's residual stream at the
chosen positions (default: the prompt's last, where the answer's first token is predicted); prints the
top-k tokens per layer as text, id and probability (``--json``: one object).
"""

from __future__ import annotations

import argparse
import json

from r4b_core.cli.common import add_chat_prompt_options, positive_int, set_up


def add_parser(subparsers: argparse._SubParsersAction,
               parents: list[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "lens", parents=parents, help="logit lens: each layer's top next-token guesses at chosen positions",
        description="Apply the final norm and lm_head to every decoder layer's residual stream at the chosen "
                    "positions of the chat prompt and print each layer's top-k next tokens with their "
                    "probabilities. Default checkpoint: the built-in random-init synthetic one.")
    add_chat_prompt_options(
        p, image="a picture (file or http(s)/file URL); repeat for several; none for a text-only prompt",
        prompt="the user's message", thinking="chat template thinking mode (default auto)")
    p.add_argument("--positions", type=int, nargs="+", metavar="P",
                   help="token positions of the prompt (negative from the end; default: the last)")
    p.add_argument("--layers", type=int, nargs="+", metavar="L",
                   help="decoder layers to show (negative from the end; default: all)")
    p.add_argument("--top-k", type=positive_int, default=5, help="tokens shown per layer (default 5)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return p


def run(args: argparse.Namespace) -> int:
    from r4b_core.interp.indices import check_layers
    from r4b_core.config import R4BConfig
    from r4b_core.interp.logit_lens import lens_for_prompt

    setup = set_up(args, args.image, synthetic_note=None if args.json else "its guesses are random")
    config = R4BConfig.from_pretrained(setup.directory)
    layers = check_layers(args.layers, config.text_config.num_hidden_layers)  # before the weights load
    if args.top_k > config.text_config.vocab_size:
        raise ValueError(f"--top-k {args.top_k} is larger than the vocabulary ({config.text_config.vocab_size}).")
    processor = setup.load_processor()
    model = setup.load_model(progress=not args.json)
    result = lens_for_prompt(model, processor, args.prompt, setup.images, positions=args.positions, top_k=args.top_k,
                             thinking_mode=args.thinking_mode, layers=layers)

    def decode(ids: list[int]) -> str:
        return processor.decode(ids, skip_special_tokens=False)

    if args.json:
        print(json.dumps(result.as_dict(decode), ensure_ascii=False))
    else:
        print(result.table(decode))
    return 0
