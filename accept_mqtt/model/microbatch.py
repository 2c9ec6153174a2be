"""Mini-batches and micro-batches, identical in the pipeline and in the one-process reference.

Guarantees:

* ``epoch_batches(n, batch_size, seed, epoch)`` is a pure function of its arguments: the same
  seed gives the same sample order on every machine and for every bit width.
* ``split(b, m)`` cuts a mini-batch of ``b`` samples into ``min(m, b)`` consecutive
  micro-batches whose sizes differ by at most one (``torch.tensor_split`` semantics).
* ``loss_scale(b)`` is the factor each micro-batch's summed loss is multiplied by, so that
  accumulating the micro-batch gradients gives exactly the gradient of the mini-batch mean.
"""

from __future__ import annotations

import torch


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int,
                  drop_last: bool = False) -> list[torch.Tensor]:
    """Index tensors of the mini-batches of one epoch, shuffled by ``(seed, epoch)``."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    out = list(torch.split(perm, batch_size))
    if drop_last and out and len(out[-1]) < batch_size:
        out.pop()
    return out


def split(batch: int, micro_batches: int) -> list[tuple[int, int]]:
    """``(start, end)`` of each micro-batch of a mini-batch of ``batch`` samples."""
    m = max(1, min(micro_batches, batch))
    bounds = torch.tensor_split(torch.arange(batch), m)
    return [(int(b[0]), int(b[-1]) + 1) for b in bounds if len(b)]


def loss_scale(batch: int) -> float:
    return 1.0 / batch
