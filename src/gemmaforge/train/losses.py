"""Chunked output-head losses: cross-entropy and distillation without a [B, T, vocab] tensor.

With Gemma's 256k vocabulary one token's fp32 logits take 1 MB (REFERENCE.md section 6), so the
head is applied ``chunk`` tokens at a time. Rather than keeping each chunk's logits for the backward
(or recomputing them under torch.utils.checkpoint), the gradient is computed *in the forward*, in
closed form, while the chunk's logits exist anyway -- the "fused linear cross-entropy" trick. Per
token, with s = soft-capped student logits, p = softmax(s), p_tau = softmax(s / tau) and q the
teacher's distribution at temperature tau:

    loss   = (1 - alpha) * CE(s, y)              + alpha * tau^2 * KD(q, s / tau)
    dL/ds  = (1 - alpha) * (p - onehot(y))       + alpha * tau   * (p_tau - q)
    dL/dz  = dL/ds * (1 - (s / cap)^2)           (z = h @ E^T, s = cap * tanh(z / cap))

KD is the soft-target cross-entropy -sum q log p_tau, or the forward KL = that minus the entropy
of q; both have the gradient above (REFERENCE.md section 6). tau^2 keeps the soft-target gradient's
scale independent of tau (Hinton et al. 2015). Everything inside a chunk runs in fp32 with the final
soft-cap applied; only the two matmuls run in ``compute_dtype`` (bf16 on GPU).

The teacher's distribution comes from ``teacher(rows) -> (ids, z)``: ``ids`` None and ``z`` [n, V]
full logits (a live teacher), or ``ids``/``z`` [n, k] for cached logits (top-k, or Gemma 3 style
sampled tokens with -inf padding). q = softmax(z / tau) over the given entries, so top-k with k = V
is exactly the full computation.
"""

from __future__ import annotations

from typing import Callable

import torch

TeacherFn = Callable[[slice], tuple[torch.Tensor | None, torch.Tensor]]


def _softmax_into(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out <- softmax(x) over the last dim (out may be x); returns logsumexp(x) per row."""
    m = x.amax(-1, keepdim=True)
    torch.sub(x, m, out=out).exp_()
    total = out.sum(-1, keepdim=True)
    out.div_(total)
    return (m + total.log()).squeeze(1)


class _Buffers:
    """[rows, vocab] scratch tensors allocated once and reused by every chunk: a fresh 1 GB tensor per
    operation costs page faults on CPU (measured: ~10x slower than the in-place op) and churn on GPU."""

    def __init__(self, rows: int, device):
        self.rows, self.device, self._store = rows, device, {}

    def get(self, name: str, m: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        t = self._store.get(name)
        if t is None or t.dtype != dtype or t.shape[1] != cols:
            t = self._store[name] = torch.empty(self.rows, cols, dtype=dtype, device=self.device)
        return t[:m]


class _FusedHeadLoss(torch.autograd.Function):
    """sum over rows of the mixed loss; backward returns the gradients computed in forward."""

    @staticmethod
    def forward(ctx, h, weight, labels, teacher, alpha, tau, kd_kind, chunk, softcap, compute_dtype, with_grad):
        n, vocab = h.shape[0], weight.shape[0]
        f32 = torch.float32
        w = weight.to(compute_dtype)
        grad_h = torch.empty(h.shape, dtype=f32, device=h.device) if with_grad else None
        grad_w = torch.zeros(weight.shape, dtype=f32, device=h.device) if with_grad else None
        hard_sum = h.new_zeros((), dtype=f32)
        kd_sum = h.new_zeros((), dtype=f32)
        buf = _Buffers(min(chunk, max(n, 1)), h.device)
        gw_buf = torch.empty_like(w) if with_grad and compute_dtype != f32 else None
        for start in range(0, n, chunk):
            rows = slice(start, min(n, start + chunk))
            m = rows.stop - start
            hc = h[rows].to(compute_dtype)
            z = torch.matmul(hc, w.T, out=buf.get("z", m, vocab, compute_dtype))
            s = z if compute_dtype == f32 else buf.get("s", m, vocab, f32).copy_(z)
            if softcap is not None:
                s.div_(softcap).tanh_().mul_(softcap)
            y = labels[rows]
            g = buf.get("g", m, vocab, f32)
            lse = _softmax_into(s, g)  # g = p = softmax(s)
            hard_sum += (lse - s.gather(1, y[:, None]).squeeze(1)).sum()
            if alpha > 0.0:
                ids, q = teacher(rows)  # a full-vocab q is the teacher's scratch: overwritten in place
                q = (q.float() if ids is None else q.to(f32, copy=True)).div_(tau)
                _softmax_into(q, q)
                if tau == 1.0:
                    p_tau, lse_tau = g, lse
                else:
                    p_tau = buf.get("p_tau", m, vocab, f32)
                    lse_tau = _softmax_into(torch.div(s, tau, out=p_tau), p_tau)
                picked = s if ids is None else s.gather(1, ids)
                kd = lse_tau.sum() - torch.dot(q.reshape(-1), picked.reshape(-1)) / tau  # -sum q log p_tau
                if kd_kind == "kl":
                    entropy_buf = buf.get("xlogx", m, q.shape[1], f32) if ids is None else None
                    kd = kd + torch.xlogy(q, q, out=entropy_buf).sum()
                kd_sum += kd
            if not with_grad:
                continue
            # dL/ds = (1 - a) (p - onehot(y)) + a tau (p_tau - q), built in g
            if alpha > 0.0:
                if p_tau is g:
                    g.mul_(1.0 - alpha + alpha * tau)
                else:
                    g.mul_(1.0 - alpha).add_(p_tau, alpha=alpha * tau)
                if ids is None:
                    g.sub_(q, alpha=alpha * tau)
                else:
                    g.scatter_add_(1, ids, q * -(alpha * tau))
            g[torch.arange(m, device=g.device), y] -= 1.0 - alpha
            if softcap is not None:  # dL/dz = dL/ds * (1 - (s / cap)^2); s is not needed any more
                g.mul_(s.div_(softcap).square_().neg_().add_(1.0))
            gz = g if compute_dtype == f32 else z.copy_(g)
            grad_h[rows] = (gz @ w).float()
            if compute_dtype == f32:
                grad_w.addmm_(gz.T, hc)
            else:
                grad_w += torch.matmul(gz.T, hc, out=gw_buf)
        loss = (1.0 - alpha) * hard_sum + alpha * tau**2 * kd_sum
        if with_grad:
            ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (h.dtype, weight.dtype)
        ctx.mark_non_differentiable(hard_sum, kd_sum)
        return loss, hard_sum, kd_sum

    @staticmethod
    def backward(ctx, grad_loss, _grad_hard, _grad_kd):
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        g = grad_loss.float()  # the loss is linear in its upstream gradient, so scaling is exact
        return (grad_h * g).to(h_dtype), (grad_w * g).to(w_dtype), *([None] * 9)


def head_loss(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, softcap: float | None,
              teacher: TeacherFn | None = None, alpha: float = 0.0, tau: float = 1.0, kd_kind: str = "kl",
              chunk: int = 1024, compute_dtype: torch.dtype | None = None):
    """Summed loss over rows of ``h`` [n, D] (already selected: every row has a label) ->
    (loss, hard CE sum, KD sum); the last two are detached, for logging."""
    if alpha > 0.0 and teacher is None:
        raise ValueError("alpha > 0 needs a teacher")
    compute_dtype = compute_dtype or h.dtype
    with_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    return _FusedHeadLoss.apply(h, weight, labels, teacher, float(alpha), float(tau), kd_kind, int(chunk),
                                softcap, compute_dtype, with_grad)


def select_rows(h: torch.Tensor, labels: torch.Tensor, ignore: int = -100):
    """[B, T, D], [B, T] -> rows [n, D] and labels [n] of the positions that have a label, plus their
    flat indices (to select the matching teacher rows)."""
    flat = labels.reshape(-1)
    index = (flat != ignore).nonzero().squeeze(1)
    return h.reshape(-1, h.shape[-1]).index_select(0, index), flat.index_select(0, index), index
