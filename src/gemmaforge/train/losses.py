"""Chunked output-head losses: cross-entropy and distillation without a [B, T, vocab] tensor.

With Gemma's 256k vocabulary one token's fp32 logits take 1 MB (docs/reference.md §6), so the
head is applied ``chunk`` tokens at a time. Rather than keeping each chunk's logits for the backward
(or recomputing them under torch.utils.checkpoint), the gradient is computed *in the forward*, while
the chunk's logits exist anyway -- the "fused linear cross-entropy" trick. Per token, with
s = head(h) the soft-capped logits, p = softmax(s), p_tau = softmax(s / tau) and q the teacher's
distribution at temperature tau:

    loss   = (1 - alpha) * CE(s, y)              + alpha * tau^2 * KD(q, s / tau)
    dL/ds  = (1 - alpha) * (p - onehot(y))       + alpha * tau   * (p_tau - q)

dL/ds has this closed form; autograd takes it back through the head of that one chunk (the tied
matmul and the final soft-cap: whatever ``head`` does, typically ``Gemma.logits``, the model's one
definition of its output head) to the hidden states and the head's parameters, and the chunk's
logits are dropped. The backward pass only scales the stored gradients.

KD is the soft-target cross-entropy -sum q log p_tau, or the forward KL = that minus the entropy
of q; both have the gradient above (docs/reference.md §6). tau^2 keeps the soft-target gradient's
scale independent of tau (Hinton et al. 2015). Everything after the head runs in fp32; the head runs
in the ambient precision (bf16 under autocast).

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


def _tied_head(model, h: torch.Tensor):
    """(weight, cap) when the model's head is a float tied table and the chunk runs in fp32 without
    autocast: its gradient is then taken back in closed form, in place, without autograd's fresh
    [chunk, vocab] tensors (the forward values still come from ``model.logits``). None otherwise
    (a quantized table has no gradient to take; bf16 goes through autograd)."""
    from ..model import Embedding

    weight = getattr(model.embed, "weight", None)
    if (type(model.embed) is not Embedding or weight.dtype != torch.float32 or h.dtype != torch.float32
            or torch.is_autocast_enabled(h.device.type)):
        return None
    return weight, model.config.final_logit_softcap


def _logits_into(model, hc: torch.Tensor, buf: _Buffers, m: int) -> torch.Tensor:
    """``model.logits(hc)`` without autograd, into a reused fp32 [chunk, vocab] buffer when the chunk
    is fp32 and autocast is off (else whatever dtype the head computes in)."""
    if hc.dtype != torch.float32 or torch.is_autocast_enabled(hc.device.type):
        return model.logits(hc)
    return model.logits(hc, out=buf.get("s", m, model.config.vocab_size, torch.float32))


class _Precomputed(torch.autograd.Function):
    """``value`` with the gradients of ``inputs`` already known: backward scales and returns them."""

    @staticmethod
    def forward(ctx, value, grads, *inputs):
        ctx.grads = grads
        return value.clone()

    @staticmethod
    def backward(ctx, grad_out):
        g = grad_out.float()  # the loss is linear in its upstream gradient, so scaling is exact
        return None, None, *((gr * g).to(gr_dtype) for gr, gr_dtype in ctx.grads)


def head_loss(h: torch.Tensor, model, labels: torch.Tensor, *, teacher: TeacherFn | None = None,
              alpha: float = 0.0, tau: float = 1.0, kd_kind: str = "kl", chunk: int = 1024):
    """Summed loss over rows of ``h`` [n, D] (already selected: every row has a label), with the
    model's output head (``model.logits``: tied table and final soft-cap) applied ``chunk`` rows at a
    time -> (loss, hard CE sum, KD sum); the last two are detached, for logging. ``loss``
    backpropagates to ``h`` and the head's parameters (the tied table's, if it has any)."""
    if alpha > 0.0 and teacher is None:
        raise ValueError("alpha > 0 needs a teacher")
    f32 = torch.float32
    n = h.shape[0]
    grad_on = torch.is_grad_enabled()
    hd = h.detach()
    hard_sum = hd.new_zeros((), dtype=f32)
    kd_sum = hd.new_zeros((), dtype=f32)
    buf = _Buffers(min(chunk, max(n, 1)), h.device)
    grad_h = torch.empty(h.shape, dtype=f32, device=h.device) if grad_on and h.requires_grad else None
    tied = _tied_head(model, hd)
    params = [p for p in model.embed.parameters() if p.requires_grad] if grad_on else []
    grad_params = None
    if tied is not None:
        weight, cap = tied
        if grad_h is None and not params:
            tied = None  # nothing needs a gradient: the plain no-grad path below (still buffered)
    for start in range(0, max(n, 1), chunk):  # once even for n = 0, so the head's parameters get a gradient
        rows = slice(start, min(n, start + chunk))
        m = rows.stop - start
        s_out = None
        if tied is not None or (grad_h is None and not params):
            hc = hd[rows]
            with torch.no_grad():
                s = _logits_into(model, hc, buf, m)
            need_grad = tied is not None
        else:
            hc = hd[rows].detach().requires_grad_(grad_h is not None)
            s_out = model.logits(hc)
            s = s_out.detach()
            need_grad = True
        with torch.no_grad():
            s = s if s.dtype == f32 else buf.get("s32", m, s.shape[1], f32).copy_(s)
            vocab = s.shape[1]
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
            if not need_grad:
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
            if tied is not None:  # through the head in place: s = cap tanh(z / cap), z = h W^T
                if cap is not None:  # dL/dz = dL/ds (1 - (s / cap)^2); s is not needed any more
                    g.mul_(s.div_(cap).square_().neg_().add_(1.0))
                if grad_h is not None:
                    torch.matmul(g, weight, out=grad_h[rows])
                if params:
                    if grad_params is None:
                        grad_params = [torch.matmul(g.T, hc)]
                    else:
                        grad_params[0].addmm_(g.T, hc)
                continue
        wrt = ([hc] if grad_h is not None else []) + params
        grads = torch.autograd.grad(s_out, wrt, g.to(s_out.dtype))
        if grad_h is not None:
            grad_h[rows] = grads[0]
            grads = grads[1:]
        if grad_params is None:  # the first chunk's gradients become the accumulators (no zero-fill)
            grad_params = [gp.float() for gp in grads]
        else:
            for acc, gp in zip(grad_params, grads):
                acc += gp
    loss = (1.0 - alpha) * hard_sum + alpha * tau**2 * kd_sum
    inputs = ([h] if grad_h is not None else []) + params
    if inputs:
        grads = [(grad_h, h.dtype)] if grad_h is not None else []
        grads += [(g, p.dtype) for g, p in zip(grad_params, params)]
        loss = _Precomputed.apply(loss, grads, *inputs)
    return loss, hard_sum, kd_sum


def select_rows(h: torch.Tensor, labels: torch.Tensor, ignore: int = -100):
    """[B, T, D], [B, T] -> rows [n, D] and labels [n] of the positions that have a label, plus their
    flat indices (to select the matching teacher rows)."""
    flat = labels.reshape(-1)
    index = (flat != ignore).nonzero().squeeze(1)
    return h.reshape(-1, h.shape[-1]).index_select(0, index), flat.index_select(0, index), index
