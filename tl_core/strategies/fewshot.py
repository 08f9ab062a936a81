"""Few-shot learning on classes never seen in training: `protonet`, `maml`, `episodic-finetune`.

Data: a dataset prepared with `tl prepare ... --test-split classes`, so the train split holds
some classes and the test split the others. Training sees only the train classes; evaluation
draws N-way K-shot episodes (`tl_core.data.batches.Episodes`) from the test classes: each
episode gives K labelled "support" images of N new classes and asks for the class of Q "query"
images of each. An accuracy is the mean over `eval_episodes` episodes, fixed by the seed, so
every method and every call is scored on the same episodes.

- `protonet` (Snell et al. 2017, "Prototypical Networks for Few-shot Learning"): trains on
  episodes of the train classes. A class's prototype is the mean embedding (backbone features)
  of its support images; a query's logits are its negative squared euclidean distances to the
  prototypes; the loss is cross-entropy on the queries. Nothing is fitted at test time.
- `maml` (Finn et al. 2017, "Model-Agnostic Meta-Learning"): learns an initialisation from
  which `inner_steps` SGD steps (at `inner_lr`) on an episode's support set give a good
  classifier of its queries. The outer loss is the query loss after those steps,
  differentiated through them (`first_order` drops the second-order terms: FOMAML). The head
  has `ways` outputs (episode labels 0..N-1), so a model is trained for one N: scoring it at
  another N is an error that says to train one with that `--ways`. Batch norm uses the
  batch's statistics, in training and at test (transductive, as the paper's code): the running
  averages are never used, because they average over networks that were each adapted
  differently. We keep small_cnn's batch norm for it: with group norm instead, 300 training
  episodes (5-way 1-shot, one inner step) reached 37 % on held-out Omniglot characters, with
  batch norm 71 %.
- `episodic-finetune` (the fine-tuned baseline of Chen et al. 2019, "A Closer Look at
  Few-shot Classification"): ordinary supervised training (cross-entropy, plain mini-batches)
  on the train classes; at test time the backbone is frozen and each episode fits a new
  linear head on its support features, which then classifies the queries.

`fit` scores the model on the test episodes after training (and every `eval_every` epochs,
on the test split when there is no validation split): for maml that is an inner loop per
episode, so keep `eval_episodes` small or `eval_every` 0 in long runs.

`few_shot_accuracy` scores a model at any ways/shots: the mean episode accuracy and its 95 %
confidence interval.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from tl_core.checkpoints import load_checkpoint, load_state
from tl_core.config import TrainConfig
from tl_core.data import load_prepared, normalise
from tl_core.data.batches import Episodes, StreamedEpisodes, split_episode
from tl_core.errors import UserError
from tl_core.models import Classifier, build_from_spec
from tl_core.strategies._registry import STRATEGIES, register_strategy
from tl_core.strategies.base import Strategy, predict_chunks, unwrap
from tl_core.strategies.linear_probe import extract_features

# The epoch whose episodes evaluation uses. Training episodes come from the train split, so
# sharing an epoch number with them would not matter; a fixed number keeps every evaluation
# (each method, each call, during and after training) on the very same test episodes.
EVAL_EPOCH = 1_000_003


def evaluation_episodes(cfg, x: torch.Tensor, y: torch.Tensor) -> Episodes:
    """The fixed test episodes of `cfg` drawn from (x, y): x may be images or their features."""
    episodes = Episodes(x, y, cfg.ways, cfg.episode_shots, cfg.episode_queries, cfg.eval_episodes, cfg.seed)
    episodes.set_epoch(EVAL_EPOCH)
    return episodes


def score_episodes(cfg, x: torch.Tensor, y: torch.Tensor, episode_logits) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """`predict` for the episodic strategies: query logits of every test episode, concatenated,
    against the episode labels 0..N-1 ("way 0".."way N-1")."""
    all_logits, all_labels = [], []
    for batch, labels in evaluation_episodes(cfg, x, y):
        support, support_y, query, query_y = split_episode(batch, labels, cfg.ways, cfg.episode_shots)
        all_logits.append(episode_logits(support, support_y, query).detach().float().cpu())
        all_labels.append(query_y)
    return torch.cat(all_logits), torch.cat(all_labels), [f"way {i}" for i in range(cfg.ways)]


def prototype_logits(support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor, ways: int) -> torch.Tensor:
    """Negative squared euclidean distances of the query embeddings to the class prototypes
    (the mean support embedding of each class)."""
    one_hot = F.one_hot(support_y, ways).to(support.dtype)  # (N*K, N)
    prototypes = one_hot.T @ support / one_hot.sum(0).unsqueeze(1)  # (N, D)
    return -((query.unsqueeze(1) - prototypes.unsqueeze(0)) ** 2).sum(-1)


class FewShotStrategy(Strategy):
    """What the three share: random init unless --backbone, and a model that is scored on
    episodes of unseen classes, not as a classifier of the dataset's own classes."""

    classifies_dataset_classes = False

    def __init__(self, cfg):
        super().__init__(cfg)
        self.needs_backbone = cfg.backbone is not None


class EpisodicStrategy(FewShotStrategy):
    """protonet and maml: training batches are episodes of the train classes too. A train split
    larger than memory (or photos) streams: each episode's rows are read from the shards a block
    of episodes at a time, at most `--in-memory-mb` of images held."""

    streams = True
    streams_shares = False

    def batches(self, x, y, batch_size, rank, world_size):
        return Episodes(x, y, self.cfg.ways, self.cfg.episode_shots, self.cfg.episode_queries,
                        self.cfg.episodes_per_epoch, self.cfg.seed, rank, world_size)

    def stream_batches(self, rows, normalise, batch_size, session):
        cfg = self.cfg
        block_rows = cfg.in_memory_mb * 2**20 // (4 * math.prod(rows.data.shape))
        return StreamedEpisodes(rows, normalise, cfg.ways, cfg.episode_shots, cfg.episode_queries, cfg.episodes_per_epoch,
                                cfg.seed, session.rank, session.world_size, augment=cfg.augment > 0,
                                block_rows=block_rows)


@register_strategy
class ProtoNet(EpisodicStrategy):
    name = "protonet"

    def trainable(self, model: Classifier) -> nn.Module:
        # Only the backbone trains (the head is never used): DDP then sees no unused parameters.
        return model.backbone

    def loss(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        embeddings = net(x)  # one forward pass over support and query together
        support, support_y, query, query_y = split_episode(embeddings, y, self.cfg.ways, self.cfg.episode_shots)
        return F.cross_entropy(prototype_logits(support, support_y, query, self.cfg.ways), query_y)

    @classmethod
    def set_input(cls, model, x, device):
        # Eval-mode features do not depend on the batch: every test image is embedded once, a
        # chunk at a time, and the episodes are drawn from the embeddings.
        return extract_features(model.to(device), x.to(device)).cpu()

    @classmethod
    def predict(cls, model, cfg, x, y, classes, device):
        """`x`: the test images' features (`set_input`)."""
        return score_episodes(cfg, x, y, lambda s, sy, q: prototype_logits(s, sy, q, cfg.ways))


@register_strategy
class EpisodicFinetune(FewShotStrategy):
    """Trains as `scratch` does (plain mini-batches, cross-entropy on the train classes)."""

    name = "episodic-finetune"
    streams = True  # plain mini-batches: streamed as scratch's are
    head_steps = 100  # Adam steps of each episode's new linear head
    head_lr = 0.01
    head_weight_decay = 1e-3

    set_input = ProtoNet.set_input  # the test images' features, a chunk at a time

    @classmethod
    def predict(cls, model, cfg, x, y, classes, device):
        """`x`: the test images' features (`set_input`)."""
        support, support_y, query, query_y = [], [], [], []
        for batch, labels in evaluation_episodes(cfg, x, y):
            parts = split_episode(batch, labels, cfg.ways, cfg.episode_shots)
            for collected, part in zip((support, support_y, query, query_y), parts):
                collected.append(part)
        logits = fit_episode_heads(torch.stack(support), torch.stack(support_y), torch.stack(query), cfg.ways,
                                   cls.head_steps, cls.head_lr, cls.head_weight_decay)
        return logits.flatten(0, 1), torch.cat(query_y), [f"way {i}" for i in range(cfg.ways)]


@torch.enable_grad()
def fit_episode_heads(support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor, ways: int, steps: int,
                      lr: float, weight_decay: float) -> torch.Tensor:
    """One new linear head per episode on frozen features, all episodes at once (a batched
    logistic regression: support (E, N*K, D), labels (E, N*K), query (E, M, D)); returns the
    query logits (E, M, N)."""
    episodes, _, dim = support.shape
    weight = torch.zeros(episodes, dim, ways, requires_grad=True)
    bias = torch.zeros(episodes, 1, ways, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        optimizer.zero_grad()
        logits = support @ weight + bias
        # Summed over episodes: each head gets the gradient of its own mean loss.
        loss = F.cross_entropy(logits.flatten(0, 1), support_y.flatten(), reduction="sum") / support_y.shape[1]
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return query @ weight + bias


@register_strategy
class MAML(EpisodicStrategy):
    name = "maml"

    def build_model(self, num_classes, shape, backbone):
        # The head classifies an episode's N classes (labels 0..N-1), not the dataset's classes.
        return super().build_model(self.cfg.ways, shape, backbone)

    def batches(self, x, y, batch_size, rank, world_size):
        one_worker(world_size)
        return super().batches(x, y, batch_size, rank, world_size)

    def stream_batches(self, rows, normalise, batch_size, session):
        one_worker(session.world_size)
        return super().stream_batches(rows, normalise, batch_size, session)

    def loss(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        model = unwrap(net)
        support, support_y, query, query_y = split_episode(x, y, self.cfg.ways, self.cfg.episode_shots)
        params = dict(model.named_parameters())
        adapted = adapt(model, params, support, support_y, self.cfg.inner_steps, self.cfg.inner_lr,
                        create_graph=not self.cfg.first_order)
        return F.cross_entropy(functional_call(model, adapted, (query,)), query_y)

    @classmethod
    def predict(cls, model, cfg, x, y, classes, device):
        check_maml_ways(model, cfg.ways)
        model = model.to(device)
        was_training = model.training
        model.train()  # batch statistics, as in training (see the module docstring)
        # Copies of the buffers take batch norm's running-average updates, so scoring leaves
        # the model exactly as it was.
        buffers = {name: b.clone() for name, b in model.named_buffers()}
        start = {name: p.detach() for name, p in model.named_parameters()}

        def episode_logits(support, support_y, query):
            support, support_y, query = support.to(device), support_y.to(device), query.to(device)
            params = {name: p.clone().requires_grad_() for name, p in start.items()}
            with torch.enable_grad():
                adapted = adapt(model, params, support, support_y, cfg.inner_steps, cfg.inner_lr, create_graph=False,
                                buffers=buffers)
            with torch.no_grad():
                return functional_call(model, ({k: v.detach() for k, v in adapted.items()}, buffers), (query,))

        try:
            return score_episodes(cfg, x, y, episode_logits)
        finally:
            model.train(was_training)


def one_worker(world_size: int) -> None:
    if world_size > 1:
        # The inner loop calls the model's functional form, outside DDP's forward, so DDP
        # would not synchronise the meta-gradients.
        raise UserError("strategy maml trains in one worker: use --workers 1")


def adapt(model: nn.Module, params: dict, support: torch.Tensor, support_y: torch.Tensor, steps: int, lr: float,
          create_graph: bool, buffers: dict | None = None) -> dict:
    """MAML's inner loop: `steps` plain SGD steps on the support loss, from `params`; returns the
    adapted parameters as a function of the starting ones (with second-order terms if
    `create_graph`, else first-order: the gradients are treated as constants)."""
    for _ in range(steps):
        state = (params, buffers) if buffers is not None else params
        loss = F.cross_entropy(functional_call(model, state, (support,)), support_y)
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)
        params = {name: p - lr * g for (name, p), g in zip(params.items(), grads)}
    return params


def check_maml_ways(model: Classifier, ways: int) -> None:
    trained = model.head.out_features
    if trained != ways:
        raise UserError(f"this maml model was trained for {trained}-way episodes (its head has {trained} outputs), not "
                        f"{ways}-way: train one with --ways {ways}, or score it at --ways {trained}")


def few_shot_accuracy(ckpt_or_model, cfg, data, ways: int | None = None, shots: int | None = None,
                      episodes: int | None = None, queries: int | None = None, split: str = "test"
                      ) -> tuple[float, float]:
    """Mean episode accuracy of a few-shot model on `data`'s `split` and its 95 % confidence
    interval (1.96 standard errors over episodes), at any ways/shots/episodes (None: the config's).

    `ckpt_or_model`: a checkpoint (dict or URI; `cfg` may then be None: the checkpoint's) or a
    model (with its `cfg`). `data`: a prepared dataset or its path.
    """
    data = load_prepared(data) if isinstance(data, str) else data
    x, y = data.split(split)
    if isinstance(ckpt_or_model, nn.Module):
        model, images = ckpt_or_model, data.normalise(x)
    else:
        ckpt = load_checkpoint(ckpt_or_model) if isinstance(ckpt_or_model, str) else ckpt_or_model
        model = build_from_spec(ckpt["model_spec"])
        load_state(model, ckpt["model"], "the checkpoint")
        cfg = cfg or TrainConfig(**ckpt["config"])
        images = normalise(x, ckpt["data"])  # as the model was trained
    update = {k: v for k, v in {"ways": ways, "episode_shots": shots, "eval_episodes": episodes,
                                "episode_queries": queries}.items() if v is not None}
    cfg = cfg.model_copy(update=update)
    logits, labels, _ = predict_chunks(STRATEGIES[cfg.strategy], model, cfg, [(images, torch.from_numpy(y))],
                                       data.classes, torch.device("cpu"))
    per_episode = (logits.argmax(1) == labels).float().view(cfg.eval_episodes, -1).mean(1)
    ci95 = 1.96 * per_episode.std().item() / math.sqrt(cfg.eval_episodes) if cfg.eval_episodes > 1 else float("nan")
    return per_episode.mean().item(), ci95
