"""``granite-lsp complete``: the headless path prints exactly what the editor would be offered."""

from __future__ import annotations

import subprocess
import sys

from conftest import TINY, load_fixtures


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "granite_lsp", "complete", *args], capture_output=True, text=True, timeout=300
    )


def test_complete_prints_memorized_middle(tmp_path) -> None:
    fixtures = [f for f in load_fixtures() if not f.get("mid_token")][:2]
    for i, fixture in enumerate(fixtures):
        path = tmp_path / f"f{i}_{fixture['file'].split('/')[-1]}"
        path.write_text(fixture["text"], encoding="utf-8")
        out = _run(
            str(path),
            "--line",
            str(fixture["line"]),
            "--character",
            str(fixture["character"]),
            "--model",
            str(TINY),
            "--device",
            "cpu",
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout == fixture["middle"]


def test_missing_model_is_a_clear_error(tmp_path) -> None:
    path = tmp_path / "a.py"
    path.write_text("x = 1\n")
    out = _run(str(path), "--line", "0", "--character", "0", "--model", "no-such-org/no-such-model")
    assert out.returncode == 2
    assert "no-such-org/no-such-model" in out.stderr
    assert "Hugging Face cache" in out.stderr and "--download" in out.stderr


def test_bad_position_is_a_clear_error(tmp_path) -> None:
    path = tmp_path / "a.py"
    path.write_text("x = 1\n")
    out = _run(str(path), "--line", "9", "--character", "0", "--model", str(TINY))
    assert out.returncode == 2
    assert "past the end" in out.stderr


def test_pickle_only_checkpoint_is_refused(tmp_path) -> None:
    model = tmp_path / "m"
    model.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (model / name).write_bytes((TINY / name).read_bytes())
    (model / "pytorch_model.bin").write_bytes(b"not loaded")
    path = tmp_path / "a.py"
    path.write_text("x = 1\n")
    out = _run(str(path), "--line", "0", "--character", "0", "--model", str(model))
    assert out.returncode == 2
    assert "safetensors" in out.stderr and "pickle" in out.stderr


def test_invalid_utf8_file_is_a_clear_error(tmp_path) -> None:
    path = tmp_path / "bad.py"
    path.write_bytes(b"x = '\xff\xfe'\x00\n")
    out = _run(str(path), "--line", "0", "--character", "0", "--model", str(TINY))
    assert out.returncode == 2
    assert "cannot read" in out.stderr
