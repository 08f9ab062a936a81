"""Default training settings per (model, strategy): what `tl run` (and the pipeline, and `auto`)
trains each strategy with when no `recipes:` file says otherwise.

One learning rate, epoch count and batch size suit no two of a 22 M parameter sentence encoder
fine-tuned on 16 sentences, a byte CNN from scratch and a small image CNN. The small CNN's
settings are the shared ones (`tl run`'s flags); a model whose strategies need others lists them
here. The text recipes are the ones measured on SST-2 and AG News (bench/text_transfer.py, never
tuned on a test split; examples/text-sst2.yaml). `linear-probe` needs none: its head is solved.
A `recipes:` entry in a config file overrides these setting by setting.
"""

from __future__ import annotations

# ImageNet's EfficientNet-Lite on 224 px photos, where an epoch of forward and backward passes
# costs seconds a photo batch on 2 cores (bench/imagenet_transfer.md): few epochs. Fine-tuning
# starts from features that already separate the classes (the probe's 90 % at 5 shots), so
# the backbone moves at a tenth of the head's rate; scratch gets the same short budget, on the
# same labels and crops, as the baseline the gain is stated against. Measured on Lite0; Lite1
# and Lite2 are the same network a little deeper and wider, and take the same. Tested at the end
# only (eval_every 0): an epoch of 5 shots is 10 photos, a pass over the test split 153, and
# `tl transfer`'s default of every epoch made its scratch baseline another run than `tl run`'s
# row: 93 s of the command's 108 trained it again (bench/scratch_baseline.md, at 52a2152); the
# end's test accuracy is the same either way.
# augment 0: photos take their own crops and flips, never the digits' pixel shifts, whatever it
# says; with tl run's 1 against tl transfer's 0 the same baseline was two runs in the cache.
PHOTO_RUN = {"epochs": 10, "batch_size": 16, "checkpoint_every": 0, "eval_every": 0, "augment": 0}
EFFICIENTNET_LITE = {
    "scratch": {"lr": 1.0e-3, **PHOTO_RUN},
    "finetune": {"lr": 1.0e-3, "backbone_lr_mult": 0.1, **PHOTO_RUN},
    "distill": {"lr": 1.0e-3, **PHOTO_RUN},
}

RECIPES: dict[str, dict[str, dict]] = {
    # The small image CNN pretrained on another digit set: its features are close to the target's,
    # so fine-tuning moves the backbone at 0.3x the head's rate (MNIST-test -> USPS, seeds 0-2, 30
    # epochs: 92.5 % at 10 shots and 76.5 % at 1 shot, against 91.8 and 68.9 at 1x; 93.1 at 10
    # shots with tl run's 100 epochs; a head warm-up on top gave 92.0 / 68.3). Other settings shared.
    "small_cnn": {
        "finetune": {"backbone_lr_mult": 0.3},
    },
    "minilm-l6": {
        "scratch": {"lr": 1.0e-3, "epochs": 60, "batch_size": 64},  # text_cnn, the scratch stand-in
        # the encoder at lr * backbone_lr_mult; a fine-tuned checkpoint is 270 MB: written at the end only.
        # Tested at the end only too: with no validation split an epoch's evaluation encodes the whole
        # test split again through the changed encoder (2 000 AG News texts: about a minute on 2
        # CPUs): every epoch, SetFit's 40 epochs on AG News's 32 labels ran over 20 minutes; at the end
        # only, 75-84 s (bench/auto.md, agnews-8).
        "finetune": {"lr": 1.0e-3, "backbone_lr_mult": 0.05, "epochs": 20, "batch_size": 8, "checkpoint_every": 0,
                     "eval_every": 0},
        "setfit": {"lr": 1.0e-2, "backbone_lr_mult": 0.002, "epochs": 40, "batch_size": 16, "checkpoint_every": 0,
                   "eval_every": 0},
    },
    **{f"efficientnet-lite{n}": EFFICIENTNET_LITE for n in (0, 1, 2)},
}


def default_recipe(model: str, strategy: str, given: frozenset[str] | set[str] = frozenset()) -> dict:
    """The settings `strategy` trains `model` with by default, over the shared ones ({}: the shared),
    less those in `given`: settings a run was given explicitly win over its recipe."""
    return {k: v for k, v in RECIPES.get(model, {}).get(strategy, {}).items() if k not in given}
