"""``granite-lsp bench --kernels --rss``: the real server's peak memory on a checkpoint of the real shape.

The checkpoint (random weights, bf16 like Granite's) and a tokenizer of Granite's size are written
once into the bench's work directory; the server is started on them over stdio, answers one
completion, and its peak RSS (VmHWM from /proc, or the load's peak where that was higher: the server
restarts VmHWM once its model is loaded, ``memory.Ledger``) is reported.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import torch

from ..runtime.config import HybridConfig
from ..runtime.weights import random_state_dict
from ..tokens import CONTROL_TOKENS
from .client import RpcClient
from .rss_watch import lifetime_peak_mb
from .shape import PRECISIONS, REPO, real_config

# Granite's control tokens have the ids 100257.. in tokens.CONTROL_TOKENS' order (BOS = EOS).
GRANITE_CONTROL_IDS = {name: 100257 + i for i, name in enumerate(CONTROL_TOKENS)}


def write_granite_sized_tokenizer(dst: Path, corpus_chars: int = 40_000_000) -> None:
    """A tokenizer the size of Granite's for the RSS measurement: the tiny model's (byte-level BPE,
    same pre-tokenizer and control tokens) retrained to 100,257 merges-built tokens on this Python's
    standard library, the control tokens at Granite's ids. The real one cannot be downloaded here,
    and a 100k-token vocabulary holds ~30 MB in the server that the tiny one (768 tokens) does not;
    on code it also cuts text into about as many tokens (~16 s to train on 2 cores)."""
    from tokenizers import Tokenizer, pre_tokenizers, trainers

    tiny_dir = REPO / "model" / "tiny"
    tiny = json.loads((tiny_dir / "tokenizer.json").read_text())
    blank = {**tiny, "added_tokens": [], "model": {**tiny["model"], "vocab": {}, "merges": []}}
    tok = Tokenizer.from_str(json.dumps(blank))
    first_control = min(GRANITE_CONTROL_IDS.values())
    trainer = trainers.BpeTrainer(
        vocab_size=first_control, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )

    def corpus() -> Iterator[str]:
        seen = 0
        for f in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
            try:
                text = f.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            yield text
            seen += len(text)
            if seen >= corpus_chars:
                return

    tok.train_from_iterator(corpus(), trainer)
    out = json.loads(tok.to_str())
    out["added_tokens"] = [{**a, "id": GRANITE_CONTROL_IDS[a["content"]]} for a in tiny["added_tokens"]]
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "tokenizer.json").write_text(json.dumps(out))
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_dir / name).is_file():
            shutil.copy(tiny_dir / name, dst / name)


def server_peak_rss_mb(precision: str, threads: int, workdir: Path, device: str = "cpu") -> float:
    """Peak RSS (VmHWM) of a real ``granite-lsp --stdio`` that loaded a real-shape checkpoint in
    ``precision`` and answered one completion."""
    from safetensors.torch import save_file

    ckpt = workdir / "granite-4.0-h-350m-random"
    if not (ckpt / "model.safetensors").is_file():
        ckpt.mkdir(parents=True, exist_ok=True)
        cfg = {**real_config(), "dtype": "bfloat16"}
        sd = {k: v.to(torch.bfloat16).contiguous() for k, v in random_state_dict(HybridConfig.load(cfg)).items()}
        save_file(sd, str(ckpt / "model.safetensors"))
        del sd
        (ckpt / "config.json").write_text(json.dumps(cfg))
    tokenizer = ckpt / "tokenizer.json"
    if not tokenizer.is_file() or tokenizer.stat().st_size < 1 << 20:  # absent, or an older run's tiny one
        write_granite_sized_tokenizer(ckpt)
    dtype, quantize = PRECISIONS[precision]
    cmd = [sys.executable, "-m", "granite_lsp", "--stdio", "--model", str(ckpt), "--device", device]
    cmd += ["--dtype", str(dtype).removeprefix("torch."), "--threads", str(threads)]
    if quantize:
        cmd += ["--quantize", quantize]
    server = RpcClient(cmd)
    try:
        server.call("initialize", {"processId": os.getpid(), "rootUri": None, "capabilities": {}}, timeout=1800.0)
        server.notify("initialized", {})
        status = server.wait_ready(1800.0)
        if status["state"] != "ready":
            raise RuntimeError(f"server failed to load: {status['message']}")
        text = "def add(a, b):\n    return a + b\n\n" * 40 + "def mul(a, b):\n    "
        doc = {"uri": "file:///bench.py", "languageId": "python", "version": 1, "text": text}
        server.notify("textDocument/didOpen", {"textDocument": doc})
        pos = {"line": text.count("\n"), "character": 4}
        server.call(
            "textDocument/inlineCompletion",
            {"textDocument": {"uri": doc["uri"]}, "position": pos, "context": {"triggerKind": 1}},
            timeout=1800.0,
        )
        return lifetime_peak_mb(server.peak_rss_mb(), server.call("granite/stats", None))
    finally:
        server.close()
