"""The documentation's code, run from the documents themselves so that the text cannot drift from the code.

- README.md's Python example (the block under "## Use") runs on the built-in synthetic checkpoint.
- docs/internals.md's research recipes (the python blocks of its "## Recipes" section) run in order in one
  namespace, from the repository root with the r4b cache in a temporary folder, so the synthetic checkpoint
  is written there. After each block its results are checked against the same quantity computed another
  way here (``output_hidden_states``, causality, the cache, an uncached greedy loop).
- docs/internals.md's hook-point table names exactly the hook points ``hook_names()`` lists.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
import torch

from r4b_core.models.hooks import hook_names, hooks, run_with_cache, run_with_hooks

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(document: str, heading: str) -> list[str]:
    """The python code blocks of the section ``heading`` (up to the next heading of the same or a higher
    level) of ``document``, in order."""
    text = (ROOT / document).read_text(encoding="utf-8")
    if f"\n{heading}\n" not in text:
        raise AssertionError(f"{document} has no section {heading!r}; a test reads its code from there.")
    level = len(heading) - len(heading.lstrip("#"))
    section = text.split(f"\n{heading}\n", 1)[1]
    section = re.split(rf"^#{{1,{level}}} ", section, maxsplit=1, flags=re.M)[0]
    return re.findall(r"^```python\n(.*?)^```", section, flags=re.M | re.S)


def run_quietly(code: str, name: str, namespace: dict) -> str:
    """Execute ``code`` in ``namespace``; what it printed."""
    with contextlib.redirect_stdout(io.StringIO()) as out:
        exec(compile(code, name, "exec"), namespace)  # noqa: S102
    return out.getvalue()


@pytest.fixture(scope="module")
def in_repo_with_own_cache(tmp_path_factory):
    """The repository root as the working directory, and an empty r4b cache (the synthetic checkpoint is
    written there on first use)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("R4B_CACHE", str(tmp_path_factory.mktemp("r4b-cache")))
    mp.chdir(ROOT)
    yield
    mp.undo()


def test_readme_example(in_repo_with_own_cache):
    blocks = python_blocks("README.md", "## Use")
    assert len(blocks) == 1, f"expected one python block under README.md's '## Use', found {len(blocks)}"
    ns: dict = {"__name__": "readme"}
    printed = run_quietly(blocks[0], "README.md example", ns)
    model, inputs, result, out = ns["model"], ns["inputs"], ns["result"], ns["out"]
    assert 0 < len(result.tokens) <= 16 and result.answer in printed
    vocab = model.config.text_config.vocab_size
    assert out.logits.shape == (1, inputs["input_ids"].shape[1], vocab) and torch.isfinite(out.loss)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, out.logits)  # the labels change the loss, not the logits


# ---------------------------------------------------------------------------------------------
# docs/internals.md: the hook table


def table_hook_names(n_layers: int, n_vision_layers: int) -> set[str]:
    """Every name the hook-point table of docs/internals.md stands for, its layer ranges expanded for a model
    of ``n_layers`` decoder and ``n_vision_layers`` vision layers. A cell lists one name, then siblings
    ("`a.b.hook_x` / `hook_y`": ``a.b.hook_y``)."""
    text = (ROOT / "docs" / "internals.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| (`[^|]*`) \|", text, flags=re.M)
    names: set[str] = set()
    for cell in rows:
        first, *siblings = re.findall(r"`([^`]+)`", cell)
        if not first.split(".")[-1].startswith("hook_"):
            continue
        prefix = first.rsplit(".", 1)[0] + "." if "." in first else ""
        for name in [first, *(prefix + s for s in siblings)]:
            count = n_vision_layers if name.startswith("vision_tower.") else n_layers
            layer_ranges = re.compile(r"\{(?:0\.\.Lv?-1|i)\}")
            if layer_ranges.search(name):
                names.update(layer_ranges.sub(str(i), name) for i in range(count))
            else:
                names.add(name)
    return names


def test_the_hook_table_lists_exactly_the_models_hook_points(tiny_model):
    config = tiny_model.config
    documented = table_hook_names(config.text_config.num_hidden_layers, config.vision_config.num_hidden_layers)
    actual = set(hook_names(tiny_model))
    assert len(documented) > 40
    assert documented - actual == set(), "docs/internals.md lists hook points the model lacks"
    assert actual - documented == set(), "the model has hook points docs/internals.md does not list"


# ---------------------------------------------------------------------------------------------
# docs/internals.md: the recipes


@pytest.fixture(scope="module")
def recipes(in_repo_with_own_cache):
    """A runner: ``recipes(i)`` executes blocks up to i (each once, in order, whatever order the tests run
    in) and returns the namespace; ``printed[k]`` is what block k printed."""
    blocks = python_blocks("docs/internals.md", "## Recipes")
    assert len(blocks) == 5, f"expected the setup block and four recipes, found {len(blocks)} python blocks"
    namespace: dict = {"__name__": "recipes"}
    printed: list[str] = []

    def run(i: int) -> dict:
        while len(printed) <= i:
            k = len(printed)
            printed.append(run_quietly(blocks[k], f"docs/internals.md recipes block {k}", namespace))
        return namespace

    run.printed = printed
    return run


def test_setup_block(recipes):
    ns = recipes(0)
    model, inputs = ns["model"], ns["inputs"]
    assert int(ns["is_image"].sum()) > 0 and ns["layer"] < model.config.text_config.num_hidden_layers


def test_capture_residuals(recipes):
    ns = recipes(1)
    model, inputs, resid = ns["model"], ns["inputs"], ns["resid"]
    n_layers = model.config.text_config.num_hidden_layers
    assert resid.shape == (n_layers, inputs["input_ids"].shape[1], model.config.text_config.hidden_size)
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    for i in range(n_layers - 1):
        assert torch.equal(resid[i], out.hidden_states[i + 1][0])
    final = model.language_model.model.norm(resid[-1])  # the last hidden state is returned normed
    assert torch.allclose(final, out.hidden_states[-1][0], atol=1e-6)
    regions, strongest = ns["regions"], ns["strongest"]
    position = int(regions.position[strongest])
    assert int(inputs["input_ids"][0, position]) == model.config.image_token_index
    norms = resid[ns["layer"], ns["is_image"]].norm(dim=-1)
    assert float(resid[ns["layer"], position].norm()) == pytest.approx(float(norms.max()))
    assert str(regions.region(strongest)) in recipes.printed[1]


def test_zero_ablation(recipes):
    ns = recipes(2)
    model, inputs, is_image, layer = ns["model"], ns["inputs"], ns["is_image"], ns["layer"]
    assert torch.isfinite(ns["kl"]) and float(ns["kl"]) >= 0 and not torch.equal(ns["clean"], ns["ablated"])
    name = f"language_model.model.layers.{layer}.hook_resid_pre"
    with torch.no_grad():
        full = model(**inputs).logits[0]
        ablated = run_with_hooks(model, [(name, ns["zero_image_tokens"])], **inputs).logits[0]
        _, cache = run_with_cache(model, [name], **inputs)
        seen = {}
        with hooks(model, [(name, ns["zero_image_tokens"]), (name, lambda t, n: seen.setdefault("x", t))]):
            model(**inputs)
    first_image = int(is_image.nonzero()[0])
    assert torch.equal(ablated[:first_image], full[:first_image])  # causal: text before the picture untouched
    assert torch.equal(ablated[-1], ns["ablated"])
    assert (seen["x"][0, is_image] == 0).all() and torch.equal(seen["x"][0, ~is_image], cache[name][0, ~is_image])


def test_activation_patching(recipes):
    ns = recipes(3)
    model, inputs, is_image = ns["model"], ns["inputs"], ns["is_image"]
    name, other_cache = ns["patch_name"], ns["other_cache"]
    assert torch.equal(ns["other_inputs"]["input_ids"], inputs["input_ids"])  # same size: same token positions
    with torch.no_grad():
        _, clean_cache = run_with_cache(model, [name], **inputs)
        seen = {}
        with hooks(model, [(name, ns["patch_from_other"]), (name, lambda t, n: seen.setdefault("x", t))]):
            logits = model(**inputs).logits[0, -1]
    assert torch.equal(seen["x"][0, is_image], other_cache[name][0, is_image])
    assert torch.equal(seen["x"][0, ~is_image], clean_cache[name][0, ~is_image])
    assert torch.equal(logits, ns["patched"])
    assert not torch.equal(other_cache[name], clean_cache[name])  # the two pictures really differ
    assert "of the way to the other picture's" in recipes.printed[3]


def test_steering_during_generate(recipes):
    ns = recipes(4)
    model, inputs, layer = ns["model"], ns["inputs"], ns["layer"]
    steered = ns["steered"].tokens[0]
    assert len(steered) == 8 and float(ns["steer"].norm()) > 0
    # the same greedy tokens from full uncached forwards with the hook attached: the steering applied at
    # the prefill and at every cached decode step
    name = f"language_model.model.layers.{layer}.hook_resid_post"
    ids = inputs["input_ids"]
    image_inputs = {k: inputs[k] for k in ("pixel_values", "image_sizes", "batch_num_images")}
    with torch.no_grad():
        for token in steered:
            logits = run_with_hooks(model, [(name, ns["add_steering"])], input_ids=ids, **image_inputs).logits
            assert int(logits[0, -1].argmax()) == token
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    assert not any(m._forward_hooks for m in model.modules())  # the with-block removed the hook


# ---------------------------------------------------------------------------------------------------------
# docs/eval.md: the steering recipe


def test_eval_recipe_compares_a_steered_model_with_the_plain_one(tiny_model, tiny_processor, tmp_path):
    """The block runs as written; the hook changes the answers (so it was attached during the steered run) and
    is gone afterwards (a plain run repeats the plain answers)."""
    from test_eval import write_tsv

    from r4b_core.eval import LocalBackend, evaluate, load_benchmark

    (block,) = python_blocks("docs/eval.md", "## In Python")
    torch.manual_seed(0)
    direction = torch.randn(tiny_model.config.text_config.hidden_size)
    namespace = {"model": tiny_model, "processor": tiny_processor, "direction": direction,
                 "data_path": write_tsv(tmp_path / "bench.tsv")}
    printed = run_quietly(block, "docs/eval.md recipe", namespace)
    plain, steered = namespace["plain"], namespace["steered"]
    assert set(plain) == set(steered) == {"auto", "short"} and printed.count("auto") >= 2
    items = load_benchmark(namespace["data_path"])
    with LocalBackend(tiny_model, tiny_processor, max_new_tokens=64) as backend:
        _, summary = evaluate(items, backend, ["auto", "short"], progress=False)
    tokens = lambda report: {m: report[m]["output_tokens"] for m in report}  # noqa: E731
    assert tokens(summary) == tokens(plain)  # the hook is gone: plain answers again
    assert tokens(steered) != tokens(plain)  # and it was attached during the steered run
