"""GPU check: the training core (`tl_core.train.loop.fit` in a `LocalSession(use_gpu=True)`) on a CUDA device.

    # here: a copy of the photos small enough to travel to the device machine (256 px short side, JPEG q90)
    .venv/bin/python bench/gpu_check.py resize ../shared/data/hymenoptera .gpucheck/photos
    # there (or anywhere with a GPU): writes OUT/gpu_check.json and OUT/gpu_check.table.md
    python3 bench/gpu_check.py run --photos .gpucheck/photos --out OUT
    # a CPU smoke test of the same code (tiny: few photos, 1 epoch, no GPU needed)
    .venv/bin/python bench/gpu_check.py resize ../shared/data/hymenoptera /tmp/tiny --per-class 4
    .venv/bin/python bench/gpu_check.py run --photos /tmp/tiny --out /tmp/gc --device cpu --digits-epochs 1 \
        --photo-epochs 1 --seeds 0 --photo-seeds 0 --image-size 64 --reference-epochs 1

Cases, each through `fit` exactly as `tl transfer` runs it in-process:
(a) scratch small_cnn on sklearn:digits (all labels, augment 1): on the CPU, on the GPU in fp32
    (amp off) and on the GPU with bf16 autocast (amp on); test accuracy per seed;
(b) finetune of the packaged ImageNet backbone `packaged:efficientnet-lite0` on the photos
    (ImageFolder with train/ and val/; val is the test split), with the model's `tl run` recipe
    (Adam lr 1e-3, backbone x0.1, batch 16, RandomResizedCrop + flip), amp off and on: seconds an
    epoch (the first left out) and test accuracy; and a plain torchvision-style loop over the same
    photos and the same network on the same device (ImageFolder-style dataset, DataLoader,
    RandomResizedCrop + flip, Adam in the same groups), fp32 and bf16, for the ratio.

Every run records torch.cuda.max_memory_allocated (peak since the run began). Whether autocast
really ran in bf16 is read off the layers' outputs by a forward hook (dtypes of the first Conv2d and
Linear outputs in training mode), not assumed from the flag.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tl_core from this checkout, also where it is not pip-installed
from bench.imagenet_transfer import BACKBONE, MODEL, reference_loop  # noqa: E402  (the same reference loop)


# -- the photos, made small enough to carry ---------------------------------------------------
def resize(src: Path, dst: Path, short_side: int, quality: int, per_class: int | None) -> None:
    """Every photo of src (DIR/{train,val}/<class>/) to dst, its shorter side `short_side` px (never
    enlarged), JPEG at `quality`; other formats (one GIF) re-saved in their own format."""
    from PIL import Image

    count, size = 0, 0
    for split in sorted(p for p in src.iterdir() if p.is_dir()):
        for cls in sorted(p for p in split.iterdir() if p.is_dir()):
            files = sorted(f for f in cls.iterdir() if f.is_file())[:per_class]
            (dst / split.name / cls.name).mkdir(parents=True, exist_ok=True)
            for f in files:
                out = dst / split.name / cls.name / f.name
                with Image.open(f) as img:
                    fmt = img.format
                    img = img.convert("RGB")
                    scale = short_side / min(img.size)
                    if scale < 1:
                        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC)
                    if fmt == "JPEG":
                        img.save(out, "JPEG", quality=quality)
                    else:
                        img.save(out, fmt)
                count, size = count + 1, size + out.stat().st_size
    print(f"{count} photos, {size / 2**20:.1f} MB -> {dst}")


# -- measuring ----------------------------------------------------------------------------------
class DtypeProbe:
    """The dtypes of the first Conv2d / Linear outputs computed in training mode (under autocast, bf16)."""

    def __init__(self, limit: int = 40):
        import torch

        self.seen: dict[str, dict[str, int]] = {}
        self.count, self.limit = 0, limit
        self.handle = torch.nn.modules.module.register_module_forward_hook(self.hook)

    def hook(self, module, args, output):
        import torch

        if not module.training or not isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            return
        if isinstance(output, torch.Tensor):
            kind = self.seen.setdefault(type(module).__name__, {})
            kind[str(output.dtype)] = kind.get(str(output.dtype), 0) + 1
            self.count += 1
        if self.count >= self.limit:
            self.handle.remove()

    def close(self) -> dict:
        self.handle.remove()
        return self.seen


def cuda_peak_reset(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def cuda_peak_mb(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None


def run_fit(cfg, device: str) -> dict:
    """One `fit` in this process; its figures from the checkpoint it returns."""
    from tl_core.train.loop import fit
    from tl_core.train.session import LocalSession

    cuda_peak_reset(device)
    probe = DtypeProbe()
    started = time.perf_counter()
    try:
        ckpt = fit(cfg, LocalSession(use_gpu=device == "cuda"))
    finally:
        dtypes = probe.close()
    wall = time.perf_counter() - started
    epochs = [h["epoch_seconds"] for h in ckpt["history"]]
    metrics = ckpt["metrics"]
    return {"device": device, "amp": cfg.amp, "seed": cfg.seed, "epochs": len(epochs),
            "test_accuracy": metrics["test_accuracy"], "test_loss": metrics["test_loss"],
            "train_images": metrics["train_images"], "train_seconds": metrics["train_seconds"], "wall_seconds": wall,
            "epoch_seconds": epochs, "seconds_per_epoch": statistics.mean(epochs[1:] or epochs),
            "train_loss_last": ckpt["history"][-1]["train_loss"],
            "max_memory_allocated_mb": cuda_peak_mb(device), "peak_rss_mb": metrics["peak_rss_mb"],
            "layer_output_dtypes": dtypes}


# -- the check ------------------------------------------------------------------------------------
def fit_case(result: dict, kind: str, label: str, cfg, device: str, out: Path) -> None:
    """One `fit` run into result[kind] (a failure goes under result["errors"]), printed and saved."""
    row = attempt(result, label, run_fit, cfg, device)
    if row is None:
        return
    result[kind].append(row)
    print(f"{label}: {pct(row['test_accuracy'])} %, {row['seconds_per_epoch']:.3f} s/epoch "
          f"{[round(s, 2) for s in row['epoch_seconds']]}, dtypes {row['layer_output_dtypes']}, "
          f"cuda peak {row['max_memory_allocated_mb']} MB", flush=True)
    save(result, out)


def environment() -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update({"gpu": props.name, "gpu_memory_gb": round(props.total_memory / 2**30, 1),
                    "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                    "bf16_supported": torch.cuda.is_bf16_supported()})
    try:
        import timm

        env["timm"] = timm.__version__
    except ImportError:
        pass
    return env


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def table(result: dict) -> list[str]:
    lines = [f"Device: {result['environment'].get('gpu', 'no GPU')}; torch {result['environment']['torch']}", "",
             "(a) scratch small_cnn on sklearn:digits, all labels",
             "", "| device | amp | test accuracy % (seeds) | mean | s/epoch | max_memory_allocated MB | layer outputs |",
             "|---|---|---|---|---|---|---|"]
    for (device, amp) in (("cpu", False), ("cuda", False), ("cuda", True)):
        runs = [r for r in result["digits"] if r["device"] == device and r["amp"] == amp]
        if runs:
            mem = runs[0]["max_memory_allocated_mb"]
            lines.append(f"| {device} | {'bf16' if amp else 'fp32'} | {', '.join(pct(r['test_accuracy']) for r in runs)} | "
                         f"{pct(statistics.mean(r['test_accuracy'] for r in runs))} | "
                         f"{statistics.mean(r['seconds_per_epoch'] for r in runs):.3f} | "
                         f"{'—' if mem is None else f'{mem:.0f}'} | {runs[0]['layer_output_dtypes']} |")
    lines += ["", f"(b) finetune {BACKBONE} on the photos, all labels",
              "", "| loop | precision | test accuracy % (seeds) | s/epoch (first left out) | max_memory_allocated MB |",
              "|---|---|---|---|---|"]
    for amp in (False, True):
        runs = [r for r in result["photos"] if r["amp"] == amp]
        if runs:
            mems = [r["max_memory_allocated_mb"] for r in runs if r["max_memory_allocated_mb"] is not None]
            lines.append(f"| tl fit | {'bf16' if amp else 'fp32'} | {', '.join(pct(r['test_accuracy']) for r in runs)} | "
                         f"{statistics.mean(r['seconds_per_epoch'] for r in runs):.2f} | "
                         f"{f'{max(mems):.0f}' if mems else '—'} |")
    for ref in result["reference"]:
        mem = ref["max_memory_allocated_mb"]
        lines.append(f"| torchvision loop, {ref['num_workers']} loader workers | {'bf16' if ref['bf16'] else 'fp32'} | — | "
                     f"{ref['seconds_per_epoch']:.2f} | {'—' if mem is None else f'{mem:.0f}'} |")
    for name, ratio in result.get("ratios", {}).items():
        lines.append(f"\n{name}: {ratio:.2f}")
    return lines


def save(result: dict, out: Path) -> None:
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out / "gpu_check.table.md").write_text("\n".join(table(result)) + "\n")


def attempt(result: dict, label: str, fn, *args):
    """fn(*args), or None with the error recorded, so that one failing case leaves the others measured."""
    import traceback

    try:
        return fn(*args)
    except Exception:
        error = traceback.format_exc()
        result.setdefault("errors", {})[label] = error
        print(f"FAILED {label}:\n{error}", flush=True)
        return None


def check(args) -> None:
    os.environ.setdefault("TL_WORKDIR", tempfile.mkdtemp(prefix="tl-gpu-check-"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from tl_core.config import PrepareConfig, TrainConfig
    from tl_core.data import prepare
    from tl_core.recipes import default_recipe

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = "cuda" if torch.cuda.is_available() and args.device != "cpu" else None
    if args.device == "cuda" and not gpu:
        raise SystemExit("--device cuda: torch sees no CUDA device")
    started = time.perf_counter()
    result = {"environment": environment(), "args": vars(args), "digits": [], "photos": [], "reference": [], "errors": {}}
    print(json.dumps(result["environment"]), flush=True)
    devices = [("cpu", False)] + ([(gpu, False), (gpu, True)] if gpu else [])
    seeds = [int(s) for s in args.seeds.split(",")]

    # (a) the small CNN from scratch on the digits: CPU, GPU fp32, GPU bf16
    digits, _ = prepare(PrepareConfig(uri="sklearn:digits"))
    for device, amp in devices:
        for seed in seeds:
            cfg = TrainConfig(data=digits.path, strategy="scratch", shots=None, epochs=args.digits_epochs, augment=1,
                              seed=seed, amp=amp, eval_every=0, checkpoint_every=0, use_gpu=device == "cuda")
            fit_case(result, "digits", f"digits {device} amp={amp} seed {seed}", cfg, device, out)

    # (b) the packaged ImageNet backbone fine-tuned on the photos, on the GPU (else the CPU), amp off and on
    device = gpu or "cpu"
    photo_seeds = [int(s) for s in args.photo_seeds.split(",")]
    t0 = time.perf_counter()
    prepared = attempt(result, "prepare photos", prepare,
                       PrepareConfig(uri=f"imagefolder:{Path(args.photos).resolve()}", image_size=args.image_size))
    photos = prepared[0] if prepared else None
    result["photos_prepare_seconds"] = time.perf_counter() - t0
    recipe = {**default_recipe(MODEL, "finetune"), "epochs": args.photo_epochs}
    for amp in (([False, True] if gpu else [False]) if photos else []):
        for seed in photo_seeds:
            cfg = TrainConfig(data=photos.path, strategy="finetune", backbone=BACKBONE, shots=None, seed=seed, augment=1,
                              amp=amp, eval_every=0, use_gpu=device == "cuda", **recipe)
            fit_case(result, "photos", f"photos {device} amp={amp} seed {seed}", cfg, device, out)

    # the plain torchvision loop over the same photos and network, same device
    size = args.image_size or 224
    for bf16, workers in ([(False, 0), (True, 0), (False, args.reference_workers)] if gpu else [(False, 0)]):
        ref = attempt(result, f"reference bf16={bf16} workers={workers}", reference_loop, args.photos,
                      args.reference_epochs, device, bf16, workers, size, photo_seeds[0])
        if ref is None:
            continue
        result["reference"].append(ref)
        print(f"reference {device} bf16={bf16} workers={workers}: {ref['seconds_per_epoch']:.2f} s/epoch "
              f"{[round(s, 2) for s in ref['epoch_seconds']]}, cuda peak {ref['max_memory_allocated_mb']} MB", flush=True)
        save(result, out)

    def per_epoch(runs):
        return statistics.mean(r["seconds_per_epoch"] for r in runs)

    ratios = {}
    for amp in ([False, True] if gpu else [False]):
        ours = [r for r in result["photos"] if r["amp"] == amp]
        for ref in result["reference"]:
            if ref["bf16"] == amp and ours:
                name = (f"tl fit {'bf16' if amp else 'fp32'} s/epoch over the torchvision loop's "
                        f"({ref['num_workers']} loader workers)")
                ratios[name] = per_epoch(ours) / ref["seconds_per_epoch"]
    result["ratios"] = ratios
    result["seconds"] = time.perf_counter() - started
    save(result, out)
    print("\n".join(table(result)), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("resize", help="copy an ImageFolder's photos, shorter side SHORT px, JPEG quality Q")
    r.add_argument("src")
    r.add_argument("dst")
    r.add_argument("--short-side", type=int, default=256)
    r.add_argument("--quality", type=int, default=90)
    r.add_argument("--per-class", type=int, default=None, help="only the first N photos of each class and split")
    c = sub.add_parser("run", help="the check")
    c.add_argument("--photos", required=True, help="an ImageFolder with train/ and val/ (val: the test split)")
    c.add_argument("--out", required=True)
    c.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="auto: the GPU where torch sees one (the digits run on the CPU too, for comparison)")
    c.add_argument("--seeds", default="0,1,2", help="seeds of the digits runs")
    c.add_argument("--digits-epochs", type=int, default=30)
    c.add_argument("--photo-seeds", default="0,1")
    c.add_argument("--photo-epochs", type=int, default=10, help="the finetune recipe's own: 10")
    c.add_argument("--image-size", type=int, default=None, help="photos' crop (default: tl prepare's, 224)")
    c.add_argument("--reference-epochs", type=int, default=5)
    c.add_argument("--reference-workers", type=int, default=8, help="loader workers of the third reference run")
    args = parser.parse_args()
    if args.command == "resize":
        resize(Path(args.src), Path(args.dst), args.short_side, args.quality, args.per_class)
    else:
        check(args)


if __name__ == "__main__":
    main()
