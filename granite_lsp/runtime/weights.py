"""Getting HF-named weights into memory: safetensors checkpoints, state dicts, random init.

Everything is keyed exactly like transformers' ``GraniteMoeHybridForCausalLM.state_dict()``
so a checkpoint, a live transformers model, and a random init all go through one path
(``expected_shapes`` is the single source of truth for names and shapes). Only safetensors
are read: pickle-based formats (.bin/.pt/.pth) can execute code on load.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from torch import Tensor

from .config import HybridConfig

TIED_LM_HEAD = "lm_head.weight"
# Non-persistent buffers that some exporters still include; they carry nothing we need.
_IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.original_inv_freq")


def expected_shapes(cfg: HybridConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor the model needs (lm_head only when untied)."""
    D = cfg.hidden_size
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (cfg.vocab_size, D),
        "model.norm.weight": (D,),
    }
    if not cfg.tie_word_embeddings:
        shapes[TIED_LM_HEAD] = (cfg.vocab_size, D)
    for i, kind in enumerate(cfg.layer_kinds):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (D,)
        shapes[p + "post_attention_layernorm.weight"] = (D,)
        shapes[p + "shared_mlp.input_linear.weight"] = (2 * cfg.shared_intermediate_size, D)
        shapes[p + "shared_mlp.output_linear.weight"] = (D, cfg.shared_intermediate_size)
        if kind == "mamba":
            m = p + "mamba."
            E, H, C = cfg.mamba_intermediate, cfg.mamba_n_heads, cfg.mamba_conv_dim
            shapes[m + "in_proj.weight"] = (E + C + H, D)
            if cfg.mamba_proj_bias:
                shapes[m + "in_proj.bias"] = (E + C + H,)
                shapes[m + "out_proj.bias"] = (D,)
            shapes[m + "conv1d.weight"] = (C, 1, cfg.mamba_d_conv)
            if cfg.mamba_conv_bias:
                shapes[m + "conv1d.bias"] = (C,)
            shapes[m + "dt_bias"] = (H,)
            shapes[m + "A_log"] = (H,)
            shapes[m + "D"] = (H,)
            shapes[m + "norm.weight"] = (E,)
            shapes[m + "out_proj.weight"] = (D, E)
        else:
            a = p + "self_attn."
            q = cfg.num_attention_heads * cfg.head_dim
            kv = cfg.num_key_value_heads * cfg.head_dim
            for name, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
                shapes[a + name + ".weight"] = (rows, D)
                if cfg.attention_bias:
                    shapes[a + name + ".bias"] = (rows,)
            shapes[a + "o_proj.weight"] = (D, q)
            if cfg.attention_bias:
                shapes[a + "o_proj.bias"] = (D,)
    return shapes


def check_state_dict(cfg: HybridConfig, sd: Mapping[str, Tensor]) -> None:
    """Raise ValueError listing missing, unexpected or mis-shaped tensors (without reading lazy ones)."""
    want = expected_shapes(cfg)
    shape = sd.shape_of if isinstance(sd, SafetensorsFiles) else (lambda k: tuple(sd[k].shape))
    missing = sorted(set(want) - set(sd))
    unexpected = sorted(k for k in set(sd) - set(want) if not (k == TIED_LM_HEAD or k.endswith(_IGNORABLE_SUFFIXES)))
    wrong = sorted(f"{k}: {shape(k)} != {want[k]}" for k in want if k in sd and shape(k) != want[k])
    if missing or unexpected or wrong:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if items:
                more = f" (+{len(items) - 8} more)" if len(items) > 8 else ""
                parts.append(f"{label}: {', '.join(items[:8])}{more}")
        raise ValueError("state dict does not match the config; " + "; ".join(parts))


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
                dtype = _ST_DTYPES.get(info.get("dtype"))
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
                if nbytes and f.readinto(memoryview(flat.view(torch.uint8).numpy())) != nbytes:
                    raise ValueError(f"{path}: truncated while reading {name}")
                return out
            if self._buf is None:
                self._buf = torch.empty(_PIECE_BYTES, dtype=torch.uint8)
            step = _PIECE_BYTES // stored.itemsize
            for a in range(0, flat.numel(), step):
                n = min(step, flat.numel() - a)
                buf = self._buf[: n * stored.itemsize]
                if f.readinto(memoryview(buf.numpy())) != buf.numel():
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


def random_state_dict(cfg: HybridConfig, seed: int = 0) -> dict[str, Tensor]:
    """Float32 weights initialised roughly like HF's ``_init_weights``: N(0, initializer_range)
    for matrices and conv taps, zero biases, unit norms, A_log = log(1..H), D = 1, dt_bias = 1."""
    gen = torch.Generator().manual_seed(seed)
    std = cfg.initializer_range
    sd: dict[str, Tensor] = {}
    for name, shape in expected_shapes(cfg).items():
        if name.endswith("A_log"):
            t = torch.log(torch.arange(1, shape[0] + 1, dtype=torch.float32))
        elif name.endswith(("dt_bias", ".D", "norm.weight")):
            t = torch.ones(shape)
        elif name.endswith(".bias"):
            t = torch.zeros(shape)
        else:
            t = torch.empty(shape).normal_(0.0, std, generator=gen)
        sd[name] = t
    return sd


def make_getter(
    sd: Mapping[str, Tensor],
    dtype: torch.dtype | None,
    device: torch.device | str,
    consume: bool = False,
) -> Callable[..., Tensor]:
    """Fetch a tensor converted to ``dtype`` (None: as stored) and ``device`` (``keep_fp32`` for
    SSM parameters). ``consume`` removes each tensor from ``sd`` once read, so that a loader owning
    the dict never holds two copies of the weights."""

    def get(name: str, keep_fp32: bool = False) -> Tensor:
        want = torch.float32 if keep_fp32 else dtype
        if consume and isinstance(sd, SafetensorsFiles):
            t = sd.pop_as(name, want)  # converted while it is read
        else:
            t = (sd.pop(name) if consume else sd[name]).detach()  # type: ignore[attr-defined]
        return t.to(device=device, dtype=want or t.dtype).contiguous()

    return get
