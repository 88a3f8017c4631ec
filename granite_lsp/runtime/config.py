"""The subset of a GraniteMoeHybrid ``config.json`` that the runtime needs.

We parse HF's config dict ourselves instead of going through ``transformers.AutoConfig`` so
loading never imports model code (nor could run remote code) and so the runtime has no
dependency on transformers at all. Field names follow HF's ``GraniteMoeHybridConfig``; the
defaults are that class's defaults, so a config.json that omits a key means the same thing
here as it does there.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

# HF renamed the layer kinds; both spellings appear in published config.json files.
_MAMBA_KINDS = {"mamba", "linear_attention"}
_ATTENTION_KINDS = {"attention", "full_attention"}


# Fields read from the key of the same name with a plain conversion (the annotation, a string here),
# except those HF spells or derives differently (from_dict reads them apart).
_PLAIN: dict[Any, Any] = {"int": int, "float": float, "bool": bool}
_READ_APART = {"num_key_value_heads", "head_dim", "num_local_experts", "mamba_d_head", "time_step_min", "time_step_max"}


def _layer_kinds(kinds: list[str] | None) -> tuple[str, ...]:
    """HF's layer type names (either spelling) as "mamba" / "attention"; () when absent (all Mamba)."""
    if kinds is None:
        return ()
    out = []
    for k in kinds:
        if k in _MAMBA_KINDS:
            out.append("mamba")
        elif k in _ATTENTION_KINDS:
            out.append("attention")
        else:
            raise ValueError(f"unsupported layer type {k!r}")
    return tuple(out)


def _positions(c: dict[str, Any]) -> dict[str, Any]:
    """position_embedding_type ("nope" is None) and rope_theta, wherever HF put it; only default RoPE."""
    pe = c.get("position_embedding_type")
    pe = None if pe == "nope" else pe
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    rope = rope if isinstance(rope, dict) else {}
    if pe == "rope" and rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"unsupported rope_type {rope.get('rope_type', rope.get('type'))!r} (only default RoPE)")
    theta = float(rope.get("rope_theta") or c.get("rope_theta", HybridConfig.rope_theta))
    return {"position_embedding_type": pe, "rope_theta": theta}


def _as_float(value: Any) -> float:
    """Decode a float as HF writes it to JSON: a number, "Infinity", or {"__float__": "Infinity"}."""
    if isinstance(value, dict) and set(value) == {"__float__"}:
        value = value["__float__"]
    return float(value)


@dataclass(frozen=True)
class HybridConfig:
    """Architecture hyper-parameters (frozen: a model's shape never changes after loading).

    The defaults are HF's (``GraniteMoeHybridConfig``): a config.json that omits a key means the
    same here. Fields HF spells or derives differently are marked; ``from_dict`` reads them."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    layer_kinds: tuple[str, ...] = ()  # "mamba" or "attention" per layer (HF: layer_types; all Mamba)
    num_attention_heads: int = 32
    num_key_value_heads: int = 0  # HF: None -> num_attention_heads
    head_dim: int = 0  # HF: None -> hidden_size // num_attention_heads
    attention_bias: bool = False
    attention_multiplier: float = 1.0
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0
    rms_norm_eps: float = 1e-6
    shared_intermediate_size: int = 1024
    num_local_experts: int = 8  # refused unless 0: no mixture-of-experts support
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    position_embedding_type: str | None = None  # None ("nope") or "rope"
    rope_theta: float = 1e4  # HF: rope_theta, or inside rope_parameters / rope_scaling
    mamba_n_heads: int = 128
    mamba_d_head: int = 0  # HF: "auto" -> mamba_expand * hidden_size // mamba_n_heads
    mamba_d_state: int = 256
    mamba_n_groups: int = 1
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    mamba_chunk_size: int = 256
    time_step_min: float = 0.0  # HF: time_step_limit = (min, max)
    time_step_max: float = math.inf
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        """Fills in what HF derives (the 0 / empty defaults above), then refuses what we cannot
        run, however the config was made."""
        derived = {
            "layer_kinds": self.layer_kinds or ("mamba",) * self.num_hidden_layers,
            "num_key_value_heads": self.num_key_value_heads or self.num_attention_heads,
            "head_dim": self.head_dim or self.hidden_size // self.num_attention_heads,
            "mamba_d_head": self.mamba_d_head or (self.mamba_expand * self.hidden_size) // self.mamba_n_heads,
        }
        for name, value in derived.items():
            object.__setattr__(self, name, value)  # frozen: set once, while being made
        bad_kinds = [k for k in self.layer_kinds if k not in ("mamba", "attention")]
        if bad_kinds:
            raise ValueError(f"unsupported layer kind {bad_kinds[0]!r}")
        if len(self.layer_kinds) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_kinds)} entries, num_hidden_layers={self.num_hidden_layers}"
            )
        if self.num_local_experts > 0:
            raise ValueError("mixture-of-experts checkpoints (num_local_experts > 0) are not supported")
        if self.hidden_act != "silu":
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r} (only silu)")
        if self.position_embedding_type not in (None, "rope"):
            raise ValueError(f"unsupported position_embedding_type {self.position_embedding_type!r}")
        if self.mamba_d_head * self.mamba_n_heads != self.mamba_expand * self.hidden_size:
            raise ValueError("mamba_n_heads * mamba_d_head must equal mamba_expand * hidden_size")
        if self.mamba_n_heads % self.mamba_n_groups:
            raise ValueError("mamba_n_groups must divide mamba_n_heads")

    # -- derived sizes -----------------------------------------------------------------------
    @property
    def mamba_intermediate(self) -> int:
        return self.mamba_expand * self.hidden_size

    @property
    def mamba_conv_dim(self) -> int:
        """Channels that go through the causal conv: x, B and C (not the gate z, not dt)."""
        return self.mamba_intermediate + 2 * self.mamba_n_groups * self.mamba_d_state

    @property
    def mamba_layers(self) -> tuple[int, ...]:
        return tuple(i for i, k in enumerate(self.layer_kinds) if k == "mamba")

    @property
    def attention_layers(self) -> tuple[int, ...]:
        return tuple(i for i, k in enumerate(self.layer_kinds) if k == "attention")

    @property
    def uses_rope(self) -> bool:
        return self.position_embedding_type == "rope"

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> HybridConfig:
        """Validate and normalise an HF config dict; raise ValueError on what we can't run."""
        c = dict(raw)
        values: dict[str, Any] = {
            f.name: _PLAIN[f.type](c[f.name])
            for f in fields(cls)
            if f.name in c and f.type in _PLAIN and f.name not in _READ_APART
        }
        m_head = c.get("mamba_d_head", "auto")
        tsl = c.get("time_step_limit") or (cls.time_step_min, cls.time_step_max)
        values.update(
            _positions(c),
            layer_kinds=_layer_kinds(c.get("layer_types", c.get("layers_block_type"))),
            num_key_value_heads=int(c.get("num_key_value_heads") or 0),
            head_dim=int(c.get("head_dim") or 0),
            num_local_experts=int(c.get("num_local_experts", cls.num_local_experts) or 0),
            hidden_act=c.get("hidden_act", cls.hidden_act),
            mamba_d_head=0 if m_head in (None, "auto") else int(m_head),
            time_step_min=_as_float(tsl[0]),
            time_step_max=_as_float(tsl[1]),
            raw=dict(raw),
        )
        return cls(**values)

    @classmethod
    def load(cls, source: dict[str, Any] | str | Path | HybridConfig) -> HybridConfig:
        """Accept a dict, a config.json path, a model directory, or an already parsed config."""
        if isinstance(source, HybridConfig):
            return source
        if isinstance(source, dict):
            return cls.from_dict(source)
        path = Path(source)
        if path.is_dir():
            path = path / "config.json"
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))
