"""User-facing settings: one typed schema fed from the CLI, initializationOptions and didChangeConfiguration.

Each setting is one field of ``Settings`` with its default and an ``Option`` in the field's metadata (help,
allowed choices or range, whether changing it reloads the model, whether it is a command line option).
Everything else is derived from that one place: the camelCase key clients send (``max_tokens`` ->
``maxTokens``), the ``--kebab-case`` CLI option, the validation and its messages, the model-reload key.

To add a setting: add a field here with ``setting(default, help, ...)``, then read ``settings.<name>``
where it is used. Nothing else needs to change (the README's table is written by hand).

A client's bad value never breaks completions later: ``merged`` keeps the previous value and returns a
message for it (the server shows it as a warning), and so it does for a key that is not a setting.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

from .fim import FimBudget
from .model_files import DEFAULT_MODEL


class SettingsError(ValueError):
    pass


@dataclass(frozen=True)
class Option:
    """What the schema knows about one setting besides its default."""

    help: str
    choices: tuple[str, ...] = ()
    minimum: int | None = None
    maximum: int | None = None
    reload: bool = False  # changing it loads the model again
    cli: bool = False  # also a command line option of the server and ``complete``
    aliases: tuple[str, ...] = ()  # other keys clients may send for it
    allow_empty: bool = False  # strings: "" is a valid value


def setting(default: Any, help: str, **option: Any) -> Any:
    return field(default=default, metadata={"option": Option(help, **option)})


_DEVICES = ("auto", "cpu", "cuda", "mps")  # mps: Apple GPUs, through the runtime's torch-ops path
_DTYPES = ("auto", "float32", "bfloat16", "float16")
_TOKENS = 1 << 16  # far above any prompt or suggestion this model can serve usefully


@dataclass(frozen=True)
class Settings:
    model: str = setting(DEFAULT_MODEL, "Hugging Face id or local directory (safetensors)", reload=True, cli=True)
    device: str = setting("auto", "where the model runs", choices=_DEVICES, reload=True, cli=True)
    dtype: str = setting("auto", "weights' precision", choices=_DTYPES, reload=True, cli=True)
    quantize: str = setting("none", "weight-only quantization", choices=("none", "int8"), reload=True, cli=True)
    download: bool = setting(False, "allow downloading the model from the Hub", cli=True)
    threads: int = setting(0, "CPU threads for torch (0: all cores)", minimum=0, maximum=1024, cli=True)
    max_tokens: int = setting(64, "tokens generated per suggestion at most", minimum=1, maximum=_TOKENS)
    prefix_tokens: int = setting(FimBudget.prefix_tokens, "prompt tokens before the cursor", minimum=0, maximum=_TOKENS)
    suffix_tokens: int = setting(FimBudget.suffix_tokens, "prompt tokens after the cursor", minimum=0, maximum=_TOKENS)
    max_lines: int = setting(10, "lines in a multi-line suggestion at most", minimum=1, maximum=10_000)
    # Several candidates are decoded as rows of one batched step (candidates.py), each alternative on a
    # copy of the state (~35 MB at 1.6k tokens on the real shape, counted against cache_mb): hence 4.
    candidates: int = setting(
        3, "suggestions for a request the user makes (next/previous cycle through them)", minimum=1, maximum=4
    )
    typing_candidates: int = setting(
        1, "suggestions for an automatic request while typing (more cost latency)", minimum=1, maximum=4
    )
    debounce_ms: int = setting(75, "longest wait of an automatic request while typing", minimum=0, maximum=10_000)
    context_tokens: int = setting(512, "tokens of other open files in the prompt", minimum=0, maximum=_TOKENS)
    filename_in_prompt: bool = setting(True, "the current file's workspace-relative path in the prompt")
    cache_mb: int = setting(512, "state checkpoints' memory cap", minimum=0, maximum=1 << 20, aliases=("cacheMB",))
    streaming: bool = setting(True, "partial notifications, for clients that also opt in by capability")
    reuse: bool = setting(True, "reuse model state across requests")
    progressive: bool = setting(True, "serve from a short window near the cursor while the full one is built")
    early_first_line: bool = setting(True, "answer standard clients once the first line is complete")
    type_through: bool = setting(True, "answer keystrokes that match the shown suggestion from it")
    speculate: bool = setting(True, "speculative decoding: draft tokens from the prompt, verified several per forward")
    trail: bool = setting(True, "healing tokens decoded from the same state before: chosen without a forward")
    # Benchmark-only knobs: a random-weight model of a given config, and transformers as the backend.
    random_weights: str = setting("", "config of a model to build with random weights", reload=True, allow_empty=True)
    backend: str = setting("native", "generation backend", choices=("native", "transformers"), reload=True)
    ignore_eos: bool = setting(False, "always generate maxTokens tokens")
    raw: bool = setting(False, "skip post-processing (the benchmark compares raw generations)")
    # Where the model runs: here, or a shared OpenAI-compatible server such as vLLM or llama.cpp's
    # (remote_engine.py; only the tokenizer of ``model`` is needed locally then).
    engine: str = setting("local", "where the model runs", choices=("local", "remote"), reload=True, cli=True)
    endpoint: str = setting(
        "", "remote engine's base URL, e.g. http://gpu-box:8000/v1", reload=True, cli=True, allow_empty=True
    )
    remote_model: str = setting("", "the model's name on the remote engine", reload=True, cli=True, allow_empty=True)
    api_key_env: str = setting(
        "",
        "NAME of the environment variable holding the remote engine's API key",
        reload=True,
        cli=True,
        allow_empty=True,
    )
    remote_timeout_ms: int = setting(
        10_000,
        "remote: connect timeout and longest silence within a request",
        minimum=100,
        maximum=600_000,
        reload=True,
        cli=True,
    )

    def updated(self, options: dict[str, Any] | None) -> Settings:
        """A copy with ``options`` applied; any unknown key or bad value raises ``SettingsError``."""
        new, problems = self.merged(options)
        if problems:
            raise SettingsError("; ".join(problems))
        return new

    def merged(self, options: Any) -> tuple[Settings, list[str]]:
        """A copy with the valid ``options`` applied (camelCase or snake_case keys, None: unchanged),
        and one message per key that is not a setting or whose value is refused."""
        if not options:
            return self, []
        if not isinstance(options, dict):
            return self, [f"settings must be an object, got {type(options).__name__}"]
        changes: dict[str, Any] = {}
        problems: list[str] = []
        for key, value in options.items():
            spec = _BY_KEY.get(key)
            if spec is None:
                problems.append(f"unknown setting {key!r}")
                continue
            if value is None:
                continue
            try:
                changes[spec.name] = spec.check(key, value)
            except SettingsError as e:
                problems.append(str(e))
        return replace(self, **changes), problems

    def model_key(self) -> tuple[Any, ...]:
        """The settings that require reloading the model when they change."""
        return tuple(getattr(self, spec.name) for spec in SPECS if spec.option.reload)

    def budget(self) -> FimBudget:
        return FimBudget(self.prefix_tokens, self.suffix_tokens)


@dataclass(frozen=True)
class _Spec:
    name: str
    kind: type
    default: Any
    option: Option

    @property
    def camel(self) -> str:
        head, *rest = self.name.split("_")
        return head + "".join(part.title() for part in rest)

    def check(self, key: str, value: Any) -> Any:
        """The value to store, or SettingsError with a message naming the key as the client sent it."""
        opt = self.option
        if self.kind is bool:
            if not isinstance(value, bool):
                raise SettingsError(f"setting {key} must be true or false, got {value!r}")
            return value
        if self.kind is int:
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise SettingsError(f"setting {key} must be a number, got {value!r}")
            if isinstance(value, float) and not value.is_integer():
                # Flooring 12.7 to 12 would apply a value the user did not write; 12.0 is 12 (JSON numbers).
                raise SettingsError(f"setting {key} must be a whole number, got {value!r}")
            low, high = opt.minimum, opt.maximum
            if (low is not None and value < low) or (high is not None and value > high):
                raise SettingsError(f"setting {key} must be between {low} and {high}, got {value!r}")
            return int(value)
        if not isinstance(value, str) or (not value and not opt.allow_empty):
            raise SettingsError(f"setting {key} must be a non-empty string, got {value!r}")
        if opt.choices and value not in opt.choices:
            raise SettingsError(f"setting {key} must be one of {', '.join(opt.choices)}, got {value!r}")
        return value


_KINDS = {"bool": bool, "int": int, "str": str}
SPECS: tuple[_Spec, ...] = tuple(
    _Spec(f.name, _KINDS[str(f.type)], f.default, f.metadata["option"]) for f in fields(Settings)
)
_BY_KEY: dict[str, _Spec] = {key: spec for spec in SPECS for key in (spec.name, spec.camel, *spec.option.aliases)}


def add_cli_options(parser: argparse.ArgumentParser, names: tuple[str, ...] = ()) -> None:
    """The settings marked ``cli`` (and ``names``) as ``--kebab-case`` options, with the schema's help."""
    for spec in SPECS:
        if not spec.option.cli and spec.name not in names:
            continue
        flag = "--" + spec.name.replace("_", "-")
        if spec.kind is bool:
            parser.add_argument(flag, action="store_true", default=None, help=spec.option.help)
            continue
        extra: dict[str, Any] = {"choices": spec.option.choices} if spec.option.choices else {}
        parser.add_argument(
            flag,
            type=spec.kind,
            default=None,
            metavar=None if extra else spec.name.upper(),
            help=f"{spec.option.help} (default: {spec.default!r})",
            **extra,
        )


def from_cli(args: argparse.Namespace, base: Settings | None = None) -> Settings:
    """``base`` (the defaults) with the options given on the command line; SettingsError if one is invalid."""
    given = {spec.name: getattr(args, spec.name) for spec in SPECS if getattr(args, spec.name, None) is not None}
    return (base or Settings()).updated(given)
