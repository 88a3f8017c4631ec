"""Mamba2 selective-state-space kernels in plain torch: a per-token recurrence and a chunked scan.

Both compute, for every head h and position t (state S is [head_dim, d_state] per head)::

    S_t = exp(dt_t * A_h) * S_{t-1} + dt_t * x_t B_t^T        y_t = S_t C_t

starting from a given state and leaving the final state in place, so callers can continue from
any checkpoint. The recurrence is cheapest for a handful of tokens (decode, small edits); the
chunked "SSD" form turns the same computation into batched matmuls for prefill. Everything here
runs in float32 whatever the model dtype: the state integrates over thousands of tokens and
bf16 rounding in the recurrence visibly drifts.

Shapes (batch size 1, no batch dim): x [T, H, P], dt [T, H], A [H], B and C [T, G, N] with
G groups shared by H // G consecutive heads, state [H, P, N].
"""

from __future__ import annotations

import torch
from torch import Tensor

# exp() of anything below ~-87 is a float32 denormal or zero, and x86 computes (and multiplies)
# denormals ~8x slower: strongly decaying heads made the scan's exp the top cost. Clamping the
# log-decay at -80 keeps every factor a normal float; e^-80 ~ 2e-35 instead of ~0 changes no
# output at float32 precision (each row also carries an undecayed, weight-1 diagonal term).
_MIN_LOG_DECAY = -80.0


def _decay(log_decay: Tensor) -> Tensor:
    return log_decay.clamp(min=_MIN_LOG_DECAY).exp_()


def ssm_recurrent(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, state: Tensor) -> Tensor:
    """Token-by-token update of ``state`` (in place); returns y [T, H, P] (without the D skip).

    Work per token is independent of the sequence length; the only per-token allocation is the
    [H, P] output row, the state itself is updated in place.
    """
    T, H, P = x.shape
    G, N = B.shape[1], B.shape[2]
    hg = H // G
    decay = _decay(dt * A)  # [T, H]
    xdt = x * dt.unsqueeze(-1)  # [T, H, P]
    s4 = state.view(G, hg, P, N)
    s3 = state.view(G, hg * P, N)
    y = x.new_empty(T, H, P)
    for t in range(T):
        s4.mul_(decay[t].view(G, hg, 1, 1))
        # rank-1 update S += (dt x) B^T, broadcasting B over the heads of its group
        s4.addcmul_(xdt[t].view(G, hg, P, 1), B[t].view(G, 1, 1, N))
        torch.matmul(s3, C[t].view(G, N, 1), out=y[t].view(G, hg * P, 1))
    return y


def _scan_equal_chunks(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, state: Tensor, n: int, L: int
) -> tuple[Tensor, Tensor]:
    """SSD over ``n`` consecutive chunks of exactly ``L`` tokens; returns (y, final state).

    The four steps of the matmul form: (1) intra-chunk output through the decay-masked C B^T
    "attention" matrix, (2) each chunk's own contribution to the state at its end, (3) the
    short sequential recurrence that turns those into the state entering each chunk, (4) that
    entering state read out through C with the decay up to each position.

    Only the decay matrix is [n, H, L, L]; it is built in place (one subtraction, clamp, exp,
    scaling by the causally masked scores). B and C are shared by the heads of a group, so
    steps (2) and (4) fold the heads into the matmul rows/columns instead of broadcasting B/C
    per head.
    """
    _, H, P = x.shape
    G, N = B.shape[1], B.shape[2]
    hg = H // G
    # Log-decay accumulated from the chunk start, per position: [n, H, L]. Accumulated in
    # float64 because the decay between two positions is a difference of these sums: a head
    # that forgets fast (|dt*A| in the hundreds per token) makes them huge, and a float32
    # difference then loses the small decays between neighbouring positions (on the real shape
    # with random weights logits drifted ~1.5e-3 from a float64 evaluation, now 5e-5; the
    # float64 subtraction costs ~1% of a prefill).
    a_cum64 = (dt.double() * A.double()).view(n, L, H).cumsum(dim=1).transpose(1, 2).contiguous()
    a_cum = a_cum64.float()
    xdt = (x * dt.unsqueeze(-1)).view(n, L, H, P)
    Bc = B.view(n, L, G, N).transpose(1, 2)  # [n, G, L, N]
    Cc = C.view(n, L, G, N).transpose(1, 2)  # [n, G, L, N]

    # (1) diagonal blocks: y[l] = sum_{s<=l} (C_l.B_s) exp(a_cum[l] - a_cum[s]) dt_s x_s
    causal = torch.ones(L, L, dtype=torch.float32, device=x.device).tril_()
    scores = torch.matmul(Cc, Bc.transpose(-1, -2)).mul_(causal)  # [n, G, L, L], masked
    decay = torch.empty(n, H, L, L, dtype=torch.float32, device=x.device)
    torch.sub(a_cum64.unsqueeze(-1), a_cum64.unsqueeze(-2), out=decay)  # > 0 above the diagonal
    decay.clamp_(_MIN_LOG_DECAY, 0.0).exp_()  # (see _MIN_LOG_DECAY; masked by the scores)
    decay.view(n, G, hg, L, L).mul_(scores.unsqueeze(2))
    y_diag = torch.matmul(decay, xdt.transpose(1, 2))  # [n, H, L, P]

    # (2) chunk states: sum_l exp(a_cum[-1] - a_cum[l]) dt_l x_l B_l^T, heads folded into rows
    to_end = _decay((a_cum64[..., -1:] - a_cum64).float()).transpose(1, 2)  # [n, L, H]
    weighted = (xdt * to_end.unsqueeze(-1)).permute(0, 2, 3, 1).reshape(n, G, hg * P, L)
    chunk_states = torch.matmul(weighted, Bc).view(n, H, P, N)

    # (3) inter-chunk recurrence (n is small: T / chunk_size)
    chunk_decay = _decay(a_cum[..., -1]).view(n, H, 1, 1)
    starts = torch.empty_like(chunk_states)
    s = state
    for i in range(n):
        starts[i] = s
        s = torch.addcmul(chunk_states[i], s, chunk_decay[i])

    # (4) off-diagonal blocks: entering state read through C, decayed to each position
    y = torch.matmul(Cc, starts.view(n, G, hg * P, N).transpose(-1, -2))  # [n, G, L, hg*P]
    if G > 1:
        y = y.view(n, G, L, hg, P).transpose(1, 2)
    y = y.reshape(n, L, H, P)
    y.mul_(_decay(a_cum).transpose(1, 2).unsqueeze(-1))
    y.add_(y_diag.transpose(1, 2))
    return y.view(n * L, H, P), s


def ssm_chunked(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, state: Tensor, chunk_size: int) -> Tensor:
    """Chunked SSD scan of T tokens from ``state`` (updated in place); returns y [T, H, P].

    No padding: the full chunks are processed as one batch and a shorter tail chunk as a second
    batch of one, so the cost tracks T rather than T rounded up to the chunk size.
    """
    T = x.shape[0]
    n_full, tail = divmod(T, chunk_size)
    parts: list[Tensor] = []
    s = state
    start = 0
    for n, L in ((n_full, chunk_size), (1 if tail else 0, tail)):
        if n == 0:
            continue
        end = start + n * L
        sl = slice(start, end)
        y, s = _scan_equal_chunks(x[sl], dt[sl], A, B[sl], C[sl], s, n, L)
        parts.append(y)
        start = end
    state.copy_(s)
    return parts[0] if len(parts) == 1 else torch.cat(parts)
