"""`radfed simulate --task detection|segmentation` end to end: real Flower, generated DICOM."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from radfed.config import RunConfig
from radfed.data.loading import SplitData, load_site_for
from radfed.data.synth import synth_sites
from radfed.federation.checkpoint import load_checkpoint
from radfed.tasks import get_task
from radfed.tasks.protocol import merge_stats
from tests.e2e.processes import run_simulate

#: Ray-backed simulations run one at a time, on one pytest-xdist worker.
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("ray")]
SITES = ("site-a", "site-b")


@pytest.fixture(scope="module", params=["detection", "segmentation"])
def finished(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    task = str(request.param)
    root = tmp_path_factory.mktemp(task)
    data, out = root / "data", root / "run"
    synth_sites(data, task=task, sites=len(SITES), cases_per_site=24, seed=4, image_size=32)
    output = run_simulate(
        root / "flwr-home",
        "--data",
        str(data),
        "--out",
        str(out),
        "--task",
        task,
        "--rounds",
        "2",
        "--run-config",
        # min-cell-size=1: nothing withheld, so the numbers can be recomputed exactly
        "image-size=32 local-epochs=2 batch-size=8 min-cell-size=1",
    )
    assert f"round 2/2 val {get_task(task).headline}" in output
    return out


def _site_splits(out: Path, config: RunConfig) -> dict[str, SplitData]:
    data = Path(config.data_root)
    return {site: load_site_for(data / site, config).splits["train"] for site in SITES}


def test_pooled_numbers_are_the_metrics_of_the_merged_site_statistics(finished: Path) -> None:
    # Prepare: the final global model, and each site's training cases
    checkpoint = load_checkpoint(finished / "checkpoints" / "round-002.pt")
    config = RunConfig.from_run_config(checkpoint["run-config"])
    task = get_task(config.task)
    model = task.build_model(config)
    model.load_state_dict(checkpoint["state_dict"])
    lines = [json.loads(line) for line in (finished / "metrics.jsonl").read_text().splitlines()]
    reported = {
        line["site"]: line for line in lines if line["round"] == 2 and line["split"] == "train"
    }
    # Execute: what each site computes locally, merged here
    per_site = {}
    for site, split in _site_splits(finished, config).items():
        outputs = task.predict(model, split, config)
        per_site[site] = outputs.stats(range(len(outputs)))
        assert reported[site]["n"] == len(split)
    pooled = task.metrics(merge_stats(task, per_site.values(), config))
    # Assert: every site and the pool reported every round, and the pool is the merged value
    assert {(line["round"], line["site"]) for line in lines} == {
        (r, s) for r in (1, 2) for s in (*SITES, "ALL")
    }
    assert pooled[task.headline] is not None
    for key, value in pooled.items():
        assert reported["ALL"]["metrics"][key] == pytest.approx(value, abs=1e-6), key
    assert (finished / "curves.png").is_file()


def test_segmentation_pooled_dice_equals_monai_on_the_pooled_cases(finished: Path) -> None:
    checkpoint = load_checkpoint(finished / "checkpoints" / "round-002.pt")
    config = RunConfig.from_run_config(checkpoint["run-config"])
    if config.task != "segmentation":
        pytest.skip("segmentation only")
    from monai.metrics import DiceMetric

    from radfed.tasks.segmentation import build_model, infer_logits

    # Prepare
    model = build_model(config)
    model.load_state_dict(checkpoint["state_dict"])
    model.eval()
    metric = DiceMetric(include_background=False, ignore_empty=True, reduction="none")
    # Execute: MONAI's Dice of every case of both sites, on the argmax masks
    values = []
    for split in _site_splits(finished, config).values():
        assert split.masks is not None
        with torch.no_grad():
            predicted = infer_logits(model, split.images, config).argmax(dim=1, keepdim=True)
        values.append(metric(predicted, split.masks.long()).reshape(-1).numpy())
    dice = np.concatenate(values)
    lines = [json.loads(line) for line in (finished / "metrics.jsonl").read_text().splitlines()]
    reported = next(
        line
        for line in lines
        if (line["round"], line["site"], line["split"]) == (2, "ALL", "train")
    )
    # Assert: the pooled mean over cases with a structure (MONAI gives NaN for the others)
    assert reported["metrics"]["dice_mean"] == pytest.approx(float(np.nanmean(dice)), abs=1e-5)
