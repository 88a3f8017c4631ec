"""Finding a checkpoint on disk (local directory or Hugging Face cache) and refusing unsafe ones.

Loading is offline by default: a language server must not reach the network because a user opened a
file. Downloading happens only when the user asks for it (``--download``).
"""

from __future__ import annotations

import os
from pathlib import Path

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


class ModelNotFound(RuntimeError):
    """The model is neither a local directory nor in the Hugging Face cache (and no download was asked)."""


class UnsafeCheckpoint(RuntimeError):
    """The checkpoint exists but only as pickle files, which can run arbitrary code when loaded."""


def _hf_cache_dir() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except Exception:  # pragma: no cover - huggingface_hub is a dependency, this is belt and braces
        return os.path.expanduser("~/.cache/huggingface/hub")


def _not_found(spec: str, detail: str) -> ModelNotFound:
    return ModelNotFound(
        f"Model '{spec}' was not found: {detail} "
        f"Looked for a local directory named '{spec}' and in the Hugging Face cache at {_hf_cache_dir()} "
        "(set HF_HOME or HF_HUB_CACHE to use another). To fix it, either pass --model with a directory "
        "holding config.json, tokenizer.json and *.safetensors, or fetch the model once on a machine "
        f"with internet access (`hf download {spec}`) and copy the cache here, or run granite-lsp "
        "with --download to let it download the model now."
    )


def check_checkpoint_dir(path: Path) -> Path:
    """A directory usable as a checkpoint: config, tokenizer and safetensors weights (never pickle)."""
    if not (path / "config.json").is_file():
        raise _not_found(str(path), f"{path} has no config.json.")
    if not (path / "tokenizer.json").is_file():
        raise _not_found(str(path), f"{path} has no tokenizer.json.")
    if not any(path.glob("*.safetensors")):
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickles:
            raise UnsafeCheckpoint(
                f"{path} holds weights only as pickle files ({', '.join(pickles)}). granite-lsp loads "
                "safetensors only, because pickle files can execute code when loaded. Convert the "
                "checkpoint to safetensors (e.g. save_pretrained(..., safe_serialization=True))."
            )
        raise _not_found(str(path), f"{path} has no *.safetensors weights.")
    return path


def resolve_model_dir(spec: str, allow_download: bool = False) -> Path:
    """The local directory holding the checkpoint named by ``spec`` (a path or a Hugging Face id)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return check_checkpoint_dir(path)
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise _not_found(spec, "no such directory.")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover
        raise _not_found(spec, f"huggingface_hub is not installed ({e}).") from e
    try:
        local = snapshot_download(spec, allow_patterns=_WANTED, local_files_only=True)
    except Exception as e:
        if not allow_download:
            raise _not_found(spec, "it is not in the local cache and downloading was not requested.") from e
        try:
            local = snapshot_download(spec, allow_patterns=_WANTED)
        except Exception as e2:
            raise _not_found(spec, f"the download failed ({type(e2).__name__}: {e2}).") from e2
    return check_checkpoint_dir(Path(local))
