"""Recovery losses computed from final hidden states, in chunks of tokens: the logits never exist all at once.

A model with a vocabulary of 128k-256k tokens makes ``batch × sequence × vocabulary`` float32 logits of gigabytes;
distillation needs two such tensors (student and teacher) plus their softmaxes. :func:`chunked_recovery_loss` takes
the student's and the teacher's *final hidden states* ``(tokens, hidden)`` and their output layers, and walks over
the tokens ``chunk_size`` at a time: for each chunk it builds the student's logits ``(chunk, vocab)``, the teacher's
(through ``teacher_logits``), the KL and cross-entropy terms and - analytically - their gradient with respect to the
student's logits, which it turns into the gradient for the hidden states and the output layer's weight before
moving on. At most one chunk of logits (and its softmaxes) is alive at any time, in the forward and in the backward.

Terms (means over the tokens that count):

* KL: ``T² · KL(softmax(t / T) ‖ softmax(s / T))`` (Hinton's scaling keeps gradient sizes comparable across ``T``);
  with ``top_k`` the KL is taken over ``k + 1`` outcomes: the teacher's ``k`` most likely tokens one by one and all
  the others as one bucket (the student's and the teacher's remaining mass), so the student is not taught that the
  tail is impossible (renormalising the top ``k`` alone does that, and raises test perplexity);
* cross-entropy: the usual next-token loss against ``labels`` (``-100`` ignored).

>>> import torch
>>> hidden, weight = torch.randn(6, 4), torch.randn(10, 4)
>>> loss, kd, lm = chunked_recovery_loss(hidden, weight, None, lambda rows: hidden[rows] @ weight.T,
...                                      torch.randint(0, 10, (6,)), kd_weight=1.0, lm_weight=0.0, chunk_size=4)
>>> round(float(kd), 6)  # the teacher is the student: nothing to distil
0.0
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


class _ChunkedLoss(torch.autograd.Function):
    """Forward computes the loss and the gradients (chunk by chunk); backward only scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher_logits, labels, kd_weight, lm_weight, temperature, top_k,
                chunk_size):
        # hidden (n, d) student final hidden states; weight (V, d) and bias (V,) the student's output layer;
        # teacher_logits(rows) -> (len(rows), V) float32 on hidden's device, no grad; labels (n,) with -100 ignored.
        n = hidden.shape[0]
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_bias else None
        counted = labels != IGNORE_INDEX
        kd_tokens = max(1, int(counted.sum()))  # KL over the same tokens as the cross-entropy
        lm_tokens = kd_tokens
        kd_total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        lm_total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        T = float(temperature)
        for start in range(0, n, chunk_size):
            rows = torch.arange(start, min(n, start + chunk_size), device=hidden.device)
            keep = counted[rows]
            if not bool(keep.any()):
                continue
            rows = rows[keep]
            h = hidden[rows]  # (c, d)
            logits = F.linear(h, weight, bias).float()  # (c, V): the only student logits alive
            grad_logits = None
            # The (c, V) arithmetic below is memory-bound: written with few passes and in-place steps, it costs
            # about as much as one of the two output-layer matmuls instead of three.
            shared = False  # True when one softmax serves both terms (full vocabulary, T = 1, LM term on)
            if kd_weight:
                with torch.no_grad():
                    t_logits = teacher_logits(rows).float()  # (c, V)
                c_kd = kd_weight * T / kd_tokens  # T² · KL, differentiated by s: T² · (1/T) · (p - q)
                if top_k is not None and top_k < t_logits.shape[-1]:
                    # the student's tempered logits (a copy when the LM term still needs the logits)
                    z = logits / T if T != 1.0 else (logits.clone() if lm_weight else logits)
                    log_p = torch.log_softmax(z, dim=-1)
                    # The teacher's k largest probabilities, and the rest of its mass as one bucket.
                    log_q, index = torch.log_softmax(t_logits.div_(T), dim=-1).topk(top_k, dim=-1)  # (c, k)
                    q = log_q.exp()
                    q_rest = (1.0 - q.sum(-1)).clamp_min(0.0)  # (c,)
                    log_p_top = log_p.gather(-1, index)
                    p = log_p.exp_()
                    p_rest = (1.0 - log_p_top.exp().sum(-1)).clamp_min(1e-12)
                    kd_total += (q * (log_q - log_p_top)).sum().double()
                    kd_total += torch.xlogy(q_rest, q_rest / p_rest).sum().double()
                    # d/d(s/T) is p - target: q on the top k; outside it the rest mass q_rest, spread like the
                    # student's own tail (p_i / p_rest)
                    target = p * (q_rest / p_rest)[:, None]
                    target.scatter_(-1, index, q)
                    grad_logits = p.sub_(target).mul_(c_kd)
                    del target, q, log_q
                else:
                    # KL(q || p) per row = sum q (t - z) - lse(t) + lse(z), with t, z the tempered logits.
                    t = t_logits.div_(T) if T != 1.0 else t_logits
                    z = logits / T if T != 1.0 else logits  # a copy when tempered, else the logits themselves
                    lse_t = torch.logsumexp(t, dim=-1, keepdim=True)
                    lse_z = torch.logsumexp(z, dim=-1, keepdim=True)
                    q = torch.softmax(t, dim=-1)
                    cross = torch.dot(q.view(-1), t.sub_(z).view(-1))  # sum q (t - z), one pass
                    kd_total += (cross - lse_t.sum() + lse_z.sum()).double()
                    shared = bool(lm_weight) and T == 1.0
                    if shared:  # read the LM term's picks before the logits become probabilities in place
                        targets = labels[rows]
                        index = torch.arange(rows.numel(), device=logits.device)
                        lm_total -= (logits[index, targets] - lse_z[:, 0]).sum().double()
                    p = z.sub_(lse_z).exp_()  # softmax(z), in place
                    if shared:  # c_kd (p - q) + c_lm (p - onehot), from the one softmax
                        c_lm = lm_weight / lm_tokens
                        grad_logits = p.mul_(c_kd + c_lm).sub_(q, alpha=c_kd)
                        grad_logits[index, targets] -= c_lm
                    else:
                        grad_logits = p.sub_(q).mul_(c_kd)
                    del t, q
                del t_logits
            if lm_weight and not shared:
                targets = labels[rows]
                index = torch.arange(rows.numel(), device=logits.device)
                lse = torch.logsumexp(logits, dim=-1)
                lm_total -= (logits[index, targets] - lse).sum().double()
                probabilities = logits.sub_(lse[:, None]).exp_()  # logits are not needed any more
                probabilities[index, targets] -= 1.0
                probabilities.mul_(lm_weight / lm_tokens)
                grad_logits = probabilities if grad_logits is None else grad_logits.add_(probabilities)
                del probabilities
            if grad_logits is None:
                continue
            del logits
            if grad_hidden is not None:
                grad_hidden[rows] = (grad_logits @ weight.float()).to(hidden.dtype)
            if need_weight:
                grad_weight += grad_logits.T @ h.float()
            if need_bias:
                grad_bias += grad_logits.sum(0)
        kd = (T * T * kd_total / kd_tokens).float()
        lm = (lm_total / lm_tokens).float()
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.mark_non_differentiable(kd, lm)
        return kd_weight * kd + lm_weight * lm, kd, lm

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd, _grad_lm):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        scale = grad_loss
        return (
            grad_hidden * scale.to(grad_hidden.dtype) if grad_hidden is not None else None,
            (grad_weight * scale).to(ctx.weight_dtype) if grad_weight is not None else None,
            (grad_bias * scale).to(ctx.bias_dtype) if grad_bias is not None else None,
            None, None, None, None, None, None, None,
        )


def chunked_recovery_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          teacher_logits: Callable[[torch.Tensor], torch.Tensor] | None, labels: torch.Tensor, *,
                          kd_weight: float, lm_weight: float, temperature: float = 1.0, top_k: int | None = None,
                          chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(kd_weight · KL + lm_weight · CE, KL, CE)`` over the tokens of ``hidden`` ``(n, d)``, chunk by chunk.

    ``weight`` ``(V, d)`` / ``bias`` are the student's output layer; ``teacher_logits(rows)`` returns the teacher's
    logits for those token rows (needed when ``kd_weight > 0``); ``labels`` ``(n,)`` are the next tokens, ``-100``
    where a position does not count (in the KL term too). Only the first value carries gradients.
    """
    if kd_weight and teacher_logits is None:
        raise ValueError("kd_weight > 0 needs teacher logits")
    return _ChunkedLoss.apply(hidden, weight, bias, teacher_logits, labels, float(kd_weight), float(lm_weight),
                              float(temperature), top_k, int(chunk_size))


def block_mapping(structure: dict | None, student_blocks: int, teacher_blocks: int) -> list[tuple[int, int]]:
    """``(student block, teacher block)`` pairs whose outputs the hidden-state loss compares.

    A structured record lists each remaining block's ``original_index``; without one (masked students, same depth)
    block ``i`` is teacher block ``i``.

    >>> block_mapping({"blocks": [{"original_index": 0}, {"original_index": 2}]}, 2, 3)
    [(0, 0), (1, 2)]
    """
    if structure is not None and structure.get("blocks"):
        mapping = [(i, int(entry["original_index"])) for i, entry in enumerate(structure["blocks"])]
    else:
        mapping = [(i, i) for i in range(student_blocks)]
    if len(mapping) != student_blocks or any(j >= teacher_blocks for _, j in mapping):
        raise ValueError(f"cannot map the student's {student_blocks} blocks onto the teacher's {teacher_blocks}: the "
                         "record's structure does not describe this student/teacher pair")
    return mapping


def hidden_state_loss(student_states: tuple[torch.Tensor, ...], teacher_states: tuple[torch.Tensor, ...],
                      mapping: list[tuple[int, int]], mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean normalised MSE ``‖h_s − h_t‖² / ‖h_t‖²`` between mapped block outputs.

    ``*_states`` are a model's ``output_hidden_states`` (embeddings first, then one entry per block; the last entry is
    the final normalised state, so a pair ending at the last block of both compares the final states). ``mask``
    ``(batch, seq)`` selects the tokens that count.
    """
    losses = []
    last_student, last_teacher = len(student_states) - 2, len(teacher_states) - 2
    for i, j in mapping:
        if (i == last_student) != (j == last_teacher):
            continue  # one side would be normalised, the other not: not comparable
        s, t = student_states[i + 1], teacher_states[j + 1].to(student_states[i + 1].device)
        if s.shape != t.shape:
            raise ValueError(f"student block {i} output {tuple(s.shape)} and teacher block {j} output "
                             f"{tuple(t.shape)} differ in shape: the hidden-state loss needs the same hidden size")
        error = (s.float() - t.float()).pow(2).sum(-1)  # (batch, seq)
        scale = t.float().pow(2).sum(-1).clamp_min(1e-12)
        ratio = error / scale
        losses.append(ratio[mask].mean() if mask is not None else ratio.mean())
    if not losses:
        return student_states[-1].new_zeros((), dtype=torch.float32)
    return torch.stack(losses).mean()


__all__ = ["IGNORE_INDEX", "block_mapping", "chunked_recovery_loss", "hidden_state_loss"]
