"""Finding the model: local directories, and the Hugging Face cache looked up in any letter case."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import TINY

from granite_lsp.model_files import ModelNotFound, UnsafeCheckpoint, find_model, resolve_model_dir

COMMIT = "a" * 40


def _cache_entry(cache: Path, repo_id: str, with_weights: bool = True) -> Path:
    """A Hugging Face cache entry as huggingface_hub lays it out: refs/main -> snapshots/<commit>/."""
    entry = cache / ("models--" + repo_id.replace("/", "--"))
    snap = entry / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(COMMIT)
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        if name != "model.safetensors" or with_weights:
            shutil.copy(TINY / name, snap / name)
    return snap


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    return cache


def test_cache_lookup_ignores_letter_case_and_says_which_directory(hf_cache) -> None:
    snap = _cache_entry(hf_cache, "ibm-granite/granite-4.0-h-350m-base")  # as the hub spells it
    lookup = find_model("ibm-granite/granite-4.0-h-350M-base")  # the default id's spelling
    assert lookup.found and lookup.path == snap
    assert any(
        "letter case differs" in s and "models--ibm-granite--granite-4.0-h-350m-base" in s for s in lookup.searched
    )
    assert resolve_model_dir("ibm-granite/granite-4.0-h-350M-base") == snap


def test_exact_spelling_wins_over_another_case(hf_cache) -> None:
    _cache_entry(hf_cache, "org/Model")
    exact = _cache_entry(hf_cache, "org/model")
    assert find_model("org/model").path == exact


def test_an_incomplete_entry_does_not_hide_a_complete_one(hf_cache) -> None:
    _cache_entry(hf_cache, "org/model", with_weights=False)
    other = _cache_entry(hf_cache, "org/MODEL")
    lookup = find_model("org/model")
    assert lookup.found and lookup.path == other
    assert len([s for s in lookup.searched if "Hugging Face cache" in s]) == 2


def test_not_found_lists_every_place_and_the_download_command(hf_cache) -> None:
    with pytest.raises(ModelNotFound) as e:
        resolve_model_dir("org/absent")
    msg = str(e.value)
    assert "granite-lsp download org/absent" in msg
    assert str(hf_cache / "models--org--absent") in msg and "local directory" in msg


def test_local_directory_and_pickle_refusal(tmp_path, hf_cache) -> None:
    assert resolve_model_dir(str(TINY)) == TINY
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(TINY / name, bad / name)
    (bad / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(UnsafeCheckpoint):
        resolve_model_dir(str(bad))
