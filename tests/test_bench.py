"""``r4b bench`` on the tiny checkpoint (the fast path: few tokens, one round, no compile) and its parts:
the JSON keys and values the issue asks for (finite, positive; no timing is asserted), the bytes a decode
step reads, the per-step clock, and the choice of torch threads."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from r4b_core.bench.decode import decode_bytes_per_step, ours_variant, spread
from r4b_core.cli import main
from r4b_core.models.fast_linears import quantize_model
from r4b_core.threads import choose_threads, configure_threads, physical_cores

pytest.importorskip("transformers")


def _run_bench(argv: list[str], capsys) -> dict:
    assert main(["bench", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_tiny_bench_json_has_every_headline_figure(tiny_checkpoint, capsys):
    threads = torch.get_num_threads()
    try:
        result = _run_bench(["--model", str(tiny_checkpoint), "--full", "--max-new-tokens", "4", "--repeats", "1",
                             "--max-repeats", "1", "--no-compile", "--load-repeats", "1", "--prompt-tokens", "16"],
                            capsys)
    finally:
        torch.set_num_threads(threads)
    for name in ("float32", "float32_plain", "bfloat16", "int8"):
        for key in (f"decode_tokens_per_s_{name}", f"decode_share_of_limit_{name}"):
            assert key in result, key
    for key in ("decode_speed_ratio_bfloat16_vs_float32", "decode_speed_ratio_int8_vs_float32",
                "decode_speed_ratio_bfloat16_vs_float32_plain", "decode_speed_ratio_float32_vs_float32_plain",
                "batch1_throughput_ratio_ours_vs_transformers", "batch4_throughput_ratio_ours_vs_transformers",
                "batch8_throughput_ratio_ours_vs_transformers", "prefill_image_time_ratio_ours_vs_transformers",
                "vision_time_ratio_ours_vs_transformers", "load_time_ratio_ours_vs_transformers",
                "peak_rss_ratio_ours_vs_transformers"):
        assert key in result, key
    headline = {k: v for k, v in result.items() if "ratio" in k or "share" in k or k.startswith("decode_tokens")}
    for key, value in headline.items():
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (key, value)
    for name, v in result["decode"].items():  # every variant has its own limit and its share of it
        assert v["bytes_per_step"] > 0 and v["limit_tokens_per_s"] > 0 and v["share_of_limit"] > 0, name
        assert v["steps"] == 3  # 4 new tokens: the 3 steps after the first
    decode = result["decode"]
    assert decode["int8"]["bytes_per_step"] < decode["bfloat16"]["bytes_per_step"] < decode["float32"]["bytes_per_step"]
    assert decode["float32"]["bytes_per_step"] == decode["float32-plain"]["bytes_per_step"]  # packing moves no bytes
    modes = result["linear_modes"]
    assert modes["int8"] == "int8" and modes["float32-plain"] == "none"
    assert modes["float32"] == ("prepacked" if torch.backends.mkldnn.is_available() else "none")
    assert set(result["logit_error_vs_float32_plain"]) == {"float32", "bfloat16", "int8"}
    assert result["logit_error_vs_float32_plain"]["float32"]["relative_to_max_logit"] < 1e-4
    assert set(result["load"]) >= {"ours", "transformers"} and result["load"]["ours"]["parameters"] > 0
    assert result["load"]["ours"]["parameters"] == result["load"]["transformers"]["parameters"]
    assert result["prefill"]["image_prompt_tokens"] > 16


@pytest.mark.parametrize("argv, message", [
    (["--variants", "float32,int4"], "comma-separated list"),
    (["--batch-sizes", "1,0"], "at least 1"),
])
def test_bench_refuses_bad_lists_on_the_command_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--preset", "tiny", *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_bench_defaults_are_the_short_run_and_full_the_sweep():
    from r4b_core.cli.bench import sweep_settings
    from r4b_core.cli.main import build_parser

    parse = build_parser().parse_args
    assert sweep_settings(parse(["bench"])) == (("float32", "float32-plain"), (1, 8), 3, 1, False)
    assert sweep_settings(parse(["bench", "--full"])) == (("float32", "float32-plain", "bfloat16", "int8"), (1, 4, 8), 9, 2,
                                                          True)
    assert sweep_settings(parse(["bench", "--compile"]))[4] and not sweep_settings(parse(["bench", "--full",
                                                                                          "--no-compile"]))[4]
    assert sweep_settings(parse(["bench", "--full", "--variants", "int8", "--max-repeats", "3"]))[0:3:2] == (("int8",), 3)


def test_bench_needs_two_new_tokens_to_time_a_step(capsys):
    assert main(["bench", "--preset", "tiny", "--max-new-tokens", "1"]) == 2
    assert "at least 2" in capsys.readouterr().err


def test_decode_bytes_per_step_counts_what_a_step_reads(tiny_model):
    cfg = tiny_model.config.text_config
    c, i, layers, v = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    per_layer = c * q + 2 * c * kv + q * c + 3 * c * i + 2 * c + 2 * cfg.head_dim  # projections, MLP, norms
    weights = layers * per_layer + c + v * c  # + final norm + lm_head (untied in the tiny preset)
    context, batch = 40, 3
    kv_bytes = 2 * layers * kv * context * 4
    expected = 4 * weights + batch * (4 * c + kv_bytes)
    assert decode_bytes_per_step(tiny_model, batch, context) == expected

    int8 = copy.deepcopy(tiny_model)
    quantize_model(int8, "int8")
    linear_params = layers * (c * q + 2 * c * kv + q * c + 3 * c * i) + v * c
    scales = layers * (q + 2 * kv + c + 2 * i + c) + v  # one per output channel, bf16
    smaller = 3 * linear_params - 2 * scales  # 4 bytes -> 1 byte per weight, + 2 bytes per scale
    assert decode_bytes_per_step(int8, batch, context) == expected - smaller


def test_per_step_times_exclude_the_first_token(tiny_model):
    ids = torch.randint(0, 500, (2, 7), generator=torch.Generator().manual_seed(0))
    variant = ours_variant("t", tiny_model, ids, max_new_tokens=5, compile=False, context=9)
    times = variant.run(5)
    assert len(times) == 4 and all(t > 0 for t in times)
    assert variant.batch == 2 and spread([1.0, 1.0]) == 0 and spread([1.0, 2.0, 3.0]) == 1.0


def test_threads_flag_wins_over_the_environment_which_wins_over_the_cores(monkeypatch):
    assert choose_threads(3, {"OMP_NUM_THREADS": "5"}).threads == 3
    assert choose_threads(None, {"OMP_NUM_THREADS": "5"}) == choose_threads(None, {"OMP_NUM_THREADS": " 5,2"})
    assert choose_threads(None, {"OMP_NUM_THREADS": "5"}).source == "OMP_NUM_THREADS"
    default = choose_threads(None, {})
    assert default.source == "physical cores" and default.threads == physical_cores() >= 1
    with pytest.raises(ValueError, match="OMP_NUM_THREADS='many'"):
        choose_threads(None, {"OMP_NUM_THREADS": "many"})
    with pytest.raises(ValueError, match="--threads must be at least 1"):
        choose_threads(0, {})
    before = torch.get_num_threads()
    try:
        assert configure_threads(1).threads == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_physical_cores_counts_smt_siblings_once(tmp_path):
    # 4 logical CPUs on 2 cores of one package (2-way SMT), as the kernel's topology files describe them
    for cpu, core in enumerate([0, 1, 0, 1]):
        topology = tmp_path / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "physical_package_id").write_text("0\n")
        (topology / "core_id").write_text(f"{core}\n")
    assert physical_cores([0, 1, 2, 3], tmp_path) == 2
    assert physical_cores([0, 2], tmp_path) == 1  # affinity limited to one core's two siblings
    assert physical_cores([0, 1, 7], tmp_path) == 3  # no topology for cpu7: count logical CPUs


def test_the_cli_sets_threads_from_the_flag(capsys):
    before = torch.get_num_threads()
    try:
        main(["inspect", "--preset", "tiny", "--threads", "1", "--max-new-tokens", "2"])
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_the_warm_up_compiles_the_graph_that_generate_then_reuses(tiny_model):
    """`r4b generate --compile` compiles on a throwaway cache first, so its TTFT and tokens/s hold no compile
    time; that only works if generate() then runs the very same graph (no recompile)."""
    from torch._dynamo.utils import counters

    from r4b_core.generation.generate import generate, warm_up_decode_step

    torch._dynamo.reset()
    ids = torch.randint(0, 500, (1, 11), generator=torch.Generator().manual_seed(3))
    new_tokens = 8
    assert warm_up_decode_step(tiny_model, 1, ids.shape[1] + new_tokens - 1, compile=True) > 0
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    out = generate(tiny_model, ids, max_new_tokens=new_tokens, compile=True)
    assert counters["stats"]["unique_graphs"] == graphs, "generate() compiled again after the warm-up"
    assert out.tokens == generate(tiny_model, ids, max_new_tokens=new_tokens).tokens


def test_generate_json_reports_compile_time_apart(tiny_checkpoint, capsys):
    before = torch.get_num_threads()
    try:
        assert main(["generate", "--model", str(tiny_checkpoint), "--prompt", "hi", "--max-new-tokens", "6",
                     "--compile", "--json"]) == 0
    finally:
        torch.set_num_threads(before)
    out = json.loads(capsys.readouterr().out)
    assert out["compile_time_s"] > 0 and out["warm_up_time_s"] == out["compile_time_s"]
    assert out["linears"] == "none"  # prepacked weights cannot be compiled: fast_linears leaves them alone
    assert len(out["tokens"]) == 6 and out["decode_tokens_per_s"] > 0
