"""r4b eval: benchmark files, end to end on the tiny checkpoint (all three modes), resuming, --out safety."""

import base64
import csv
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from r4b_core.cli.main import main
from r4b_core.eval import BenchmarkFileError, EvalOutput, evaluate, load_benchmark, summarize
from r4b_core.eval.generation import Generation
from tests.conftest import picture


def _b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def write_tsv(path: Path, rows: int = 4) -> Path:
    """A VLMEvalKit-style TSV: one image, a JSON list of two, a reference to an earlier row's image."""
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"]
    lines = [header]
    for i in range(rows):
        if i == 1:
            image = json.dumps([_b64(picture(40, 30, 1)), _b64(picture(30, 40, 2))])
        elif i == 3:
            image = "100"  # VLMEvalKit: the index of the row that holds the image
        else:
            image = _b64(picture(48, 32, i))
        lines.append([str(100 + i), f"Which animal is in picture {i}?", "Look closely." if i % 2 else "",
                      "cat", "dog", "bird", "" if i == 2 else "fish", "ABCD"[i % 4] if i != 2 else "C",
                      ["pets", "wild"][i % 2], image])
    with path.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f, delimiter="\t").writerows(lines)
    return path


def write_jsonl(path: Path) -> Path:
    picture(36, 36, 7).save(path.parent / "seven.png")
    records = [
        {"id": "n1", "question": "How many dots?", "image": "seven.png", "answer": 3, "answer_type": "number"},
        {"id": "m1", "question": "Simplify 2/4.", "answer": "\\frac{1}{2}", "answer_type": "math", "category": "alg"},
        {"id": "t1", "question": "Name the colour.", "image": ["seven.png"], "answer": "red", "answer_type": "text"},
        {"id": "c1", "question": "Pick one.", "options": ["yes", "no"], "answer": "A"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_tsv_reader(tmp_path):
    items = load_benchmark(write_tsv(tmp_path / "bench.tsv"))
    assert [i.id for i in items] == ["100", "101", "102", "103"]
    assert items[0].options == {"A": "cat", "B": "dog", "C": "bird", "D": "fish"}
    assert items[2].options == {"A": "cat", "B": "dog", "C": "bird"}  # empty D cell: no option D
    assert len(items[1].images) == 2 and items[3].images == items[0].images
    assert items[1].hint == "Look closely." and items[0].hint is None
    assert items[0].answer_type == "choice" and items[1].category == "wild"
    assert Image.open(io.BytesIO(items[0].images[0])).size == (48, 32)
    assert len(load_benchmark(tmp_path / "bench.tsv", limit=2)) == 2


def test_jsonl_reader(tmp_path):
    items = load_benchmark(write_jsonl(tmp_path / "open.jsonl"))
    assert [(i.id, i.answer_type, i.answer) for i in items] == [
        ("n1", "number", "3"), ("m1", "math", "\\frac{1}{2}"), ("t1", "text", "red"), ("c1", "choice", "A")]
    assert items[0].images == (tmp_path / "seven.png",) and items[3].options == {"A": "yes", "B": "no"}


@pytest.mark.parametrize("suffix, content, expected", [
    (".tsv", "index\tquestion\tanswer\timage\n1\tQ?\tx\tnot base64!!\n", r"row 1, column 'image': not valid base64"),
    (".tsv", "index\tquestion\tA\tanswer\n1\tQ?\tcat\n", r"row 1: has 3 cells but the header has 4"),
    (".tsv", "index\tquestion\tanswer\n1\t\tx\n", r"row 1, column 'question': empty"),
    (".tsv", "id\tquestion\tanswer\n1\tQ?\tx\n", r"no 'index' column"),
    (".tsv", "index\tquestion\tanswer\n1\tQ?\tx\n1\tQ2?\ty\n", r"row 2, column 'id': id '1' repeats row 1"),
    (".jsonl", '{"question": "Q?", "answer": "x"}\n{"question": "Q?"\n', r"row 2: not valid JSON"),
    (".jsonl", '{"question": "Q?", "answer": "x", "answer_type": "essay"}\n', r"row 1, column 'answer_type'"),
    (".jsonl", '{"question": "Q?", "answer": "x", "image": "missing.png"}\n', r"row 1, column 'image': image file"),
    (".jsonl", '{"answer": "x"}\n', r"row 1, column 'question'"),
])
def test_bad_files_name_row_and_column(tmp_path, suffix, content, expected):
    path = tmp_path / f"bad{suffix}"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(BenchmarkFileError, match=expected):
        load_benchmark(path)


def test_bad_file_is_one_cli_line(tmp_path, capsys):
    path = tmp_path / "bad.tsv"
    path.write_text("index\tquestion\tanswer\timage\n7\tQ?\tx\t%%%\n", encoding="utf-8")
    assert main(["eval", "--data", str(path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"r4b: error: {path}: row 1, column 'image': not valid base64 (VLMEvalKit stores each image "
                   "base64-encoded; a JSON list of such strings for several)."]


def _predictions(directory: Path) -> list[dict]:
    return [json.loads(line) for line in (directory / "predictions.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("writer", [write_tsv, write_jsonl])
def test_end_to_end_all_modes(tiny_checkpoint, tmp_path, capsys, writer):
    data = writer(tmp_path / ("bench.tsv" if writer is write_tsv else "open.jsonl"))
    out = tmp_path / "out"
    assert main(["eval", "--model", str(tiny_checkpoint), "--data", str(data), "--max-new-tokens", "6",
                 "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert [line.split()[0] for line in table.splitlines()[1:4]] == ["auto", "long", "short"]
    records = _predictions(out)
    summary = json.loads((out / "summary.json").read_text())["modes"]
    assert sorted((r["id"], r["mode"]) for r in records) == sorted(
        (i.id, m) for i in load_benchmark(data) for m in ("auto", "long", "short"))
    for mode in ("auto", "long", "short"):
        mine = [r for r in records if r["mode"] == mode]
        s = summary[mode]
        assert s["items"] == len(mine) == 4
        assert s["correct"] == sum(bool(r["correct"]) for r in mine)
        assert s["unparseable"] == sum(not r["parseable"] for r in mine)
        assert s["thought"] == sum(r["thought"] for r in mine)
        assert s["output_tokens"]["mean"] == pytest.approx(sum(r["output_tokens"] for r in mine) / 4)
        assert sum(c["items"] for c in s["by_category"].values()) == 4
        assert all(1 <= r["output_tokens"] <= 6 for r in mine)
    assert summary["long"]["thinking_rate"] == 1.0  # the prompt opened the thinking
    assert summary["short"]["thinking_rate"] == 0.0  # the prompt closed it, empty
    assert all(r["thinking_tokens"] == r["output_tokens"] for r in records if r["mode"] == "long"
               and r["finish_reason"] == "length")
    assert (out / "accuracy_vs_tokens.png").read_bytes()[:4] == b"\x89PNG"


class _StopAfter:
    """A backend that replays fixed generations and raises KeyboardInterrupt after ``stop_after`` of them."""

    name = "fixed"

    def __init__(self, stop_after: int | None = None) -> None:
        self.stop_after, self.yielded = stop_after, 0

    def generate(self, jobs):
        for item, mode in jobs:
            if self.stop_after is not None and self.yielded == self.stop_after:
                raise KeyboardInterrupt
            self.yielded += 1
            answer = item.answer if int(item.id) % 2 == 0 else "no idea"
            thought = mode == "long" or (mode == "auto" and int(item.id) % 3 == 0)
            yield item, mode, Generation("hmm" if thought else "", answer, thought, 10 + int(item.id) % 7,
                                         3 if thought else 0, 0.1, "stop")


def _without_timing(summary: dict) -> dict:
    return {mode: {k: v for k, v in s.items() if k != "tokens_per_s"} for mode, s in summary.items()}


def test_interrupted_run_resumes_to_the_same_summary(tmp_path):
    items = load_benchmark(write_tsv(tmp_path / "bench.tsv", rows=8))
    modes = ["auto", "long", "short"]
    _, uninterrupted = evaluate(items, _StopAfter(), modes, progress=False)

    settings = {"model": "fixed"}
    first = EvalOutput(tmp_path / "out", settings)
    with pytest.raises(KeyboardInterrupt):
        evaluate(items, _StopAfter(stop_after=11), modes, out=first, progress=False)
    first.close()
    with (tmp_path / "out" / "predictions.jsonl").open("ab") as f:
        f.write(b'{"id": "105", "mode": "long", "answ')  # a SIGKILL in the middle of a write
    assert len(_predictions_lines := (tmp_path / "out" / "predictions.jsonl").read_bytes().splitlines()) == 12

    again = EvalOutput(tmp_path / "out", settings)
    assert len(again.done) == 11
    backend = _StopAfter()
    records, resumed = evaluate(items, backend, modes, out=again, progress=False)
    again.close()
    assert backend.yielded == 24 - 11  # only what was missing ran
    assert _without_timing(resumed) == _without_timing(uninterrupted)
    assert _without_timing(summarize(_predictions(tmp_path / "out"))) == _without_timing(uninterrupted)
    assert resumed["long"]["thinking_rate"] == 1.0 and resumed["short"]["thinking_rate"] == 0.0
    assert len(_predictions_lines) == 12


def test_out_refuses_foreign_files_without_force(tmp_path, tiny_checkpoint):
    data = write_jsonl(tmp_path / "open.jsonl")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ["eval", "--model", str(tiny_checkpoint), "--data", str(data), "--max-new-tokens", "2",
            "--thinking-mode", "short", "--limit", "1", "--out", str(out)]
    assert main(args) == 1
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert main(args + ["--force"]) == 0
    assert (out / "notes.txt").read_text() == "mine" and len(_predictions(out)) == 1
    with pytest.raises(FileExistsError, match="r4b did not write"):
        foreign = tmp_path / "foreign"
        foreign.mkdir()
        (foreign / "predictions.jsonl").write_text("{}\n")
        EvalOutput(foreign, {}, force=True)
    with pytest.raises(ValueError, match="other settings"):
        EvalOutput(out, {"model": "another"}, force=True)
