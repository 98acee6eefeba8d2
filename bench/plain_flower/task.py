"""Model, data and training of the plain app, written as Flower's PyTorch quickstart writes them.

The network is radfed's default classification network; images are read with pydicom on
every call and preprocessed like radfed does (modality LUT, MONOCHROME1 inverted, area
resize, 1st..99th percentile scaled to [0, 1]); the split is radfed's patient assignment.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pydicom
import torch
from monai.transforms import Resize, ScaleIntensityRangePercentiles
from pydicom.pixels import apply_modality_lut
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from radfed.config import RunConfig
from radfed.data.attributes import normalise_sex
from radfed.data.splits import PatientInfo, assign_splits, legacy_patient_key
from radfed.tasks import get_task


def Net(seed: int) -> nn.Module:  # the quickstart names it so
    """radfed's default classification network (one logit), initialised from ``seed``."""
    return get_task("classification").build_model(RunConfig(seed=seed))


def read_image(path: Path, size: int) -> tuple[torch.Tensor, str]:
    """One DICOM file as a ``(1, size, size)`` tensor in [0, 1], and the patient's sex."""
    ds = pydicom.dcmread(path)
    pixels = np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float64)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        pixels = pixels.max() + pixels.min() - pixels
    image = Resize((size, size), mode="area")(torch.from_numpy(pixels.astype(np.float32))[None])
    image = ScaleIntensityRangePercentiles(1, 99, 0.0, 1.0, clip=True)(image)
    return torch.as_tensor(np.asarray(image, dtype=np.float32)), normalise_sex(ds.get("PatientSex"))


def load_data(site: Path, split: str, image_size: int, seed: int) -> TensorDataset:
    """Read every DICOM file of a site folder and keep one split (train/val/test 60/20/20)."""
    with (site / "manifest.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    images, sexes = zip(*(read_image(site / row["image"], image_size) for row in rows), strict=True)
    keys = [legacy_patient_key(row["patient_id"]) for row in rows]
    patients: dict[str, PatientInfo] = {}
    for key, row, sex in zip(keys, rows, sexes, strict=True):
        before = patients.get(key)
        label = max(int(row["label"]), before.label if before else 0)
        patients[key] = PatientInfo(label=label, sex=before.sex if before else sex)
    splits = assign_splits(patients, val_fraction=0.2, test_fraction=0.2, seed=seed)
    index = [i for i, key in enumerate(keys) if splits[key] == split]
    labels = torch.tensor([float(rows[i]["label"]) for i in index])
    return TensorDataset(torch.stack([images[i] for i in index]), labels)


def train(net: nn.Module, loader: DataLoader, epochs: int, lr: float, device: str) -> float:
    """Train on the site's train split; the mean training loss."""
    net.to(device).train()
    criterion = nn.BCEWithLogitsLoss()
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    running, steps = 0.0, 0
    for _ in range(epochs):
        for images, labels in loader:
            if len(labels) < 2:  # BatchNorm needs two images
                continue
            optimizer.zero_grad()
            loss = criterion(net(images.to(device)).reshape(-1), labels.to(device))
            loss.backward()
            optimizer.step()
            running += loss.item()
            steps += 1
    return running / max(steps, 1)


def test(net: nn.Module, loader: DataLoader, device: str) -> tuple[float, float]:
    """Loss and accuracy on the site's validation split."""
    net.to(device).eval()
    criterion = nn.BCEWithLogitsLoss(reduction="sum")
    loss, correct = 0.0, 0
    with torch.no_grad():
        for images, labels in loader:
            logits = net(images.to(device)).reshape(-1)
            loss += criterion(logits, labels.to(device)).item()
            correct += ((logits > 0).float() == labels.to(device)).sum().item()
    return loss / len(loader.dataset), correct / len(loader.dataset)
