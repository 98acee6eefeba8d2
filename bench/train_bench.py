"""Local training throughput per task: radfed's ``Task.train`` versus a plain MONAI loop.

For classification, detection and segmentation, radfed's ``get_task(name).train`` and a
training loop written the way MONAI's tutorials write it (a plain shuffling DataLoader,
Adam, forward, loss, backward, step) train the same network (the task's ``build_model``),
on the same synthetic in-memory data, with the same batch size, epochs and precision:
float32 on the CPU; on CUDA both use float16 autocast with a GradScaler, so the ratio
compares the loops, not the precisions. Repeats alternate radfed, plain, radfed, plain
after a warm-up; the medians go to ``train_bench.json`` and ``train_bench.md``.

Run: ``python bench/train_bench.py [--tasks detection segmentation] [--scale 8 --size 128]``.
Only torch, MONAI, NumPy and radfed's config, data and tasks modules are imported (no
Flower), so the script runs on a bare CUDA machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from radfed.config import RunConfig, TaskName
from radfed.data.loading import SplitData
from radfed.tasks import get_task, pick_device

#: Per task: default images (per epoch), image size and batch size; the whole run takes
#: about a minute on 2 CPU cores.
_DEFAULTS = {
    "classification": (256, 64, 32),
    "detection": (48, 64, 8),
    "segmentation": (192, 64, 16),
}
#: The loss of each plain loop, as written in the MONAI tutorials.
_PLAIN_LOSS = {
    "classification": "BCEWithLogitsLoss",
    "detection": "detector(images, targets): classification + box_regression",
    "segmentation": "DiceCELoss(to_onehot_y=True, softmax=True), whole images",
}
_LOOPS = ("radfed", "plain")


@dataclasses.dataclass(frozen=True)
class _Workload:
    """One task's benchmark settings."""

    task: str
    images: int
    size: int
    batch_size: int
    epochs: int
    seed: int

    def config(self) -> RunConfig:
        return RunConfig(
            task=self.task,
            image_size=self.size,
            batch_size=self.batch_size,
            local_epochs=self.epochs,
            seed=self.seed,
            augment=False,  # the plain loop does not augment: compare the same work
        )


# --- synthetic data -------------------------------------------------------------------


def _data(task: str, cases: int, size: int, seed: int) -> SplitData:
    """Noise images ``(N, 1, S, S)`` in [0, 1] with a task-shaped bright object."""
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    images = 0.3 * torch.rand(cases, 1, size, size, generator=generator)
    if task == "classification":
        labels = torch.from_numpy(rng.random(cases) < 0.5).long()
        side = max(4, size // 16)
        images[labels == 1, :, size // 3 : size // 3 + side, size // 3 : size // 3 + side] += 0.7
        return SplitData(images=images, labels=labels)
    if task == "detection":  # half the images hold one bright square, boxed
        labels = torch.from_numpy(rng.random(cases) < 0.5).long()
        boxes = []
        for i in range(cases):
            if not labels[i]:
                boxes.append(np.zeros((0, 4), dtype=np.float32))
                continue
            side = int(rng.integers(size // 8, size // 4 + 1))
            x, y = (int(v) for v in rng.integers(0, size - side + 1, size=2))
            images[i, 0, y : y + side, x : x + side] += 0.7
            boxes.append(np.array([[x, y, x + side, y + side]], dtype=np.float32))  # x1 y1 x2 y2
        return SplitData(images=images, labels=labels, boxes=tuple(boxes))
    # segmentation: three in four images hold a bright disc; the mask is the disc
    has_disc = rng.random(cases) < 0.75
    radius = rng.uniform(size / 10, size / 5, cases) * has_disc
    cy, cx = (rng.uniform(size / 5, 4 * size / 5, cases) for _ in range(2))
    yy, xx = np.mgrid[:size, :size]
    inside = (yy - cy[:, None, None]) ** 2 + (xx - cx[:, None, None]) ** 2 <= radius[
        :, None, None
    ] ** 2
    masks = torch.from_numpy(inside[:, None]).to(torch.uint8)
    images += 0.7 * masks
    return SplitData(images=images, labels=torch.from_numpy(has_disc).long(), masks=masks)


# --- plain MONAI-tutorial loops -------------------------------------------------------


def _plain_classification(model: nn.Module, data: SplitData, config: RunConfig) -> None:
    device, amp = _device_amp()
    model.to(device).train()
    loader = DataLoader(
        TensorDataset(data.images, data.labels.float()),
        batch_size=config.batch_size,
        shuffle=True,
    )
    optimiser = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    loss_function = nn.BCEWithLogitsLoss()
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    for _ in range(config.local_epochs):
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            optimiser.zero_grad()
            with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                loss = loss_function(model(images).reshape(-1), labels)
            scaler.scale(loss).backward()
            scaler.step(optimiser)
            scaler.update()


def _plain_detection(model: nn.Module, data: SplitData, config: RunConfig) -> None:
    from radfed.tasks.detection import to_monai_boxes

    device, amp = _device_amp()
    detector: Any = model.detector  # MONAI's RetinaNetDetector, as the tutorial builds it
    detector.to(device).train()
    cases: Any = [  # a list serves as a map-style dataset
        (image, torch.from_numpy(to_monai_boxes(boxes)))
        for image, boxes in zip(data.images, data.boxes, strict=True)
    ]
    loader: DataLoader[Any] = DataLoader(
        cases,
        batch_size=config.batch_size,
        shuffle=True,
        collate_fn=lambda batch: batch,  # a list of cases: images may hold any number of boxes
    )
    optimiser = torch.optim.Adam(detector.network.parameters(), lr=config.learning_rate)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    for _ in range(config.local_epochs):
        for batch in loader:
            images = torch.stack([image for image, _ in batch]).to(device)
            targets = [
                {
                    "boxes": boxes.to(device),
                    "labels": torch.zeros(len(boxes), dtype=torch.long, device=device),
                }
                for _, boxes in batch
            ]
            optimiser.zero_grad()
            with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                outputs = detector(images, targets)
                loss = outputs[detector.cls_key] + outputs[detector.box_reg_key]
            scaler.scale(loss).backward()
            scaler.step(optimiser)
            scaler.update()


def _plain_segmentation(model: nn.Module, data: SplitData, config: RunConfig) -> None:
    from monai.losses import DiceCELoss

    device, amp = _device_amp()
    assert data.masks is not None
    model.to(device).train()
    loader = DataLoader(
        TensorDataset(data.images, data.masks),
        batch_size=config.batch_size,
        shuffle=True,
    )
    optimiser = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    loss_function = DiceCELoss(to_onehot_y=True, softmax=True)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    for _ in range(config.local_epochs):
        for images, masks in loader:
            images, masks = images.to(device), masks.to(device).float()
            optimiser.zero_grad()
            with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                loss = loss_function(model(images), masks)
            scaler.scale(loss).backward()
            scaler.step(optimiser)
            scaler.update()


_PLAIN: dict[str, Callable[[nn.Module, SplitData, RunConfig], None]] = {
    "classification": _plain_classification,
    "detection": _plain_detection,
    "segmentation": _plain_segmentation,
}


def _device_amp() -> tuple[torch.device, bool]:
    """The device radfed trains on, and whether it uses mixed precision there (CUDA)."""
    device = pick_device()
    return device, device.type == "cuda"


# --- measurement ----------------------------------------------------------------------


def _timed(loop: str, work: _Workload, data: SplitData) -> tuple[float, int | None]:
    """Seconds of one training pass of ``loop`` (the model is built before the clock
    starts; moving it to the device is timed in both loops), and the peak GPU memory
    allocated during it in bytes (None on CPU)."""
    task = get_task(work.task)
    config = work.config()
    model = task.build_model(config)
    cuda = pick_device().type == "cuda"
    torch.manual_seed(work.seed)
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if loop == "radfed":
        task.train(model, data, config, seed=work.seed)
    else:
        _PLAIN[work.task](model, data, config)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return seconds, torch.cuda.max_memory_allocated() if cuda else None


def _measure(work: _Workload, *, repeats: int, warmup: int) -> dict[str, Any]:
    """Warm-up passes of both loops, then ``repeats`` interleaved timed passes of each."""
    data = _data(work.task, work.images, work.size, work.seed)
    warm = dataclasses.replace(work, epochs=1)
    small = data.subset(range(min(len(data), 4 * work.batch_size)))
    for _ in range(warmup):  # allocator, kernels, lazy imports
        for loop in _LOOPS:
            _timed(loop, warm, small)
    seconds: dict[str, list[float]] = {loop: [] for loop in _LOOPS}
    peaks: dict[str, list[int]] = {loop: [] for loop in _LOOPS}
    for repeat in range(repeats):
        for loop in _LOOPS:  # alternating, so both see the same machine load
            took, peak = _timed(loop, work, data)
            seconds[loop].append(took)
            if peak is not None:
                peaks[loop].append(peak)
        print(
            f"{work.task} repeat {repeat + 1}/{repeats}: radfed {seconds['radfed'][-1]:.2f} s, "
            f"plain {seconds['plain'][-1]:.2f} s",
            file=sys.stderr,
        )
    trained = work.images * work.epochs
    median = {loop: statistics.median(v) for loop, v in seconds.items()}
    rates = {loop: trained / median[loop] for loop in _LOOPS}
    config = work.config()
    return {
        "config": {
            "model": config.model or get_task(work.task).models[0],
            "images": work.images,
            "image_size": work.size,
            "epochs": work.epochs,
            "batch_size": work.batch_size,
            "learning_rate": config.learning_rate,
            "seed": work.seed,
            "radfed_loss": config.loss or get_task(work.task).losses[0],
            "plain_loss": _PLAIN_LOSS[work.task],
        },
        "images_trained": trained,
        "seconds": seconds,
        "median_seconds": median,
        "images_per_second": rates,
        "radfed_vs_plain": rates["radfed"] / rates["plain"],
        "peak_gpu_memory_bytes": {k: max(v) for k, v in peaks.items()} if peaks["radfed"] else None,
    }


# --- report ---------------------------------------------------------------------------


def _precision(device: torch.device) -> str:
    if device.type == "cuda":
        return "both loops: float16 autocast + GradScaler (radfed's CUDA policy)"
    return "both loops: float32 (radfed uses mixed precision only on CUDA)"


def _table(result: dict[str, Any]) -> str:
    cuda = result["device"] == "cuda"
    where = f"{result['device']} ({result['gpu']})" if cuda else result["device"]
    lines = [
        "# radfed training throughput: `Task.train` vs a plain MONAI loop",
        "",
        f"Device {where}, torch {result['torch']}, MONAI {result['monai']}; "
        f"{result['precision']}. Same model, data, batch size and epochs in both loops; "
        f"images/s = images x epochs / median of {result['repeats']} interleaved repeats.",
        "",
        "| task | model | images | size | batch | epochs | radfed img/s | plain img/s | ratio |"
        + (" radfed peak MiB | plain peak MiB |" if cuda else ""),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if cuda else ""),
    ]
    for name, r in result["tasks"].items():
        c, rate = r["config"], r["images_per_second"]
        row = (
            f"| {name} | {c['model']} | {c['images']} | {c['image_size']} | {c['batch_size']} "
            f"| {c['epochs']} | {rate['radfed']:.1f} | {rate['plain']:.1f} "
            f"| {r['radfed_vs_plain']:.2f}x |"
        )
        if cuda:
            peak = r["peak_gpu_memory_bytes"]
            row += f" {peak['radfed'] / 2**20:.0f} | {peak['plain'] / 2**20:.0f} |"
        lines.append(row)
    return "\n".join(lines) + "\n"


def _workloads(args: argparse.Namespace) -> list[_Workload]:
    out = []
    for name in args.tasks:
        images, size, batch = _DEFAULTS[name]
        task_images = getattr(args, f"{name}_images")
        out.append(
            _Workload(
                task=name,
                images=task_images if task_images else images * args.scale,
                size=getattr(args, f"{name}_size") or args.size or size,
                batch_size=args.batch_size or batch,
                epochs=args.epochs,
                seed=args.seed,
            )
        )
    return out


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tasks",
        nargs="+",
        choices=[t.value for t in TaskName],
        default=[t.value for t in TaskName],
        metavar="TASK",
    )
    parser.add_argument(
        "--scale", type=int, default=1, help="multiply every task's default image count"
    )
    parser.add_argument("--size", type=int, default=0, help="image size of every task")
    for name, (images, size, _) in _DEFAULTS.items():
        parser.add_argument(
            f"--{name}-images", type=int, default=0, help=f"default {images} x --scale"
        )
        parser.add_argument(f"--{name}-size", type=int, default=0, help=f"default {size}")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=0,
        help="for every task (defaults: "
        + ", ".join(f"{k} {v[2]}" for k, v in _DEFAULTS.items())
        + ")",
    )
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1, help="untimed passes of each loop")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    for key in ("scale", "epochs", "repeats"):
        if getattr(args, key) < 1:
            parser.error(f"--{key} must be at least 1, got {getattr(args, key)}")
    return args


def main() -> None:
    args = _parse()
    workloads = _workloads(args)
    try:  # refuse bad sizes before any timing
        for work in workloads:
            get_task(work.task).check(work.config())
    except ValueError as error:  # radfed's ConfigError names the value and the fix
        sys.exit(f"train_bench: {error}")
    device = pick_device()
    import monai

    started = time.perf_counter()
    result: dict[str, Any] = {
        "device": device.type,
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
        "precision": _precision(device),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "tasks": {w.task: _measure(w, repeats=args.repeats, warmup=args.warmup) for w in workloads},
    }
    result["wall_seconds"] = time.perf_counter() - started
    table = _table(result)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train_bench.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "train_bench.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
