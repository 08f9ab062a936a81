"""`linear-probe` (feature extraction): a frozen pretrained backbone and a new linear head.

The backbone never changes, so every image goes through it once: the features of the training
images, and of every split it is evaluated on (validation, test, `tl evaluate`), are computed
once and cached on disk, keyed by a hash of the backbone's weights and the images' identity
(their bytes, or for streamed sets the dataset's content hash and the rows taken). A run whose
features are cached never runs the backbone.

The head on the cached features is a convex problem: by default (`--head-solver optimum`) it is
solved to its optimum, L2-regularised logistic regression with C chosen by k-fold
cross-validation on the labels (strategies/logistic.py), and the loop trains no epochs. With
`--head-init descriptions` (or `source`) the penalty pulls towards the zero-shot head of the class
descriptions (or the backbone's own head) instead of towards zero; a descriptions file's sentences
make their zero-shot head itself the default, which a C replaces only where the held-out labels
show it better. `--head-solver epochs` trains the head by `--optimizer` as any model.

Features are computed, written and read a chunk at a time (one file per chunk, a `done` marker
last), so a split larger than memory never is in memory as images. A new backbone or new data
gives a new key, so a stale cache is never read.
"""

from __future__ import annotations

import hashlib
import io
import weakref
from typing import Iterable

import torch
from torch import nn

from tl_core import storage
from tl_core.config import workdir
from tl_core.models import Classifier
from tl_core.strategies._registry import register_strategy
from tl_core.strategies.base import Strategy
from tl_core.strategies.logistic import Solved, choose_and_fit

FEATURE_BATCH = 512


@torch.no_grad()
def extract_features(model: Classifier, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    return torch.cat([model.features(x[i : i + FEATURE_BATCH]) for i in range(0, len(x), FEATURE_BATCH)])


_weights_keys: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()


def weights_key(module: nn.Module) -> str:
    """sha256 of a module's state (its tensors' bytes, and anything else it saves, such as a
    text model's tokenizer): the identity of a frozen backbone. Hashed once per module object
    (0.2 s for a 22 M parameter encoder); a frozen backbone does not change after."""
    if module not in _weights_keys:
        digest = hashlib.sha256()
        for name, value in module.state_dict().items():
            digest.update(name.encode())
            if isinstance(value, torch.Tensor):
                digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
            else:
                digest.update(repr(value).encode())
        _weights_keys[module] = digest.hexdigest()
    return _weights_keys[module]


def cached_features(model: Classifier, images_key: str, chunks: Iterable[torch.Tensor]) -> tuple[torch.Tensor, bool]:
    """The features of the images that `chunks` yield (normalised), from the cache or computed
    and cached chunk by chunk; and whether they came from the cache."""
    key = storage.sha256_bytes(weights_key(model.backbone).encode() + images_key.encode())
    folder = storage.join(workdir(), "cache", "features", key[:32])
    done = storage.join(folder, "done")
    if storage.exists(done):
        parts = int(storage.read_bytes(done))
        return torch.cat([torch.load(io.BytesIO(storage.read_bytes(storage.join(folder, f"{i:05d}.pt"))),
                                     weights_only=True) for i in range(parts)]), True
    features = []
    for i, x in enumerate(chunks):
        features.append(extract_features(model, x).cpu())
        buf = io.BytesIO()
        torch.save(features[-1], buf)
        storage.write_bytes(storage.join(folder, f"{i:05d}.pt"), buf.getvalue())
    storage.write_bytes(done, str(len(features)).encode())  # last: a folder with `done` is complete
    return torch.cat(features), False


def images_key(x: torch.Tensor) -> str:
    return storage.sha256_bytes(x.contiguous().numpy().tobytes())


@register_strategy
class LinearProbe(Strategy):
    name = "linear-probe"
    trains_on_images = False
    streams = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.cache_hit: bool | None = None
        self.solved: Solved | None = None

    def build_model(self, num_classes, shape, backbone):
        model, spec = super().build_model(num_classes, shape, backbone)
        model.backbone.requires_grad_(False)
        return model, spec

    def trainable(self, model: Classifier) -> nn.Module:
        return model.head

    def train_set(self, model: Classifier, x: torch.Tensor, y: torch.Tensor, unlabeled=None):
        chunks = (x[i : i + FEATURE_BATCH * 8] for i in range(0, len(x), FEATURE_BATCH * 8))
        features, self.cache_hit = cached_features(model, images_key(x), chunks)
        self.solve(model, features, y)
        return features, y

    def stream_set(self, model: Classifier, rows, normalise):
        features, self.cache_hit = self.rows_features(model, rows, normalise)
        y = torch.from_numpy(rows.labels())
        self.solve(model, features, y)
        return features, y

    def test_input(self, model: Classifier, rows, normalise):
        # The backbone never changes, so the test images' features are cached like the training
        # images' and each evaluation scores the head alone: photos are not decoded and run
        # through the network again at every evaluation, nor for every seed.
        features, _ = self.rows_features(model, rows, normalise)
        return model.head, [(features, torch.from_numpy(rows.labels()))]

    def rows_features(self, model: Classifier, rows, normalise) -> tuple[torch.Tensor, bool]:
        chunks = (normalise(x) for x, _ in rows.chunks())
        identity = f"{rows.data.hash}/{rows.split}/{storage.sha256_bytes(rows.indices.tobytes()) if rows.indices is not None else 'all'}"
        return cached_features(model, storage.sha256_bytes(identity.encode()), chunks)

    def solve(self, model: Classifier, features: torch.Tensor, y: torch.Tensor) -> None:
        """With --head-solver optimum: the head solved on the features, towards the head it started
        as (`head_start`: the descriptions' or the source's), else towards zero. A start guessed from
        text's class names alone pulls only where the labels show it helps (logistic.py): AG News's
        four names cost the probe 3 points at 8 shots (bench/probe_vs_sklearn.md)."""
        if self.cfg.head_solver != "optimum" or not len(y):
            return
        # A descriptions file's head is zero-shot, which the labels must show they improve on (the
        # probe's trivial equivalent: at 8 shots on SST-2 the best of the Cs lost 2 points to it)
        self.solved = choose_and_fit(features, y, model.head.out_features, self.cfg.head_c, self.head_start,
                                     seed=self.cfg.seed, prior_optional=self.head_start_guessed,
                                     prior_default=self.head_start_described)
        model.head.weight.data.copy_(self.solved.weight)
        model.head.bias.data.copy_(self.solved.bias)

    def epochs(self) -> int:
        return 0 if self.solved is not None else self.cfg.epochs

    def run_metrics(self) -> dict:
        if self.solved is None:
            return {}
        return {"head_c": self.solved.C, "head_cv_folds": float(self.solved.folds),
                **({"head_cv_accuracy": self.solved.cv_accuracy} if self.solved.cv_accuracy is not None else {}),
                **({"head_towards_start": float(self.solved.anchored)} if self.head_start is not None else {})}

    # A checkpoint evaluated (tl evaluate, and each run's own evaluation after training) scores the
    # head on the split's features too, each chunk of images embedded once and cached like the
    # training features. `model` is the whole classifier there; the head alone where the test
    # split's features came from `test_input`.
    @classmethod
    def set_input(cls, model: nn.Module, x: torch.Tensor, device: torch.device) -> torch.Tensor:
        if not isinstance(model, Classifier):
            return x  # features already
        return cached_features(model, images_key(x), [x.to(device)])[0]

    @classmethod
    def predict(cls, model, cfg, x, y, classes, device):
        head = model.head if isinstance(model, Classifier) else model
        with torch.no_grad():
            return head.to(device)(x.to(device)).cpu(), y, classes
