"""The first hour's commands: ``--help``, ``download`` (against a stand-in hub on 127.0.0.1) and ``doctor``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, TINY
from hub_standin import HubStandIn

HUB_ID = "ibm-granite/granite-4.0-h-350m-base"  # the hub's spelling; the default id has "350M"


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "granite_lsp", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_DISABLE_TELEMETRY": "1", **(env or {})},
    )


def test_help_lists_the_subcommands() -> None:
    out = _run("--help")
    assert out.returncode == 0
    for sub in ("complete", "bench", "download", "doctor"):
        assert re.search(rf"^\s+{sub}\b", out.stdout, re.M), sub


def test_bench_help_lists_every_option_the_readme_uses() -> None:
    readme = (REPO / "README.md").read_text()
    used = set()
    for command in re.findall(r"granite-lsp bench(?:[^`\n]|\n(?!\n))*", readme):
        used.update(re.findall(r"(--[a-z][a-z-]+)", command))
    assert {"--kernels", "--random-weights", "--mode", "--llama-cpp"} <= used  # the README's commands were read
    out = _run("bench", "--help")
    assert out.returncode == 0, out.stderr
    missing = [opt for opt in used if opt not in out.stdout]
    assert not missing, missing


def test_download_from_a_local_hub_then_found_under_the_default_spelling(tmp_path) -> None:
    with HubStandIn(HUB_ID, TINY) as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf")}
        out = _run("download", HUB_ID, env=env)
        assert out.returncode == 0, out.stderr
        where = Path(out.stdout.strip())
        assert (
            where.is_dir() and (where / "model.safetensors").read_bytes() == (TINY / "model.safetensors").read_bytes()
        )
        assert str(where) in out.stderr and "it/s" in out.stderr  # said where it went, with a progress bar
        # The default id spells it "350M": the server's lookup finds the hub's spelling, offline, and says where.
        doc = _run("doctor", "--model", "ibm-granite/granite-4.0-h-350M-base", env={**env, "GRANITE_LSP_KERNELS": "0"})
        assert doc.returncode == 0, doc.stdout + doc.stderr
        assert "letter case differs" in doc.stdout and f"-> using {where}" in doc.stdout


def test_a_dropped_connection_resumes_where_it_stopped(tmp_path) -> None:
    """The transfer continues with a Range request from the bytes already on disk, not from the start.

    (huggingface_hub writes in 10 MiB chunks and retries a dropped connection from the last one; a
    killed process starts its partial file again: huggingface_hub 1.x+ keeps no partial file across runs.)
    """
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (repo / name).write_bytes((TINY / name).read_bytes())
    weights = os.urandom(24 << 20)
    (repo / "model.safetensors").write_bytes(weights)
    with HubStandIn(HUB_ID, repo, drop_after=12 << 20) as hub:
        out = _run("download", HUB_ID, env={"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf")})
        assert out.returncode == 0, out.stderr
        assert hub.ranges == [f"model.safetensors: bytes={10 << 20}-"]
    assert (Path(out.stdout.strip()) / "model.safetensors").read_bytes() == weights


def test_download_of_an_unknown_repo_is_a_clear_error(tmp_path) -> None:
    with HubStandIn(HUB_ID, TINY) as hub:
        out = _run("download", "org/absent", env={"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf")})
    assert out.returncode == 2
    assert "org/absent" in out.stderr and "download failed" in out.stderr


def test_doctor_reports_each_part_and_why_the_kernels_are_off(tmp_path) -> None:
    out = _run(
        "doctor", "--model", "org/absent", "--device", "cpu", env={"GRANITE_LSP_KERNELS": "0", "HF_HOME": str(tmp_path)}
    )
    assert out.returncode == 1  # no model: completions cannot work
    text = out.stdout
    for part in (
        "Python ",
        "torch ",
        "device: cpu -> cpu",
        "ISA level:",
        "C++ compiler:",
        "Hugging Face cache:",
        "settings: ",
    ):
        assert part in text, part
    assert "CPU kernels: unavailable" in text and "GRANITE_LSP_KERNELS=0" in text
    assert f"searched Hugging Face cache {tmp_path / 'hub'}" in text
    assert "granite-lsp download org/absent" in text


def test_missing_model_message_names_the_download_command(tmp_path) -> None:
    path = tmp_path / "a.py"
    path.write_text("x = 1\n")
    out = _run(
        "complete",
        str(path),
        "--line",
        "0",
        "--character",
        "0",
        "--model",
        "org/absent",
        env={"HF_HOME": str(tmp_path)},
    )
    assert out.returncode == 2
    assert "granite-lsp download org/absent" in out.stderr


def test_doctor_says_when_the_requested_device_is_not_there() -> None:
    import torch

    if torch.backends.mps.is_available():
        pytest.skip("this machine has an Apple GPU: nothing to refuse")
    out = _run("doctor", "--model", str(TINY), "--device", "mps", env={"GRANITE_LSP_KERNELS": "0"})
    assert out.returncode == 1
    assert "device: mps -> unusable" in out.stdout and "Apple GPU" in out.stdout


def test_doctor_reports_the_kernels_isa_level_or_why_they_are_off() -> None:
    from granite_lsp.kernels.isa import LEVELS

    out = _run("doctor", "--model", str(TINY), "--device", "cpu")
    assert out.returncode == 0, out.stdout + out.stderr
    kernels = next(line for line in out.stdout.splitlines() if line.startswith("CPU kernels: "))
    isa = next(line for line in out.stdout.splitlines() if line.startswith("ISA level: "))
    if "built and loaded" in kernels:
        assert isa.split()[2] in LEVELS
    else:
        assert kernels.split("(slower): ", 1)[1].strip() and "none" in isa
    assert f"-> using {TINY}" in out.stdout
