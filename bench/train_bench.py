"""Local training throughput: radfed's training pass versus a plain MONAI/PyTorch loop.

Same network (radfed's ``cnn``, a MONAI ResNet), same data, same batch size and optimiser,
measured side by side in one run; images per second and their ratio go to
bench/results/train_bench.json and .md. On a CUDA machine radfed trains with mixed
precision and the plain loop in float32, as a typical MONAI tutorial loop does.

Run: ``python bench/train_bench.py [--cases 512] [--image-size 64] [--epochs 2]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from radfed.config import RunConfig
from radfed.data.site import SplitData
from radfed.tasks import pick_device
from radfed.tasks.classification import build_model, train


def _data(cases: int, size: int) -> SplitData:
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(cases, 1, size, size, generator=generator)
    labels = (torch.rand(cases, generator=generator) < 0.5).long()
    images[labels == 1, :, size // 3 : size // 3 + 4, size // 3 : size // 3 + 4] += 1.0
    return SplitData(images=images, labels=labels)


def _plain_loop(config: RunConfig, data: SplitData) -> float:
    """A MONAI-tutorial training loop: DataLoader, Adam, BCEWithLogitsLoss; returns seconds."""
    device = pick_device()
    model = build_model(config).to(device).train()
    optimiser = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    loader = DataLoader(
        TensorDataset(data.images, data.labels.float()),
        batch_size=config.batch_size,
        shuffle=True,
        drop_last=True,
    )
    start = time.perf_counter()
    for _ in range(config.local_epochs):
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            optimiser.zero_grad()
            loss = loss_fn(model(images).reshape(-1), labels)
            loss.backward()
            optimiser.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _radfed(config: RunConfig, data: SplitData) -> float:
    model = build_model(config)
    start = time.perf_counter()
    train(model, data, config, seed=0)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", type=int, default=512)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    config = dataclasses.replace(
        RunConfig(),
        image_size=args.image_size,
        local_epochs=args.epochs,
        batch_size=args.batch_size,
    )
    data = _data(args.cases, args.image_size)
    images = args.cases * args.epochs
    _radfed(dataclasses.replace(config, local_epochs=1), data)  # warm-up (allocator, kernels)
    timings: dict[str, list[float]] = {"radfed": [], "plain": []}
    for repeat in range(args.repeats):  # interleaved, so both see the same machine load
        timings["radfed"].append(_radfed(config, data))
        timings["plain"].append(_plain_loop(config, data))
        print(
            f"repeat {repeat + 1}/{args.repeats}: radfed {timings['radfed'][-1]:.2f} s, "
            f"plain {timings['plain'][-1]:.2f} s",
            file=sys.stderr,
        )
    rates = {k: images / statistics.median(v) for k, v in timings.items()}
    ratio = rates["radfed"] / rates["plain"]
    device = pick_device()
    result = {
        "cases": args.cases,
        "image_size": args.image_size,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "device": str(device),
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
        "platform": platform.platform(),
        "torch": torch.__version__,
        "seconds": timings,
        "images_per_second": rates,
        "radfed_vs_plain": ratio,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train_bench.json").write_text(json.dumps(result, indent=2) + "\n")
    table = (
        "# radfed training throughput\n\n"
        f"{args.cases} images {args.image_size}x{args.image_size}, {args.epochs} epochs, batch "
        f"{args.batch_size}, device {device}; median of {args.repeats}.\n\n"
        "| loop | images/s |\n|---|---:|\n"
        f"| radfed `tasks.train` | {rates['radfed']:.1f} |\n"
        f"| plain MONAI/PyTorch loop | {rates['plain']:.1f} |\n\n"
        f"**radfed vs plain: {ratio:.2f}x**\n"
    )
    (args.out / "train_bench.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
