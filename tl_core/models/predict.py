"""A model's logits over a batch of images: what evaluation, strategies and the served pyfunc score."""

from __future__ import annotations

import torch


@torch.no_grad()
def predict_logits(model, x: torch.Tensor, device, batch_size: int = 1024) -> torch.Tensor:
    """Logits of the whole model on images, in eval mode, in chunks of `batch_size`, on the CPU.
    (Not `Strategy.predict`, which returns what evaluation scores: logits, labels and class names.)"""
    model.eval()
    return torch.cat([model(x[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)])
