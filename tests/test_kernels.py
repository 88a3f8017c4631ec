"""granite_lsp.kernels: the extension (streaming kernels and blocked GEMM) and its torch fallback
against float64 references, at every ISA level this CPU has (conftest's isa_level).

The first run compiles the extension (~30-60 s on 2 cores); later runs load it from the cache.
"""

from __future__ import annotations

import itertools
import math
import os
import threading

import pytest
import torch

from granite_lsp import kernels
from granite_lsp.kernels import PackedLinear, isa

pytestmark = pytest.mark.usefixtures("isa_level")

# (K, N): real widths, K % 8 != 0 (the scalar tail), N not a multiple of any row block.
SHAPES = [(768, 203), (1536, 77), (100, 37), (7, 5), (2048, 1)]
# 1-9: the streaming kernels; 17 and 45 (past GEMV_MAX_ROWS): the blocked GEMM, with short row tiles.
ROWS = [1, 2, 5, 9, 17, 45]
MODES = ["fp32", "bf16", "fp16", "int8"]

needs_ext = pytest.mark.skipif(not kernels.available(), reason=f"extension unavailable: {kernels.build_error()}")


def _ops() -> kernels.CpuKernels:
    ops = kernels.load()
    assert ops is not None, kernels.build_error()
    return ops


def test_extension_builds_where_required() -> None:
    """CI sets GRANITE_LSP_REQUIRE_KERNELS=1 so that a broken build fails instead of skipping."""
    if os.environ.get("GRANITE_LSP_REQUIRE_KERNELS") != "1":
        pytest.skip("GRANITE_LSP_REQUIRE_KERNELS is not set")
    assert kernels.available(), kernels.build_error()


def _layer(
    mode: str, n: int, k: int, bias: bool, seed: int = 0
) -> tuple[PackedLinear, torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    b = torch.randn(n, generator=g) if bias else None
    if mode == "bf16":
        w = w.bfloat16()
    elif mode == "fp16":
        w = w.half()
    return PackedLinear.from_weight(w, b, mode="int8" if mode == "int8" else "same"), w, b


def int8_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, K] as linear_vnni.cpp quantizes it, bit for bit: per row, q = round-half-even(x * (127 /
    max|x|)) clamped to [-127, 127] (fp32 ops), and the row's scale max|x| / 127; (q, scale [T, 1])."""
    amax = x.abs().amax(dim=1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))
    return torch.round(x * inv).clamp_(-127, 127), amax / torch.tensor(127.0)


def _reference(layer: PackedLinear, x: torch.Tensor, kernels_run: bool = True) -> torch.Tensor:
    """float64 product with the weights the layer holds (int8: its dequantized weights), of x as
    the kernels see it: where they run on vdpbf16ps (isa.rounds_activations_to_bf16), x rounded to
    bf16; where int8 weights run on vpdpbusd (isa.quantizes_activations_to_int8), x quantized to
    int8 per row. So the tolerance below holds on every level; the rounding's own effect is
    test_bf16_products_round_activations_only's and test_int8_products_quantize_activations_only's."""
    if kernels_run and isa.rounds_activations_to_bf16(layer.weight.dtype, layer.scale is not None):
        x = x.bfloat16().float()
    if kernels_run and isa.quantizes_activations_to_int8(layer.weight.dtype):
        q, sx = int8_activations(x)
        x = (q.double() * sx.double()).float()  # exact: an integer below 128 times an fp32
    y = x.double() @ layer.dequantize().double().T
    return y if layer.bias is None else y + layer.bias.double()


def _check(y: torch.Tensor, ref: torch.Tensor, k: int) -> None:
    assert y.dtype == torch.float32 and y.shape == ref.shape
    # fp32 accumulation of k products: error grows ~ sqrt(k) * eps * |terms|
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=2e-6 * k**0.5)


@needs_ext
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_kernel_matches_reference(mode: str, k: int, n: int, bias: bool) -> None:
    layer, _, _ = _layer(mode, n, k, bias)
    for t in ROWS:
        x = torch.randn(t, k)
        for threads in (1, 2, 3):
            _check(layer(x, threads=threads), _reference(layer, x), k)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("k,n", [(768, 203), (100, 37)])
def test_torch_fallback_matches_reference(mode: str, k: int, n: int) -> None:
    layer, _, _ = _layer(mode, n, k, bias=True)
    for t in ROWS:
        x = torch.randn(t, k)
        _check(layer._torch(x), _reference(layer, x, kernels_run=False), k)


@pytest.mark.parametrize("mode", MODES)
def test_fallback_when_extension_unavailable(mode: str) -> None:
    layer, _, _ = _layer(mode, 50, 96, bias=True)
    x = torch.randn(3, 96)
    layer.kernels = None  # what a model built without the extension hands its matrices
    _check(layer(x), _reference(layer, x, kernels_run=False), 96)


@needs_ext
@pytest.mark.parametrize("mode", MODES)
def test_rows_are_bit_identical_alone_or_batched(mode: str) -> None:
    """One row (decode) and a small batch (a short edit) agree exactly, so states match either way."""
    layer, _, _ = _layer(mode, 300, 768, bias=True)
    x = torch.randn(kernels.GEMV_MAX_ROWS, 768)
    batched = layer(x, threads=2)
    for i in (0, 7, x.shape[0] - 1):
        assert torch.equal(layer(x[i : i + 1], threads=1), batched[i : i + 1])


@needs_ext
def test_gemm_over_several_k_slices_and_column_blocks() -> None:
    """K past one 256-wide slice (partial sums accumulate into y), N past one column block, and a
    bias added exactly once."""
    for mode in MODES:
        layer, _, _ = _layer(mode, 1100, 700, bias=True, seed=3)
        x = torch.randn(70, 700)
        for threads in (1, 2):
            _check(layer(x, threads=threads), _reference(layer, x), 700)


@needs_ext
def test_concurrent_callers() -> None:
    """The helper pool runs one job at a time; a second caller must still get right answers."""
    layer, _, _ = _layer("int8", 3000, 768, bias=False)
    xs = [torch.randn(1, 768) for _ in range(4)]
    expected = [layer(x, threads=1) for x in xs]
    failures: list[int] = []

    def hammer(i: int) -> None:
        for _ in range(30):
            if not torch.equal(layer(xs[i], threads=2), expected[i]):
                failures.append(i)

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures


def test_shapes_dtypes_and_size() -> None:
    layer, w, b = _layer("fp32", 40, 64, bias=True)
    assert layer(torch.randn(2, 3, 64)).shape == (2, 3, 40)
    assert layer(torch.randn(64)).shape == (40,)
    assert layer(torch.randn(0, 64)).shape == (0, 40)
    y16 = layer(torch.randn(4, 64).bfloat16())
    assert y16.dtype == torch.float32
    assert layer.nbytes == w.numel() * 4 + 40 * 4
    q, _, _ = _layer("int8", 40, 64, bias=False)
    assert q.weight.dtype == torch.int8 and q.nbytes == 40 * 64 + 40 * 4
    assert PackedLinear.from_weight(w.half()).weight.dtype == torch.float16
    assert PackedLinear.from_weight(w.bfloat16()).weight.dtype == torch.bfloat16


def test_int8_quantization() -> None:
    w = torch.randn(16, 96)
    w[3] = 0  # an all-zero row must not divide by zero
    before = w.clone()
    q = PackedLinear.from_weight(w, mode="int8")
    assert torch.equal(w, before), "quantizing must not touch the caller's weights"
    assert q.weight.abs().max() == 127
    err = (q.dequantize() - w).abs().amax(dim=1)
    assert torch.all(err <= w.abs().amax(dim=1) / 254 + 1e-7)  # within half a quantization step
    assert torch.equal(q.dequantize(torch.tensor([3, 5])), q.dequantize()[[3, 5]])


def test_int8_quantization_in_blocks_is_the_per_row_formula() -> None:
    """Quantized a block of rows at a time in one reused buffer (the loader's memory), with a short
    last block and bf16 input: exactly round(w / s), s = max |row| / 127, as one whole-matrix step."""
    from granite_lsp.kernels.packed import _FALLBACK_BLOCK_BYTES

    k = 512
    rows = 2 * (_FALLBACK_BLOCK_BYTES // (4 * k)) + 7
    w = torch.randn(rows, k).bfloat16()
    w[5] = 0
    q = PackedLinear.from_weight(w, mode="int8")
    full = w.float()
    s = full.abs().amax(dim=1) / 127
    s = torch.where(s > 0, s, torch.ones_like(s))
    assert torch.equal(q.scale, s)
    assert torch.equal(q.weight, torch.round(full / s[:, None]).clamp(-127, 127).to(torch.int8))
    # a non-contiguous view quantizes like its contiguous copy and is left as it was
    view = w[:, :96].t()
    before = view.clone()
    qt = PackedLinear.from_weight(view, mode="int8")
    assert torch.equal(view, before)
    qc = PackedLinear.from_weight(view.contiguous(), mode="int8")
    assert torch.equal(qt.weight, qc.weight) and torch.equal(qt.scale, qc.scale)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        PackedLinear.from_weight(torch.randn(4, 4), mode="int4")
    with pytest.raises(ValueError):
        PackedLinear.from_weight(torch.randn(4, 4, 4))
    with pytest.raises(ValueError):
        PackedLinear.from_weight(torch.zeros(4, 4, dtype=torch.int32))


@needs_ext
@pytest.mark.parametrize("shape", [(1, 768), (5, 64), (3, 7), (100, 768)])
@pytest.mark.parametrize("threads", [1, 2])
def test_rms_norm_matches_torch(shape: tuple[int, int], threads: int) -> None:
    x, w = torch.randn(*shape) * 3, torch.randn(shape[-1])
    want = torch.nn.functional.rms_norm(x, (shape[-1],), w, 1e-5)
    torch.testing.assert_close(_ops().rms_norm(x, w, 1e-5, threads), want)


@needs_ext
@pytest.mark.parametrize("rows", [3, 77])  # 77: several row tasks on the pool
def test_add_rms_norm_and_swiglu_match_torch(rows: int) -> None:
    x, h, w = torch.randn(rows, 64), torch.randn(rows, 64), torch.randn(64)
    want_x = x + 0.25 * h
    want = torch.nn.functional.rms_norm(want_x, (64,), w, 1e-5)
    got = _ops().add_rms_norm(x, h, 0.25, w, 1e-5, threads=2)
    torch.testing.assert_close(x, want_x)  # updated in place
    torch.testing.assert_close(got, want)
    gu = torch.randn(rows, 42) * 6  # 21 wide: the vector loop and its scalar tail; SiLU far into both tails
    want_act = torch.nn.functional.silu(gu[:, :21]) * gu[:, 21:]
    torch.testing.assert_close(_ops().swiglu(gu, threads=2), want_act)


@needs_ext
@pytest.mark.parametrize("hd,length", [(64, 1), (64, 1403), (6, 37)])
def test_attention_decode_matches_softmax_attention(hd: int, length: int) -> None:
    """One query token over a partly filled KV buffer, GQA with 3 query heads per KV head."""
    g = torch.Generator().manual_seed(hd + length)
    nkv, per, cap = 4, 3, length + 9
    q = torch.randn(nkv * per * hd, generator=g)
    k = torch.randn(nkv, cap, hd, generator=g)
    v = torch.randn(nkv, cap, hd, generator=g)
    out = _ops().attention_decode(q, k, v, length, 0.125, threads=2)
    qh = q.double().view(nkv, per, hd)
    scores = qh @ k[:, :length].double().transpose(1, 2) * 0.125
    ref = (scores.softmax(-1) @ v[:, :length].double()).reshape(1, -1)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


def _causal_attention_reference(
    qkv: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: int, nq: int, scale: float
) -> torch.Tensor:
    """float64 softmax attention of T query rows (row i at position pos + i) over keys 0 .. pos + i."""
    T, (nkv, _, hd) = qkv.shape[0], k.shape
    q = qkv[:, : nq * hd].double().view(T, nkv, nq // nkv, hd).permute(1, 2, 0, 3)  # [nkv, per, T, hd]
    keys, values = k[:, : pos + T].double(), v[:, : pos + T].double()
    scores = torch.einsum("gptd,gld->gptl", q, keys) * scale
    visible = torch.arange(pos + T).unsqueeze(0) <= (pos + torch.arange(T)).unsqueeze(1)  # [T, L]
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return torch.einsum("gptl,gld->tgpd", probs, values).reshape(T, nq * hd)


@needs_ext
@pytest.mark.parametrize(
    "T,pos,nq,nkv,hd",
    [(512, 0, 12, 4, 64), (37, 0, 12, 4, 64), (17, 150, 12, 4, 64), (70, 3, 4, 4, 24), (33, 64, 8, 2, 128)],
)
def test_attention_prefill_matches_causal_softmax_attention(T: int, pos: int, nq: int, nkv: int, hd: int) -> None:
    """Causal GQA attention of T new rows after pos cached ones: the real shape (12 query heads over 4
    KV heads, head 64, 512 rows), a continuation (pos > 0, key blocks that straddle it), query blocks
    left partly empty, one query head per KV head, head dims of 24 (no 32-wide value tiles) and 128."""
    g = torch.Generator().manual_seed(T + pos + hd)
    cap = pos + T + 5
    qkv = torch.randn(T, (nq + 2 * nkv) * hd, generator=g) * 2
    k = torch.randn(nkv, cap, hd, generator=g)
    v = torch.randn(nkv, cap, hd, generator=g)
    out = _ops().attention_prefill(qkv, k, v, pos, nq, 0.125, threads=2)
    ref = _causal_attention_reference(qkv, k, v, pos, nq, 0.125)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=2e-6)


@needs_ext
def test_attention_prefill_nan_reaches_only_rows_at_and_after_it() -> None:
    """A NaN key (or value) at position j: only the rows at positions >= j of that KV head's query
    heads get NaN (every dim for a key, the value's dim for a value); earlier rows and the other
    heads are the attention without it."""
    T, pos, nq, nkv, hd, j = 90, 20, 6, 2, 16, 71
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(T, (nq + 2 * nkv) * hd, generator=g)
    for poisoned in ("k", "v"):
        k = torch.randn(nkv, pos + T, hd, generator=g)
        v = torch.randn(nkv, pos + T, hd, generator=g)
        (k if poisoned == "k" else v)[1, j, 3] = float("nan")
        out = _ops().attention_prefill(qkv, k, v, pos, nq, 0.25, threads=2).view(T, nkv, nq // nkv * hd)
        first = j - pos  # the row at position j
        heads = out[first:, 1].view(T - first, nq // nkv, hd)  # a NaN value poisons its own dim only
        assert torch.isnan(heads).any(-1).all()
        assert torch.isfinite(out[:first, 1]).all() and torch.isfinite(out[:, 0]).all()
        ref = _causal_attention_reference(qkv[:first], k, v, pos, nq, 0.25).view(first, nkv, -1)
        torch.testing.assert_close(out[:first, 1].double(), ref[:, 1], rtol=1e-5, atol=2e-6)


@needs_ext
@pytest.mark.parametrize("nq,nkv", [(0, 2), (-4, 2), (4, 0), (6, 4)])
def test_attention_prefill_refuses_bad_head_counts(nq: int, nkv: int) -> None:
    """No query heads (which divided by zero), a negative count, no KV heads, or query heads that are
    not a multiple of the KV heads: refused with an error that says so, before anything is computed."""
    hd, T, cap = 16, 5, 8
    qkv = torch.randn(T, (max(nq, 0) + 2 * max(nkv, 1)) * hd)
    k, v = torch.randn(max(nkv, 0), cap, hd), torch.randn(max(nkv, 0), cap, hd)
    with pytest.raises(RuntimeError, match="query heads: a positive multiple of KV heads"):
        _ops().attention_prefill(qkv, k, v, 0, nq, 0.25, threads=2)


@needs_ext
def test_vectorized_silu_over_the_whole_float_range() -> None:
    """The AVX2 exp behind SiLU clamps its argument: huge, tiny and denormal-producing gates."""
    edges = [-88.7, -88.5, -88.0, -87.5, -87.2, -87.0, 87.0, 88.0, 88.5, 88.7]  # around exp's clamps
    gate = torch.tensor([-1e30, -100.0, -20.0, -1e-3, 0.0, 1e-3, 3.0, 20.0, 100.0, 1e30, *edges] * 2)
    gu = torch.cat([gate, torch.ones_like(gate)]).unsqueeze(0)
    got = _ops().swiglu(gu, threads=1)
    want = torch.nn.functional.silu(gate.double()).float().unsqueeze(0)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-30)
    nan = _ops().swiglu(torch.tensor([[float("nan")] * 9 + [1.0] * 9]), threads=1)
    assert torch.isnan(nan).all()


@needs_ext
def test_attention_decode_propagates_nan() -> None:
    """A NaN in a key must not be softmaxed away (torch gives NaN; so must the kernel)."""
    q, k, v = torch.randn(4 * 16), torch.randn(2, 20, 16), torch.randn(2, 20, 16)
    k[0, 3, 5] = float("nan")  # in the vectorized part of the scores (the first 16 positions)
    out = _ops().attention_decode(q, k, v, 20, 0.25, threads=1).view(4, 16)
    assert torch.isnan(out[:2]).all() and torch.isfinite(out[2:]).all()


@needs_ext
@pytest.mark.parametrize("rows", [2, 30])  # streaming kernels and GEMM
def test_empty_inner_dimension_gives_the_bias(rows: int) -> None:
    layer = PackedLinear.from_weight(torch.zeros(5, 0), torch.arange(5.0))
    assert torch.equal(layer(torch.zeros(rows, 0)), torch.arange(5.0).expand(rows, 5))
    assert torch.equal(PackedLinear.from_weight(torch.zeros(5, 0))(torch.zeros(rows, 0)), torch.zeros(rows, 5))


# -- ISA levels (isa.h) ----------------------------------------------------------------------------
@needs_ext
def test_isa_levels_follow_the_cpu_and_can_be_forced() -> None:
    """The extension offers exactly the levels /proc/cpuinfo allows, the one in use is one of them
    and set_level moves it (and refuses what the CPU lacks, with the CPU's levels in the error)."""
    levels = isa.levels()
    assert levels == isa.cpu_levels() and levels[0] == "avx2"
    start = isa.level()
    assert start in levels
    with isa.at_level("avx2"):
        assert isa.level() == "avx2"
    assert isa.level() == start
    for name in isa.LEVELS[len(levels) :]:
        with pytest.raises(ValueError, match="lacks"):
            isa.set_level(name)
    with pytest.raises(ValueError, match="unknown"):
        isa.set_level("sse2")


def test_isa_levels_stop_below_amx_without_the_os_permission(monkeypatch: pytest.MonkeyPatch) -> None:
    """AMX's flags are not enough: where the OS refuses the tile state (isa.cpp's amx_refusal asks
    Linux; a refusal cannot be arranged here, so it is stood in for), cpu_levels stops at
    avx512_bf16, as the extension does; granted, amx is the top level."""
    every_flag = set().union(*isa._NEEDS.values())
    monkeypatch.setattr(isa, "cpu_info", lambda: ("a CPU with every flag", every_flag))
    monkeypatch.setattr(isa, "amx_permitted", lambda: False)
    assert isa.cpu_levels() == list(isa.LEVELS[: isa.LEVELS.index("amx")])
    monkeypatch.setattr(isa, "amx_permitted", lambda: True)
    assert isa.cpu_levels() == list(isa.LEVELS)


def test_isa_environment_caps_the_level() -> None:
    """GRANITE_LSP_ISA in a fresh process: a level the CPU has is applied; an unknown name is
    ignored with the reason in note()."""
    import subprocess
    import sys

    code = "from granite_lsp.kernels import isa; print(isa.level(), '|', isa.note())"
    if not kernels.available():
        pytest.skip(f"extension unavailable: {kernels.build_error()}")
    for value, want_level, want_note in [("avx2", "avx2", ""), ("sse9", isa.levels()[-1], "not a level")]:
        env = {**os.environ, "GRANITE_LSP_ISA": value}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        level, note = (part.strip() for part in out.stdout.split("|"))
        assert level == want_level and want_note in note


@needs_ext
@pytest.mark.parametrize("mode", MODES)
def test_gemm_is_bit_identical_across_fp32_levels(mode: str) -> None:
    """The AVX-512F GEMM sums every element in the avx2 GEMM's order: the same bits, for every weight
    format (bf16 too, compared at avx512: only avx512_bf16 rounds x)."""
    if "avx512" not in isa.levels():
        pytest.skip("CPU without AVX-512")
    layer, _, _ = _layer(mode, 1100, 700, bias=True, seed=4)
    x = torch.randn(70, 700)
    with isa.at_level("avx2"):
        want = layer(x, threads=2)
    with isa.at_level("avx512"):
        assert torch.equal(layer(x, threads=2), want)


@needs_ext
@pytest.mark.parametrize("mode", ["fp16", "bf16"])
def test_16bit_streaming_kernels_on_avx512_change_only_the_summation_order(mode: str) -> None:
    """At avx512 the streaming kernels widen fp16 / bf16 weights on 16 lanes (linear_avx512.cpp's
    wide_rows): the same products as the avx2 kernels' 8 lanes, summed in another order, so every
    result is within fp32 summation error of avx2's (each within K * 2^-24 of sum |x * w| of the
    exact sum, plus the bias's rounding), and some differ (it is another kernel). x keeps all its
    bits: the level's only rounding is the sum's."""
    if "avx512" not in isa.levels():
        pytest.skip("CPU without AVX-512")
    moved = False
    # K % 16 != 0 (the masked tail), K < 16, 1-16 rows (every row block of the streaming kernels)
    for k, n, t in [(769, 203, 1), (7, 5, 3), (1536, 77, 16), (100, 37, 9)]:
        layer, _, _ = _layer(mode, n, k, bias=True, seed=k)
        x = torch.randn(t, k)
        with isa.at_level("avx2"):
            want = layer(x, threads=2)
        with isa.at_level("avx512"):
            got = layer(x, threads=2)
            assert torch.equal(layer(x[-1:], threads=1), got[-1:]), "a row alone or batched: the same bits"
        magnitude = x.double().abs() @ layer.dequantize().double().abs().T
        bound = 2 * k * 2**-24 * magnitude + 2**-23 * want.double().abs()
        assert torch.all((got.double() - want.double()).abs() <= bound)
        moved |= not torch.equal(got, want)
    assert moved, "the avx512 level ran the avx2 kernels"


@needs_ext
def test_bf16_products_round_activations_only() -> None:
    """At avx512_bf16 and amx bf16 products (vdpbf16ps: the GEMM and the streaming kernels; amx: tile
    matmuls, both) compute the exact product of bf16-rounded x, summed in fp32; the rounding moves each
    result by at most ~2^-8 of sum |x * w| (the bound a relative rounding error of 2^-9 per activation gives)."""
    levels = [name for name in ("avx512_bf16", "amx") if name in isa.levels()]
    if not levels:
        pytest.skip("CPU without AVX512_BF16")
    # odd K: the last pair is half padding; 1-9 rows: the streaming kernels, K % 32 != 0 their masked tail;
    # 2048 with 29 rows: the GEMM over four depth slices, a short last 16-row tile
    cases = [(700, 1100, 70), (7, 5, 17), (769, 65, 33), (769, 203, 1), (100, 37, 9), (2048, 300, 3), (2048, 90, 29)]
    for (k, n, t), level in itertools.product(cases, levels):
        layer, w, _ = _layer("bf16", n, k, bias=True, seed=k)
        x = torch.randn(t, k)
        with isa.at_level(level):
            got = layer(x, threads=2)
        exact = x.double() @ layer.dequantize().double().T + layer.bias.double()
        rounded = x.bfloat16().double() @ layer.dequantize().double().T + layer.bias.double()
        _check(got, rounded, k)
        magnitude = x.double().abs() @ layer.dequantize().double().abs().T
        assert torch.all((got.double() - exact).abs() <= 2**-8 * magnitude + 1e-6)


@needs_ext
def test_int8_products_quantize_activations_only() -> None:
    """At avx512_vnni and above int8 products (vpdpbusd: the GEMM and the streaming kernels; amx: tile
    matmuls, both) compute the exact product of x quantized per row (int8_activations), with the weights'
    own scale; the quantization moves each result by at most half a step per activation:
    max|x_row| / 254 * sum |w|. A row's result is the same in the GEMM and the streaming kernels
    (K <= 1024, one depth slice), and a row holding a NaN gives NaN without touching the other rows."""
    levels = [name for name in ("avx512_vnni", "amx") if name in isa.levels()]
    if not levels:
        pytest.skip("CPU without AVX512_VNNI")
    # K % 64 != 0: the streaming kernels' masked tail; K % 4 != 0: the GEMM's padded quad; 2048: two
    # depth slices; 1-9 rows: streaming, 17+: the GEMM with short row tiles
    cases = [(700, 1100, 70), (7, 5, 17), (769, 65, 33), (769, 203, 1), (100, 37, 9), (2048, 300, 3), (2048, 90, 29)]
    for (k, n, t), level in itertools.product(cases, levels):
        layer, _, _ = _layer("int8", n, k, bias=True, seed=k)
        x = torch.randn(t, k) * torch.rand(t, 1) * 4  # rows of different ranges
        with isa.at_level(level):
            got = layer(x, threads=2)
            alone = layer(x[-1:], threads=1)
        w = layer.dequantize().double()
        q, sx = int8_activations(x)
        quantized = (q.double() * sx.double()) @ w.T + layer.bias.double()
        _check(got, quantized, k)
        exact = x.double() @ w.T + layer.bias.double()
        bound = sx.double() / 2 * w.abs().sum(dim=1)  # half a step per activation, times |w|
        assert torch.all((got.double() - exact).abs() <= bound * (1 + 1e-5) + 1e-5)
        if k <= 1024:
            assert torch.equal(alone, got[-1:])
    layer, _, _ = _layer("int8", 70, 300, bias=False)
    x = torch.randn(20, 300)
    x[3, 7] = float("nan")
    for level in levels:
        with isa.at_level(level):
            for rows in (x[:5], x):  # streaming, GEMM
                y = layer(rows, threads=2)
                assert torch.isnan(y[3]).all() and not torch.isnan(y[torch.arange(len(rows)) != 3]).any()


# K % 64 != 0 and K % 4 != 0 (a padded tile step and quad), K past one depth slice (int8: 1024, bf16:
# 512), N not a multiple of 16 or 32 (masked columns), T not a multiple of 16 (a short or empty second
# tile of rows), T just past GEMV_MAX_ROWS, 512 rows on a real width; one and two threads.
AMX_SHAPES = [(700, 1100, 70), (7, 5, 17), (769, 65, 33), (2050, 90, 45), (1030, 203, 29), (768, 77, 512)]


@needs_ext
def test_amx_int8_gemm_is_bit_identical_to_vnni() -> None:
    """amx's int8 GEMM (TDPBSSD, linear_amx.cpp) sums q * w exactly in int32 like vpdpbusd and finishes
    each depth slice with the same fused multiply-add: every result bit-identical to avx512_vnni's,
    with and without a bias, whatever the thread count; a NaN row stays NaN."""
    if "amx" not in isa.levels():
        pytest.skip("CPU (or OS) without AMX")
    for (k, n, t), bias in itertools.product(AMX_SHAPES, (True, False)):
        layer, _, _ = _layer("int8", n, k, bias=bias, seed=k + n)
        x = torch.randn(t, k) * torch.rand(t, 1) * 4
        x[t // 2, k // 3] = float("nan")
        with isa.at_level("avx512_vnni"):
            want = layer(x, threads=2)
        with isa.at_level("amx"):
            for threads in (1, 2):
                assert torch.equal(layer(x, threads=threads).view(torch.int32), want.view(torch.int32))  # NaNs too
        assert want[t // 2].isnan().all() and not want[torch.arange(t) != t // 2].isnan().any()


@needs_ext
def test_amx_bf16_gemm_sums_the_same_rounded_products() -> None:
    """amx's bf16 GEMM (TDPBF16PS) multiplies the same bf16-rounded x as avx512_bf16's and sums in fp32,
    in the tile unit's own order: each result within fp32 summation error of avx512_bf16's (both within
    K * 2^-24 of sum |x_bf16 * w| of the exact sum, plus the bias's rounding), the same whatever the
    thread count, and some differ (it is another kernel)."""
    if "amx" not in isa.levels():
        pytest.skip("CPU (or OS) without AMX")
    moved = False
    for k, n, t in AMX_SHAPES:
        layer, _, _ = _layer("bf16", n, k, bias=True, seed=k + n)
        x = torch.randn(t, k)
        with isa.at_level("avx512_bf16"):
            want = layer(x, threads=2)
        with isa.at_level("amx"):
            got = layer(x, threads=2)
            assert torch.equal(layer(x, threads=1), got)
        magnitude = x.bfloat16().double().abs() @ layer.dequantize().double().abs().T
        bound = 2 * k * 2**-24 * magnitude + 2**-23 * want.double().abs()
        assert torch.all((got.double() - want.double()).abs() <= bound)
        moved |= not torch.equal(got, want)
    assert moved, "the amx level ran the avx512_bf16 GEMM"


# The streaming kernels at amx (linear_amx_stream.cpp), (K, N): K % 64 != 0 and odd (a zero-padded last
# tile step, half a pair), K past one bf16 depth slice (512) and past one int8 slice (1024), N not a
# multiple of 16 (the last rows under a second tile configuration), N < 16 and N = 16, a real shape.
# (K, N): tails of K (not whole 64 bytes), several depth slices (K > 512 / 1024), N tails under a second
# tile configuration, also after whole 16-row groups in the same pool task ((100, 45), (768, 3381)).
AMX_STREAM_SHAPES = [(769, 203), (7, 5), (2050, 90), (1030, 37), (768, 3376), (100, 16), (100, 45), (768, 3381)]


@needs_ext
def test_amx_int8_streaming_is_bit_identical_to_vnni() -> None:
    """amx's int8 streaming kernels (TDPBSSD on W's own rows against x's quantized rows as the tile's
    columns) sum q * w over all of K exactly in int32 like vpdpbusd and finish with the same fused
    multiply-add: for every row count 1..GEMV_MAX_ROWS, with and without a bias, on 1 or 2 threads,
    every result bit-identical to avx512_vnni's streaming kernels, and to the GEMM's row where K fits
    one depth slice (K <= 1024); a NaN row stays NaN."""
    if "amx" not in isa.levels():
        pytest.skip("CPU (or OS) without AMX")
    rows = kernels.GEMV_MAX_ROWS
    for (k, n), bias in itertools.product(AMX_STREAM_SHAPES, (True, False)):
        layer, _, _ = _layer("int8", n, k, bias=bias, seed=k + n)
        x = torch.randn(rows + 8, k) * torch.rand(rows + 8, 1) * 4
        x[5, k // 3] = float("nan")
        with isa.at_level("avx512_vnni"):
            want = layer(x[:rows], threads=2).view(torch.int32)  # NaNs compared too
        with isa.at_level("amx"):
            for t in range(1, rows + 1):
                assert torch.equal(layer(x[:t], threads=1 + t % 2).view(torch.int32), want[:t])
            gemm = layer(x, threads=2).view(torch.int32)  # past GEMV_MAX_ROWS: the GEMM
        if k <= 1024:
            assert torch.equal(gemm[:rows], want)
        assert want.view(torch.float32)[5].isnan().all()
        assert not want.view(torch.float32)[torch.arange(rows) != 5].isnan().any()


@needs_ext
def test_amx_bf16_streaming_rows_are_bit_identical_whatever_the_row_count_and_to_the_gemm() -> None:
    """amx's bf16 streaming kernels (TDPBF16PS on W's own rows against x's bf16-rounded rows as the tile's
    columns) take the same arithmetic for every row count: each row of a T-row product, T = 1..GEMV_MAX_ROWS,
    is bit-identical to that row alone (a token decoded alone gets the logits it gets inside a verify)
    and to that row in amx's prefill GEMM (per element the same products in the same k order, the same
    depth slices added in fp32 in order, the bias with the first). Against avx512_bf16's streaming
    kernels (vdpbf16ps) only the fp32 summation order differs: within K * 2^-24 of sum |x_bf16 * w| each
    (plus the bias's rounding), and some differ (it is another kernel)."""
    if "amx" not in isa.levels():
        pytest.skip("CPU (or OS) without AMX")
    rows = kernels.GEMV_MAX_ROWS
    moved = False
    for (k, n), bias in itertools.product(AMX_STREAM_SHAPES, (True, False)):
        layer, _, _ = _layer("bf16", n, k, bias=bias, seed=k + n)
        x = torch.randn(rows + 8, k)
        x[3, k // 2] = float("nan")  # its row is NaN throughout, the others untouched

        def bits(y: torch.Tensor) -> torch.Tensor:  # bit patterns (-0 is not +0), the NaN row left out
            return y[torch.arange(len(y)) != 3].view(torch.int32)

        with isa.at_level("amx"):
            alone = torch.cat([layer(x[i : i + 1], threads=1) for i in range(rows)])
            for t in range(1, rows + 1):
                assert torch.equal(bits(layer(x[:t], threads=1 + t % 2)), bits(alone[:t]))
            gemm = layer(x, threads=2)  # past GEMV_MAX_ROWS: the GEMM
            # the C++ op itself with more rows than one streaming call takes: groups of GEMV_MAX_ROWS
            ops_rows = _ops()._ops.linear(x[: rows + 8], layer.weight, layer.scale, layer.bias, 2)
        assert torch.equal(bits(gemm[:rows]), bits(alone)) and torch.equal(bits(ops_rows[:rows]), bits(alone))
        assert alone[3].isnan().all() and gemm[3].isnan().all()
        x[3].nan_to_num_(0.0)
        with isa.at_level("amx"):
            alone[3] = layer(x[3:4], threads=1)
        with isa.at_level("avx512_bf16"):
            want = layer(x[:rows], threads=2)
        magnitude = x[:rows].bfloat16().double().abs() @ layer.dequantize().double().abs().T
        bound = 2 * k * 2**-24 * magnitude + 2**-23 * want.double().abs()
        assert torch.all((alone.double() - want.double()).abs() <= bound)
        moved |= not torch.equal(alone, want)
    assert moved, "the amx level ran the avx512_bf16 streaming kernels"


TINY = 1e-39  # a denormal float32 (below 2^-126 ~ 1.18e-38)


@needs_ext
@pytest.mark.parametrize("tokens", [1, 2, 40])  # rows_head (one row, two), the chunked scan
def test_kernels_flush_denormals_and_leave_the_caller_s_mode(tokens: int) -> None:
    """Inside the kernels denormals are zero (common.h's DenormalsFlushed: on Intel cores each one
    costs a microcode assist, and the Mamba scan makes them all the time), on the calling thread and
    on the pool's helpers alike; outside, torch's own arithmetic keeps them, also after an op that
    failed. A Mamba state of 1e-4 decayed by exp(-80 / tokens) per token and fed nothing ends at
    1.8e-39 in exact arithmetic (and without the flush, in these kernels too): flushed, every head's
    state is exactly zero (48 heads on 2 threads: the helper takes heads where it is awake in time,
    which no test can force)."""
    ops = _ops()
    torch.set_flush_denormal(False)
    assert (torch.tensor([1e-30]) * 1e-9).item() != 0.0  # torch makes denormals here
    heads, head_dim, state, K = 48, 16, 32, 4
    E = heads * head_dim
    C = E + 2 * state
    rows = torch.zeros(tokens, E + C + heads)  # x, B, C and raw dt all zero: nothing is added
    ssm = torch.full((heads, head_dim, state), 1e-4)
    conv = torch.zeros(K - 1, C)
    A = torch.full((heads,), -80.0 / tokens / math.log(2.0))  # dt = softplus(0) = log 2: dt * A = -80 / tokens
    ops.mamba_mixer(
        rows, conv, torch.ones(K, C), None, torch.zeros(heads), A, torch.ones(heads), ssm,
        torch.ones(E), 1, 1e-5, 0.0, float("inf"), 2,
    )  # fmt: skip
    assert torch.count_nonzero(ssm) == 0
    # DAZ: a denormal weight reads as zero. A one-hot row of 256 normalises to 16 there, and 16 * TINY is
    # a normal float (1.6e-38), so FTZ alone would keep it: only DAZ makes it zero.
    x = torch.zeros(3, 256)
    x[:, 0] = 1.0
    w = torch.full((256,), TINY)
    assert torch.count_nonzero(ops.rms_norm(x, w, 1e-5, 2)) == 0
    assert torch.nn.functional.rms_norm(x, (256,), w)[0, 0].item() > 1.17549435e-38  # normal outside
    # the caller's mode is back after an op, and after one that raised
    assert (torch.tensor([1e-30]) * 1e-9).item() != 0.0
    with pytest.raises(RuntimeError):
        ops.rms_norm(x, torch.ones(7), 1e-5, 2)  # a weight of the wrong width
    assert (torch.tensor([1e-30]) * 1e-9).item() != 0.0


@needs_ext
@pytest.mark.parametrize("heads,head_dim,state,groups", [(48, 32, 128, 1), (8, 16, 32, 2), (4, 6, 16, 1)])
def test_mamba_mixer_one_token_at_a_time_equals_a_batch(heads: int, head_dim: int, state: int, groups: int) -> None:
    """A decode token (T = 1) leaves the same bits in y, the conv state and the SSM state as the same
    tokens inside one call of several: speculative decoding's verify and a plain step must agree
    exactly. Both take mamba.cpp's rows_head (one pass per head on the pool) where head_dim % 8 == 0,
    the general path for (4, 6, 16)."""
    ops = _ops()
    g = torch.Generator().manual_seed(heads)
    E, K = heads * head_dim, 4
    C = E + 2 * groups * state
    conv_w, conv_b = torch.randn(K, C, generator=g) * 0.3, torch.randn(C, generator=g) * 0.1
    dt_bias, A, D = (
        torch.randn(heads, generator=g),
        -torch.rand(heads, generator=g) - 0.1,
        torch.randn(heads, generator=g),
    )
    norm_w = torch.rand(E, generator=g) + 0.5
    rows = torch.randn(5, E + C + heads, generator=g)
    conv0, ssm0 = torch.randn(K - 1, C, generator=g), torch.randn(heads, head_dim, state, generator=g) * 0.1

    def mix(z: torch.Tensor, conv: torch.Tensor, ssm: torch.Tensor) -> torch.Tensor:
        args = (dt_bias, A, D, ssm, norm_w, groups, 1e-5, 1e-3, 0.5, 2)
        return ops.mamba_mixer(z.contiguous(), conv, conv_w, conv_b, *args)

    conv_b1, ssm_b1 = conv0.clone(), ssm0.clone()
    batched = mix(rows, conv_b1, ssm_b1)
    conv_s, ssm_s = conv0.clone(), ssm0.clone()
    alone = torch.cat([mix(rows[t : t + 1], conv_s, ssm_s) for t in range(rows.shape[0])])
    assert torch.equal(alone, batched)
    assert torch.equal(conv_s, conv_b1) and torch.equal(ssm_s, ssm_b1)
    assert not torch.equal(ssm_s, ssm0) and torch.equal(conv_s[-1], rows[-1, E : E + C])


@needs_ext
@pytest.mark.parametrize(
    "heads,head_dim,state,groups,tokens", [(6, 32, 128, 1, 53), (8, 24, 20, 2, 17), (4, 8, 12, 2, 40)]
)
def test_mamba_prefill_chunks_equal_the_recurrence(
    heads: int, head_dim: int, state: int, groups: int, tokens: int
) -> None:
    """From 17 tokens on mamba.cpp scans in chunks (the matmul form, mamba_head_chunked); up to 16 it
    runs the recurrence. The same tokens in one call and in pieces of at most 16 leave y and the SSM
    state within rounding of each other (full chunks and a tail; head dims with 8-lane blocks left
    over; a d_state not a multiple of 8; two groups), the conv state bit for bit; and a NaN in one
    token's input reaches only the rows at and after it (no masked products over later tokens)."""
    ops = _ops()
    g = torch.Generator().manual_seed(tokens)
    E, K = heads * head_dim, 4
    C = E + 2 * groups * state
    conv_w, conv_b = torch.randn(K, C, generator=g) * 0.3, torch.randn(C, generator=g) * 0.1
    dt_bias, A, D = (
        torch.randn(heads, generator=g),
        -torch.rand(heads, generator=g) * 4 - 0.1,  # some heads forget within a chunk
        torch.randn(heads, generator=g),
    )
    norm_w = torch.rand(E, generator=g) + 0.5
    rows = torch.randn(tokens, E + C + heads, generator=g)
    conv0, ssm0 = torch.randn(K - 1, C, generator=g), torch.randn(heads, head_dim, state, generator=g) * 0.1

    def mix(z: torch.Tensor, conv: torch.Tensor, ssm: torch.Tensor) -> torch.Tensor:
        args = (dt_bias, A, D, ssm, norm_w, groups, 1e-5, 0.0, float("inf"), 2)
        return ops.mamba_mixer(z.contiguous(), conv, conv_w, conv_b, *args)

    conv_c, ssm_c = conv0.clone(), ssm0.clone()
    chunked = mix(rows, conv_c, ssm_c)
    conv_r, ssm_r = conv0.clone(), ssm0.clone()
    pieces = torch.cat([mix(rows[t : t + 16], conv_r, ssm_r) for t in range(0, tokens, 16)])
    assert (chunked - pieces).abs().max().item() <= 1e-4 * max(1.0, pieces.abs().max().item())
    assert (ssm_c - ssm_r).abs().max().item() <= 1e-5 * max(1.0, ssm_r.abs().max().item())
    assert not torch.equal(ssm_c, ssm0) and torch.equal(conv_c, conv_r)
    bad = rows.clone()
    bad[tokens - 3, E] = float("nan")  # x of the first head, three tokens before the end
    y = mix(bad, conv0.clone(), ssm0.clone())
    assert torch.isfinite(y[: tokens - 3]).all() and torch.isnan(y[tokens - 3 :]).any()


@needs_ext
@pytest.mark.parametrize("dt_min,dt_max", [(0.0, 100.0), (1e-3, 0.5)])
def test_mamba_prefill_dt_special_values_as_the_recurrence(dt_min: float, dt_max: float) -> None:
    """A chunked prefill takes dt = clamp(softplus(raw + bias)) 8 heads at a time (mamba.cpp's
    softplus_dt8), the recurrence one value at a time (softplus_dt). Raw dt of NaN, +-inf, 0, 20 (where
    softplus becomes the identity), 20.5 and far below exp's range, over 10 heads (a vector of 8 and a
    scalar tail), with and without the clamps biting: y and the SSM state as the same tokens in pieces
    of 16 (the recurrence) within rounding, and the NaN (one token of one head) in exactly the same
    places: from its row on, in its group, and its head's state."""
    ops = _ops()
    heads, head_dim, state, groups, tokens = 10, 8, 16, 2, 40
    g = torch.Generator().manual_seed(7)
    E, K = heads * head_dim, 4
    C = E + 2 * groups * state
    conv_w, conv_b = torch.randn(K, C, generator=g) * 0.3, torch.randn(C, generator=g) * 0.1
    dt_bias = torch.zeros(heads)  # raw + bias hits the special values exactly
    A, D = -torch.rand(heads, generator=g) - 0.1, torch.randn(heads, generator=g)
    norm_w = torch.rand(E, generator=g) + 0.5
    rows = torch.randn(tokens, E + C + heads, generator=g)
    special = [float("inf"), float("-inf"), 0.0, 20.0, 20.5, -90.0, -100.0, 19.99]
    for t in range(4, 28):  # every special value in every head, the vector's lanes and the tail
        for h in range(heads):
            rows[t, E + C + h] = special[(t + h) % len(special)]
    nan_row, nan_head = 30, 3
    rows[nan_row, E + C + nan_head] = float("nan")
    conv0, ssm0 = torch.randn(K - 1, C, generator=g), torch.randn(heads, head_dim, state, generator=g) * 0.1

    def mix(z: torch.Tensor, conv: torch.Tensor, ssm: torch.Tensor) -> torch.Tensor:
        args = (dt_bias, A, D, ssm, norm_w, groups, 1e-5, dt_min, dt_max, 2)
        return ops.mamba_mixer(z.contiguous(), conv, conv_w, conv_b, *args)

    ssm_c = ssm0.clone()
    chunked = mix(rows, conv0.clone(), ssm_c)
    ssm_r = ssm0.clone()
    conv_r = conv0.clone()
    pieces = torch.cat([mix(rows[t : t + 16], conv_r, ssm_r) for t in range(0, tokens, 16)])
    nan = torch.isnan(pieces)
    assert torch.equal(torch.isnan(chunked), nan)
    per = E // groups  # the gated norm spreads a head's NaN over its group
    group = slice(nan_head * head_dim // per * per, (nan_head * head_dim // per + 1) * per)
    assert not nan[:nan_row].any() and nan[nan_row:, group].all() and nan.sum() == (tokens - nan_row) * per
    assert torch.isfinite(pieces[~nan]).all()
    assert (chunked[~nan] - pieces[~nan]).abs().max().item() <= 1e-4 * max(1.0, pieces[~nan].abs().max().item())
    state_nan = torch.isnan(ssm_r)
    assert torch.equal(torch.isnan(ssm_c), state_nan) and state_nan[nan_head].all()
    assert state_nan.sum() == state_nan[nan_head].numel()
    ok = ~state_nan
    assert (ssm_c[ok] - ssm_r[ok]).abs().max().item() <= 1e-5 * max(1.0, ssm_r[ok].abs().max().item())
