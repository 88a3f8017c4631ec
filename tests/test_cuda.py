"""The runtime on a CUDA device (skipped without one).

* Our torch ops on CUDA meet the CPU bar of tests/test_runtime.py: transformers' fp32 logits and
  the float64 textbook reference within 1e-4 whether a sequence arrives whole or in continuation
  pieces, and a restored snapshot continues exactly like a fresh run.
* With causal_conv1d / mamba_ssm installed (cuda_kernels.py), the kernel path equals the torch path
  over pieces of 37, 1, 1, 9, 1 and 50 tokens (prefill, decode steps, an edit, a long piece
  crossing scan chunks): fp32 logits within 1e-4 and the same conv / SSM states after every piece;
  in bf16 the same greedy tokens on the tiny trained model's corpus files.

transformers picks those packages at import time whatever the device, so once they are installed
its CPU forward runs into CUDA kernels and is no reference: the transformers comparison is then
left out and the float64 reference alone is the oracle (bench/gpu_check.sh runs this file once
without the packages, once with them).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from test_runtime import (
    ROOT,
    TINY_CONFIG,
    TINY_DIR,
    TOL,
    VARIANT_CONFIG,
    _hf_logits,
    _hf_model,
    _ours,
    _reference_f64,
    _run_splits,
)

from granite_lsp.runtime import HybridModel, cuda_kernels

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

CUDA = torch.device("cuda")
PIECES = [37, 1, 1, 9, 1, 50]  # 99 tokens
CONFIGS = {"tiny": TINY_CONFIG, "variant": VARIANT_CONFIG}
KERNEL_PACKAGES = any(importlib.util.find_spec(name) is not None for name in ("mamba_ssm", "causal_conv1d"))


def _torch_ops(model: HybridModel) -> HybridModel:
    for blk in model.blocks:
        if blk.kind == "mamba":
            blk.mixer.cuda_kernels = False
    return model


def _scan_chunk(model: HybridModel, chunk: int) -> HybridModel:
    for blk in model.blocks:
        if blk.kind == "mamba":
            blk.mixer.cuda_chunk_size = chunk
    return model


def _need_kernels() -> None:
    if not cuda_kernels.available(CUDA):
        pytest.skip(f"causal_conv1d / mamba_ssm unavailable: {cuda_kernels.describe(CUDA)}")


def _count_kernel_calls(monkeypatch) -> dict[str, int]:
    """Counts the conv / scan calls that the kernels answered (None means the torch ops ran)."""
    calls = {"conv": 0, "scan": 0}
    for name in calls:
        real = getattr(cuda_kernels, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            out = _real(*args, **kwargs)
            calls[_name] += out is not None
            return out

        monkeypatch.setattr(cuda_kernels, name, counted)
    return calls


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item() / max(1.0, b.float().abs().max().item())


def _assert_states_close(s1, s2, tol: float, where: object) -> None:
    for i, (x, y) in enumerate(zip((*s1.conv, *s1.ssm), (*s2.conv, *s2.ssm), strict=True)):
        assert x.shape == y.shape and x.dtype == y.dtype and x.device.type == "cuda"
        assert _rel_diff(x, y) < tol, (where, i, _rel_diff(x, y))


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request):
    """(config, transformers model on CPU, ids, transformers' logits or None, float64 logits)."""
    conf = CONFIGS[request.param]
    hf = _hf_model(conf, seed=3)
    ids = torch.randint(0, conf["vocab_size"], (72,), generator=torch.Generator().manual_seed(1))
    ref = None if KERNEL_PACKAGES else _hf_logits(hf, ids)
    return conf, hf, ids, ref, _reference_f64(conf, hf.state_dict(), ids)


# -- our torch ops on CUDA -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "splits",
    [[72], [1, 3, 17, 2, 40, 1, 1, 5, 2], [1] * 10 + [2, 1, 2] + [57], [33, 1, 1, 1, 36], [8, 9, 16, 17, 7, 15]],
)
def test_torch_ops_on_cuda_match_references(case, splits):
    conf, hf, ids, ref, exact = case
    model = _torch_ops(_ours(hf, conf, device="cuda", chunk_size=16))
    assert model.device.type == "cuda" and model.dtype == torch.float32
    out = _run_splits(model, ids, splits).cpu()
    assert (out.double() - exact).abs().max().item() < TOL
    if ref is not None:
        assert (out - ref).abs().max().item() < TOL


@pytest.mark.parametrize("kernels", [False, True], ids=["torch-ops", "cuda-kernels"])
def test_snapshot_restore_on_cuda(case, kernels):
    """A restored snapshot (and a fork of one) continues like a fresh run; with the kernels too,
    whose state round trip goes through their own layouts."""
    conf, hf, ids, _, exact = case
    if kernels:
        _need_kernels()
    model = _ours(hf, conf, device="cuda")
    if not kernels:
        _torch_ops(model)
    a, b, c = ids[:20], ids[20:45], ids[45:60]
    state = model.new_state(16)
    model.forward(a, state)
    snap = state.snapshot()
    model.forward(b, state)
    state.restore(snap)
    after = model.forward(c, state, all_logits=True)
    fresh = model.new_state(16)
    model.forward(a, fresh)
    expected = model.forward(c, fresh, all_logits=True)
    again = state.fork(snap)
    forked = model.forward(c, again, all_logits=True)
    state.restore(snap)
    twice = model.forward(c, state, all_logits=True)
    for got in (after, forked, twice):
        if kernels:  # Triton autotuning could pick another tiling between calls: allow rounding
            assert (got - expected).abs().max().item() < 1e-6
        else:
            assert torch.equal(got, expected)
    assert (after.cpu().double() - exact[45:60]).abs().max().item() < TOL


def test_cuda_kernels_env_knob(monkeypatch):
    monkeypatch.setenv(cuda_kernels.ENV, "0")
    assert not cuda_kernels.available(CUDA)
    assert "=0" in cuda_kernels.describe(CUDA)


# -- causal_conv1d / mamba_ssm against our torch ops ------------------------------------------------
@pytest.mark.parametrize("cfg", sorted(CONFIGS))
def test_cuda_kernels_equal_torch_ops_fp32(cfg, monkeypatch):
    """Logits within 1e-4 and the same states after each piece; the scan chunk is 32 so that the
    37- and 50-token pieces cross chunk boundaries (variant: 2 SSM groups, biases, RoPE)."""
    _need_kernels()
    conf = CONFIGS[cfg]
    hf = _hf_model(conf, seed=5)
    fast = _scan_chunk(_ours(hf, conf, device="cuda"), 32)
    plain = _torch_ops(_ours(hf, conf, device="cuda", chunk_size=16))
    calls = _count_kernel_calls(monkeypatch)
    ids = torch.randint(0, conf["vocab_size"], (sum(PIECES),), generator=torch.Generator().manual_seed(2))
    sf, sp = fast.new_state(128), plain.new_state(128)
    start = 0
    for n in PIECES:
        a = fast.forward(ids[start : start + n], sf, all_logits=True)
        b = plain.forward(ids[start : start + n], sp, all_logits=True)
        start += n
        assert (a - b).abs().max().item() < TOL, n
        _assert_states_close(sf, sp, TOL, n)
    n_mamba = sum(blk.kind == "mamba" for blk in fast.blocks)
    # every Mamba layer of every piece ran through the kernels that are installed
    expected = n_mamba * len(PIECES)
    assert calls["conv"] in (0, expected) and calls["scan"] in (0, expected) and sum(calls.values()) > 0, calls
    if cuda_kernels.conv_available(CUDA):
        assert calls["conv"] == expected
    if cuda_kernels.scan_available(CUDA):
        assert calls["scan"] == expected


@pytest.mark.skipif(not (TINY_DIR / "model.safetensors").is_file(), reason="model/tiny not built")
def test_cuda_kernels_bf16_same_greedy_tokens(monkeypatch):
    """bf16 weights and activations, both paths: the corpus files' first 99 tokens in the pieces
    above, then 16 greedy tokens each path chooses for itself."""
    _need_kernels()
    from tokenizers import Tokenizer

    corpus = sorted((ROOT / "model" / "corpus").glob("*.*"))
    if not corpus:
        pytest.skip("model/corpus is empty")
    tok = Tokenizer.from_file(str(TINY_DIR / "tokenizer.json"))
    fast = HybridModel.from_pretrained(TINY_DIR, dtype=torch.bfloat16, device="cuda")
    plain = _torch_ops(HybridModel.from_pretrained(TINY_DIR, dtype=torch.bfloat16, device="cuda"))
    assert fast.dtype == torch.bfloat16
    calls = _count_kernel_calls(monkeypatch)
    for path in corpus:
        ids = torch.tensor(tok.encode(path.read_text()).ids[: sum(PIECES)])
        assert len(ids) == sum(PIECES), path.name
        sf, sp = fast.new_state(128), plain.new_state(128)
        start = 0
        for n in PIECES:
            lf, lp = fast.forward(ids[start : start + n], sf), plain.forward(ids[start : start + n], sp)
            start += n
            # bf16 activations: an op order change can flip a rounding, which later layers carry
            _assert_states_close(sf, sp, 5e-2, (path.name, n))
        got, want = [], []
        for _ in range(16):
            got.append(int(lf.argmax()))
            want.append(int(lp.argmax()))
            lf = fast.forward(torch.tensor([got[-1]]), sf)
            lp = plain.forward(torch.tensor([want[-1]]), sp)
        assert got == want, path.name
    assert sum(calls.values()) > 0
