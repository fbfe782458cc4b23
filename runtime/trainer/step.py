"""One optimizer step on the Aurora objective: the online trainer and `fit_draft` take
the same step.

Under torch.distributed every rank calls it with its own share of the batch: the
loss is divided by the global batch size and gradients are all-reduced, so every
rank applies the same update and holds the same model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from aurora.runtime.draft import EagleDraftHead
from aurora.runtime.trainer.objective import Objective, TraceExample, aurora_loss


def make_optimizer(head: EagleDraftHead, lr: float, weight_decay: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)


def distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def global_sum(*values: float) -> list[float]:
    """``values`` summed over every rank (themselves without torch.distributed)."""
    if not distributed():
        return list(values)
    total = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(total)
    return total.tolist()


def optimizer_step(
    head: EagleDraftHead,
    optimizer: torch.optim.Optimizer,
    batch: Sequence[TraceExample],
    objective: Objective,
    *,
    lr: float,
    clip: float,
    t2d: Tensor | None = None,
) -> float | None:
    """Accumulate the objective's gradient over ``batch`` (the mean over the global
    batch), clip its norm to ``clip``, and take one step at learning rate ``lr``. Leaves
    the head in eval mode. Returns this rank's mean loss, or None (and no step) when no
    rank had an example."""
    (count,) = global_sum(len(batch))
    if count == 0:
        return None
    t2d = head.target_to_draft() if t2d is None else t2d
    head.train()
    optimizer.zero_grad(set_to_none=False)
    total = 0.0
    for ex in batch:
        parts = aurora_loss(head, ex, objective, t2d=t2d)
        (parts.total / count).backward()
        total += float(parts.total.detach())
    if distributed():
        for p in head.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
    torch.nn.utils.clip_grad_norm_(head.parameters(), clip)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    head.eval()
    return total / max(1, len(batch))
