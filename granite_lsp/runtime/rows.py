"""One decode step for several sequences at once: the alternative candidates of one request.

Each sequence has a ``ModelState`` of its own (forked from the request's state: its own Mamba conv/SSM
states and KV buffers) and gets one new token. What costs a decode step is streaming the weights from
memory; the streaming kernels read every weight matrix once for up to 16 rows of input, so the
projections and MLPs run on all rows together, and only what depends on a sequence's own state (the
Mamba conv + scan, attention over its KV) runs row by row.

Each row's result is the one a single-sequence step (``HybridModel.forward`` with one token) gives that
sequence: the kernels sum every output element in the same order whatever the number of rows
(kernels/linear.cpp), and the fused one-call step is bit-identical to the layer-by-layer path it
mirrors (kernels/step.cpp). On the packed kernels all the rows go through that one call too (each row
on its own sequence's states: ``decode_layers`` with one position per row), the path below otherwise.
tests/test_candidates.py checks it at every ISA level. The torch-ops path
(no kernels) may round a row differently than alone (its matmuls pick algorithms by shape).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..kernels import GEMV_MAX_ROWS
from .layers import MambaMixer, add_rms_norm, rms_norm, rope_tables
from .matmul import linear, matmul_threads, small_ops_single_threaded
from .model import HybridModel
from .state import MambaSnapshot, ModelState


def fork_row(state: ModelState, room: int) -> ModelState:
    """An independent copy of ``state`` to decode another sequence on: its Mamba states copied once (not
    snapshot and then copied again, as ``ModelState.fork`` does) and its KV positions with room for
    ``room`` more tokens only (not the source's whole capacity). Copies are memory-bound: call it under
    ``small_ops_single_threaded`` (see StateCache._restore)."""
    state.settle()  # the live buffers themselves are copied
    view = MambaSnapshot(tuple(state.conv), tuple(state.ssm), state.pos)  # ModelState copies it
    return ModelState(state.kv.clone(state.pos, capacity=state.pos + max(1, room)), view)


def step_rows(model: HybridModel, tokens: Sequence[int], states: Sequence[ModelState]) -> Tensor:
    """Feed ``tokens[i]`` to ``states[i]`` (each advanced in place by one); float32 logits [rows, vocab].

    If this raises midway the states are inconsistent; restore snapshots before reusing them.
    """
    if len(tokens) != len(states) or not tokens:
        raise ValueError(f"one token per state: {len(tokens)} tokens, {len(states)} states")
    if len({id(s.kv) for s in states}) != len(states):
        raise ValueError("states share a KV cache: fork them first (ModelState.fork)")
    for s in states:
        if s.kv.length != s.pos:
            raise ValueError(f"state is inconsistent: pos {s.pos} but KV length {s.kv.length}")
    with torch.no_grad(), torch.inference_mode(states[0].is_inference):
        for s in states:
            s.settle()  # each row on its own sequence's live states (no deferred rows: kernels/step.cpp)
            s.prepare(1)
        if model.single_thread_small_ops:
            with small_ops_single_threaded():
                return _step(model, tokens, states)
        return _step(model, tokens, states)


def _step(model: HybridModel, tokens: Sequence[int], states: Sequence[ModelState]) -> Tensor:
    cfg = model.config
    ids = torch.tensor(list(tokens), dtype=torch.long, device=model.device)
    x = model.embed_rows(ids)
    if cfg.embedding_multiplier != 1.0:
        x = x * cfg.embedding_multiplier
    x = x.contiguous()
    if len(states) <= GEMV_MAX_ROWS and model._one_call_step_applies():
        assert model.kernels is not None  # every layer in one call, each row on its own sequence's states
        slots = range(len(states[0].conv))
        x = model.kernels.decode_layers(
            x,
            *model._decode_plan(),
            [s.conv[m] for m in slots for s in states],
            [s.ssm[m] for m in slots for s in states],
            [s.kv.k[a] for a in range(len(states[0].kv.k)) for s in states],
            [s.kv.v[a] for a in range(len(states[0].kv.v)) for s in states],
            [s.pos for s in states],
            matmul_threads(),
        )[0]
        for s in states:
            s.advance(1)
        return model.lm_head_logits(x)
    ropes = [rope_tables(cfg, s.pos, 1, model.dtype, model.device) if cfg.uses_rope else None for s in states]
    rm, eps, k = cfg.residual_multiplier, cfg.rms_norm_eps, model.kernels
    h = rms_norm(x, model.blocks[0].ln_in, eps, k) if model.blocks else x
    for i, blk in enumerate(model.blocks):
        mix = blk.mixer
        if isinstance(mix, MambaMixer):
            zxbcdt = linear(h, mix.w_in, mix.b_in)
            ys = [
                mix.mix(zxbcdt[r : r + 1], s.conv[blk.slot], s.ssm[blk.slot], model.chunk_size, model.recurrent_max)
                for r, s in enumerate(states)
            ]
            h = linear(torch.cat(ys).to(h.dtype), mix.w_out, mix.b_out)
        else:
            qkv = linear(h, mix.wqkv, mix.bqkv)
            outs = [
                mix.attend(qkv[r : r + 1], s.kv.k[blk.slot], s.kv.v[blk.slot], s.pos, ropes[r])
                for r, s in enumerate(states)
            ]
            h = linear(torch.cat(outs).reshape(len(states), -1), mix.wo, mix.bo)
        x, h = add_rms_norm(x, h, rm, blk.ln_post, eps, k)
        h = blk.mlp.forward(h)
        if i + 1 < len(model.blocks):
            x, h = add_rms_norm(x, h, rm, model.blocks[i + 1].ln_in, eps, k)
        else:
            x = torch.add(x, h, alpha=rm)
    for s in states:
        s.advance(1)
    return model.lm_head_logits(x)
