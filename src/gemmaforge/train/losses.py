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


import math
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


ChunkFn = Callable[[slice, torch.Tensor, "_Buffers", bool], "torch.Tensor | None"]


def chunked_head(h: torch.Tensor, model, fn: ChunkFn, *, chunk: int = 1024) -> Callable[[torch.Tensor], torch.Tensor]:
    """The one chunk loop every output-head loss runs on. ``model.logits`` (tied table and final
    soft-cap) is applied to rows of ``h`` [n, D] ``chunk`` at a time; ``fn(rows, s, buf, want_grad)``
    gets each chunk's fp32 logits ``s`` [m, V] (no autograd), adds whatever sums it keeps, and returns
    dL/ds [m, V] fp32 when ``want_grad`` (it may be one of ``buf``'s scratch tensors, never ``s``
    itself). That gradient is taken back through the head at once, in closed form for a float tied
    table or through that chunk's autograd graph otherwise, so no chunk's logits outlive it.

    Returns ``attach(loss)``: the caller's loss value (a 0-d tensor built from its sums) carrying the
    gradients to ``h`` and the head's parameters."""
    f32 = torch.float32
    n = h.shape[0]
    grad_on = torch.is_grad_enabled()
    hd = h.detach()
    buf = _Buffers(min(chunk, max(n, 1)), h.device)
    grad_h = torch.empty(h.shape, dtype=f32, device=h.device) if grad_on and h.requires_grad else None
    params = [p for p in model.embed.parameters() if p.requires_grad] if grad_on else []
    want = grad_h is not None or bool(params)
    tied = _tied_head(model, hd) if want else None  # nothing needs a gradient: the plain no-grad path
    grad_params = None
    for start in range(0, max(n, 1), chunk):  # once even for n = 0, so the head's parameters get a gradient
        rows = slice(start, min(n, start + chunk))
        m = rows.stop - start
        s_out = None
        if tied is not None or not want:
            hc = hd[rows]
            with torch.no_grad():
                s = _logits_into(model, hc, buf, m)
        else:
            hc = hd[rows].detach().requires_grad_(grad_h is not None)
            s_out = model.logits(hc)
            s = s_out.detach()
        with torch.no_grad():
            s = s if s.dtype == f32 else buf.get("s32", m, s.shape[1], f32).copy_(s)
            g = fn(rows, s, buf, want)
            if not want:
                continue
            if tied is not None:  # through the head in place: s = cap tanh(z / cap), z = h W^T
                weight, cap = tied
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

    def attach(loss: torch.Tensor) -> torch.Tensor:
        inputs = ([h] if grad_h is not None else []) + params
        if not inputs:
            return loss
        grads = [(grad_h, h.dtype)] if grad_h is not None else []
        grads += [(g, p.dtype) for g, p in zip(grad_params or [], params)]  # none for a frozen table
        return _Precomputed.apply(loss, grads, *inputs)

    return attach


def head_loss(h: torch.Tensor, model, labels: torch.Tensor, *, teacher: TeacherFn | None = None,
              alpha: float = 0.0, tau: float = 1.0, kd_kind: str = "kl", chunk: int = 1024):
    """Summed loss over rows of ``h`` [n, D] (already selected: every row has a label), with the
    model's output head (``model.logits``: tied table and final soft-cap) applied ``chunk`` rows at a
    time -> (loss, hard CE sum, KD sum); the last two are detached, for logging. ``loss``
    backpropagates to ``h`` and the head's parameters (the tied table's, if it has any)."""
    if alpha > 0.0 and teacher is None:
        raise ValueError("alpha > 0 needs a teacher")
    f32 = torch.float32
    hard_sum = h.new_zeros((), dtype=f32)
    kd_sum = h.new_zeros((), dtype=f32)

    def fn(rows, s, buf, want):
        nonlocal hard_sum, kd_sum
        m, vocab = s.shape
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
        if not want:
            return None
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
        return g

    attach = chunked_head(h, model, fn, chunk=chunk)
    return attach((1.0 - alpha) * hard_sum + alpha * tau**2 * kd_sum), hard_sum, kd_sum


def select_rows(h: torch.Tensor, labels: torch.Tensor, ignore: int = -100):
    """[B, T, D], [B, T] -> rows [n, D] and labels [n] of the positions that have a label, plus their
    flat indices (to select the matching teacher rows)."""
    flat = labels.reshape(-1)
    index = (flat != ignore).nonzero().squeeze(1)
    return h.reshape(-1, h.shape[-1]).index_select(0, index), flat.index_select(0, index), index


# ---- generalized Jensen-Shannon divergence (GKD, Agarwal et al. 2024, eq. 1) -----------------------
# With p = softmax(s / tau) the student's and q = softmax(z / tau) the teacher's distribution, and the
# mixture m = (1 - beta) p + beta q:
#
#     JSD_beta = beta KL(q || m) + (1 - beta) KL(p || m)  =  H(m) - beta H(q) - (1 - beta) H(p)
#
# beta = 0 and 1 are the limits' *unnormalised* end points as TRL defines them (GKDTrainer.
# generalized_jsd_loss): forward KL(q || p) and reverse KL(p || q). The gradient with respect to the
# student's scaled logits a = s / tau has a closed form, which the chunked training form uses:
#
#     beta = 0:   p - q
#     beta = 1:   p (log p - log q - KL(p || q))
#     otherwise:  (1 - beta) p (log p - log m - KL(p || m))       (row-wise KL, broadcast over vocab)
def _jsd_terms(lp: torch.Tensor, lq: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-row divergence from fp32 log-probs [m, V] (autograd-friendly: the reference form)."""
    if beta == 0.0:
        return (lq.exp() * (lq - lp)).sum(-1)
    if beta == 1.0:
        return (lp.exp() * (lp - lq)).sum(-1)
    lm = torch.logaddexp(lp + math.log1p(-beta), lq + math.log(beta))
    return beta * (lq.exp() * (lq - lm)).sum(-1) + (1.0 - beta) * (lp.exp() * (lp - lm)).sum(-1)


def _check_beta(beta: float, temperature: float) -> None:
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None = None,
                    beta: float = 0.5, temperature: float = 1.0, *, chunk: int = 1024) -> torch.Tensor:
    """The generalized JSD of full logits [..., V], reduced as TRL's ``GKDTrainer.generalized_jsd_loss``
    does by default ("batchmean"): summed over the positions whose label is not -100 and divided by
    their number, or, without labels, summed over everything and divided by ``student_logits.shape[0]``.
    Differentiable (autograd), computed in fp32 ``chunk`` positions at a time, so a bf16 input never
    gets a full fp32 copy. Training uses ``head_jsd``, which never has [B, T, V] logits at all."""
    _check_beta(beta, temperature)
    vocab = student_logits.shape[-1]
    s, z = student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab)
    if labels is not None:
        index = (labels.reshape(-1) != -100).nonzero().squeeze(1)
        s, z = s.index_select(0, index), z.index_select(0, index)
        denominator = max(int(index.numel()), 1)
    else:
        denominator = max(student_logits.shape[0], 1)
    total = student_logits.new_zeros((), dtype=torch.float32)
    for start in range(0, s.shape[0], chunk):
        lp = torch.log_softmax(s[start:start + chunk].float() / temperature, dim=-1)
        lq = torch.log_softmax(z[start:start + chunk].float() / temperature, dim=-1)
        total = total + _jsd_terms(lp, lq, beta).sum()
    return total / denominator


def _log_softmax_into(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out <- log_softmax(x) over the last dim (out may be x), without a fresh [m, V] tensor."""
    m = x.amax(-1, keepdim=True)
    torch.sub(x, m, out=out)
    total = torch.exp(out).sum(-1, keepdim=True)  # one temporary: exp cannot write into out here
    return out.sub_(total.log_())


def head_jsd(h: torch.Tensor, model, teacher: TeacherFn, *, beta: float = 0.5, tau: float = 1.0,
             chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed generalized JSD over rows of ``h`` [n, D] (every row a scored position) between the
    model's head and ``teacher(rows) -> (None, z)`` (full [m, V] teacher logits, e.g.
    ``objectives.LiveTeacher``), ``chunk`` rows at a time with the closed-form gradient above
    -> (loss carrying the gradient, detached sum)."""
    _check_beta(beta, tau)
    f32 = torch.float32
    total = h.new_zeros((), dtype=f32)

    def fn(rows, s, buf, want):
        nonlocal total
        m, vocab = s.shape
        ids, z = teacher(rows)
        if ids is not None:
            raise ValueError("the generalized JSD needs the teacher's full logits, not a top-k cache")
        lp = _log_softmax_into(torch.div(s, tau, out=buf.get("lp", m, vocab, f32)), buf.get("lp", m, vocab, f32))
        q = z.float()  # the teacher's scratch (as in head_loss): overwritten in place
        lq = _log_softmax_into(q.div_(tau), q)
        g = buf.get("g", m, vocab, f32)
        p = torch.exp(lp, out=g)
        if beta == 0.0:
            q = torch.exp(lq)
            total += torch.dot(q.reshape(-1), (lq - lp).reshape(-1))
            return g.sub_(q).div_(tau) if want else None
        if beta == 1.0:
            lref = lq
        else:
            lref = buf.get("lm", m, vocab, f32)
            torch.logaddexp(lp + math.log1p(-beta), lq + math.log(beta), out=lref)
        d = buf.get("d", m, vocab, f32)
        torch.sub(lp, lref, out=d)  # log p - log ref
        kl_p = (p * d).sum(-1)  # KL(p || ref) per row
        if beta == 1.0:
            total += kl_p.sum()
        else:
            kl_q = (torch.exp(lq) * (lq - lref)).sum(-1)  # KL(q || m)
            total += (beta * kl_q + (1.0 - beta) * kl_p).sum()
        if not want:
            return None
        scale = (1.0 if beta == 1.0 else 1.0 - beta) / tau  # through a = s / tau
        return g.mul_(d.sub_(kl_p[:, None])).mul_(scale)

    attach = chunked_head(h, model, fn, chunk=chunk)
    return attach(total), total.detach()


def policy_gradient_loss(h: torch.Tensor, model, labels: torch.Tensor, weights: torch.Tensor, *, chunk: int = 1024):
    """REINFORCE-style surrogate over rows of ``h`` [n, D]: loss = -sum_t w_t log p(y_t), with a
    fixed weight (an advantage) per row -> (loss, per-row NLL [n], per-row entropy [n]); the last two
    detached, for logging. dL/ds = w (p - onehot(y)), in the same chunk loop as the other losses."""
    f32 = torch.float32
    n = h.shape[0]
    nll = h.new_zeros(n, dtype=f32)
    entropy = h.new_zeros(n, dtype=f32)
    weighted = h.new_zeros((), dtype=f32)
    w_all = weights.to(device=h.device, dtype=f32)

    def fn(rows, s, buf, want):
        nonlocal weighted
        m, vocab = s.shape
        y, w = labels[rows], w_all[rows]
        g = buf.get("g", m, vocab, f32)
        lse = _softmax_into(s, g)  # g = p
        token_nll = lse - s.gather(1, y[:, None]).squeeze(1)
        nll[rows] = token_nll
        weighted += (w * token_nll).sum()
        entropy[rows] = lse - (g * s).sum(-1)  # H(p) = lse - sum p s
        if not want:
            return None
        g[torch.arange(m, device=g.device), y] -= 1.0
        return g.mul_(w[:, None])

    attach = chunked_head(h, model, fn, chunk=chunk)
    return attach(weighted), nll, entropy
