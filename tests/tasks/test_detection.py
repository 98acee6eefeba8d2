"""Detection task: the RetinaNet builds in 2-D and 3-D, box conventions, training, records."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from radfed.config import RunConfig
from radfed.data.loading import SplitData, load_site
from radfed.data.synth import synth_sites
from radfed.errors import ConfigError, DataError
from radfed.metrics.detection import DetectionStats
from radfed.tasks.detection import (
    HIST_KEYS,
    TASK,
    TP_HIST_KEYS,
    DetectionTask,
    RetinaNetModel,
    from_monai_boxes,
    to_monai_boxes,
)

CONFIG = RunConfig(
    task="detection", image_size=32, batch_size=8, local_epochs=2, metric_bins=20, seed=3
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny tensors gain nothing from a second intra-op thread, and one thread does not
    stall when other processes share the two cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SplitData]:
    """One generated detection site of 24 cases at 32 pixels: train and val splits."""
    root = tmp_path_factory.mktemp("det") / "data"
    synth_sites(root, task="detection", sites=1, cases_per_site=24, image_size=32, seed=1)
    folder = next(p for p in sorted(root.iterdir()) if p.is_dir())
    loaded = load_site(
        folder, image_size=32, val_fraction=0.25, test_fraction=0.0, seed=1, task="detection"
    )
    return loaded.splits


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return float(sum(float(((a[k].float() - b[k].float()) ** 2).sum()) for k in a) ** 0.5)


@pytest.mark.parametrize(("dims", "size"), [(2, 32), (3, 16)])
def test_builds_in_2d_and_3d_with_only_network_weights_in_the_state(dims: int, size: int) -> None:
    # Prepare
    config = dataclasses.replace(CONFIG, spatial_dims=dims, image_size=size)
    # Execute
    model = TASK.build_model(config)
    model.eval()
    with torch.no_grad():
        found = model(torch.rand(2, 1, *(size,) * dims))
    # Assert: the state is the network's, float weights and integer batch-norm counters
    assert isinstance(model, RetinaNetModel)
    state = model.state_dict()
    assert set(state) == {f"network.{k}" for k in model.detector.network.state_dict()}
    assert {v.dtype for v in state.values()} == {torch.float32, torch.int64}
    assert len(found) == 2 and found[0]["boxes"].shape[1] == 2 * dims
    assert len(found[0]["boxes"]) <= CONFIG.det_detections_per_image


def test_same_seed_same_initial_weights_and_no_global_rng_side_effect() -> None:
    # Prepare
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    # Execute
    a = _state(TASK.build_model(CONFIG))
    after = torch.rand(1)
    b = _state(TASK.build_model(CONFIG))
    c = _state(TASK.build_model(dataclasses.replace(CONFIG, seed=4)))
    # Assert
    assert torch.equal(before, after)
    assert _distance(a, b) == 0 and _distance(a, c) > 0


@pytest.mark.parametrize(
    ("shape", "box", "region"),
    [
        ((32, 32), (20, 4, 28, 10), np.s_[4:10, 20:28]),  # x = columns, y = rows
        ((12, 16, 20), (3, 5, 1, 17, 9, 4), np.s_[1:4, 5:9, 3:17]),  # z = slices
    ],
)
def test_box_conversion_agrees_with_monais_own_box_and_mask_helpers(
    shape: tuple[int, ...], box: tuple[int, ...], region: tuple[slice, ...]
) -> None:
    from monai.apps.detection.transforms.box_ops import convert_box_to_mask, convert_mask_to_box

    # Prepare: a lone bright block and its box in radfed's convention (x the last axis)
    mask = np.zeros(shape, dtype=np.int16)
    mask[region] = 1
    radfed_box = np.array([box], dtype=np.float32)
    # Execute
    drawn = convert_box_to_mask(to_monai_boxes(radfed_box), np.array([1]), shape, bg_label=0)
    found, _ = convert_mask_to_box(mask[None], bg_label=0)
    # Assert: MONAI draws the converted box on the block, and finds the block's box back
    np.testing.assert_array_equal(drawn[0], mask)
    np.testing.assert_array_equal(from_monai_boxes(np.asarray(found)), radfed_box)


def test_monais_anchors_number_coordinates_in_tensor_axis_order() -> None:
    # Prepare: a non-square image, 32 rows by 64 columns
    model = TASK.build_model(CONFIG)
    assert isinstance(model, RetinaNetModel)
    images = torch.rand(1, 1, 32, 64)
    # Execute
    with torch.no_grad():
        head = model.detector.network(images)
    anchors = model.detector.anchor_generator(images, head["classification"])[0]
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    # Assert: the first coordinate runs along the rows (dim 0), the second the columns
    assert float(centres[:, 0].max()) < 32 < float(centres[:, 1].max()) < 64


def test_training_lowers_the_loss_and_predictions_give_finite_metrics(
    site: dict[str, SplitData],
) -> None:
    # Prepare
    model = TASK.build_model(CONFIG)
    train, val = site["train"], site["val"]
    assert any(len(b) == 0 for b in train.boxes) and any(len(b) for b in train.boxes)
    # Execute: two rounds of local training, then prediction on val
    first = TASK.train(model, train, CONFIG, seed=1)
    second = TASK.train(model, train, CONFIG, seed=2)
    outputs = TASK.predict(model, val, CONFIG)
    stats = outputs.stats(np.arange(len(outputs)))
    metrics = TASK.metrics(stats)
    # Assert
    assert first.num_examples == len(train) and first.epochs == 2
    assert second.loss < first.loss
    assert next(model.parameters()).device.type == "cpu"
    assert stats.n == len(val) and stats.lesions == sum(len(b) for b in val.boxes)
    assert all(v is None or np.isfinite(v) for v in metrics.values())
    assert metrics["ap50"] is not None and 0 <= metrics["ap50"] <= 1
    assert outputs.boxes[0].shape[1] == 4 and outputs.boxes[0].dtype == np.float32
    rows = outputs.rows()
    assert len(rows) == len(val)
    assert [r["lesions"] for r in rows] == [len(b) for b in val.boxes]
    assert {"index", "lesions", "detections", "best_score"} <= set(rows[0])


def test_trains_and_predicts_volumes_in_3d() -> None:
    # Prepare: four 16^3 volumes, a bright 4x5x6 block in two of them
    config = dataclasses.replace(CONFIG, spatial_dims=3, image_size=16, local_epochs=1)
    images = torch.rand(4, 1, 16, 16, 16) * 0.2
    images[:2, 0, 2:6, 3:8, 6:12] = 1.0  # z 2:6, y 3:8, x 6:12
    block = np.array([[6, 3, 2, 12, 8, 6]], dtype=np.float32)  # x1, y1, z1, x2, y2, z2
    empty = np.zeros((0, 6), dtype=np.float32)
    data = SplitData(
        images=images, labels=torch.tensor([1, 1, 0, 0]), boxes=(block, block, empty, empty)
    )
    model = TASK.build_model(config)
    # Execute
    result = TASK.train(model, data, config, seed=0)
    outputs = TASK.predict(model, data, config)
    stats = outputs.stats([0, 1, 2, 3])
    # Assert
    assert np.isfinite(result.loss) and stats.n == 4 and stats.lesions == 2
    assert all(b.shape[1] == 6 for b in outputs.boxes)
    assert all(v is None or np.isfinite(v) for v in TASK.metrics(stats).values())


def test_images_without_lesions_train_as_negatives(site: dict[str, SplitData]) -> None:
    # Prepare: only the lesion-free cases
    train = site["train"]
    keep = [i for i, b in enumerate(train.boxes) if len(b) == 0]
    negatives = SplitData(
        images=train.images[keep],
        labels=train.labels[keep],
        boxes=tuple(train.boxes[i] for i in keep),
    )
    # Execute
    result = TASK.train(TASK.build_model(CONFIG), negatives, CONFIG, seed=0)
    # Assert
    assert result.num_examples == len(keep) > 0 and np.isfinite(result.loss)


def test_fedprox_pulls_the_update_towards_the_global_weights(
    site: dict[str, SplitData],
) -> None:
    # Prepare
    config = dataclasses.replace(CONFIG, local_epochs=1)
    start = _state(TASK.build_model(config))

    def update(mu: float) -> dict[str, torch.Tensor]:
        model = TASK.build_model(config)
        TASK.train(model, site["train"], config, seed=5, proximal_mu=mu)
        return _state(model)

    # Execute
    plain, again, proximal = update(0.0), update(0.0), update(10.0)
    # Assert: deterministic for a seed (bitwise on CPU; cuDNN's kernels are not bitwise
    # reproducible on a GPU), so the difference is the proximal term's
    noise = _distance(plain, again)
    assert noise == 0 if not torch.cuda.is_available() else noise < 0.1 * _distance(plain, proximal)
    assert _distance(plain, proximal) > 0
    assert _distance(proximal, start) < _distance(plain, start)


def test_early_stopping_on_the_validation_loss(site: dict[str, SplitData]) -> None:
    # Prepare
    config = dataclasses.replace(CONFIG, local_epochs=3, early_stopping_patience=1)
    model = TASK.build_model(config)
    model.eval()
    images = site["val"].images[:4]
    targets = [
        {"boxes": torch.from_numpy(to_monai_boxes(b)), "labels": torch.zeros(len(b)).long()}
        for b in site["val"].boxes[:4]
    ]
    before = _state(model)
    # Execute
    with torch.no_grad():
        losses = model(images, targets)
    result = TASK.train(model, site["train"], config, seed=0, val=site["val"])
    # Assert: the loss in eval mode leaves batch-norm statistics alone
    assert np.isfinite(float(losses["classification"] + losses["box_regression"]))
    assert _distance(before, _state(model)) > 0
    assert result.epochs in (1, 2, 3) and np.isfinite(result.loss)


def test_a_split_without_boxes_is_refused(site: dict[str, SplitData]) -> None:
    unboxed = dataclasses.replace(site["val"], boxes=())
    with pytest.raises(DataError, match="'boxes' column"):
        TASK.predict(TASK.build_model(CONFIG), unboxed, CONFIG)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model": "unet"}, "'model' for detection must be one of retinanet"),
        ({"loss": "dice"}, "'loss' for detection must be one of retinanet"),
        ({"patch_size": 16}, "'patch-size' must be 0 for detection"),
    ],
)
def test_check_refuses_settings_that_cannot_work(change: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TASK.check(dataclasses.replace(CONFIG, **change))  # type: ignore[arg-type]


def _stats() -> DetectionStats:
    gt = [np.array([[2.0, 2, 8, 8], [20.0, 20, 26, 27]]), np.zeros((0, 4))]
    pred = [np.array([[2.0, 2, 8, 8], [3.0, 2, 9, 8], [10.0, 10, 14, 14]]), np.zeros((0, 4))]
    scores = [np.array([0.9, 0.6, 0.3]), np.zeros(0)]
    return DetectionStats.from_images(pred, scores, gt, bins=CONFIG.metric_bins)


def test_record_values_round_trip_with_fixed_keys() -> None:
    # Prepare
    stats = _stats()
    # Execute
    values = TASK.to_values(stats)
    back = TASK.from_values(values, CONFIG)
    # Assert
    assert back == stats
    empty = TASK.to_values(TASK.empty_stats(CONFIG))
    assert list(values) == list(empty) == ["images", "lesions-missed", *HIST_KEYS]
    assert TP_HIST_KEYS[0] == "tp-hist-50" and TP_HIST_KEYS[-1] == "tp-hist-95"
    assert all(len(v) == CONFIG.metric_bins for k, v in values.items() if k.endswith("hist"))  # type: ignore[arg-type]
    assert TASK.from_values(empty, CONFIG) == TASK.empty_stats(CONFIG)
    assert TASK.metrics(back) == TASK.metrics(stats)


def _broken(key: str, value: object) -> dict[str, object]:
    values: dict[str, object] = dict(TASK.to_values(_stats()))
    if value is _MISSING:
        del values[key]
    else:
        values[key] = value
    return values


_MISSING = object()
_BINS = CONFIG.metric_bins


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("fp-hist", _MISSING, "fp-hist is missing"),
        ("images", 2.0, "images must be a non-negative integer"),
        ("images", True, "images must be a non-negative integer"),
        ("lesions-missed", -7, "lesions-missed must be a non-negative integer"),
        ("det-hist", [1] * (_BINS - 1), f"det-hist must be a list of {_BINS} counts"),
        ("hit-hist", "0,1", f"hit-hist must be a list of {_BINS} counts"),
        ("tp-hist-55", [0] * (_BINS - 1) + [-3], "tp-hist-55 must be a non-negative integer"),
        ("tp-hist-50", [0] * (_BINS - 1) + [5], "tp-hist-50 counts more detections"),
        ("fp-hist", [4] + [0] * (_BINS - 1), "fp-hist counts more detections"),
        ("hit-hist", [0, 0, 0, 9] + [0] * (_BINS - 4), "hit-hist places a lesion"),
        ("images", 0, "images must be positive"),
    ],
)
def test_bad_record_values_are_refused_by_key(key: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message) as raised:
        TASK.from_values(_broken(key, value), CONFIG)
    assert key in str(raised.value)
    assert value is _MISSING or repr(value) not in str(raised.value)


def test_more_true_positives_than_lesions_are_refused() -> None:
    values = _broken("lesions-missed", 0)
    values["hit-hist"] = [0] * _BINS
    values["det-hist"] = [0] * (_BINS - 1) + [3]
    for key in TP_HIST_KEYS:
        values[key] = [0] * (_BINS - 1) + [2]
    values["fp-hist"] = [0] * _BINS
    with pytest.raises(ValueError, match="tp-hist-50 counts more true positives than lesions"):
        TASK.from_values(values, CONFIG)


def test_the_registry_finds_the_task() -> None:
    from radfed.tasks import get_task

    task = get_task("detection")
    assert isinstance(task, DetectionTask) and task is TASK
    assert task.headline == "ap50" and task.models == task.losses == ("retinanet",)
