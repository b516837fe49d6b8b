"""scripts/measure_agreement.py: greedy tokens alone vs in a crowd whose prefills are packed into one forward
(the engine's default mode) and in exact mode, on the tiny checkpoint; the report names both counts."""

from __future__ import annotations

import measure_agreement  # scripts/measure_agreement.py (conftest puts scripts/ on the path)


def test_crowded_greedy_tokens_match_the_alone_ones_in_both_modes(tiny_checkpoint, capsys):
    args = [str(tiny_checkpoint), "--prompts", "5", "--max-tokens", "6", "--concurrency", "3", "--threads", "1"]
    assert measure_agreement.main(args) == 0
    out = capsys.readouterr().out
    assert "engine default mode; 5 prompts" in out and "alone vs 3 submitted together" in out
    assert "identical token lists: 5/5; tokens before the first difference: 30/30 (100.0 %)" in out
    assert measure_agreement.main([*args, "--exact"]) == 0
    assert "engine exact mode" in capsys.readouterr().out


def test_a_difference_is_reported_with_where_it_starts(tiny_checkpoint, capsys, monkeypatch):
    runs = iter([[[1, 2, 3], [4, 5, 6]], [[1, 2, 3], [4, 9, 6]]])  # alone, then crowded (order restored below)
    monkeypatch.setattr(measure_agreement, "run_all", lambda engine, prompts, max_tokens, group: next(runs))
    monkeypatch.setattr(measure_agreement.random.Random, "shuffle", lambda self, order: None)
    args = [str(tiny_checkpoint), "--prompts", "2", "--max-tokens", "3", "--threads", "1"]
    assert measure_agreement.main([*args, "--exact"]) == 1
    out = capsys.readouterr().out
    assert "identical token lists: 1/2; tokens before the first difference: 4/6 (66.7 %)" in out
    assert "first differing token (0 = the first new token): [1]" in out
