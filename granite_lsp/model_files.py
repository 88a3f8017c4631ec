"""Finding a checkpoint on disk (local directory or Hugging Face cache), downloading one, refusing unsafe ones.

Loading is offline by default: a language server must not reach the network because a user opened a
file. Downloading happens only when the user asks for it (``granite-lsp download``, or ``--download``).

The Hugging Face cache keeps a repository under the id *as it was typed* when it was downloaded
(``models--ibm-granite--granite-4.0-h-350m-base``), while the hub itself matches ids case-insensitively;
so the cache is looked up case-insensitively too, and the lookup says which directory it found.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_MODEL = "ibm-granite/granite-4.0-h-350M-base"
_WANTED = [
    "config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
]
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INSTALL_HINT = (
    "granite-lsp is installed from its repository (it is not on PyPI): "
    "`pipx install /path/to/granite-lsp` or `uv tool install /path/to/granite-lsp`."
)


class ModelNotFound(RuntimeError):
    """The model is neither a local directory nor in the Hugging Face cache (and no download was asked)."""


class UnsafeCheckpoint(RuntimeError):
    """The checkpoint exists but only as pickle files, which can run arbitrary code when loaded."""


def hf_cache_dir() -> Path:
    """Where huggingface_hub keeps downloaded repositories (honours HF_HOME / HF_HUB_CACHE)."""
    try:
        from huggingface_hub import constants

        return Path(constants.HF_HUB_CACHE)
    except Exception:  # pragma: no cover - huggingface_hub is a dependency, this is belt and braces
        return Path(os.path.expanduser("~/.cache/huggingface/hub"))


def _is_hub_id(spec: str) -> bool:
    return not spec.startswith((".", "/", "~")) and spec.count("/") == 1 and all(spec.split("/"))


def _cache_entry_name(repo_id: str) -> str:
    return "models--" + repo_id.replace("/", "--")


def _entry_repo_id(entry: str) -> str:
    """``models--org--name`` -> ``org/name`` (hub ids cannot hold ``--`` in the owner part)."""
    owner, _, name = entry.removeprefix("models--").partition("--")
    return f"{owner}/{name}"


def _snapshot(entry: Path) -> Path | None:
    """The snapshot directory ``refs/main`` points to, else the newest snapshot; None when there is none."""
    snapshots = entry / "snapshots"
    ref = entry / "refs" / "main"
    if ref.is_file():
        commit = ref.read_text(encoding="utf-8").strip()
        if (snapshots / commit).is_dir():
            return snapshots / commit
    if not snapshots.is_dir():
        return None
    found = sorted((p for p in snapshots.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
    return found[0] if found else None


@dataclass
class Lookup:
    """Where a model spec was looked for and what was found (``granite-lsp doctor`` prints it)."""

    spec: str
    path: Path | None = None  # the checkpoint directory, when found
    searched: list[str] = field(default_factory=list)  # every place looked, each with what was there
    problem: str = ""  # why the place found is unusable (missing files, pickle only)

    @property
    def found(self) -> bool:
        return self.path is not None and not self.problem


def _checkpoint_problem(path: Path) -> str:
    """'' when ``path`` holds config, tokenizer and safetensors weights, else what is wrong with it."""
    if not (path / "config.json").is_file():
        return f"{path} has no config.json."
    if not (path / "tokenizer.json").is_file():
        return f"{path} has no tokenizer.json."
    if not any(path.glob("*.safetensors")):
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickles:
            return f"{path} holds weights only as pickle files ({', '.join(pickles)})."
        return f"{path} has no *.safetensors weights."
    return ""


def find_model(spec: str) -> Lookup:
    """Look ``spec`` up as a local directory, then (a hub id) in the Hugging Face cache, any letter case.

    Never touches the network. The record lists every place searched, found or not.
    """
    result = Lookup(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        result.searched.append(f"local directory {path.resolve()}: found")
        result.path, result.problem = path, _checkpoint_problem(path)
        return result
    result.searched.append(f"local directory {path.resolve()}: {'not a directory' if path.exists() else 'absent'}")
    if not _is_hub_id(spec):
        return result
    cache = hf_cache_dir()
    wanted = _cache_entry_name(spec)
    if not cache.is_dir():
        result.searched.append(f"Hugging Face cache {cache}: absent")
        return result
    # The exact spelling first, then any other letter case of it (the hub's ids are case-insensitive).
    entries = sorted(
        (p for p in cache.iterdir() if p.name.casefold() == wanted.casefold() and p.is_dir()),
        key=lambda p: p.name != wanted,
    )
    if not entries:
        result.searched.append(f"Hugging Face cache {cache / wanted} (any letter case): absent")
        return result
    for entry in entries:
        snap = _snapshot(entry)
        how = "" if entry.name == wanted else f" (as {_entry_repo_id(entry.name)}: the letter case differs)"
        if snap is None:
            result.searched.append(f"Hugging Face cache {entry}{how}: no snapshot")
            continue
        problem = _checkpoint_problem(snap)
        result.searched.append(f"Hugging Face cache {entry}{how}: {problem or 'found ' + str(snap)}")
        if result.path is None or (result.problem and not problem):
            result.path, result.problem = snap, problem
        if not problem:
            break
    return result


def _not_found(lookup: Lookup, detail: str) -> ModelNotFound:
    places = "; ".join(lookup.searched) or "nowhere"
    spec = lookup.spec
    fix = (
        f"To fix it, run `granite-lsp download {spec}` once (it needs internet access; or run it on another "
        "machine and copy the Hugging Face cache here)"
        if _is_hub_id(spec)
        else "To fix it, pass --model with a Hugging Face id (then `granite-lsp download ID`)"
    )
    return ModelNotFound(
        f"Model '{spec}' was not found: {detail} Searched: {places}. {fix}, or pass --model with a directory "
        "holding config.json, tokenizer.json and *.safetensors (HF_HOME or HF_HUB_CACHE select another "
        "Hugging Face cache; --download lets the server download it itself)."
    )


def check_checkpoint_dir(path: Path) -> Path:
    """A directory usable as a checkpoint: config, tokenizer and safetensors weights (never pickle)."""
    lookup = Lookup(str(path), path, [f"directory {path}"], _checkpoint_problem(path))
    return _checked(lookup)


def _checked(lookup: Lookup) -> Path:
    assert lookup.path is not None
    if "pickle" in lookup.problem:
        raise UnsafeCheckpoint(
            f"{lookup.problem} granite-lsp loads safetensors only, because pickle files can execute code "
            "when loaded. Convert the checkpoint to safetensors (e.g. save_pretrained(..., safe_serialization=True))."
        )
    if lookup.problem:
        raise _not_found(lookup, lookup.problem)
    return lookup.path


def download_model(spec: str) -> Path:
    """Download ``spec`` from the hub (HF_ENDPOINT honoured) into the Hugging Face cache; the snapshot dir.

    Progress bars go to stderr; an interrupted download resumes from its partial files on the next call.
    """
    from huggingface_hub import snapshot_download

    if not _is_hub_id(spec):
        raise ModelNotFound(f"'{spec}' is not a Hugging Face id (owner/name): nothing to download.")
    try:
        local = snapshot_download(spec, allow_patterns=_WANTED)
    except Exception as e:
        raise _not_found(find_model(spec), f"the download failed ({type(e).__name__}: {e}).") from e
    return _checked(Lookup(spec, Path(local), [f"downloaded to {local}"], _checkpoint_problem(Path(local))))


def resolve_model_dir(spec: str, allow_download: bool = False) -> Path:
    """The local directory holding the checkpoint named by ``spec`` (a path or a Hugging Face id)."""
    lookup = find_model(spec)
    if lookup.path is not None:
        path = _checked(lookup)
        log.info("model %s: using %s", spec, path)
        return path
    if not _is_hub_id(spec):
        raise _not_found(lookup, "no such directory.")
    if not allow_download:
        raise _not_found(lookup, "it is not in the local cache and downloading was not requested.")
    return download_model(spec)


_TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


def resolve_tokenizer_dir(spec: str, allow_download: bool = False) -> Path:
    """The directory holding ``spec``'s tokenizer.json, for a remote engine: the engine runs the model,
    so no weights are needed here (a directory or cached snapshot without them is fine, and a download
    fetches only the tokenizer files)."""
    lookup = find_model(spec)
    if lookup.path is not None:
        if (lookup.path / "tokenizer.json").is_file():
            return lookup.path
        raise _not_found(lookup, f"{lookup.path} has no tokenizer.json.")
    if not _is_hub_id(spec):
        raise _not_found(lookup, "no such directory.")
    if not allow_download:
        raise _not_found(lookup, "it is not in the local cache and downloading was not requested.")
    from huggingface_hub import snapshot_download

    try:
        local = Path(snapshot_download(spec, allow_patterns=_TOKENIZER_FILES))
    except Exception as e:
        raise _not_found(lookup, f"the download failed ({type(e).__name__}: {e}).") from e
    if not (local / "tokenizer.json").is_file():
        raise _not_found(lookup, f"{spec} has no tokenizer.json.")
    return local
