"""One-process training with the pipeline's exact arithmetic: the yardstick for correctness.

Guarantee: for the same model, seed, batches, micro-batch count and optimizer config,
``train_reference`` performs the same floating-point work as the pipeline with compression
off (same micro-batches in the same order, summed loss scaled by ``1/batch``, gradients
accumulated, one optimizer step per mini-batch at the learning rate ``schedule.lr_at`` gives
for that step), so BatchNorm sees the same inputs and the parameters agree to float
tolerance.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .data import Dataset
from .microbatch import epoch_batches, loss_scale, split
from .schedule import apply_lr
from .stage import make_optimizer
from .zoo import ZooModel


def train_reference(
    model: ZooModel,
    data: Dataset,
    *,
    batch_size: int,
    micro_batches: int,
    optimizer: dict[str, Any],
    seed: int,
    epochs: int = 1,
    max_steps: int | None = None,
) -> dict[str, torch.Tensor]:
    net = model.sequential()
    net.train()
    opt = make_optimizer([p for p in net.parameters() if p.requires_grad], optimizer)
    step = 0
    for epoch in range(epochs):
        for idx in epoch_batches(len(data.train_x), batch_size, seed, epoch):
            if max_steps is not None and step >= max_steps:
                return net.state_dict()
            x, y = data.train_x[idx], data.train_y[idx]
            scale = loss_scale(len(idx))
            for a, b in split(len(idx), micro_batches):
                loss = F.cross_entropy(net(x[a:b]), y[a:b], reduction="sum") * scale
                loss.backward()
            apply_lr(opt, optimizer, step)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
    return net.state_dict()


@torch.no_grad()
def accuracy(model: ZooModel, x: torch.Tensor, y: torch.Tensor, batch: int = 512) -> float:
    net = model.sequential()
    was = net.training
    net.eval()
    correct = 0
    for i in range(0, len(x), batch):
        correct += int((net(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
    net.train(was)
    return correct / max(1, len(x))
