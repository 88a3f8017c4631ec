"""Reading .safetensors checkpoints: one tensor at a time, never a pickle.

Only safetensors are read: pickle-based formats (.bin/.pt/.pth) can execute code on load.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import Tensor

_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


_PIECE_BYTES = 16 << 20  # read (and convert) at most this much of a tensor at a time


class SafetensorsFiles(Mapping[str, Tensor]):
    """The tensors of .safetensors files, each read from disk only when asked for.

    Why not ``safetensors.torch.load_file``: it maps the files, and every page read stays in the
    process's resident memory until all their tensors are gone, so converting a bf16 checkpoint to
    fp32 (or int8) briefly held both. Read with plain file I/O, one tensor at a time, and dropped
    with ``pop`` once converted, the weights only ever exist once.
    """

    def __init__(self, files: list[Path]) -> None:
        self._buf: Tensor | None = None
        self._where: dict[str, tuple[Path, torch.dtype, tuple[int, ...], int, int]] = {}
        for path in files:
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) != 8:
                    raise ValueError(f"{path}: not a safetensors file (too short)")
                n = int.from_bytes(head, "little")
                size = path.stat().st_size
                if n <= 0 or 8 + n > size:
                    raise ValueError(f"{path}: not a safetensors file (header length {n})")
                try:
                    header = json.loads(f.read(n))
                except ValueError as e:
                    raise ValueError(f"{path}: unreadable safetensors header: {e}") from None
            base = 8 + n
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if not isinstance(info, dict):
                    raise ValueError(f"{path}: malformed entry for tensor {name}")
                dtype = _ST_DTYPES.get(str(info.get("dtype")))
                if dtype is None:
                    raise ValueError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')!r}")
                try:
                    shape = tuple(int(d) for d in info["shape"])
                    start, end = (int(o) for o in info["data_offsets"])
                except (KeyError, TypeError, ValueError):
                    raise ValueError(f"{path}: tensor {name} has a malformed shape or offsets") from None
                consistent = min(shape, default=0) >= 0 and 0 <= start <= end <= size - base
                if not consistent or end - start != math.prod(shape) * dtype.itemsize:
                    raise ValueError(f"{path}: tensor {name} has inconsistent offsets")
                self._where[name] = (path, dtype, shape, base + start, end - start)

    def shape_of(self, name: str) -> tuple[int, ...]:
        return self._where[name][2]

    def _read(self, name: str, dtype: torch.dtype | None = None) -> Tensor:
        """Tensor ``name`` as ``dtype`` (default: as stored). Stored bytes go straight into the
        result; a conversion goes through one shared ~16 MB buffer, a piece at a time, so a bf16
        embedding read as fp32 never briefly needs both copies (+150 MB) and leaves no garbage."""
        path, stored, shape, offset, nbytes = self._where[name]
        out = torch.empty(shape, dtype=dtype or stored)
        flat = out.view(-1)
        with open(path, "rb") as f:
            f.seek(offset)
            if out.dtype == stored:
                if nbytes and f.readinto(flat.view(torch.uint8).numpy().data) != nbytes:
                    raise ValueError(f"{path}: truncated while reading {name}")
                return out
            if self._buf is None:
                self._buf = torch.empty(_PIECE_BYTES, dtype=torch.uint8)
            step = _PIECE_BYTES // stored.itemsize
            for a in range(0, flat.numel(), step):
                n = min(step, flat.numel() - a)
                buf = self._buf[: n * stored.itemsize]
                if f.readinto(buf.numpy().data) != buf.numel():
                    raise ValueError(f"{path}: truncated while reading {name}")
                flat[a : a + n] = buf.view(stored)
        return out

    def __getitem__(self, name: str) -> Tensor:
        return self._read(name)

    def pop(self, name: str) -> Tensor:
        return self.pop_as(name, None)

    def pop_as(self, name: str, dtype: torch.dtype | None) -> Tensor:
        """``pop(name).to(dtype)``, converted while reading (see ``_read``)."""
        t = self._read(name, dtype)
        del self._where[name]
        if not self._where:
            self._buf = None
        return t

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, name: object) -> bool:
        return name in self._where


def load_safetensors_dir(path: str | Path) -> SafetensorsFiles:
    """All tensors of a model directory (single file or sharded with an index), read lazily."""
    root = Path(path)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        with open(index, encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(p.name for p in root.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for pat in ("*.bin", "*.pt", "*.pth") for p in root.glob(pat))
        if pickled:
            raise ValueError(
                f"{root} holds only pickle checkpoints ({', '.join(pickled)}); refusing to load them "
                "(unpickling can execute code). Convert to .safetensors first."
            )
        raise ValueError(f"no .safetensors weights found in {root}")
    return SafetensorsFiles([root / name for name in files])
