"""Segmentation task: networks, patch training, sliding-window inference, statistics records."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from radfed.config import RunConfig
from radfed.data.loading import SplitData, load_site
from radfed.data.synth import synth_sites
from radfed.errors import ConfigError, DataError
from radfed.metrics.segmentation import CaseMetrics, SegmentationStats
from radfed.tasks.segmentation import (
    COUNT_KEYS,
    HIST_KEYS,
    SUM_KEYS,
    TASK,
    infer_logits,
    make_loss,
)

_CONFIG = RunConfig(
    task="segmentation", image_size=32, batch_size=4, learning_rate=1e-2, metric_bins=20
)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One intra-op thread: on two shared cores, OpenMP threads waiting for a busy core
    slow these small trainings tenfold or more; one thread keeps them at about a second."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def splits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SplitData]:
    """One generated segmentation site of 24 cases, 32 x 32 pixels."""
    root = tmp_path_factory.mktemp("seg") / "data"
    synth_sites(root, task="segmentation", sites=1, cases_per_site=24, image_size=32, seed=1)
    site = load_site(
        root / "site-a",
        image_size=32,
        val_fraction=0.2,
        test_fraction=0.2,
        seed=1,
        task="segmentation",
    )
    return site.splits


def _mean_loss(model: nn.Module, data: SplitData, config: RunConfig) -> float:
    assert data.masks is not None
    model.eval()
    with torch.no_grad():
        logits = infer_logits(model, data.images, config)
        return float(make_loss("dice-ce")(logits, data.masks.float()))


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("model", ["unet", "segresnet"])
@pytest.mark.parametrize("dims", [2, 3])
def test_builds_both_models_in_2d_and_3d_with_seeded_weights(model: str, dims: int) -> None:
    # Prepare
    config = RunConfig(task="segmentation", model=model, spatial_dims=dims, image_size=16)
    images = torch.rand((1, 1) + (16,) * dims)
    # Execute
    net = TASK.build_model(config)
    again = TASK.build_model(config)
    other = TASK.build_model(dataclasses.replace(config, seed=config.seed + 1))
    net.eval()
    with torch.no_grad():
        logits = net(images)
    # Assert
    assert logits.shape == (1, 2) + (16,) * dims
    assert torch.equal(_flat(net), _flat(again)) and not torch.equal(_flat(net), _flat(other))


@pytest.mark.parametrize(
    ("settings", "key", "fix"),
    [
        ({"patch_size": 48}, "'patch-size'", "at most image-size (32)"),
        ({"patch_size": 12}, "'patch-size'", "use 16"),
        ({"image_size": 36}, "'image-size'", "use 32 or 40"),
        ({"model": "vnet"}, "'model'", "unet, segresnet"),
        ({"loss": "bce"}, "'loss'", "dice-ce, dice"),
    ],
)
def test_check_refuses_settings_that_cannot_work(
    settings: dict[str, object], key: str, fix: str
) -> None:
    # Prepare
    config = dataclasses.replace(_CONFIG, **settings)  # type: ignore[arg-type]
    # Execute / Assert: the message names the key, the value and the fix
    with pytest.raises(ConfigError, match=key) as info:
        TASK.check(config)
    value = next(iter(settings.values()))
    assert repr(value) in str(info.value) or str(value) in str(info.value)
    assert fix in str(info.value)
    with pytest.raises(ConfigError):
        TASK.build_model(config)
    TASK.check(dataclasses.replace(_CONFIG, patch_size=16))


def test_short_training_lowers_the_loss_and_gives_finite_metrics(
    splits: dict[str, SplitData],
) -> None:
    # Prepare
    config = dataclasses.replace(_CONFIG, local_epochs=15)
    model = TASK.build_model(config)
    before = _mean_loss(model, splits["train"], config)
    # Execute
    result = TASK.train(model, splits["train"], config, seed=3, val=splits["val"])
    outputs = TASK.predict(model, splits["train"], config)
    stats = outputs.stats(np.arange(len(outputs)))
    metrics = TASK.metrics(stats)
    # Assert
    after = _mean_loss(model, splits["train"], config)
    assert after < 0.8 * before
    assert result.num_examples == len(splits["train"]) and result.epochs == 15
    assert stats.n == len(splits["train"]) and stats.segmented > 0
    for key in ("dice_mean", "dice_median", "iou_mean", "hd95_mean", "hd95_median"):
        value = metrics[key]
        assert value is not None and math.isfinite(value), key
    assert 0 < (metrics["dice_mean"] or 0) <= 1
    assert next(p.device for p in model.parameters()).type == "cpu"


def test_fedprox_changes_the_update_and_same_seed_repeats_it(
    splits: dict[str, SplitData],
) -> None:
    # Prepare
    config = dataclasses.replace(_CONFIG, local_epochs=2)
    start = _flat(TASK.build_model(config))
    # Execute
    updates = {}
    for name, mu in (("plain", 0.0), ("again", 0.0), ("prox", 10.0)):
        model = TASK.build_model(config)
        TASK.train(model, splits["train"], config, seed=5, proximal_mu=mu)
        updates[name] = _flat(model) - start
    # Assert
    assert torch.equal(updates["plain"], updates["again"])
    assert not torch.allclose(updates["plain"], updates["prox"])
    assert updates["prox"].norm() < updates["plain"].norm()


def test_patch_training_and_sliding_window_prediction_run(splits: dict[str, SplitData]) -> None:
    # Prepare
    config = dataclasses.replace(_CONFIG, patch_size=16, local_epochs=2, model="segresnet")
    model = TASK.build_model(config)
    # Execute
    result = TASK.train(model, splits["train"], config, seed=2, val=splits["val"])
    again = TASK.build_model(config)
    TASK.train(again, splits["train"], config, seed=2, val=splits["val"])
    outputs = TASK.predict(model, splits["val"], config)
    # Assert: finite loss, seeded patches (same seed, same weights), one value per case
    assert math.isfinite(result.loss) and result.epochs == 2
    assert torch.equal(_flat(model), _flat(again))
    assert len(outputs) == len(splits["val"]) and len(outputs.rows()) == len(splits["val"])


def test_sliding_window_matches_whole_image_inference_of_a_pointwise_net() -> None:
    # Prepare: a 1 x 1 convolution sees no neighbours, so patches change nothing
    torch.manual_seed(0)
    net = nn.Conv2d(1, 2, kernel_size=1)
    images = torch.rand(3, 1, 32, 32)
    whole = dataclasses.replace(_CONFIG, patch_size=0)
    patched = dataclasses.replace(_CONFIG, patch_size=16, sw_overlap=0.25)
    # Execute
    with torch.no_grad():
        expected = infer_logits(net, images, whole)
        got = infer_logits(net, images, patched)
    # Assert: every pixel covered, same values, a plain tensor
    assert got.shape == expected.shape == (3, 2, 32, 32)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    assert type(got) is torch.Tensor


def test_sliding_window_unet_prediction_covers_the_image() -> None:
    # Prepare
    config = dataclasses.replace(_CONFIG, patch_size=16)
    net = TASK.build_model(config).eval()
    images = torch.rand(2, 1, 32, 32)
    # Execute
    with torch.no_grad():
        patched = infer_logits(net, images, config)
        whole = infer_logits(net, images, dataclasses.replace(config, patch_size=0))
    # Assert: same shape, finite everywhere (instance norm per patch: values differ a bit)
    assert patched.shape == whole.shape == (2, 2, 32, 32)
    assert torch.isfinite(patched).all()
    assert float((patched.argmax(1) == whole.argmax(1)).float().mean()) > 0.5


def test_predict_rows_name_each_case_kind_and_leave_undefined_values_blank() -> None:
    # Prepare: a net that predicts foreground everywhere; one empty and one full mask
    class _All(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([torch.zeros_like(x), torch.ones_like(x)], dim=1)

    masks = torch.zeros(2, 1, 32, 32, dtype=torch.uint8)
    masks[1, 0, 8:16, 8:16] = 1
    data = SplitData(images=torch.rand(2, 1, 32, 32), labels=torch.tensor([0, 1]), masks=masks)
    # Execute
    outputs = TASK.predict(_All(), data, _CONFIG)
    rows = outputs.rows()
    # Assert
    assert [r["kind"] for r in rows] == ["false-positive", "segmented"]
    assert rows[0]["dice"] == "" and rows[0]["hd95"] == ""
    assert rows[1]["dice"] == pytest.approx(2 * 64 / (64 + 1024))
    assert rows[1]["foreground_voxels"] == 64 and rows[1]["predicted_voxels"] == 1024
    assert outputs.stats([0]).false_positive == 1 and outputs.stats([1]).segmented == 1


def test_missing_masks_are_a_data_error() -> None:
    data = SplitData(images=torch.rand(2, 1, 32, 32), labels=torch.tensor([0, 1]))
    with pytest.raises(DataError, match="mask"):
        TASK.predict(TASK.build_model(_CONFIG), data, _CONFIG)


def _stats() -> SegmentationStats:
    rng = np.random.default_rng(0)
    kind = rng.choice(4, size=40).astype(np.int8)
    dice = np.where(kind >= 2, rng.uniform(0, 1, 40), np.nan)
    dice[kind == 2] = 0.0
    hd95 = np.where(kind == 3, rng.uniform(0, 20, 40), np.nan)
    voxels = rng.integers(1, 9, (3, 40))
    tp = np.where(kind == 3, voxels[0], 0)
    fp = np.where(np.isin(kind, (1, 3)), voxels[1], 0)
    fn = np.where(np.isin(kind, (2, 3)), voxels[2], 0)
    cases = CaseMetrics(kind, dice, dice / (2 - dice), hd95, tp, fp, fn)
    return TASK.empty_stats(_CONFIG) + SegmentationStats.from_cases(
        cases, bins=_CONFIG.metric_bins, hd95_max=TASK.empty_stats(_CONFIG).hd95_max
    )


def test_values_round_trip_with_fixed_keys_and_lengths() -> None:
    # Prepare
    stats = _stats().with_min_cell(5)
    # Execute
    values = TASK.to_values(stats)
    back = TASK.from_values(values, _CONFIG)
    # Assert
    assert set(values) == {*COUNT_KEYS, *SUM_KEYS, *HIST_KEYS}
    assert set(TASK.to_values(TASK.empty_stats(_CONFIG))) == set(values)
    assert all(len(values[k]) == _CONFIG.metric_bins for k in HIST_KEYS)  # type: ignore[arg-type]
    assert all(type(values[k]) is int for k in COUNT_KEYS)
    assert all(type(values[k]) is float for k in SUM_KEYS)
    assert back == stats
    assert TASK.metrics(back) == TASK.metrics(stats)


@pytest.mark.parametrize(
    ("key", "bad"),
    [
        ("missed", None),
        ("segmented", -1),
        ("tp-voxels", 2.5),
        ("dice-hits", True),
        ("dice-sum", math.inf),
        ("iou-sum", "0.1"),
        ("hd95-hist", [0] * 3),
        ("dice-hist", [-1] + [0] * 19),
        ("segmented", 10_000),  # disagrees with the histograms
        ("dice-sum", 1e6),  # above one per case
        ("hd95-sum", 1e6),  # above the image diagonal per case
        ("voxels-withheld", 3),  # some of the cell's cases: the sums leave whole or not
    ],
)
def test_from_values_rejects_naming_the_key_but_not_the_value(key: str, bad: object) -> None:
    # Prepare
    values: dict[str, object] = dict(TASK.to_values(_stats()))
    if bad is None:
        del values[key]
    else:
        values[key] = bad
    # Execute / Assert
    with pytest.raises(ValueError, match=key) as info:
        TASK.from_values(values, _CONFIG)
    if bad is not None and not isinstance(bad, list | bool):
        assert str(bad) not in str(info.value).replace(str(_CONFIG.metric_bins), "")


def test_to_values_refuses_other_statistics() -> None:
    from radfed.metrics.binary import BinaryStats

    with pytest.raises(TypeError, match="BinaryStats"):
        TASK.to_values(BinaryStats.empty(10))


def test_task_attributes(tmp_path: Path) -> None:
    assert TASK.name == "segmentation" and TASK.headline == "dice_mean"
    assert TASK.models == ("unet", "segresnet") and TASK.losses == ("dice-ce", "dice")
    assert TASK.headline in TASK.metrics(TASK.empty_stats(_CONFIG))


def test_a_cell_that_withholds_a_metric_but_sends_its_voxels_is_refused() -> None:
    # Prepare: a cell whose Dice part is withheld (fewer segmented cases than k) claims
    # to send its voxel sums
    stats = _stats()
    withheld = stats.with_min_cell(stats.segmented + 1)
    assert withheld.dice_withheld and withheld.voxels_withheld == withheld.n
    values: dict[str, object] = dict(TASK.to_values(withheld))
    values["voxels-withheld"] = 0

    # Execute / Assert
    with pytest.raises(ValueError, match="voxels-withheld must be the cell's cases"):
        TASK.from_values(values, _CONFIG)
