"""Benchmark: photos from the ImageNet-pretrained `packaged:efficientnet-lite0` against scratch (issue 28).

    .venv/bin/python bench/imagenet_transfer.py                       # writes bench/imagenet_transfer.{json,md}
    .venv/bin/python bench/imagenet_transfer.py --data DIR            # any ImageFolder (train/ + val/, or one folder)
    .venv/bin/python bench/imagenet_transfer.py --strategies linear-probe,finetune,scratch --seeds 0,1,2
    .venv/bin/python bench/imagenet_transfer.py --strategies linear-probe,distill --speed-epochs 0 \
        --out bench/imagenet_distill                                 # the distill rows (bench/imagenet_transfer.md)
    .venv/bin/python bench/imagenet_transfer.py --model efficientnet-lite2 --all-seeds 0 \
        --speed-epochs 0 --out bench/imagenet_lite2                  # the larger network (bench/imagenet_transfer.md)

Data: hymenoptera (../shared/data/hymenoptera; its val split is the test split), prepared at
224 px by `tl prepare`. Shots 5, 10 and all a class, seeds 0-2, the same labels for every
strategy of a seed (`sample_shots`). Every run goes through `tl_core.train.train`, the training
core `tl transfer` runs, with the recipe `tl run` gives the model (tl_core/recipes.py):

- linear-probe: frozen backbone, features cached (the first run embeds its photos; the test
  split's are embedded once for all), the linear head solved (L-BFGS, C by cross-validation on
  the labels);
- sklearn-lr: scikit-learn's LogisticRegression (C=1, lbfgs) on the very same cached features:
  the plain recipe, the trivial reference;
- finetune: every layer from the packaged weights, Adam lr 1e-3, the backbone at x0.1,
  RandomResizedCrop + flip, batch 16, 10 epochs;
- scratch: the same network from random init, same labels, crops and budget.
- auto: `--strategy auto` (tl_core/auto.py) on the same labels at 5 and 10 shots: linear-probe,
  finetune and scratch validated on folds of the labels (never the test split), the winner refitted.
- distill (not in the default list: about 5 minutes a run here): the seed's linear-probe as the
  teacher, a student EfficientNet-Lite0 from the packaged weights trained on the labels and on
  the teacher's soft labels of every other training photo (`use_unlabeled`, the way `tl run`
  wires its distill row), with distill's recipe; at 5 and 10 shots (with all labels there is no
  unlabeled photo left).

And the training loop's speed: the seconds an epoch of finetune takes (with all labels: 245
photos, decoded and cropped every epoch) against a plain torchvision-style loop on the same
photos in the same process (ImageFolder-style dataset, DataLoader, RandomResizedCrop + flip,
the same timm network and optimizer): `reference_seconds_per_epoch`.

Seconds are the training core's (`train_seconds`: data, model, training, test evaluation).
TL_WORKDIR (default /tmp/tl-bench-imagenet) keeps prepared data, features and checkpoints: a
rerun reuses identical runs and says so (`reused`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
PHOTOS = HERE.parent.parent / "shared" / "data" / "hymenoptera"
BACKBONE = "packaged:efficientnet-lite0"
SHOTS = [5, 10, None]  # None: all labels
MODEL = BACKBONE.split(":", 1)[1]
GOALS = {5: 0.90, 10: 0.94, None: 0.94}  # the linear-probe goals


def shots_name(shots) -> str:
    return "all" if shots is None else str(shots)


def sklearn_lr(data_path: str, shots, seed: int, model: str = MODEL) -> dict:
    """LogisticRegression on linear-probe's cached features of the same labelled photos."""
    from sklearn.linear_model import LogisticRegression

    from tl_core.checkpoints import load_checkpoint
    from tl_core.config import TrainConfig
    from tl_core.data import load_prepared, sample_shots
    from tl_core.models import INPUT_STATS
    from tl_core.strategies import create_strategy

    started = time.perf_counter()
    backbone = f"packaged:{model}"
    cfg = TrainConfig(data=data_path, strategy="linear-probe", backbone=backbone, shots=shots, seed=seed)
    data = load_prepared(data_path).normalised_as(INPUT_STATS[model])
    probe = create_strategy(cfg)
    network, _ = probe.build_model(len(data.classes), data.shape, load_checkpoint(backbone))
    train_idx, _ = sample_shots(data.labels("train"), shots, seed, data.classes)
    x_train, _ = probe.rows_features(network, data.rows("train", train_idx), data.normalise)  # the cache linear-probe wrote
    x_test, _ = probe.rows_features(network, data.rows("test"), data.normalise)
    fitted = LogisticRegression(C=1.0, max_iter=2000).fit(x_train.numpy(), data.labels("train")[train_idx])
    accuracy = float((fitted.predict(x_test.numpy()) == data.labels("test")).mean())
    return {"accuracy": accuracy, "seconds": time.perf_counter() - started, "reused": False}


def transfer(data_path: str, strategy: str, shots, seed: int, model: str = MODEL, **override) -> dict:
    from tl_core.config import TrainConfig
    from tl_core.train import train

    cfg = TrainConfig(**{"data": data_path, "strategy": strategy, "backbone": f"packaged:{model}", "shots": shots,
                         "seed": seed, "augment": 1, "eval_every": 0, "checkpoint_every": 0, **recipe(strategy, model),
                         **override})  # an override (another backbone: bench/rank_photos.py) wins
    result = train(cfg)
    metrics = result.checkpoint["metrics"]
    epochs = [h["epoch_seconds"] for h in result.checkpoint["history"]]
    return {"accuracy": metrics["test_accuracy"], "seconds": metrics["train_seconds"], "reused": result.reused,
            "checkpoint": result.checkpoint_uri,
            "epochs": len(epochs), "seconds_per_epoch": statistics.mean(epochs[1:] or epochs) if epochs else None,
            "feature_cache_hit": metrics.get("feature_cache_hit")}


def auto(data_path: str, shots, seed: int, model: str = MODEL) -> dict:
    """`--strategy auto` (tl_core/auto.py) on the same labels: its candidates validated on folds of
    them, the winner refitted (the single run of the same recipe, reused where trained above). Its
    seconds: the choosing (the search's wall time) + the refit's training, as bench/auto.py counts."""
    from tl_core.auto import auto_step
    from tl_core.config import TrainConfig

    cfg = TrainConfig(data=data_path, strategy="auto", backbone=f"packaged:{model}", shots=shots, seed=seed, augment=1,
                      eval_every=0, checkpoint_every=0)
    result = auto_step(cfg, baseline=False, say=lambda line: print(f"  shots {shots_name(shots)} seed {seed}: {line}",
                                                                    flush=True))
    return {"accuracy": result["metrics"]["accuracy"], "seconds": result["train_seconds"],
            "reused": result["reused"],  # the refit's (a search asked again resumes, and reuses its trials, by name)
            "choice": result["auto"]["choice"], "reason": result["auto"]["reason"]}


def distill(data_path: str, shots, seed: int, model: str = MODEL) -> dict:
    """The seed's probe (trained above, so reused) teaching a student from the packaged weights on
    the labels and the soft labels of the rest of the training photos."""
    teacher = transfer(data_path, "linear-probe", shots, seed, model)["checkpoint"]
    return {**transfer(data_path, "distill", shots, seed, model, teacher=teacher, use_unlabeled=True), "teacher": teacher}


def recipe(strategy: str, model: str = MODEL) -> dict:
    from tl_core.recipes import default_recipe

    return default_recipe(model, strategy)


def reference_loop(data_dir: str, epochs: int, device: str = "cpu", bf16: bool = False, workers: int = 0,
                   image_size: int = 224, seed: int = 0, model: str = MODEL) -> dict:
    """A plain torchvision-style fine-tuning loop over the train photos (all labels), no tl_core
    in the loop: an ImageFolder-style dataset, a DataLoader, the same timm network from the same
    packaged weights, the same optimizer groups and batch as tl's finetune recipe. Seconds an
    epoch (the first one left out, as for finetune). bench/gpu_check.py runs it on a GPU too."""
    import torch
    from PIL import Image
    from torchvision import transforms

    from tl_core.models.efficientnet import INPUT, timm_network

    settings = recipe("finetune", model)
    root = Path(data_dir) / "train" if (Path(data_dir) / "train").is_dir() else Path(data_dir)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    samples = [(f, i) for i, c in enumerate(classes) for f in sorted((root / c).iterdir()) if f.is_file()]
    tf = transforms.Compose([transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(), transforms.Normalize(INPUT["mean"], INPUT["std"])])

    class Photos(torch.utils.data.Dataset):
        def __len__(self):
            return len(samples)

        def __getitem__(self, i):
            with Image.open(samples[i][0]) as img:
                return tf(img.convert("RGB")), samples[i][1]

    torch.manual_seed(seed)
    net = timm_network(packaged=True, name=model)
    net.reset_classifier(len(classes))
    net = net.to(device)
    head = list(net.get_classifier().parameters())
    body = [p for n, p in net.named_parameters() if not n.startswith("classifier.")]
    optimizer = torch.optim.Adam([{"params": body, "lr": settings["lr"] * settings["backbone_lr_mult"]},
                                  {"params": head, "lr": settings["lr"]}])
    loader = torch.utils.data.DataLoader(Photos(), batch_size=settings["batch_size"], shuffle=True, num_workers=workers,
                                         pin_memory=device == "cuda", persistent_workers=workers > 0,
                                         multiprocessing_context="fork" if workers else None)  # Photos is a local class
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    net.train()
    for _ in range(epochs):
        started, total = time.perf_counter(), 0.0
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
                loss = torch.nn.functional.cross_entropy(net(x), y)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(y)  # a sync a step, as tl's loop has
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
        losses.append(total / len(samples))
    return {"device": device, "bf16": bf16, "num_workers": workers, "epochs": epochs, "photos": len(samples),
            "epoch_seconds": times, "seconds_per_epoch": statistics.mean(times[1:] or times), "train_loss": losses,
            "max_memory_allocated_mb": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None}


def table(rows: list[dict], strategies: list[str]) -> list[str]:
    lines = ["| shots a class | strategy | test accuracy % (seeds) | mean | vs scratch | train s (mean) |",
             "|---|---|---|---|---|---|"]
    for shots in SHOTS:
        scratch = {r["seed"]: r["accuracy"] for r in rows if r["shots"] == shots and r["strategy"] == "scratch"}
        for strategy in strategies:
            runs = [r for r in rows if r["shots"] == shots and r["strategy"] == strategy]
            if not runs:
                continue
            accs = [r["accuracy"] for r in runs]
            gains = [r["accuracy"] - scratch[r["seed"]] for r in runs if r["seed"] in scratch]
            vs = f"{100 * statistics.mean(gains):+.1f}" if gains and strategy != "scratch" else "—"
            label = strategy + (f" ({', '.join(r['choice'] for r in runs)})" if strategy == "auto" else "")
            lines.append(f"| {shots_name(shots)} | {label} | {', '.join(f'{100 * a:.1f}' for a in accs)} | "
                         f"{100 * statistics.mean(accs):.1f} | {vs} | {statistics.mean(r['seconds'] for r in runs):.1f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(PHOTOS), help="an ImageFolder: DIR/{train,val}/<class>/ or DIR/<class>/")
    parser.add_argument("--model", default=MODEL, help="the packaged network: efficientnet-lite0, -lite1 or -lite2")
    parser.add_argument("--strategies", default="linear-probe,sklearn-lr,finetune,scratch,auto")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--finetune-seeds", default=None, help="seeds of finetune and scratch (default: --seeds)")
    parser.add_argument("--finetune-shots", default="5,10,all", help="shot counts of finetune and scratch")
    parser.add_argument("--auto-shots", default="5,10", help="shot counts of auto (listed in --strategies), which "
                        "trains finetune and scratch on a fold of the labels and refits: ~2.5x a finetune run")
    parser.add_argument("--all-seeds", default=None, help="seeds of finetune and scratch with all labels (default: "
                        "--finetune-seeds)")
    parser.add_argument("--speed-epochs", type=int, default=3, help="epochs of the speed comparison: finetune with all "
                        "labels (seed 0) and the torchvision-style loop, each this many (0: none)")
    parser.add_argument("--out", default=str(HERE / "imagenet_transfer"))
    args = parser.parse_args()
    os.environ.setdefault("TL_WORKDIR", "/tmp/tl-bench-imagenet")
    from tl_core.config import PrepareConfig
    from tl_core.data import prepare

    strategies = args.strategies.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    trained_seeds = [int(s) for s in (args.finetune_seeds or args.seeds).split(",")]
    trained_shots = [None if s == "all" else int(s) for s in args.finetune_shots.split(",")]
    auto_shots = [None if s == "all" else int(s) for s in args.auto_shots.split(",")]
    started = time.perf_counter()
    data, _ = prepare(PrepareConfig(uri=f"imagefolder:{args.data}"))
    prepare_seconds = time.perf_counter() - started
    rows = []
    for shots in SHOTS:
        for strategy in strategies:
            cheap = strategy in ("linear-probe", "sklearn-lr")  # on cached features
            if not cheap and shots not in (auto_shots if strategy == "auto" else trained_shots):
                continue
            if strategy == "distill" and shots is None:  # no unlabeled photo to learn the teacher's labels on
                continue
            all_seeds = [int(x) for x in args.all_seeds.split(",")] if args.all_seeds and shots is None else None
            for seed in seeds if cheap else (all_seeds or trained_seeds):
                run = (sklearn_lr(data.path, shots, seed, args.model) if strategy == "sklearn-lr" else
                       auto(data.path, shots, seed, args.model) if strategy == "auto" else
                       distill(data.path, shots, seed, args.model) if strategy == "distill" else
                       transfer(data.path, strategy, shots, seed, args.model))
                rows.append({"shots": shots, "strategy": strategy, "seed": seed, **run})
                print(f"shots {shots_name(shots)} {strategy} seed {seed}: {100 * run['accuracy']:.1f} % "
                      f"in {run['seconds']:.1f} s", flush=True)
                Path(args.out + ".partial.json").write_text(json.dumps(rows, indent=2, default=str) + "\n")
    speed = transfer(data.path, "finetune", None, 0, args.model, epochs=args.speed_epochs) if args.speed_epochs else None
    reference = reference_loop(args.data, args.speed_epochs, model=args.model) if args.speed_epochs else None
    if reference:
        print(f"torchvision-style loop: {reference['seconds_per_epoch']:.1f} s an epoch of {reference['photos']} photos",
              flush=True)
    probe = {shots: statistics.mean(r["accuracy"] for r in rows if r["shots"] == shots and r["strategy"] == "linear-probe")
             for shots in SHOTS if any(r["strategy"] == "linear-probe" for r in rows)}
    summary = {"data": args.data, "model": args.model, "prepared": data.path, "prepare_seconds": prepare_seconds,
               "recipes": {s: recipe(s, args.model) for s in strategies},
               "speed_finetune": speed, "reference_loop": reference,
               "rows": rows, "linear_probe_goals_met": {shots_name(s): probe[s] >= GOALS[s] for s in probe},
               "seconds": time.perf_counter() - started, "load_average": os.getloadavg()}
    Path(args.out + ".json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    md = table(rows, strategies)
    ours = [speed["seconds_per_epoch"]] if speed else []
    if reference and ours:
        ratio = reference["seconds_per_epoch"] / statistics.mean(ours)
        summary["finetune_speed_vs_reference"] = ratio
        Path(args.out + ".json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        md += ["", f"finetune with all labels ({args.speed_epochs} epochs, the first left out): "
               f"{statistics.mean(ours):.1f} s an epoch; the torchvision-style loop: "
               f"{reference['seconds_per_epoch']:.1f} s (speed {ratio:.2f}x the reference's)"]
    Path(args.out + ".table.md").write_text("\n".join(md) + "\n")  # the measured table; bench/imagenet_transfer.md quotes it
    print("\n".join(md))


if __name__ == "__main__":
    main()
