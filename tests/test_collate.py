"""Training examples and batches (training_data.py): ``build_training_example`` (labels on assistant turns
only, as the chat template renders them) and ``collate`` (right padding, images kept straight).
Tiny synthetic checkpoint: 56-pixel tiles, so a view is 16 image tokens."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from conftest import picture

from r4b_core.models.anyres import num_image_tokens
from r4b_core.models.r4b import R4BForConditionalGeneration
from r4b_core.processing.processor import R4BProcessor
from r4b_core.training.data import build_training_example, collate

IMAGE_ID = 151669


def user(text, n_images=0):
    return {"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}


def assistant(text):
    return {"role": "assistant", "content": text}


def target_texts(tiny_processor, example):
    """The decoded runs of consecutive label tokens."""
    runs = itertools.groupby(zip(example["input_ids"].tolist(), example["labels"].tolist()), key=lambda t: t[1] != -100)
    return [tiny_processor.decode([i for i, _ in run], skip_special_tokens=False) for is_label, run in runs if is_label]


def test_labels_cover_assistant_turns_with_thinking_and_end_token(tiny_processor):
    thought = "<think>\nThe shape is round and red.\n</think>\n\na red circle"
    messages = [{"role": "system", "content": "Describe pictures."}, user("What is this?", 1), assistant(thought),
                user("Sure?"), assistant("yes")]
    image = picture(90, 60, 0)
    ex = build_training_example(tiny_processor, messages, [image])
    assert target_texts(tiny_processor, ex) == [thought + "<|im_end|>", "yes<|im_end|>"]
    # the ids are exactly what the inference path tokenizes for the same text (no boundary effects)
    full = tiny_processor.apply_chat_template(messages, add_generation_prompt=False)
    want = tiny_processor(text=full, images=[image])["input_ids"][0]
    assert torch.equal(ex["input_ids"], want)
    assert ex["labels"].shape == ex["input_ids"].shape and ex["labels"].dtype == torch.int64
    n_image = num_image_tokens((60, 90), tiny_processor.config)
    assert int((ex["input_ids"] == IMAGE_ID).sum()) == n_image and not (ex["labels"] == IMAGE_ID).any()
    assert ex["pixel_values"].shape[0] == 1 and ex["image_sizes"].tolist() == [[60, 90]]


def test_images_inside_messages_and_multi_image(tiny_processor):
    a, b = picture(40, 70, 1), picture(64, 64, 2)
    messages = [{"role": "user", "content": [{"type": "image", "image": a}, {"type": "image", "image": b},
                                             {"type": "text", "text": "Compare."}]}, assistant("two shapes")]
    ex = build_training_example(tiny_processor, messages)
    assert int((ex["input_ids"] == IMAGE_ID).sum()) == 2 * (16 + 1)  # multi-image: one view + a newline each
    assert ex["pixel_values"].shape[:2] == (2, 1)
    assert target_texts(tiny_processor, ex) == ["two shapes<|im_end|>"]


def test_image_tokens_are_never_labels_even_inside_an_assistant_turn(tiny_processor):
    answer = {"role": "assistant", "content": [{"type": "image"}, {"type": "text", "text": "done"}]}
    messages = [user("draw it"), answer]
    ex = build_training_example(tiny_processor, messages, [picture(56, 56, 3)])
    assert (ex["input_ids"] == IMAGE_ID).sum() > 0 and not (ex["labels"] == IMAGE_ID).any()
    assert target_texts(tiny_processor, ex) == ["\ndone<|im_end|>"]


@pytest.mark.parametrize("mode, content, learned", [
    ("auto", "<think>\nhmm\n</think>\n\nok", "<think>\nhmm\n</think>\n\nok<|im_end|>"),  # the model decides
    ("long", "<think>\nhmm\n</think>\n\nok", "hmm\n</think>\n\nok<|im_end|>"),  # <think>\n is in the prompt
    ("short", "<think>\n\n</think>\n\nok", "ok<|im_end|>"),  # the empty thought is in the prompt
])
def test_thinking_modes_label_what_follows_the_generation_prompt(tiny_processor, mode, content, learned):
    ex = build_training_example(tiny_processor, [user("hi"), assistant(content)], thinking_mode=mode)
    assert target_texts(tiny_processor, ex) == [learned]


def test_content_that_does_not_continue_the_forced_prompt_is_an_error(tiny_processor):
    with pytest.raises(ValueError, match="generation prompt of thinking_mode='long'"):
        build_training_example(tiny_processor, [user("hi"), assistant("no thinking here")], thinking_mode="long")


def test_input_errors(tiny_processor):
    img = picture(30, 30, 3)
    with pytest.raises(ValueError, match="no assistant turn"):
        build_training_example(tiny_processor, [user("hi", 1)], [img])
    with pytest.raises(ValueError, match="more images than placeholders"):
        build_training_example(tiny_processor, [user("hi", 1), assistant("ok")], [img, img])
    with pytest.raises(ValueError, match="fewer images than placeholders"):
        build_training_example(tiny_processor, [user("hi", 2), assistant("ok")], [img])
    with pytest.raises(ValueError, match="fewer images than placeholders"):
        build_training_example(tiny_processor, [user("hi", 1), assistant("ok")])
    with pytest.raises(ValueError, match="max_length"):
        build_training_example(tiny_processor, [user("hi"), assistant("ok")], max_length=3)
    with pytest.raises(ValueError, match="one conversation"):
        build_training_example(tiny_processor, [[user("hi"), assistant("ok")]])


def test_a_template_that_rewrites_earlier_turns_is_refused(tiny_processor):
    """Qwen3-style templates drop the thinking of earlier assistant turns; boundaries cannot be located."""
    rewriting = copy.copy(tiny_processor)
    rewriting.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n"
        "{% if m.role == 'assistant' and not loop.last %}{{ m.content.split('</think>')[-1] }}"
        "{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    messages = [user("a"), assistant("<think>x</think>b"), user("c"), assistant("d")]
    with pytest.raises(ValueError, match="rewrites earlier turns"):
        build_training_example(rewriting, messages)
    assert target_texts(rewriting, build_training_example(rewriting, messages[:2])) == ["<think>x</think>b<|im_end|>"]


def test_collate_pads_right_and_keeps_images_straight(tiny_processor):
    examples = [
        build_training_example(tiny_processor, [user("one", 1), assistant("a red circle")], [picture(150, 90, 4)]),
        build_training_example(tiny_processor, [user("two", 2), assistant("b")], [picture(40, 40, 5), picture(50, 80, 6)]),
        build_training_example(tiny_processor, [user("text only, a longer question"), assistant("ok")]),
    ]
    batch = collate(examples, tiny_processor.pad_token_id)
    lengths = [len(ex["input_ids"]) for ex in examples]
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, max(lengths))
    for i, (ex, n) in enumerate(zip(examples, lengths)):
        assert torch.equal(batch["input_ids"][i, :n], ex["input_ids"])  # real tokens first: right padding
        assert torch.equal(batch["labels"][i, :n], ex["labels"])
        assert (batch["labels"][i, n:] == -100).all() and (batch["input_ids"][i, n:] == tiny_processor.pad_token_id).all()
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (max(lengths) - n)
    assert batch["batch_num_images"].tolist() == [1, 2, 0]
    assert batch["image_sizes"].tolist() == [[90, 150], [40, 40], [80, 50]]
    views = examples[0]["pixel_values"].shape[1]
    assert batch["pixel_values"].shape[:2] == (3, views)  # the multi-image views are zero-padded to 5
    assert torch.equal(batch["pixel_values"][1:, 1:], torch.zeros_like(batch["pixel_values"][1:, 1:]))
    assert torch.equal(batch["pixel_values"][1:, :1], examples[1]["pixel_values"])
    assert collate(examples, 7, pad_to_multiple_of=64)["input_ids"].shape[1] % 64 == 0
    text_only = collate(examples[2:], tiny_processor.pad_token_id)
    assert set(text_only) == {"input_ids", "attention_mask", "labels"}


def test_a_collated_batch_gives_each_example_the_loss_it_has_alone(tiny_checkpoint, tiny_processor):
    """Right padding changes nothing for real tokens: the batch loss is the token-weighted mean of the
    examples' own losses (which also shows image counts and views line up with the image tokens)."""
    model = R4BForConditionalGeneration.from_pretrained(tiny_checkpoint)
    examples = [
        build_training_example(tiny_processor, [user("q", 1), assistant("a red circle")], [picture(150, 90, 7)]),
        build_training_example(tiny_processor, [user("q", 2), assistant("two")], [picture(40, 40, 8), picture(50, 80, 9)]),
        build_training_example(tiny_processor, [user("say something long enough to pad"), assistant("ok")]),
    ]
    with torch.no_grad():
        batch_loss = model(**collate(examples, tiny_processor.pad_token_id)).loss
        alone = [(model(**collate([ex], tiny_processor.pad_token_id)).loss, int((ex["labels"][1:] != -100).sum()))
                 for ex in examples]
    want = sum(loss * n for loss, n in alone) / sum(n for _, n in alone)
    assert abs(batch_loss.item() - want.item()) <= 1e-5
