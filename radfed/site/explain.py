"""Saliency maps at a site: Grad-CAM and occlusion sensitivity (MONAI), written locally as PNG.

The literature's way of catching a model that looks at a burned-in marker instead of the
lesion. Everything is written to the site's own folder; nothing of it leaves the site.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from radfed.config import RunConfig
from radfed.data.loading import load_site_for
from radfed.errors import ConfigError
from radfed.federation.checkpoint import load_checkpoint
from radfed.log import logger
from radfed.tasks.classification import build_model, predict

__all__ = ["ExplainedCase", "explain_site", "last_conv_layer"]


@dataclass(frozen=True)
class ExplainedCase:
    """Maps of one case, each of the image's spatial shape, scaled to [0, 1]."""

    index: int
    label: int
    score: float
    gradcam: np.ndarray
    occlusion: np.ndarray
    figure: Path


def last_conv_layer(model: nn.Module) -> str:
    """Name of the last convolution, Grad-CAM's target layer."""
    names: list[str] = [
        str(name)
        for name, module in model.named_modules()
        if isinstance(module, nn.Conv2d | nn.Conv3d)
    ]
    if not names:
        raise ConfigError("the model has no convolution layer for Grad-CAM")
    return names[-1]


def explain_site(
    checkpoint: Path, site_dir: Path, out: Path, *, split: str = "val", cases: int = 8
) -> list[ExplainedCase]:
    """Grad-CAM and occlusion maps for the first ``cases`` cases of a split.

    Args:
        checkpoint: a radfed checkpoint (its run config rebuilds the model and preprocessing).
        site_dir: the site folder.
        out: folder for one PNG per case (image, Grad-CAM, occlusion side by side).
        split: ``train``, ``val`` or ``test``.
        cases: how many cases to explain.
    """
    if not checkpoint.is_file():
        raise ConfigError(f"checkpoint {checkpoint} not found")
    stored = load_checkpoint(checkpoint)
    config = RunConfig.from_run_config(stored["run-config"])
    if config.task != "classification":
        msg = f"radfed explain maps classifiers; this checkpoint is a {config.task} model"
        raise ConfigError(msg)
    model = build_model(config)
    model.load_state_dict(stored["state_dict"], strict=not config.fedbn)
    model.eval()
    site = load_site_for(site_dir, config)
    if split not in site.splits:
        raise ConfigError(f"--split must be train, val or test, got {split!r}")
    data = site.splits[split]
    count = min(cases, len(data))
    if count == 0:
        raise ConfigError(f"the {split} split of this site is empty")
    from monai.visualize import GradCAM, OcclusionSensitivity

    gradcam = GradCAM(nn_module=model, target_layers=last_conv_layer(model))
    # logits, not probabilities: a saturated sigmoid would flatten every difference
    occlusion = OcclusionSensitivity(
        nn_module=model,
        mask_size=max(4, config.image_size // 8),
        n_batch=16,
        verbose=False,
        activate=False,
    )
    probabilities = predict(model, data, config)
    # multi-class: explain the predicted class of each case
    classes = (
        np.zeros(len(probabilities), dtype=np.int64)
        if probabilities.ndim == 1
        else probabilities.argmax(axis=1)
    )
    scores = probabilities if probabilities.ndim == 1 else probabilities.max(axis=1)
    out.mkdir(parents=True, exist_ok=True)
    explained = []
    for index in range(count):
        image = data.images[index : index + 1]
        with warnings.catch_warnings():  # MONAI's indexing deprecation notices
            warnings.simplefilter("ignore")
            target = int(classes[index])
            cam = gradcam(x=image, class_idx=target)[0, 0].detach().numpy()
            occluded, _ = occlusion(image)
            with torch.no_grad():
                logit = float(model(image)[0, target])
        # the logit after masking each region: where it drops most is what the model used
        drop = logit - occluded[0, target].detach().numpy()
        maps = (_unit(cam), _unit(drop))
        figure = out / f"{split}-{index:04d}.png"
        _plot(
            image[0, 0].numpy(),
            maps,
            figure,
            label=int(data.labels[index]),
            score=float(scores[index]),
        )
        explained.append(
            ExplainedCase(
                index, int(data.labels[index]), float(scores[index]), maps[0], maps[1], figure
            )
        )
    logger.info("explained %d %s cases into %s", count, split, out)
    return explained


def _unit(values: np.ndarray) -> np.ndarray:
    values = np.nan_to_num(values.astype(np.float32))
    span = float(values.max() - values.min())
    return (values - values.min()) / span if span > 0 else np.zeros_like(values)


def _plot(
    image: np.ndarray, maps: tuple[np.ndarray, np.ndarray], path: Path, *, label: int, score: float
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def middle(values: np.ndarray) -> np.ndarray:
        return values[values.shape[0] // 2] if values.ndim == 3 else values

    fig, axes = plt.subplots(1, 3, figsize=(9, 3.2))
    axes[0].imshow(middle(image), cmap="gray")
    axes[0].set_title(f"label {label}, score {score:.2f}")
    for ax, values, title in zip(axes[1:], maps, ("Grad-CAM", "occlusion"), strict=True):
        ax.imshow(middle(image), cmap="gray")
        ax.imshow(middle(values), cmap="jet", alpha=0.45, vmin=0, vmax=1)
        ax.set_title(title)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
