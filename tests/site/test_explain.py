"""`radfed explain`: Grad-CAM and occlusion maps for a site's cases, written locally."""

from __future__ import annotations

from pathlib import Path

import pytest
from torch import nn
from typer.testing import CliRunner

from radfed.central.run_folder import RunFolder
from radfed.cli import app
from radfed.config import RunConfig
from radfed.errors import ConfigError
from radfed.site.explain import explain_site, last_conv_layer
from radfed.tasks.classification import build_model

CONFIG = RunConfig(image_size=32, val_fraction=0.25, test_fraction=0.25)


def test_maps_have_the_image_shape_and_are_written_as_png(site_copy: Path, tmp_path: Path) -> None:
    # Prepare: a checkpoint as the server writes it
    run = RunFolder.start(tmp_path / "run", CONFIG)
    checkpoint = run.save_checkpoint(0, build_model(CONFIG).state_dict(), CONFIG)
    # Execute
    explained = explain_site(checkpoint, site_copy, tmp_path / "maps", split="train", cases=3)
    # Assert
    assert len(explained) == 3
    for case in explained:
        assert case.gradcam.shape == case.occlusion.shape == (32, 32)
        assert case.occlusion.min() >= 0.0 and case.occlusion.max() <= 1.0
        assert case.figure.read_bytes()[:4] == b"\x89PNG"
        assert case.figure.parent == tmp_path / "maps"
    result = CliRunner().invoke(
        app,
        [
            "explain",
            "--checkpoint",
            str(checkpoint),
            "--data",
            str(site_copy),
            "--out",
            str(tmp_path / "cli"),
            "--cases",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "cli").glob("*.png"))) == 1


def test_bad_inputs_are_named(site_copy: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        explain_site(tmp_path / "absent.pt", site_copy, tmp_path / "maps")
    run = RunFolder.start(tmp_path / "run", CONFIG)
    checkpoint = run.save_checkpoint(0, build_model(CONFIG).state_dict(), CONFIG)
    with pytest.raises(ConfigError, match="--split"):
        explain_site(checkpoint, site_copy, tmp_path / "maps", split="holdout")


def test_grad_cam_targets_the_last_convolution() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3), nn.Flatten())
    assert last_conv_layer(model) == "2"
    with pytest.raises(ConfigError, match="no convolution"):
        last_conv_layer(nn.Sequential(nn.Flatten(), nn.Linear(4, 1)))
