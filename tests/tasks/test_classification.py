"""Classification task: every network builds and runs, losses match references, transfer start."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torchvision.ops import sigmoid_focal_loss

from radfed.central.run_folder import RunFolder
from radfed.central.server import load_initial_weights
from radfed.config import RunConfig
from radfed.errors import ConfigError, DataError
from radfed.tasks.classification import MODELS, build_model, make_loss

CONFIG = RunConfig(image_size=32)


@pytest.mark.parametrize("name", MODELS)
def test_every_network_gives_one_logit_per_image_in_2d_and_3d(name: str) -> None:
    for dims, size in ((2, 32), (3, 32)):
        if name in ("resnet50", "densenet121") and dims == 3:
            continue  # the biggest 3-D networks (slow on CPU): the 2-D check covers their wiring
        model = build_model(
            dataclasses.replace(CONFIG, model=name, spatial_dims=dims, image_size=size)
        )
        model.eval()
        with torch.no_grad():
            out = model(torch.rand(2, 1, *(size,) * dims))
        assert out.shape == (2, 1)


def test_same_seed_same_initial_weights_and_no_global_rng_side_effect() -> None:
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    a = build_model(CONFIG).state_dict()
    after = torch.rand(1)
    b = build_model(CONFIG).state_dict()
    assert torch.equal(before, after)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_losses_match_independent_references() -> None:
    logits = torch.tensor([2.0, -1.0, 0.5, -3.0, 1.5])
    targets = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0])
    focal = make_loss("focal", targets)(logits, targets)
    reference = sigmoid_focal_loss(logits, targets, alpha=-1, gamma=2.0, reduction="mean")
    assert float(focal) == pytest.approx(float(reference), rel=1e-5)
    weighted = make_loss("weighted-bce", targets)(logits, targets)
    p = torch.sigmoid(logits)
    ratio = 2 / 3  # negatives / positives at this "site"
    manual = -(ratio * targets * torch.log(p) + (1 - targets) * torch.log(1 - p)).mean()
    assert float(weighted) == pytest.approx(float(manual), rel=1e-5)
    with pytest.raises(ConfigError, match="'loss' must be one of"):
        make_loss("hinge", targets)


def test_transfer_learning_starts_from_a_local_checkpoint(tmp_path: Path) -> None:
    donor = build_model(dataclasses.replace(CONFIG, seed=99))
    run = RunFolder.start(tmp_path / "earlier", CONFIG)
    path = run.save_checkpoint(3, donor.state_dict(), CONFIG)
    model = build_model(CONFIG)
    load_initial_weights(model, path)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in donor.state_dict().items())
    torch.save(donor.state_dict(), tmp_path / "plain.pt")  # a plain state dict works too
    load_initial_weights(build_model(CONFIG), tmp_path / "plain.pt")
    other = build_model(dataclasses.replace(CONFIG, model="densenet121"))
    with pytest.raises(ConfigError, match="does not fit"):
        load_initial_weights(other, path)
    with pytest.raises(ConfigError, match="not found"):
        load_initial_weights(model, tmp_path / "absent.pt")


def test_early_stopping_keeps_the_best_epoch_when_validation_gets_worse() -> None:
    from radfed.data.loading import SplitData
    from radfed.tasks.classification import train

    # Prepare: validation labels are the training labels flipped, so fitting the training
    # split makes the validation loss worse from the first epoch on
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(32, 1, 32, 32, generator=generator)
    images[:16, :, 10:14, 10:14] += 2.0  # a bright spot marks the positives
    labels = torch.tensor([1] * 16 + [0] * 16)
    data, flipped = SplitData(images, labels), SplitData(images, 1 - labels)
    config = dataclasses.replace(
        CONFIG, local_epochs=8, batch_size=8, learning_rate=0.01, early_stopping_patience=2
    )
    model = build_model(config)
    # Execute
    result = train(model, data, config, seed=1, val=flipped)
    # Assert: stopped early, after the patience ran out
    assert result.epochs < config.local_epochs
    full = build_model(config)
    plain = train(
        full, data, dataclasses.replace(config, early_stopping_patience=0), seed=1, val=flipped
    )
    assert plain.epochs == config.local_epochs
    # the kept weights are the best epoch's: better on validation than training to the end
    loss_fn = make_loss("bce", labels)

    def val_loss(net: torch.nn.Module) -> float:
        with torch.no_grad():
            return float(loss_fn(net.eval()(flipped.images).reshape(-1), flipped.labels.float()))

    assert val_loss(model) < val_loss(full)


def test_multi_class_training_learns_three_classes() -> None:
    from radfed.data.loading import SplitData
    from radfed.tasks.classification import TASK

    # Prepare: class c has a bright spot in its own third of the image
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(60) % 3
    images = torch.rand(60, 1, 32, 32, generator=generator) * 0.2
    for i, c in enumerate(labels.tolist()):
        images[i, :, 12:18, 2 + 10 * c : 8 + 10 * c] += 1.0
    data = SplitData(images, labels)
    config = dataclasses.replace(
        CONFIG, num_classes=3, local_epochs=6, batch_size=12, learning_rate=0.01
    )
    TASK.check(config)
    model = TASK.build_model(config)
    # Execute
    TASK.train(model, data, config, seed=0)
    outputs = TASK.predict(model, data, config)
    values = TASK.metrics(outputs.stats(range(len(outputs))))
    # Assert: three logits, and the classes are told apart
    assert outputs.scores.shape == (60, 3)
    assert values["accuracy"] is not None and values["accuracy"] > 0.8
    with pytest.raises(DataError, match="num-classes"):
        TASK.train(model, data, dataclasses.replace(config, num_classes=2), seed=0)
    with pytest.raises(ConfigError, match="'loss' for 3-class classification"):
        TASK.check(dataclasses.replace(config, loss="bce"))


def test_dataloader_workers_give_the_same_update_as_the_main_process() -> None:
    from radfed.data.loading import SplitData
    from radfed.tasks.classification import train

    # Prepare
    generator = torch.Generator().manual_seed(3)
    data = SplitData(torch.rand(24, 1, 32, 32, generator=generator), torch.arange(24) % 2)
    config = dataclasses.replace(CONFIG, local_epochs=2, batch_size=8)
    inline, workers = build_model(config), build_model(config)
    # Execute
    train(inline, data, config, seed=5)
    train(workers, data, dataclasses.replace(config, num_workers=2), seed=5)
    # Assert: the order comes from the seed, not from the worker processes
    for key, value in inline.state_dict().items():
        assert torch.equal(value, workers.state_dict()[key]), key


def test_local_steps_bound_the_optimiser_steps_of_a_round() -> None:
    from radfed.data.loading import SplitData
    from radfed.tasks.classification import train

    # Prepare: 24 cases in batches of 8 = 3 steps per epoch
    generator = torch.Generator().manual_seed(4)
    data = SplitData(torch.rand(24, 1, 32, 32, generator=generator), torch.arange(24) % 2)
    config = dataclasses.replace(CONFIG, batch_size=8, local_epochs=1)
    # Execute
    by_steps = train(build_model(config), data, dataclasses.replace(config, local_steps=7), seed=1)
    by_epochs = train(build_model(config), data, config, seed=1)
    # Assert: 7 steps take three passes (3 + 3 + 1), one epoch takes one
    assert by_steps.epochs == 3 and by_epochs.epochs == 1


def test_intensity_augmentation_is_seeded_and_varies_each_image() -> None:
    from radfed.tasks.training import augment_intensity, seeded_generator

    images = torch.full((4, 1, 8, 8), 0.5)
    first = augment_intensity(images, seeded_generator(3))
    again = augment_intensity(images, seeded_generator(3))
    assert torch.equal(first, again)
    assert not torch.allclose(first[0], first[1])  # each image gets its own draw
    assert (first - images).abs().mean() > 0.01


def test_outputs_group_cases_by_patient_for_the_sums_and_never_show_the_keys() -> None:
    from radfed.data.loading import SplitData
    from radfed.tasks.classification import TASK

    # Prepare: 24 images of 8 patients (3 each)
    generator = torch.Generator().manual_seed(6)
    keys = tuple(f"secret-{i // 3}" for i in range(24))
    data = SplitData(
        torch.rand(24, 1, 32, 32, generator=generator), torch.arange(24) % 2, patients=keys
    )
    # Execute
    outputs = TASK.predict(build_model(CONFIG), data, CONFIG)
    stats = outputs.stats(range(24))
    values = TASK.to_values(stats)
    # Assert: patients counted, keys nowhere in what leaves or in the audit rows
    assert stats.auc_clusters.clusters == 8  # type: ignore[attr-defined]
    assert values["auc-exact"] == 1 and values["auc-clusters"] == [8, 8, 8]
    assert not any("secret" in repr(v) for v in (*values.values(), *outputs.rows(), stats))
