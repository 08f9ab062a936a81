"""Few-shot strategies (issue 7) on real Omniglot characters: episodes never mix train and test
classes, the episode layout, protonet / maml / episodic-finetune learn to classify characters
never seen in training, checkpoints are scored by episodes, and bad settings give clear errors."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from tl_core.config import PrepareConfig, TrainConfig
from tl_core.data import prepare
from tl_core.data.batches import Episodes, split_episode
from tl_core.errors import UserError
from tl_core.evaluate import evaluate_checkpoint
from tl_core.strategies.fewshot import (
    evaluation_episodes,
    few_shot_accuracy,
    fit_episode_heads,
    prototype_logits,
)
from tl_core.train import train


@pytest.fixture(scope="module")
def omniglot(module_workdir, shared_data):
    """Omniglot background-small-1 at 28 px, whole characters held out: 95 train, 41 test."""
    zip_path = shared_data / "omniglot-small1" / "images_background_small1.zip"
    data, _ = prepare(PrepareConfig(uri=f"omniglot:{zip_path}", image_size=28, test_split="classes"))
    return data


def quick(data, **options) -> TrainConfig:
    """A short few-shot run: every train image, no per-epoch evaluation, 5-way 1-shot episodes."""
    return TrainConfig(**{"data": data.path, "shots": None, "eval_every": 0, "checkpoint_every": 0,
                          "eval_episodes": 100, **options})


@pytest.fixture(scope="module")
def protonet(omniglot):
    return train(quick(omniglot, strategy="protonet", epochs=2))


def test_class_split_episodes_never_mix_train_and_test_classes(omniglot):
    train_x, train_y = omniglot.split("train")
    test_x, test_y = omniglot.split("test")
    train_classes, test_classes = set(np.unique(train_y)), set(np.unique(test_y))
    assert len(train_classes) == 95 and len(test_classes) == 41
    assert not train_classes & test_classes
    train_images = {hashlib.sha1(img.tobytes()).hexdigest() for img in train_x}
    cfg = quick(omniglot, ways=20, episode_shots=5, episode_queries=5, eval_episodes=30)
    # Episodes over image indices: each position of a batch says which image it is.
    for name, ys, classes in (("train", train_y, train_classes), ("test", test_y, test_classes)):
        episodes = Episodes(torch.arange(len(ys)), torch.from_numpy(ys), 20, 5, 5, 30, seed=0)
        if name == "test":
            episodes = evaluation_episodes(cfg, torch.arange(len(ys)), torch.from_numpy(ys))
        for idx, _ in episodes:
            assert set(ys[idx.numpy()]) <= classes
            if name == "test":  # no image of a test episode is an image of the train split
                assert not {hashlib.sha1(test_x[i].tobytes()).hexdigest() for i in idx.numpy()} & train_images


def test_episode_layout_and_labels(omniglot):
    _, ys = omniglot.split("test")
    ways, shots, queries = 5, 3, 4
    episodes = Episodes(torch.arange(len(ys)), torch.from_numpy(ys), ways, shots, queries, episodes=20, seed=1)
    seen_classes = set()
    for idx, labels in episodes:
        assert len(idx) == ways * (shots + queries) == len(set(idx.tolist()))  # all different images
        expected = [w for w in range(ways) for _ in range(shots)] + [w for w in range(ways) for _ in range(queries)]
        assert labels.tolist() == expected  # support of ways 0..N-1, then their queries
        support, support_y, query, query_y = split_episode(idx, labels, ways, shots)
        dataset_class = {}
        for i, way in zip(torch.cat([support, query]).tolist(), torch.cat([support_y, query_y]).tolist()):
            dataset_class.setdefault(way, set()).add(int(ys[i]))
        assert all(len(c) == 1 for c in dataset_class.values())  # one dataset class per way
        assert len(set.union(*dataset_class.values())) == ways  # and a different one for each way
        seen_classes |= set.union(*dataset_class.values())
    assert len(seen_classes) > ways  # episodes vary their classes
    # The same seed and epoch give the same episodes; another epoch other ones.
    again = Episodes(torch.arange(len(ys)), torch.from_numpy(ys), ways, shots, queries, episodes=20, seed=1)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(episodes, again))
    again.set_epoch(1)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(episodes, again))


def test_prototype_logits_are_negative_squared_distances_to_class_means():
    torch.manual_seed(0)
    support, query = torch.randn(6, 4), torch.randn(3, 4)
    support_y = torch.tensor([0, 0, 1, 1, 2, 2])
    prototypes = torch.stack([support[2 * c : 2 * c + 2].mean(0) for c in range(3)])
    expected = -torch.cdist(query, prototypes) ** 2
    assert torch.allclose(prototype_logits(support, support_y, query, 3), expected, atol=1e-5)


def test_episode_heads_separate_separable_features():
    torch.manual_seed(0)
    centres = torch.randn(2, 3, 8) * 3  # 2 episodes, 3 ways, 8 features
    support_y = torch.tensor([0, 1, 2]).repeat(2, 1)
    support = centres + 0.1 * torch.randn(2, 3, 8)
    query = centres.repeat_interleave(4, dim=1) + 0.1 * torch.randn(2, 12, 8)
    logits = fit_episode_heads(support, support_y, query, ways=3, steps=100, lr=0.05, weight_decay=0.0)
    assert torch.equal(logits.argmax(-1), torch.tensor([0, 1, 2]).repeat_interleave(4).repeat(2, 1))


def test_protonet_learns_held_out_characters_and_checkpoint_scores_episodes(omniglot, protonet):
    accuracy = protonet.checkpoint["metrics"]["test_accuracy"]
    assert accuracy > 0.6, accuracy  # 5-way 1-shot on 41 characters never trained on: chance is 0.2
    # evaluate_checkpoint scores the checkpoint as its strategy does: the same episodes.
    ev = evaluate_checkpoint(protonet.checkpoint_uri, omniglot.path)
    assert ev.classes == [f"way {i}" for i in range(5)]
    assert ev.metrics["n"] == 100 * 5 * 5  # episodes x ways x queries
    assert ev.metrics["accuracy"] == pytest.approx(accuracy, abs=1e-6)
    mean, ci95 = few_shot_accuracy(protonet.checkpoint, None, omniglot)
    assert mean == pytest.approx(accuracy, abs=1e-6) and 0 < ci95 < 0.1
    # More shots, same model: better prototypes.
    five_shot, _ = few_shot_accuracy(protonet.checkpoint_uri, None, omniglot, shots=5)
    assert five_shot > mean


def test_maml_learns_held_out_characters(omniglot):
    # A short second-order run: 60 episodes, one inner step.
    result = train(quick(omniglot, strategy="maml", epochs=1, episodes_per_epoch=60, inner_steps=1))
    accuracy = result.checkpoint["metrics"]["test_accuracy"]
    assert accuracy > 0.35, accuracy  # chance 0.2
    assert result.checkpoint["model_spec"]["num_classes"] == 5  # the head has `ways` outputs
    with pytest.raises(UserError, match="trained for 5-way episodes.*--ways 20"):
        few_shot_accuracy(result.checkpoint, None, omniglot, ways=20)


def test_episodic_finetune_fits_a_head_per_episode(omniglot):
    result = train(quick(omniglot, strategy="episodic-finetune", epochs=3))
    assert result.checkpoint["model_spec"]["num_classes"] == 136  # trained as a plain classifier
    accuracy = result.checkpoint["metrics"]["test_accuracy"]
    assert accuracy > 0.5, accuracy  # chance 0.2


def test_too_many_ways_is_a_clear_error(omniglot, protonet):
    with pytest.raises(UserError, match="96-way.*lower --ways"):  # 95 train characters
        train(quick(omniglot, strategy="protonet", ways=96))
    with pytest.raises(UserError, match="42-way.*have only 41: lower --ways"):  # 41 test characters
        few_shot_accuracy(protonet.checkpoint, None, omniglot, ways=42)


def test_maml_on_several_workers_is_a_clear_error(omniglot):
    from tl_core.strategies import create_strategy

    x, y = omniglot.split("train")
    strategy = create_strategy(quick(omniglot, strategy="maml"))
    with pytest.raises(UserError, match="maml trains in one worker: use --workers 1"):
        strategy.batches(torch.from_numpy(x), torch.from_numpy(y), 64, rank=0, world_size=2)
