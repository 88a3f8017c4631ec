"""Issue 15's memory accounting on model/tiny: what the state cache says it holds is every byte it holds
and stays under its cap (background work in several documents through the real server included), the
packed model holds one copy of each weight, and the server's ledger records its memory stage by stage.

The bytes an object holds are counted here independently of the product's own accounting: every tensor
reachable from it (``gc.get_referents``, whatever attribute or container holds it), each storage once.
Assertions are on bytes and counters, never on elapsed time or on a machine-dependent RSS.
"""

from __future__ import annotations

import gc
import time
import types

import numpy as np
import torch
from conftest import TINY, wait_stats
from jsonrpc_client import RpcClient

from granite_lsp.ahead import AFTER_ANSWER_S, DEBOUNCE_S
from granite_lsp.runtime import HybridModel
from granite_lsp.runtime.weights import expected_shapes
from granite_lsp.state_cache import StateCache

_LEAVES = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, str, bytes, int, float, np.ndarray)


def reachable_storages(root: object, skip: tuple[object, ...] = ()) -> dict[int, int]:
    """data_ptr -> bytes of every tensor storage reachable from ``root`` (not through ``skip``)."""
    seen: set[int] = {id(s) for s in skip}
    storages: dict[int, int] = {}
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, _LEAVES):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
            continue
        stack.extend(gc.get_referents(obj))
    return storages


def _held(cache: StateCache) -> int:
    """Bytes the cache holds, counted by walking it (the model's weights are not the cache's); less
    the zero snapshot's two scalars (broadcast views: ``zero_snapshot`` holds no memory)."""
    zero = reachable_storages(cache._zero)
    held = reachable_storages(cache, skip=(cache.model,))
    assert sum(zero.values()) <= 64
    return sum(n for ptr, n in held.items() if ptr not in zero)


def test_the_cache_counts_every_byte_it_holds(tiny_loaded) -> None:
    """Checkpoints (interval, marks, ends, a yielded prefill's), a KV buffer branched on write, a verify's
    journal and logits, and the live state's own Mamba states: ``nbytes`` is all of them, each once."""
    model = tiny_loaded.model
    cache = StateCache(model, interval=64, max_bytes=1 << 40)
    assert cache.nbytes() == _held(cache)  # the live state alone
    base = list(range(10, 300))
    cache.prefill("a", base, marks=(100, 250))
    assert cache.nbytes() == _held(cache)
    cache.prefill("a", base[:120] + [7, 8, 9] + base[123:])  # an edit: branches the KV buffer on write
    cache.prefill("b", base[::-1], should_yield=lambda: True, chunk=40)  # yielded: a resume checkpoint
    assert cache.stats.yields == 1
    cache.prefill("a", base + [11, 12])
    cache.step(13)
    cache.verify([14, 15, 16])  # speculation's journal buffers and all rows' logits
    cache.keep(2)
    forks = cache.branches(2, room=8, protect="a")
    assert len(forks) == 2 and len({id(c.hold.kv) for c in cache.checkpoints}) > 1
    assert len(cache.checkpoints) >= 6
    assert cache.nbytes() == _held(cache)
    # Each fork holds its own copy, counted apart (against the cap when made: StateCache.branches).
    for fork in forks:
        assert sum(reachable_storages(fork).values()) == fork.nbytes


def test_the_cache_never_holds_more_than_its_cap(tiny_loaded) -> None:
    """A long prefill takes a checkpoint every ``interval`` tokens: each makes room before it is taken,
    not only once the prefill ends, so the cache's bytes never pass the cap in between."""
    cache = StateCache(tiny_loaded.model, interval=32)
    live = cache.nbytes()
    cache.max_bytes = live + 6 * 150_000 + (1 << 20)  # the KV of 700 tokens and ~6 snapshots
    peaks = []
    for doc, n in (("a", 700), ("b", 500), ("a", 690)):
        cache.prefill(doc, list(range(10, 10 + n)))
        peaks.append(cache.stats.peak_bytes)
        assert cache.nbytes() <= cache.max_bytes
    assert cache.stats.evictions > 0 and cache.stats.checkpoints_taken > 20
    assert 0 < max(peaks) <= cache.max_bytes, peaks


def _assert_one_copy_of_each_weight(model: HybridModel) -> None:
    """bf16 packed: every matrix once in bf16 (the tied embedding is the lm_head's rows, not a copy),
    norms and SSM parameters in fp32, nothing else; no original or converted copy left behind."""
    assert model.packed and model.embed is None and model.config.tie_word_embeddings
    want = 0
    for name, shape in expected_shapes(model.config).items():
        matrix = len(shape) == 2 and not name.endswith("conv1d.weight")
        want += int(np.prod(shape)) * (2 if matrix else 4)
    assert model.weight_bytes() == want
    held = reachable_storages(model)
    assert sum(held.values()) == want, (sum(held.values()) - want, len(held))


def test_the_packed_model_holds_one_copy_of_each_weight() -> None:
    _assert_one_copy_of_each_weight(HybridModel.from_pretrained(TINY, dtype=torch.bfloat16))


def test_random_weights_are_converted_out_of_their_dict_into_the_same_model() -> None:
    """The server's random-weights load (the bench's real shape) consumes the fp32 dict as it converts
    (the originals freed one by one, not all kept until the end: a lower load peak, measured in the
    commit): the model it builds holds one copy of each weight, bit for bit those of a conversion that
    keeps the dict."""
    from granite_lsp.runtime.weights import random_state_dict
    from granite_lsp.service import load
    from granite_lsp.settings import Settings

    config = TINY / "config.json"
    loaded = load(Settings().updated({"model": str(TINY), "randomWeights": str(config), "dtype": "bfloat16"}))
    _assert_one_copy_of_each_weight(loaded.model)
    kept = HybridModel.from_state_dict(config, random_state_dict(loaded.model.config), dtype=torch.bfloat16)
    ours = sorted(reachable_storages(loaded.model).values())
    assert ours == sorted(reachable_storages(kept).values())
    for a, b in zip(_tensors(loaded.model), _tensors(kept), strict=True):
        assert torch.equal(a, b)


def _tensors(model: HybridModel) -> list[torch.Tensor]:
    """The model's weights in a fixed order (packed matrices by their weight)."""
    out = [model.lm_head.weight, model.final_norm]
    for block in model.blocks:
        for part in (block.ln_in, block.ln_post, *vars(block.mixer).values(), *vars(block.mlp).values()):
            t = getattr(part, "weight", part)
            if isinstance(t, torch.Tensor):
                out.append(t)
    return out


def test_the_server_reports_its_memory_by_stage_and_its_cache_stays_under_the_cap() -> None:
    """Work ahead at several places in several documents, the cap small enough that checkpoints are
    evicted: the cache's accounted bytes never passed the cap, and ``granite/stats`` gives the stages
    (interpreter + libraries before the model, the weights in, the first completion) and the serving
    peak apart from the load's."""
    text = (TINY.parent / "corpus" / "tasks.py").read_text() * 4
    lines = [i + 1 for i, line in enumerate(text.splitlines()) if "def render" in line]
    rpc = RpcClient()
    try:
        rpc.initialize({"raw": True, "maxTokens": 4, "ignoreEos": True, "debounceMs": 0, "cacheMb": 6})
        done = 0
        for uri in ("file:///a.py", "file:///b.py", "file:///c.py"):
            rpc.open(uri, text)
            for line in lines[-3:]:
                rpc.notify("granite/focus", {"textDocument": {"uri": uri}, "position": {"line": line, "character": 4}})
                done += 1  # once it ran (from its start to its end, or until the next document's open took over)
                ran = lambda s, n=done: s["background"].get("runs", 0) >= n and not s["worker"]["busy"]  # noqa: E731
                wait_stats(rpc, ran, "worked ahead", 120.0)
        rpc.call("textDocument/inlineCompletion", rpc.inline_params("file:///c.py", lines[-1], 4))
        time.sleep(2 * AFTER_ANSWER_S + DEBOUNCE_S)
        stats = wait_stats(rpc, lambda s: not s["worker"]["busy"], "idle", timeout=120.0)
    finally:
        rpc.kill()
    cache = stats["cache"]
    assert stats["background"]["runs"] >= 9 and stats["background"]["tokens"] > 5000 and cache["evictions"] > 0
    assert cache["bytes"] > 0 and 0 < cache["peak_bytes"] <= cache["max_bytes"] == 6 << 20
    memory = stats["memory"]
    stages = memory["stages"]
    assert list(stages) == ["started", "imported", "kernels", "tokenizer", "ready", "first completion"]
    assert stages["started"]["rss"] < stages["imported"]["rss"]  # torch and the modules
    # The weights are in by "ready": at least their bytes more anonymous memory than before the model.
    assert stages["ready"]["anon"] - stages["imported"]["anon"] >= stats["model_bytes"] / 2**20
