"""`simclr`: contrastive self-supervised pretraining (Chen et al. 2020, "A Simple Framework for
Contrastive Learning of Visual Representations").

The backbone learns from images without labels: every training image gives two random views
(crop, small rotation, shift, contrast and brightness jitter, made batch-wise on tensors), the
backbone and a small projection MLP map each view to an embedding z, and the NT-Xent loss

    l(i, j) = -log( exp(sim(z_i, z_j) / tau) / sum_{k != i} exp(sim(z_i, z_k) / tau) )

(cosine similarity, temperature tau = `contrastive_temperature`) averaged over the 2B views of a
batch of B images pulls each view towards its pair and away from the other 2B - 2 views. The
projection head (`projection_dim` outputs) only serves the loss: SimCLR transfers the features
before it, and the head is kept in the checkpoint's strategy state.

The images: every image of the target's train pool (labelled or not: `uses_unlabeled`), plus
every train image of `--source-data` when given (prepared at the same shape). A pool or a source
larger than memory streams; a streamed source is drawn beside each batch in proportion to its
size, at most one source image per target image (the step's batch stays bounded: an epoch then
sees as many source images as target ones). The backbone starts from random init, or from
`--backbone` when given.

So that the checkpoint is a usable classifier (and `fit`'s test accuracy means something), the
model's own linear head trains at the same time on the DETACHED backbone features of the
labelled target shots in each batch ("online linear evaluation"): it never shapes the features.
With `--shots 0` no image has a label and that head stays at its random init: the checkpoint's
accuracy is then chance, and its backbone is what to use.

Transfer the backbone as any other: `tl transfer --strategy linear-probe` (or `finetune`)
`--backbone <this checkpoint>`.

The loop's own shift augmentation (`--augment`) still applies to each image before its two views
are made; the views do not need it, so leave `--augment 0`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tl_core.data.prepare import UNLABELED
from tl_core.errors import UserError
from tl_core.models import Classifier
from tl_core.strategies._registry import register_strategy
from tl_core.strategies.base import SourcePool, Strategy, unwrap

# View augmentation ranges, fit for small greyscale digits (no colour jitter, no flips: a
# flipped 2 or 5 is not the same digit).
CROP_AREA = (0.5, 1.0)  # share of the image a random crop keeps
CROP_ASPECT = (3 / 4, 4 / 3)
MAX_ROTATION_DEG = 15.0
CONTRAST = (0.6, 1.4)  # multiplies the deviation from each image's mean
BRIGHTNESS = 0.4  # added, in units of the dataset's std (images are normalised)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent over the 2B embeddings of B pairs: row i of z1 and row i of z2 are positives."""
    b = len(z1)
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))  # a view is never its own negative
    positives = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    return F.cross_entropy(sim, positives)


def random_views(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One random view of each image: a random resized crop with a small rotation (one affine
    warp per image through `affine_grid` + `grid_sample`), then contrast and brightness jitter."""
    n = len(x)

    def uniform(low, high, size=n):
        return low + (high - low) * torch.rand(size, generator=generator)

    area = uniform(*CROP_AREA)
    aspect = torch.exp(uniform(math.log(CROP_ASPECT[0]), math.log(CROP_ASPECT[1])))
    width = torch.sqrt(area * aspect).clamp(max=1.0)  # of the crop, as a share of the image
    height = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = uniform(-1, 1) * (1 - width)  # the crop's centre stays inside the image
    cy = uniform(-1, 1) * (1 - height)
    angle = uniform(-1, 1) * math.radians(MAX_ROTATION_DEG)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # theta maps output coordinates in [-1, 1] to input coordinates: scale to the crop, rotate, move.
    theta = torch.stack([torch.stack([width * cos, -height * sin, cx], 1),
                         torch.stack([width * sin, height * cos, cy], 1)], 1).to(x.device, x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # "border": the pixels from outside the image copy its edge, the background of a digit.
    views = F.grid_sample(x, grid, padding_mode="border", align_corners=False)

    contrast = uniform(*CONTRAST).view(n, 1, 1, 1).to(x.device, x.dtype)
    brightness = uniform(-BRIGHTNESS, BRIGHTNESS).view(n, 1, 1, 1).to(x.device, x.dtype)
    mean = views.mean(dim=(1, 2, 3), keepdim=True)
    return (views - mean) * contrast + mean + brightness


class SimCLRNet(nn.Module):
    """The classifier (backbone + online linear head) and the projection head, trained together."""

    def __init__(self, model: Classifier, projection_dim: int):
        super().__init__()
        self.model = model
        d = model.feature_dim
        self.projection = nn.Sequential(nn.Linear(d, d), nn.ReLU(inplace=True), nn.Linear(d, projection_dim))

    def forward(self, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Projections of the views, and the online head's logits on their detached features."""
        features = self.model.backbone(views)
        return self.projection(features), self.model.head(features.detach())


@register_strategy
class SimCLR(Strategy):
    name = "simclr"
    uses_unlabeled = True
    streams = True  # the target's pool streams with its unlabeled rows labelled UNLABELED

    def __init__(self, cfg):
        super().__init__(cfg)
        self.needs_backbone = cfg.backbone is not None  # random init unless --backbone
        self.source = SourcePool(cfg, self.name) if cfg.source_data else None
        self.source_share = 0.0  # source images drawn beside each target image, <= 1 (a streamed source)
        self.generator = torch.Generator().manual_seed(cfg.seed)

    def build_model(self, num_classes, shape, backbone):
        if self.source is not None and list(self.source.data.shape) != list(shape):
            raise UserError(f"the source {self.cfg.source_data} has images of shape {list(self.source.data.shape)}, "
                            f"the target {list(shape)}: prepare both with the same --image-size and --channels")
        return super().build_model(num_classes, shape, backbone)

    def trainable(self, model: Classifier) -> nn.Module:
        return SimCLRNet(model, self.cfg.projection_dim)

    def train_set(self, model, x, y, unlabeled):
        """The labelled shots (their labels train the online head), the rest of the target's train
        pool and, when it is held in memory, the source's train images (label -1: contrastive loss only)."""
        parts, labels = [x], [y]
        if unlabeled is not None and len(unlabeled):
            parts.append(unlabeled)
            labels.append(torch.full((len(unlabeled),), UNLABELED, dtype=y.dtype))
        if self.source is not None and not self.source.streamed:
            parts.append(self.source.x)
            labels.append(torch.full((len(self.source),), UNLABELED, dtype=y.dtype))
        elif self.source is not None:
            self.source_share = self.share_of_source(sum(len(p) for p in parts))
        return torch.cat(parts), torch.cat(labels)

    def stream_set(self, model, rows, normalise):
        """The target's pool streams; the source is drawn beside each batch (`share_of_source`)."""
        if self.source is not None:
            self.source_share = self.share_of_source(len(rows))
        return None

    def share_of_source(self, target_images: int) -> float:
        """Source images drawn beside each target image of a batch: in proportion to the sizes, so an
        epoch sees each about once, but at most one, so a step's batch at most doubles."""
        return min(1.0, len(self.source) / max(1, target_images))

    def loss(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.source_share:
            xs, _ = self.source.draw(max(1, round(len(x) * self.source_share)), self.generator, x.device)
            x, y = torch.cat([x, xs]), torch.cat([y, torch.full((len(xs),), UNLABELED, dtype=y.dtype, device=y.device)])
        # Both views go through one forward pass (one batch-norm batch, and DDP sees one call).
        views = torch.cat([random_views(x, self.generator), random_views(x, self.generator)])
        z, logits = net(views)
        contrastive = nt_xent(z[: len(x)], z[len(x) :], self.cfg.contrastive_temperature)
        # The online head learns from both views of the labelled shots; `* 0.0` keeps it in the
        # graph when the batch has no label (DDP expects its gradients).
        labels = torch.cat([y, y])
        labelled = labels >= 0
        online = F.cross_entropy(logits[labelled], labels[labelled]) if labelled.any() else logits.sum() * 0.0
        return contrastive + online

    def extra_state(self, net: nn.Module) -> dict:
        return {k: v.detach().cpu() for k, v in unwrap(net).projection.state_dict().items()}

    def load_extra_state(self, net: nn.Module, state: dict) -> None:
        if state:
            unwrap(net).projection.load_state_dict(state)
