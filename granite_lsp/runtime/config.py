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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# HF renamed the layer kinds; both spellings appear in published config.json files.
_MAMBA_KINDS = {"mamba", "linear_attention"}
_ATTENTION_KINDS = {"attention", "full_attention"}


def _as_float(value: Any) -> float:
    """Decode a float as HF writes it to JSON: a number, "Infinity", or {"__float__": "Infinity"}."""
    if isinstance(value, dict) and set(value) == {"__float__"}:
        value = value["__float__"]
    return float(value)


@dataclass(frozen=True)
class HybridConfig:
    """Architecture hyper-parameters (frozen: a model's shape never changes after loading)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    layer_kinds: tuple[str, ...]  # "mamba" or "attention" per layer
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    attention_bias: bool
    attention_multiplier: float
    embedding_multiplier: float
    residual_multiplier: float
    logits_scaling: float
    rms_norm_eps: float
    shared_intermediate_size: int
    num_local_experts: int
    hidden_act: str
    tie_word_embeddings: bool
    initializer_range: float
    position_embedding_type: str | None
    rope_theta: float
    mamba_n_heads: int
    mamba_d_head: int
    mamba_d_state: int
    mamba_n_groups: int
    mamba_d_conv: int
    mamba_expand: int
    mamba_conv_bias: bool
    mamba_proj_bias: bool
    mamba_chunk_size: int
    time_step_min: float
    time_step_max: float
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

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
        hidden = int(c.get("hidden_size", 4096))
        n_layers = int(c.get("num_hidden_layers", 32))
        kinds_raw = c.get("layer_types", c.get("layers_block_type"))
        if kinds_raw is None:
            kinds_raw = ["mamba"] * n_layers
        kinds: list[str] = []
        for k in kinds_raw:
            if k in _MAMBA_KINDS:
                kinds.append("mamba")
            elif k in _ATTENTION_KINDS:
                kinds.append("attention")
            else:
                raise ValueError(f"unsupported layer type {k!r}")
        if len(kinds) != n_layers:
            raise ValueError(f"layer_types has {len(kinds)} entries, num_hidden_layers={n_layers}")

        n_heads = int(c.get("num_attention_heads", 32))
        n_kv = c.get("num_key_value_heads") or n_heads
        head_dim = int(c.get("head_dim") or hidden // n_heads)
        n_experts = int(c.get("num_local_experts", 8) or 0)
        if n_experts > 0:
            raise ValueError("mixture-of-experts checkpoints (num_local_experts > 0) are not supported")
        act = c.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported hidden_act {act!r} (only silu)")

        pe = c.get("position_embedding_type")
        if pe in (None, "nope"):
            pe = None
        elif pe != "rope":
            raise ValueError(f"unsupported position_embedding_type {pe!r}")
        rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
        if pe == "rope" and rope_type != "default":
            raise ValueError(f"unsupported rope_type {rope_type!r} (only default RoPE)")
        rope_theta = float((rope.get("rope_theta") if isinstance(rope, dict) else None) or c.get("rope_theta", 1e4))

        m_expand = int(c.get("mamba_expand", 2))
        m_heads = int(c.get("mamba_n_heads", 128))
        m_head = c.get("mamba_d_head", "auto")
        m_head = (m_expand * hidden) // m_heads if m_head in (None, "auto") else int(m_head)
        if m_head * m_heads != m_expand * hidden:
            raise ValueError("mamba_n_heads * mamba_d_head must equal mamba_expand * hidden_size")
        m_groups = int(c.get("mamba_n_groups", 1))
        if m_heads % m_groups:
            raise ValueError("mamba_n_groups must divide mamba_n_heads")
        tsl = c.get("time_step_limit", (0.0, math.inf))
        if tsl is None:
            tsl = (0.0, math.inf)
        tsl = tuple(_as_float(v) for v in tsl)

        return cls(
            vocab_size=int(c.get("vocab_size", 32000)),
            hidden_size=hidden,
            num_hidden_layers=n_layers,
            layer_kinds=tuple(kinds),
            num_attention_heads=n_heads,
            num_key_value_heads=int(n_kv),
            head_dim=head_dim,
            attention_bias=bool(c.get("attention_bias", False)),
            attention_multiplier=float(c.get("attention_multiplier", 1.0)),
            embedding_multiplier=float(c.get("embedding_multiplier", 1.0)),
            residual_multiplier=float(c.get("residual_multiplier", 1.0)),
            logits_scaling=float(c.get("logits_scaling", 1.0)),
            rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
            shared_intermediate_size=int(c.get("shared_intermediate_size", 1024)),
            num_local_experts=n_experts,
            hidden_act=act,
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            initializer_range=float(c.get("initializer_range", 0.02)),
            position_embedding_type=pe,
            rope_theta=rope_theta,
            mamba_n_heads=m_heads,
            mamba_d_head=m_head,
            mamba_d_state=int(c.get("mamba_d_state", 256)),
            mamba_n_groups=m_groups,
            mamba_d_conv=int(c.get("mamba_d_conv", 4)),
            mamba_expand=m_expand,
            mamba_conv_bias=bool(c.get("mamba_conv_bias", True)),
            mamba_proj_bias=bool(c.get("mamba_proj_bias", False)),
            mamba_chunk_size=int(c.get("mamba_chunk_size", 256)),
            time_step_min=float(tsl[0]),
            time_step_max=float(tsl[1]),
            raw=dict(raw),
        )

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
