"""`setfit`: contrastive few-shot fine-tuning of the encoder on pairs (SetFit; Tunstall et al. 2022,
"Efficient Few-Shot Learning Without Prompts").

Eight labelled sentences a class are few examples to train through a 22 M parameter encoder,
but many pairs: 16 sentences make 120. SetFit fine-tunes the encoder on pairs: the cosine
similarity of two examples' embeddings is pushed to 1 when they share a class and to 0 when
they do not (the mean squared error of sentence-transformers' CosineSimilarityLoss), so each
class gathers and the classes move apart. Here every pair within a batch counts, the positive
and the negative pairs weighted equally (SetFit draws as many of each).

The linear head learns beside the encoder, from the same batches, on the embeddings detached
(cross-entropy): it follows the encoder and never pulls it, so the encoder learns from pairs
alone. SetFit fits its head after the encoder, on frozen embeddings; learning both at once
keeps it one loop of the training core (and one DDP model), and the head, at the higher
learning rate, keeps up.

At the end, as SetFit does, the head is fitted anew on the fine-tuned encoder's embeddings of the
labelled examples: logistic regression solved to its optimum (`--head-solver optimum`, the
default; strategies/logistic.py), towards the class descriptions' head with `--head-init
descriptions`. Where the labelled examples stream (photos), the head learnt beside stays.

It is `finetune` with another loss, so its settings apply: `--backbone-lr-mult` (the encoder's
learning rate is lr * mult, the head's lr), `--freeze`, `--head-warmup-epochs`. Any backbone
works, images too: the embeddings are L2-normalised before their similarities are taken.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tl_core.models import Classifier
from tl_core.strategies._registry import register_strategy
from tl_core.strategies.base import unwrap
from tl_core.strategies.finetune import Finetune
from tl_core.strategies.linear_probe import FEATURE_BATCH
from tl_core.strategies.logistic import choose_and_fit


def pair_loss(features: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the cosine similarity of every pair in the batch against 1 (same
    class) or 0 (different classes), the positive and the negative pairs' means averaged."""
    z = F.normalize(features.float(), dim=1)
    similarity = z @ z.T
    same = y[:, None] == y[None, :]
    upper = torch.ones_like(same).triu(diagonal=1)  # each pair once, no example with itself
    errors = (similarity - same.float()) ** 2
    means = [errors[upper & kind].mean() for kind in (same, ~same) if (upper & kind).any()]
    # No pair at all (a batch of one example): zero, but kept in the graph for DDP.
    return torch.stack(means).mean() if means else similarity.sum() * 0.0


class PairNet(nn.Module):
    """The classifier's backbone and head under the names `finetune` expects, with a forward that
    returns the embeddings and the head's logits on them detached."""

    def __init__(self, model: Classifier):
        super().__init__()
        self.backbone, self.head = model.backbone, model.head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.backbone(x)
        return features, self.head(features.detach())


@register_strategy
class SetFit(Finetune):
    name = "setfit"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.labelled: tuple[torch.Tensor, torch.Tensor] | None = None  # in memory: the head is refitted on them

    def trainable(self, model: Classifier) -> nn.Module:
        return PairNet(model)

    def train_set(self, model, x, y, unlabeled=None):
        self.labelled = (x, y)
        return x, y

    def on_epoch_end(self, net: nn.Module, epoch: int) -> None:
        super().on_epoch_end(net, epoch)
        if epoch != self.cfg.epochs - 1 or self.cfg.head_solver != "optimum" or self.labelled is None:
            return
        pair_net = unwrap(net)
        pair_net.eval()
        device = next(pair_net.parameters()).device
        x, y = self.labelled
        with torch.no_grad():
            features = torch.cat([pair_net.backbone(x[i : i + FEATURE_BATCH].to(device)).float().cpu()
                                  for i in range(0, len(x), FEATURE_BATCH)])
        solved = choose_and_fit(features, y, pair_net.head.out_features, self.cfg.head_c, self.head_start,
                                seed=self.cfg.seed, prior_optional=self.head_start_guessed)
        pair_net.head.weight.data.copy_(solved.weight)
        pair_net.head.bias.data.copy_(solved.bias)

    def loss(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        features, logits = net(x)
        return pair_loss(features, y) + F.cross_entropy(logits, y) + self.head_penalty(net)
