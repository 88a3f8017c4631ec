"""Settings: one schema from which client keys, CLI options, validation and defaults are derived."""

from __future__ import annotations

import argparse
import math

import pytest
from conftest import single_line_fixture
from jsonrpc_client import RpcClient

from granite_lsp.fim import FimBudget
from granite_lsp.settings import SPECS, Settings, SettingsError, add_cli_options, from_cli


def test_camel_case_and_snake_case_keys_set_the_same_field() -> None:
    s = Settings().updated({"maxTokens": 7, "prefix_tokens": 100, "cacheMB": 9, "typeThrough": False})
    assert (s.max_tokens, s.prefix_tokens, s.cache_mb, s.type_through) == (7, 100, 9, False)
    assert Settings().updated({"cacheMb": 3}).cache_mb == 3
    assert Settings().updated({"debounceMs": 12.0}).debounce_ms == 12  # a whole number sent as a float
    assert Settings().updated({"maxTokens": None}).max_tokens == Settings().max_tokens  # None: unchanged


@pytest.mark.parametrize(
    "key, value",
    [
        ("debounceMs", 1e300),  # an automatic request would never be answered
        ("debounceMs", math.inf),
        ("debounceMs", math.nan),
        ("debounceMs", -1),
        ("maxTokens", 0),
        ("maxTokens", 10**9),
        ("maxLines", 0),
        ("cacheMb", -5),
        ("threads", 1e6),
        ("debounceMs", 12.7),  # not floored to 12: a value the user did not write
        ("maxTokens", 7.5),  # floored, 7 would be in range
        ("threads", 1.5),
        ("prefixTokens", "1536"),
        ("maxTokens", True),
        ("streaming", 1),
        ("device", "tpu"),
        ("model", ""),
        ("candidates", 5),  # each alternative holds a copy of the state: at most 4 candidates
        ("typingCandidates", 16),
    ],
)
def test_out_of_range_and_ill_typed_values_are_refused_with_the_key(key: str, value) -> None:
    with pytest.raises(SettingsError, match=key):
        Settings().updated({key: value})
    other = "maxLines" if key == "maxTokens" else "maxTokens"
    new, problems = Settings().merged({key: value, other: 5})
    assert len(problems) == 1 and key in problems[0]
    assert new == Settings().updated({other: 5})  # the refused value changed nothing, the valid one applies


def test_every_numeric_setting_has_a_finite_range() -> None:
    for spec in SPECS:
        if spec.kind is int:
            assert spec.option.minimum is not None and spec.option.maximum is not None, spec.name
            assert spec.option.minimum <= spec.default <= spec.option.maximum, spec.name


def test_unknown_keys_are_reported_not_ignored() -> None:
    new, problems = Settings().merged({"maxTokens": 9, "notASetting": 1})
    assert new.max_tokens == 9
    assert problems == ["unknown setting 'notASetting'"]
    assert Settings().merged(["not", "an", "object"])[1] == ["settings must be an object, got list"]


def test_threads_is_a_setting() -> None:
    assert Settings().updated({"threads": 2}).threads == 2


def test_defaults_and_model_key_come_from_the_schema() -> None:
    s = Settings()
    assert s.budget() == FimBudget()
    reloading = {spec.name for spec in SPECS if spec.option.reload}
    where_the_model_runs = {"model", "device", "dtype", "quantize", "random_weights", "backend", "engine", "endpoint"}
    assert where_the_model_runs <= reloading and not {"max_tokens", "debounce_ms", "threads"} & reloading
    assert s.model_key() == tuple(getattr(s, spec.name) for spec in SPECS if spec.name in reloading)
    assert s.updated({"maxTokens": 3}).model_key() == s.model_key()
    assert s.updated({"dtype": "float32"}).model_key() != s.model_key()


def test_cli_options_are_derived_from_the_schema() -> None:
    p = argparse.ArgumentParser()
    add_cli_options(p, ("max_tokens",))
    assert from_cli(p.parse_args([])) == Settings()
    args = p.parse_args(["--dtype", "float32", "--threads", "3", "--max-tokens", "9", "--download"])
    s = from_cli(args)
    assert (s.dtype, s.threads, s.max_tokens, s.download) == ("float32", 3, 9, True)
    with pytest.raises(SystemExit):
        p.parse_args(["--device", "tpu"])  # choices come from the schema
    with pytest.raises(SettingsError, match="threads"):
        from_cli(p.parse_args(["--threads", "-2"]))


def test_server_reports_bad_settings_and_still_answers_automatic_requests(rpc: RpcClient) -> None:
    """debounceMs 1e300 used to make every automatic request wait forever; unknown keys passed in silence."""
    rpc.initialize({"debounceMs": 1e300, "threds": 2, "maxLines": math.nan, "maxTokens": 7.5})
    warning = rpc.wait_notification("window/showMessage", lambda p: p["type"] == 2)
    message = warning["params"]["message"]
    assert "debounceMs" in message and "'threds'" in message and "maxLines" in message
    assert "setting maxTokens must be a whole number, got 7.5" in message
    fixture = single_line_fixture()
    rpc.open("file:///s.py", fixture["text"])
    result = rpc.inline("file:///s.py", fixture["line"], fixture["character"], automatic=True)
    assert result["items"][0]["insertText"] == fixture["middle"]


def test_threads_setting_takes_effect_at_the_next_completion(make_service) -> None:
    import torch

    before = torch.get_num_threads()
    svc = make_service(maxTokens=2)
    try:
        svc.complete("file:///t.py", "x = ", 4, settings=svc.settings.updated({"threads": 1}))
        assert torch.get_num_threads() == 1
        svc.complete("file:///t.py", "x = ", 4, settings=svc.settings.updated({"threads": 0}))
        assert torch.get_num_threads() == before  # 0: torch's own default again
    finally:
        torch.set_num_threads(before)
