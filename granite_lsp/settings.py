"""User-facing settings: one dataclass fed from the CLI, initializationOptions and didChangeConfiguration."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from .model_files import DEFAULT_MODEL

_CAMEL = {
    "maxTokens": "max_tokens",
    "prefixTokens": "prefix_tokens",
    "suffixTokens": "suffix_tokens",
    "debounceMs": "debounce_ms",
    "maxLines": "max_lines",
    "contextTokens": "context_tokens",
    "cacheMb": "cache_mb",
    "cacheMB": "cache_mb",
    "randomWeights": "random_weights",
    "ignoreEos": "ignore_eos",
    "typeThrough": "type_through",
    "earlyFirstLine": "early_first_line",
}
_CHOICES = {
    "device": ("auto", "cpu", "cuda"),
    "dtype": ("auto", "float32", "bfloat16", "float16"),
    "quantize": ("none", "int8"),
    "backend": ("native", "transformers"),
}


class SettingsError(ValueError):
    pass


@dataclass(frozen=True)
class Settings:
    model: str = DEFAULT_MODEL
    device: str = "auto"
    dtype: str = "auto"
    quantize: str = "none"
    download: bool = False
    max_tokens: int = 64
    prefix_tokens: int = 1536
    suffix_tokens: int = 256
    max_lines: int = 10
    debounce_ms: int = 75
    context_tokens: int = 512
    cache_mb: int = 512
    streaming: bool = True  # partial notifications, for clients that also opt in by capability
    reuse: bool = True
    early_first_line: bool = True  # answer standard clients once the first line is complete
    type_through: bool = True  # answer keystrokes that match the shown suggestion from it
    # Benchmark-only knobs: a random-weight model of a given config, and transformers as the backend.
    random_weights: str = ""
    backend: str = "native"
    ignore_eos: bool = False
    raw: bool = False  # skip post-processing (the benchmark compares raw generations)

    def updated(self, options: dict[str, Any] | None) -> Settings:
        """A copy with ``options`` applied (camelCase or snake_case keys; unknown keys are ignored).

        Values are validated so that a bad setting is reported instead of breaking completions later.
        """
        if not options:
            return self
        if not isinstance(options, dict):
            raise SettingsError(f"settings must be an object, got {type(options).__name__}")
        known = {f.name: f for f in fields(self)}
        changes: dict[str, Any] = {}
        for key, value in options.items():
            name = _CAMEL.get(key, key)
            if name not in known or value is None:
                continue
            default = getattr(self, name)
            if isinstance(default, bool):
                if not isinstance(value, bool):
                    raise SettingsError(f"setting {key} must be true or false, got {value!r}")
            elif isinstance(default, int):
                if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                    raise SettingsError(f"setting {key} must be a non-negative number, got {value!r}")
                value = int(value)
            elif not isinstance(value, str) or (not value and name != "random_weights"):
                raise SettingsError(f"setting {key} must be a non-empty string, got {value!r}")
            if name in _CHOICES and value not in _CHOICES[name]:
                raise SettingsError(f"setting {key} must be one of {', '.join(_CHOICES[name])}, got {value!r}")
            changes[name] = value
        return replace(self, **changes)

    def model_key(self) -> tuple:
        """The settings that require reloading the model when they change."""
        return (self.model, self.device, self.dtype, self.quantize, self.random_weights, self.backend)
