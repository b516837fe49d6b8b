"""The processor: chat templates rendered exactly as transformers renders them, <image> expansion, left
padding, the model fed end to end (vs the transformers reference), checkpoint consistency checks and
every input error. The checkpoint is the session's tiny synthetic one (conftest.py; 56-pixel tiles, so a
view is 4 x 4 = 16 patches and an image of a multi-image sample costs 16 + 1 tokens)."""

from __future__ import annotations

import json
import re
import shutil

import jinja2
import pytest
import torch
import transformers
from conftest import picture

from r4b_core.models.anyres import num_image_tokens
from r4b_core.processing.image_processing import ImageProcessorConfig, preprocess_images
from r4b_core.processing.processor import (
    BUILTIN_CHAT_TEMPLATE,
    THINKING_MODES,
    ChatTemplateError,
    R4BProcessor,
)

IMAGE_ID, PAD_ID, IM_END_ID, THINK_ID, END_THINK_ID = 151669, 151643, 151645, 151667, 151668
PROCESSOR_FILES = ("config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json")


def copy_processor_files(src, dst):
    """The processor files of a checkpoint (no weights, no generation_config.json, no chat template)."""
    for name in PROCESSOR_FILES:
        shutil.copy(src / name, dst / name)
    edit_json(dst / "tokenizer_config.json", lambda d: d.pop("chat_template", None))
    return dst


@pytest.fixture(scope="module")
def proc_dir(tiny_checkpoint, tmp_path_factory):
    return copy_processor_files(tiny_checkpoint, tmp_path_factory.mktemp("processor"))


@pytest.fixture(scope="module")
def processor(proc_dir):
    return R4BProcessor.from_pretrained(proc_dir)


@pytest.fixture(scope="module")
def hf_tokenizer(proc_dir):
    return transformers.PreTrainedTokenizerFast.from_pretrained(proc_dir)


@pytest.fixture
def files_copy(tiny_checkpoint, tmp_path):
    """A copy of the checkpoint's processor files, to edit."""
    return copy_processor_files(tiny_checkpoint, tmp_path)


def edit_json(path, fn):
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


# ---------------------------------------------------------------------------------------------
# chat templates


IMG_A, IMG_B = picture(150, 90, 0), picture(60, 200, 1)
CONVERSATIONS = {
    "image_then_text": [
        {"role": "user", "content": [{"type": "image", "image": IMG_A}, {"type": "text", "text": "What is this?"}]},
    ],
    "system_and_string_content": [
        {"role": "system", "content": "You are brief."},
        {"role": "user", "content": "<image>\nCount the circles."},
    ],
    "multi_turn": [
        {"role": "system", "content": [{"type": "text", "text": "Answer in English."}]},
        {"role": "user", "content": [{"type": "text", "text": "Compare "}, {"type": "image", "image": IMG_A},
                                     {"type": "text", "text": "and"}, {"type": "image", "image": IMG_B}]},
        {"role": "assistant", "content": "<think>\nshapes\n</think>\n\nThe first is wider."},
        {"role": "user", "content": [{"type": "text", "text": "Why?"}]},
    ],
    "text_only": [{"role": "user", "content": "Hi"}],
}


@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("mode", THINKING_MODES)
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_builtin_template_renders_as_transformers(processor, hf_tokenizer, name, mode, generation_prompt):
    assert processor.chat_template is None  # the synthetic checkpoint ships no template
    conversation = CONVERSATIONS[name]
    ours = processor.apply_chat_template(conversation, thinking_mode=mode, add_generation_prompt=generation_prompt)
    theirs = hf_tokenizer.apply_chat_template(conversation, chat_template=BUILTIN_CHAT_TEMPLATE, tokenize=False,
                                              add_generation_prompt=generation_prompt, thinking_mode=mode)
    assert ours == theirs


def test_builtin_template_text(processor):
    """The inferred layout itself (r4b_spec.md §3.2), pinned string by string."""
    conv = CONVERSATIONS["multi_turn"]
    body = ("<|im_start|>system\nAnswer in English.<|im_end|>\n"
            "<|im_start|>user\nCompare <image>\nand<image>\n<|im_end|>\n"
            "<|im_start|>assistant\n<think>\nshapes\n</think>\n\nThe first is wider.<|im_end|>\n"
            "<|im_start|>user\nWhy?<|im_end|>\n")
    assert processor.apply_chat_template(conv, add_generation_prompt=False) == body
    suffix = {"auto": "", "long": "<think>\n", "short": "<think>\n\n</think>\n\n"}
    for mode, tail in suffix.items():
        assert processor.apply_chat_template(conv, thinking_mode=mode) == body + "<|im_start|>assistant\n" + tail
    assert processor.apply_chat_template(CONVERSATIONS["image_then_text"]) == (
        "<|im_start|>user\n<image>\nWhat is this?<|im_end|>\n<|im_start|>assistant\n")
    batch = processor.apply_chat_template([CONVERSATIONS["text_only"], CONVERSATIONS["text_only"]])
    assert batch == ["<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"] * 2


def test_builtin_template_refuses_unknown_mode_and_items(processor, hf_tokenizer):
    conv = CONVERSATIONS["text_only"]
    with pytest.raises(ValueError, match="thinking_mode must be one of 'auto', 'long', 'short'; got 'medium'"):
        processor.apply_chat_template(conv, thinking_mode="medium")
    # the template's own guard, as transformers runs it
    with pytest.raises(jinja2.exceptions.TemplateError, match="got 'medium'"):
        hf_tokenizer.apply_chat_template(conv, chat_template=BUILTIN_CHAT_TEMPLATE, tokenize=False,
                                         thinking_mode="medium")
    video = [{"role": "user", "content": [{"type": "video", "video": "v.mp4"}]}]
    with pytest.raises(ChatTemplateError, match="type 'image' or 'text'; got 'video'"):
        processor.apply_chat_template(video)
    with pytest.raises(ValueError, match="'video' content item is not supported"):
        processor(messages=video)


CUSTOM_TEMPLATE = """\
{%- set ns = namespace(turns=0) -%}
{%- for message in messages -%}
    {%- if message.role not in ["system", "user", "assistant"] -%}
        {{ raise_exception("unsupported role: " ~ message.role) }}
    {%- endif -%}
    {%- if message.role == "system" and skip_system -%}
        {%- continue -%}
    {%- endif -%}
    {%- set ns.turns = ns.turns + 1 %}
  [{{ message.role | upper }} {{ ns.turns }}]
    {% if message.content is string %}
{{ message.content }}
    {% else %}
        {% for item in message.content %}
            {% if loop.index > 3 %}{% break %}{% endif %}
            {% if item.type == "image" %}<image> plain={{ item.image is string }}{% else %}{{ item.text }}{% endif %}

        {% endfor %}
    {% endif %}
    meta={{ message.get("meta", dict(none=true)) | tojson }}
    {{ message.get("meta", {}) | tojson(indent=2, sort_keys=True) }}
    {% if message.role == "assistant" %}{% generation %}{{ eos_token }}{% endgeneration %}{% endif %}
    extra={{ message.extra is defined }} reasoning={{ message.reasoning_content | default("-") }}
{% endfor %}
{%- if add_generation_prompt %}
<|im_start|>assistant mode={{ thinking_mode }} pad={{ pad_token }} bos={{ bos_token is defined }}
{% endif %}"""


def test_custom_template_renders_as_transformers(files_copy):
    (files_copy / "chat_template.jinja").write_text(CUSTOM_TEMPLATE)
    processor = R4BProcessor.from_pretrained(files_copy)
    assert processor.chat_template == CUSTOM_TEMPLATE
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(files_copy)  # reads chat_template.jinja itself
    conv = [
        {"role": "system", "content": "sys"},
        {"role": "user", "meta": {"zeta": "café <b>&</b>", "alpha": [1, 2.5, None]},
         "content": [{"type": "image", "image": IMG_A}, {"type": "text", "text": "a"}, {"type": "text", "text": "b"},
                     {"type": "text", "text": "dropped by break"}]},
        {"role": "assistant", "content": "ok", "extra": None, "reasoning": "because"},
    ]
    for skip in (True, False):
        for mode in THINKING_MODES:
            ours = processor.apply_chat_template(conv, thinking_mode=mode, skip_system=skip)
            theirs = hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=True, thinking_mode=mode,
                                            skip_system=skip)
            assert ours == theirs
    assert "café <b>&</b>" in ours and "dropped" not in ours and "mode=short" in ours  # no HTML escaping
    assert "plain=True" in ours and "extra=False reasoning=because" in ours  # as transformers prepares messages
    bad = conv + [{"role": "tool", "content": "x"}]
    with pytest.raises(ChatTemplateError, match="unsupported role: tool"):
        processor.apply_chat_template(bad, skip_system=True)
    with pytest.raises(jinja2.exceptions.TemplateError, match="unsupported role: tool"):
        hf.apply_chat_template(bad, tokenize=False, skip_system=True)
    # the processor expands the template's <image> like any other
    out = processor(messages=conv)
    assert int((out["input_ids"] == IMAGE_ID).sum()) == num_image_tokens((90, 150), processor.config)


def test_chat_template_lookup_order(files_copy):
    def template_of():
        return R4BProcessor.from_pretrained(files_copy).chat_template

    assert template_of() is None
    edit_json(files_copy / "tokenizer_config.json", lambda d: d.update(chat_template="from tokenizer_config"))
    assert template_of() == "from tokenizer_config"
    (files_copy / "chat_template.json").write_text(json.dumps({"chat_template": "from chat_template.json"}))
    assert template_of() == "from chat_template.json"
    (files_copy / "chat_template.jinja").write_text("from chat_template.jinja")
    assert template_of() == "from chat_template.jinja"
    (files_copy / "chat_template.jinja").unlink()
    (files_copy / "chat_template.json").unlink()
    named = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "the default"}]
    edit_json(files_copy / "tokenizer_config.json", lambda d: d.update(chat_template=named))
    assert template_of() == "the default"
    edit_json(files_copy / "tokenizer_config.json", lambda d: d.update(chat_template=named[:1]))
    with pytest.raises(ValueError, match="none named 'default'"):
        template_of()


# ---------------------------------------------------------------------------------------------
# token ids and images


def runs(ids: list[int], token: int) -> list[tuple[int, int]]:
    """(start, length) of each maximal run of ``token``."""
    out, i = [], 0
    while i < len(ids):
        if ids[i] == token:
            j = i
            while j < len(ids) and ids[j] == token:
                j += 1
            out.append((i, j - i))
            i = j
        else:
            i += 1
    return out


def test_single_image_expansion_and_pixels(tiny_checkpoint, processor, hf_tokenizer):
    prompt = "<|im_start|>user\n<image>\nWhat is this?<|im_end|>\n<|im_start|>assistant\n"
    out = processor(text=prompt, images=[IMG_A])
    n = num_image_tokens((90, 150), processor.config)
    assert n == 16 + 4 * 8 + 4  # base view + the 2 x 2 tiles' 8 x 8 map unpadded to 4 x 8 + one newline per row
    before, after = prompt.split("<image>")
    want = processor.encode(before) + [IMAGE_ID] * n + processor.encode(after)
    assert out["input_ids"].tolist() == [want] and out["input_ids"].dtype == torch.int64
    assert out["attention_mask"].tolist() == [[1] * len(want)]
    assert want == hf_tokenizer(prompt.replace("<image>", "<image>" * n))["input_ids"]  # transformers' tokenizer
    ref = preprocess_images([IMG_A], ImageProcessorConfig.from_pretrained(tiny_checkpoint))
    for key in ("pixel_values", "image_sizes", "batch_num_images"):
        assert torch.equal(out[key], ref[key]), key
    # the same through messages: images inside the content, and via images= for placeholder-only items
    conv = CONVERSATIONS["image_then_text"]
    assert torch.equal(processor(messages=conv)["input_ids"], out["input_ids"])
    bare = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    assert torch.equal(processor(messages=bare, images=IMG_A)["input_ids"], out["input_ids"])


def test_batch_left_padding(processor):
    texts = ["<image>\nWide one.", "Text only, a longer prompt than the others here.", "Tall <image> one"]
    out = processor(text=texts, images=[[IMG_A], [], [IMG_B]])
    ids, mask = out["input_ids"], out["attention_mask"]
    singles = [processor(text=t, images=[im] if im else None)["input_ids"][0]
               for t, im in zip(texts, [IMG_A, None, IMG_B])]
    assert ids.shape == (3, max(len(s) for s in singles))
    for row, m, single in zip(ids, mask, singles):
        pad = ids.shape[1] - len(single)
        assert pad > 0 or len(single) == ids.shape[1]
        assert row[:pad].tolist() == [PAD_ID] * pad and m[:pad].tolist() == [0] * pad  # LEFT padding
        assert torch.equal(row[pad:], single) and m[pad:].tolist() == [1] * len(single)
    counts = [int((r == IMAGE_ID).sum()) for r in ids]
    assert counts == [num_image_tokens((90, 150), processor.config), 0, num_image_tokens((200, 60), processor.config)]
    ref = preprocess_images([[IMG_A], [IMG_B]], processor.image_config)  # the text-only sample has no entry
    for key in ("pixel_values", "image_sizes", "batch_num_images"):
        assert torch.equal(out[key], ref[key]), key
    assert processor(text=texts[1])["input_ids"].shape[0] == 1 and "pixel_values" not in processor(text=texts[1])


def test_multi_image_prompt(processor):
    images = [IMG_A, IMG_B, picture(40, 40, 2)]
    conv = [{"role": "user", "content": [{"type": "text", "text": "One"}, {"type": "image", "image": images[0]},
                                         {"type": "text", "text": "two"}, {"type": "image", "image": images[1]},
                                         {"type": "image", "image": images[2]}, {"type": "text", "text": "end"}]}]
    out = processor(messages=conv)
    ids = out["input_ids"][0].tolist()
    assert num_image_tokens((90, 150), processor.config, multi_image=True) == 17
    # three runs of P + 1 = 17, never merged: each <image>\n keeps a newline token between the images
    assert [n for _, n in runs(ids, IMAGE_ID)] == [17, 17, 17]
    prompt = processor.apply_chat_template(conv)
    pieces = prompt.split("<image>")
    want = processor.encode(pieces[0])
    for piece in pieces[1:]:
        want += [IMAGE_ID] * 17 + processor.encode(piece)
    assert ids == want
    ref = preprocess_images([images], processor.image_config)
    assert out["batch_num_images"].tolist() == [3] and out["pixel_values"].shape[1] == 1
    assert torch.equal(out["pixel_values"], ref["pixel_values"]) and torch.equal(out["image_sizes"], ref["image_sizes"])
    # a flat images= list is one sample
    flat = processor(text="<image><image><image>", images=images)
    assert [n for _, n in runs(flat["input_ids"][0].tolist(), IMAGE_ID)] == [51]


def test_model_runs_on_processor_output_and_matches_reference(processor, tiny_model, tiny_reference):
    ours, ref = tiny_model, tiny_reference  # the session's, of the same checkpoint as the processor's files
    batch = [
        CONVERSATIONS["image_then_text"],
        [{"role": "user", "content": "No picture here, just a question to answer."}],
        [{"role": "user", "content": [{"type": "image", "image": IMG_B}, {"type": "image", "image": IMG_A},
                                      {"type": "text", "text": "Which is taller?"}]}],
        [{"role": "user", "content": [{"type": "text", "text": "Tall:"}, {"type": "image", "image": IMG_B}]}],
    ]
    inputs = processor(messages=batch, thinking_mode="long")
    assert inputs["batch_num_images"].tolist() == [1, 2, 1]
    with torch.no_grad():
        got = ours(**inputs).logits
        want = ref(**inputs).logits
    real = inputs["attention_mask"].bool()
    assert (~real).any() and want[real].abs().max() > 1.0
    assert (got[real] - want[real]).abs().max().item() <= 1e-4


# ---------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("kwargs, message", [
    (dict(text="<image> and <image>", images=[IMG_A]), "2 <image> placeholder\\(s\\) but 1 image"),
    (dict(text="no placeholder", images=[IMG_A]), "0 <image> placeholder\\(s\\) but 1 image"),
    (dict(text=["<image>", "plain"], images=[[IMG_A], [IMG_B]]), "sample 1: the prompt has 0 <image>"),
    # transformers' parsing of content (typed "<image>" is a placeholder): only with the explicit option
    (dict(messages=CONVERSATIONS["system_and_string_content"], parse_special_tokens_in_content=True),
     "1 <image> placeholder\\(s\\) but 0 image"),
    (dict(messages=CONVERSATIONS["image_then_text"], images=[IMG_A]), "both inside the messages and as images="),
    (dict(text="<image>", thinking_mode="medium"), "thinking_mode must be one of"),
    (dict(), "nothing to process"),
    (dict(text=""), "text is an empty string"),
    (dict(text=[]), "text is an empty list"),
    (dict(text=["ok", ""]), "text\\[1\\] is an empty string"),
    (dict(messages=[]), "non-empty list"),
    (dict(messages=[[]]), "conversation 0 is empty"),
    (dict(messages=[[{"role": "user", "content": "a"}], []]), "conversation 1 is empty"),
    (dict(text="hi", messages=CONVERSATIONS["text_only"]), "not both"),
    (dict(text=["<image>", "<image>"], images=[IMG_A, IMG_B]), "one list per prompt"),
    (dict(text="<image>", images=[[IMG_A], IMG_B]), "mixes lists and single images"),
    (dict(text="<image>", images=[[IMG_A], [IMG_B]]), "2 per-sample lists for 1 prompt"),
    (dict(messages=[{"role": "user", "content": [{"type": "image", "url": "https://x.org/a.png"}]}]),
     "URLs are not fetched"),
])
def test_input_errors(processor, kwargs, message):
    with pytest.raises(ValueError, match=message):
        processor(**kwargs)


def test_image_token_id_mismatch(files_copy):
    edit_json(files_copy / "config.json", lambda d: d.update(image_token_index=151646))
    with pytest.raises(ValueError, match=r"config.json says image_token_index = 151646 .*tokenizer.json encodes "
                                         r"'<image>' as id 151669"):
        R4BProcessor.from_pretrained(files_copy)


def test_tokenizer_without_image_token(files_copy):
    def rename(d):
        for entry in d["added_tokens"]:
            if entry["content"] == "<image>":
                entry["content"] = "<img>"
        d["model"]["vocab"]["<img>"] = d["model"]["vocab"].pop("<image>")

    edit_json(files_copy / "tokenizer.json", rename)
    edit_json(files_copy / "tokenizer_config.json", lambda d: d.pop("added_tokens_decoder"))
    with pytest.raises(ValueError, match="tokenizer.json has no added token '<image>'; config.json expects it at "
                                         "id 151669"):
        R4BProcessor.from_pretrained(files_copy)


def test_tokenizer_files_disagree(files_copy):
    edit_json(files_copy / "tokenizer_config.json",
              lambda d: d["added_tokens_decoder"].update({"151000": d["added_tokens_decoder"].pop(str(THINK_ID))}))
    with pytest.raises(ValueError, match="'<think>' at id 151000 .* gives it id 151667"):
        R4BProcessor.from_pretrained(files_copy)


def test_preprocessor_must_agree_with_config(files_copy):
    edit_json(files_copy / "preprocessor_config.json", lambda d: d.update(image_grid_pinpoints=[[56, 56], [56, 112]]))
    with pytest.raises(ValueError, match=r"image_grid_pinpoints mismatch: .*preprocessor_config.json has \[\[56, 56\], "
                                         r"\[56, 112\]\] but .*config.json has \[\[56, 112\]"):
        R4BProcessor.from_pretrained(files_copy)
    edit_json(files_copy / "preprocessor_config.json", lambda d: d.update(size={"height": 28, "width": 28}))
    with pytest.raises(ValueError, match="tile size mismatch: .*vision_config.image_size = 56"):
        R4BProcessor.from_pretrained(files_copy)


# ---------------------------------------------------------------------------------------------
# special tokens, decoding, thinking


def test_special_token_ids(files_copy, processor):
    assert processor.image_token_id == IMAGE_ID and processor.pad_token_id == PAD_ID
    assert processor.special_tokens == {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    assert not (files_copy / "generation_config.json").exists()
    assert processor.eos_token_ids == [IM_END_ID]  # tokenizer_config's eos_token
    (files_copy / "generation_config.json").write_text(json.dumps({"eos_token_id": [IM_END_ID, PAD_ID]}))
    assert R4BProcessor.from_pretrained(files_copy).eos_token_ids == [IM_END_ID, PAD_ID]
    (files_copy / "generation_config.json").write_text(json.dumps({"eos_token_id": PAD_ID}))
    assert R4BProcessor.from_pretrained(files_copy).eos_token_ids == [PAD_ID]
    (files_copy / "generation_config.json").write_text(json.dumps({"eos_token_id": "<|im_end|>"}))
    message = re.escape("generation_config.json: eos_token_id = '<|im_end|>' should be an id")
    with pytest.raises(ValueError, match=message):
        R4BProcessor.from_pretrained(files_copy)
    (files_copy / "generation_config.json").unlink()
    edit_json(files_copy / "tokenizer_config.json", lambda d: d.update(pad_token="<|pad|>"))
    with pytest.raises(ValueError, match=re.escape("names pad_token = '<|pad|>' but the vocabulary has no such token")):
        R4BProcessor.from_pretrained(files_copy)


def test_encode_decode(processor, hf_tokenizer):
    text = "<|im_start|>assistant\n<think>\nFirst, count the shapes.\n</think>\n\nThe answer is 3.<|im_end|>"
    ids = processor.encode(text)
    assert ids == hf_tokenizer(text)["input_ids"]
    assert ids[0] == 151644 and ids[-1] == IM_END_ID and THINK_ID in ids and END_THINK_ID in ids
    assert processor.decode(ids, skip_special_tokens=False) == text
    # <think> / </think> are not special: they survive skip_special_tokens (VLMEvalKit relies on this)
    assert processor.decode(torch.tensor(ids)) == hf_tokenizer.decode(ids, skip_special_tokens=True)
    assert processor.decode(ids) == "assistant\n<think>\nFirst, count the shapes.\n</think>\n\nThe answer is 3."
