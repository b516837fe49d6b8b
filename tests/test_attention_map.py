"""``r4b attention-map`` and ``r4b lens``: the numbers against the model's own outputs, the overlay, the
atomic PNG write, and the commands end to end on the tiny synthetic checkpoint.

References computed in the same test: the attention mass against ``output_attentions=True`` (the
model's transformers-convention output, a different code path from the pattern hook the tool uses);
the lens against the model's real logits (last layer) and ``output_hidden_states`` (the others).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from r4b_core.models import anyres
from r4b_core.interp.attention_map import compute_attention_map, render_overlay, save_png
from r4b_core.interp.indices import check_layers
from r4b_core.cli.main import main
from r4b_core.config import preset
from r4b_core.interp.image_regions import image_token_map, token_boxes
from r4b_core.interp.logit_lens import lens_for_prompt, logit_lens
from r4b_core.processing.processor import R4BProcessor

from conftest import picture


def test_attention_mass_equals_output_attentions(tiny_model, tiny_processor):
    pic = picture(300, 140, seed=3)
    result = compute_attention_map(tiny_model, tiny_processor, pic, "Where is the red disc?", new_tokens=3, layers=[-1])
    ids = torch.tensor([result.input_ids])
    inputs = tiny_processor(messages=[{"role": "user", "content": [{"type": "image"}, {"type": "text",
                       "text": "Where is the red disc?"}]}], images=[pic], thinking_mode="short")
    assert torch.equal(ids[:, :inputs["input_ids"].shape[1]], inputs["input_ids"])  # the prompt, then the answer
    with torch.no_grad():
        out = tiny_model(ids, pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
                         output_attentions=True)
    last = out.attentions[-1][0]  # [H, T, T]
    prompt_len = inputs["input_ids"].shape[1]
    assert result.query_positions == list(range(prompt_len - 1, ids.shape[1] - 1)) and len(result.answer_ids) == 3
    positions = (ids[0] == tiny_model.config.image_token_index).nonzero()[:, 0]
    expected = last[:, result.query_positions][:, :, positions].sum((0, 1)).double()
    assert torch.allclose(result.token_mass, expected, rtol=1e-5, atol=1e-6)
    assert result.layers == [tiny_model.config.text_config.num_hidden_layers - 1]
    assert result.total_mass == tiny_model.config.text_config.num_attention_heads * 3
    # the heat map holds the image tokens' mass (newlines have no place on the picture)
    assert float(result.heat.sum()) == pytest.approx(result.image_mass - result.newline_mass, rel=1e-6)
    assert result.heat.shape == (140, 300)


def test_one_chosen_token_and_prompt_only(tiny_model, tiny_processor):
    pic = picture(90, 200, seed=4)
    only = compute_attention_map(tiny_model, tiny_processor, pic, "Colour?", new_tokens=0)
    assert only.answer_ids == [] and only.query_positions == [len(only.input_ids) - 1]
    chosen = compute_attention_map(tiny_model, tiny_processor, pic, "Colour?", new_tokens=0, token=-1)
    assert torch.equal(chosen.token_mass, only.token_mass)
    with pytest.raises(ValueError, match="out of range"):
        compute_attention_map(tiny_model, tiny_processor, pic, "Colour?", new_tokens=0, token=10_000)
    with pytest.raises(ValueError, match="layer 7 is out of range"):
        check_layers([7], 2)
    assert check_layers([-1, 0, 1], 2) == [0, 1]


def test_overlay_touches_only_hot_pixels_and_grid_lines_up():
    pic = picture(200, 120, seed=5)
    heat = torch.zeros(120, 200, dtype=torch.float64)
    heat[30:60, 50:90] = 2.0
    out = np.asarray(render_overlay(pic, heat)).astype(int)
    src = np.asarray(pic).astype(int)
    changed = (out != src).any(-1)
    assert changed[30:60, 50:90].all() and changed.sum() == 30 * 40
    assert np.array_equal(np.asarray(render_overlay(pic, torch.zeros(120, 200))), src)  # no heat: the picture
    with pytest.raises(ValueError, match="picture is 120 x 200"):
        render_overlay(pic, torch.zeros(200, 120))
    # the tile outlines of the grid sit on the tile edges that the map computes
    config = preset("tiny")
    m = image_token_map(config, [(120, 200)], positions=torch.arange(anyres.num_image_tokens((120, 200), config)))
    grey = Image.new("RGB", (200, 120), (100, 100, 100))
    gridded = np.asarray(render_overlay(grey, torch.zeros(120, 200), token_map=m)).astype(int)
    cyanish = (gridded[..., 2] - gridded[..., 0] > 100) & (gridded[..., 1] - gridded[..., 0] > 100)
    boxes = token_boxes(m)
    views = [v for v in m.view.unique().tolist() if v > 0]
    assert len(views) >= 2
    for v in views:
        b = boxes[m.view == v]
        x0, y0, x1, y1 = int(b[:, 0].min()), int(b[:, 1].min()), int(b[:, 2].max()), int(b[:, 3].max())
        assert cyanish[y0:y1, x0].mean() > 0.5 and cyanish[y0, x0:x1].mean() > 0.5, v  # left and top edges
        assert cyanish[y0:y1, x1 - 1].mean() > 0.5 and cyanish[y1 - 1, x0:x1].mean() > 0.5, v  # right and bottom
        assert not cyanish[(y0 + y1) // 2, x0 + 3:x1 - 3].any()  # inside: cell lines are faint, not cyan


def test_save_png_is_atomic_and_never_replaces_without_force(tmp_path):
    target = tmp_path / "map.png"
    target.write_bytes(b"not mine")
    image = Image.new("RGB", (8, 6), (10, 20, 30))
    with pytest.raises(FileExistsError, match="--force"):
        save_png(image, target)
    assert target.read_bytes() == b"not mine"
    save_png(image, target, force=True)
    assert Image.open(target).size == (8, 6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.png"]  # no temporary file left behind
    with pytest.raises(FileNotFoundError, match="no such directory"):
        save_png(image, tmp_path / "missing" / "map.png")


def test_attention_map_command(tiny_checkpoint, tmp_path, capsys):
    src = tmp_path / "wide.png"
    picture(330, 120, seed=6).save(src)
    out = tmp_path / "map.png"
    code = main(["attention-map", "--model", str(tiny_checkpoint), "--image", str(src), "--prompt", "What?",
                 "--out", str(out), "--layers", "0", "--max-new-tokens", "2", "--grid", "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert Image.open(out).size == (330, 120) and summary["picture"] == [330, 120]
    assert len(summary["answer_ids"]) == 2 and summary["layers"] == [0]
    shares = summary["base_view_share"] + summary["tiles_share"] + summary["newline_share"]
    assert shares == pytest.approx(summary["image_share"]) and 0 < summary["image_share"] <= 1
    before = out.read_bytes()
    assert main(["attention-map", "--model", str(tiny_checkpoint), "--image", str(src), "--prompt", "What?",
                 "--out", str(out)]) == 1
    assert "--force" in capsys.readouterr().err and out.read_bytes() == before
    assert main(["attention-map", "--model", str(tiny_checkpoint), "--image", str(src), "--prompt", "What?",
                 "--out", str(tmp_path / "m2.png"), "--layers", "9"]) == 1
    assert "layer 9 is out of range" in capsys.readouterr().err and not (tmp_path / "m2.png").exists()


# ---------------------------------------------------------------------------------------------
# logit lens


def test_lens_last_layer_is_the_models_prediction_and_others_match_hidden_states(tiny_model, tiny_processor):
    pic = picture(120, 90, seed=7)
    result = lens_for_prompt(tiny_model, tiny_processor, "Name the shapes.", [pic], positions=[-1, -4, 3], top_k=4)
    n_layers = tiny_model.config.text_config.num_hidden_layers
    assert result.layers == list(range(n_layers)) and result.token_ids.shape == (n_layers, 3, 4)
    inputs = tiny_processor(messages=[{"role": "user", "content": [{"type": "image"}, {"type": "text",
                       "text": "Name the shapes."}]}], images=[pic])
    inputs.pop("attention_mask")
    length = inputs["input_ids"].shape[1]
    assert result.positions == [length - 1, length - 4, 3]
    with torch.no_grad():
        out = tiny_model(**inputs, output_hidden_states=True)
    probs = out.logits[0, result.positions].float().softmax(-1)  # [P, V]
    top = probs.topk(4, dim=-1)
    assert torch.equal(result.token_ids[-1], top.indices) and torch.allclose(result.probs[-1], top.values, atol=1e-6)
    lm = tiny_model.language_model
    for layer in range(n_layers - 1):  # hidden_states[layer + 1] is that layer's output (the last one is normed)
        with torch.no_grad():
            p = lm.lm_head(lm.model.norm(out.hidden_states[layer + 1][0, result.positions])).float().softmax(-1)
        assert torch.equal(result.token_ids[layer], p.topk(4, dim=-1).indices)
        assert torch.allclose(result.probs[layer], p.topk(4, dim=-1).values, atol=1e-6)
    table = result.table(lambda ids: tiny_processor.decode(ids, skip_special_tokens=False))
    assert table.count("layer ") == 3 * n_layers and f"position {length - 1}" in table


def test_lens_argument_errors(tiny_model):
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="position 5 is out of range"):
        logit_lens(tiny_model, {"input_ids": ids}, positions=[5])
    with pytest.raises(ValueError, match="one sequence"):
        logit_lens(tiny_model, {"input_ids": torch.tensor([[1, 2], [3, 4]])})
    with pytest.raises(ValueError, match="top_k"):
        logit_lens(tiny_model, {"input_ids": ids}, top_k=0)


def test_lens_command_json(tiny_checkpoint, capsys):
    code = main(["lens", "--model", str(tiny_checkpoint), "--prompt", "hello", "--positions", "-1", "-2",
                 "--top-k", "3", "--layers", "-1", "--json"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert [len(p["layers"]) for p in data["positions"]] == [1, 1]
    top = data["positions"][0]["layers"][0]["top"]
    assert len(top) == 3 and top[0]["prob"] >= top[1]["prob"] >= top[2]["prob"]
    assert main(["lens", "--model", str(tiny_checkpoint), "--prompt", "hello", "--layers", "4"]) == 1
    assert "out of range" in capsys.readouterr().err
