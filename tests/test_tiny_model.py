"""Checks on the committed tiny model assets (model/tiny), independent of the server code.

The tiny model was trained by model/make_tiny.py to memorize model/corpus as FIM, so these tests
can demand exact completions. If one fails after touching the assets, rebuild with make_tiny.py.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

MODEL_DIR = Path(__file__).resolve().parent.parent / "model"
TINY = MODEL_DIR / "tiny"

END_OF_TEXT = "<|end_of_text|>"
FIM_TOKENS = ["<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>"]
META_TOKENS = ["<|filename|>", "<|reponame|>"]
NON_ASCII = 'def greet():\n    return "こんにちは 🎉 — naïve café"  # 日本語 😀\r\n\ttab\u00a0nbsp 𝔘𝔫𝔦'


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """A 1M-parameter model gains nothing from intra-op threads, and on a busy 2-core machine OpenMP
    threads waiting for each other made every forward 10x slower. Restored for other test modules."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@cache
def raw_tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(TINY / "tokenizer.json"))


@cache
def hf_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY)


@cache
def model():
    from transformers import GraniteMoeHybridForCausalLM

    torch.manual_seed(0)
    return GraniteMoeHybridForCausalLM.from_pretrained(TINY).eval()


def corpus() -> dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8") for p in sorted((MODEL_DIR / "corpus").iterdir())}


def fixtures() -> list[dict]:
    return json.loads((TINY / "fixtures.json").read_text(encoding="utf-8"))


def encode(text: str) -> list[int]:
    return raw_tokenizer().encode(text, add_special_tokens=False).ids


def test_assets_exist_and_are_safetensors_only():
    names = {p.name for p in TINY.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth", ".ckpt")) for n in names)


def test_config_is_a_small_granite_hybrid():
    config = json.loads((TINY / "config.json").read_text())
    assert config["model_type"] == "granitemoehybrid"
    assert {"mamba", "attention"} == set(config["layer_types"])
    assert config["position_embedding_type"] == "nope"
    assert config["num_local_experts"] == 0
    assert config["tie_word_embeddings"] is True
    real = json.loads((MODEL_DIR / "granite-4.0-h-350m" / "config.json").read_text())
    for key in ("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling"):
        assert config[key] == real[key], key


def test_special_tokens():
    tok = raw_tokenizer()
    added = {t.content: t for t in tok.get_added_tokens_decoder().values()}
    for name in [END_OF_TEXT, *FIM_TOKENS, *META_TOKENS]:
        assert tok.token_to_id(name) is not None, name
        assert tok.id_to_token(tok.token_to_id(name)) == name
        assert encode(name) == [tok.token_to_id(name)], "added tokens are matched inside text"
    assert added[END_OF_TEXT].special
    for name in FIM_TOKENS + META_TOKENS:
        assert not added[name].special, f"{name} must not be special (as in Granite)"


def test_transformers_tokenizer_agrees():
    hf, tok = hf_tokenizer(), raw_tokenizer()
    eot = tok.token_to_id(END_OF_TEXT)
    assert hf.eos_token == hf.bos_token == END_OF_TEXT
    assert hf.eos_token_id == eot
    assert model().config.eos_token_id == eot
    for text in [*corpus().values(), NON_ASCII]:
        assert hf(text)["input_ids"] == encode(text), "no BOS is added and the split matches"


@pytest.mark.parametrize("name", sorted(corpus()))
def test_round_trip_corpus(name):
    text = corpus()[name]
    assert raw_tokenizer().decode(encode(text), skip_special_tokens=False) == text
    assert hf_tokenizer().decode(encode(text)) == text


def test_round_trip_non_ascii_and_fim_text():
    for text in [NON_ASCII, "".join(chr(c) for c in range(1, 600)), "<|fim_prefix|>a<|fim_middle|>"]:
        ids = encode(text)
        assert raw_tokenizer().decode(ids, skip_special_tokens=False) == text
    assert len(encode("🎉")) >= 1


def offset_of(text: str, line: int, character: int) -> int:
    """LSP position (UTF-16 column) -> Python string offset."""
    start = sum(len(s) + 1 for s in text.split("\n")[:line])
    units = 0
    for i, ch in enumerate(text[start:]):
        if units >= character:
            return start + i
        units += 2 if ord(ch) > 0xFFFF else 1
    return len(text)


def fim_prompt(document: str, line: int, character: int) -> tuple[list[int], str]:
    """The server's layout, anchored at the cursor's line start; returns ids and the typed text."""
    tok = raw_tokenizer()
    cursor = offset_of(document, line, character)
    line_start = document.rfind("\n", 0, cursor) + 1
    ids = (
        [tok.token_to_id("<|fim_prefix|>")]
        + encode(document[:line_start])
        + [tok.token_to_id("<|fim_suffix|>")]
        + encode(document[cursor:])
        + [tok.token_to_id("<|fim_middle|>")]
        + encode(document[line_start:cursor])
    )
    return ids, document[line_start:cursor]


def stop_ids() -> set[int]:
    tok = raw_tokenizer()
    return {tok.token_to_id(t) for t in [END_OF_TEXT, *FIM_TOKENS, *META_TOKENS]}


@cache
def greedy_for(index: int) -> tuple[int, ...]:
    fx = fixtures()[index]
    ids, _ = fim_prompt(fx["text"], fx["line"], fx["character"])
    return tuple(greedy(ids))


@torch.no_grad()
def greedy(ids: list[int], limit: int = 96) -> list[int]:
    """Greedy decoding, re-running the full sequence every step (no cache in the way)."""
    out: list[int] = []
    while len(out) < limit:
        nxt = int(model()(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
        if nxt in stop_ids():
            return out
        out.append(nxt)
    raise AssertionError("no stop token within the limit")


def test_fixtures_are_well_formed():
    items = fixtures()
    assert len(items) >= 8
    files = corpus()
    non_ascii_lines = 0
    for fx in items:
        text = files[fx["file"].removeprefix("corpus/")]
        cursor = offset_of(fx["text"], fx["line"], fx["character"])
        window = fx["text"][:cursor] + fx["middle"] + fx["text"][cursor:]
        assert window in text and window.count("\n") >= fx["middle"].count("\n") + 2  # a window of the file
        line_before = fx["text"][fx["text"].rfind("\n", 0, cursor) + 1 : cursor]
        assert fx["anchor_line_start"] == (line_before != "")
        non_ascii_lines += len(line_before.encode("utf-16-le")) // 2 != len(line_before)
    assert non_ascii_lines >= 2, "need cursors after emoji/CJK so UTF-16 columns differ"
    assert any("\n" in fx["middle"] for fx in items)
    assert any(fx["mid_token"] for fx in items)


@pytest.mark.parametrize("index", range(len(fixtures())))
def test_fixture_completes_with_plain_greedy(index):
    fx = fixtures()[index]
    if fx["mid_token"] and not fx["plain_greedy"]:
        pytest.skip("mid-token cursor: needs the server's token healing")
    assert raw_tokenizer().decode(list(greedy_for(index)), skip_special_tokens=False) == fx["middle"]


def test_cached_generate_matches_full_reforward():
    """transformers' generate() with the hybrid (Mamba + KV) cache gives the same completions."""
    eot = raw_tokenizer().token_to_id(END_OF_TEXT)
    multi_line = next(i for i, fx in enumerate(fixtures()) if "\n" in fx["middle"])
    for index in sorted({0, multi_line}):
        fx = fixtures()[index]
        ids, _ = fim_prompt(fx["text"], fx["line"], fx["character"])
        out = (
            model()
            .generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=96,
                do_sample=False,
                eos_token_id=sorted(stop_ids()),
                pad_token_id=eot,
            )[0, len(ids) :]
            .tolist()
        )
        while out and out[-1] in stop_ids():
            out.pop()
        assert tuple(out) == greedy_for(index)
