"""A global model whose outputs are not numbers (diverged, as FedAvg under a sign-flipping
site makes it, or crafted) is evaluated like any other: the site answers statistics, not an
error. An error would be an exact bit about the images (a model can be made to give NaN for
some images only), outside the disclosure control the statistics go through."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict

from radfed.config import RunConfig, TaskName
from radfed.data.synth import synth_sites
from radfed.federation.packing import pack
from radfed.federation.schema import unpack_cells
from radfed.site.handlers import handle_evaluate
from radfed.tasks import get_task
from radfed.tasks.classification import _probabilities
from tests.helpers import make_context, make_message, site_node

CONFIG = RunConfig(image_size=32, local_epochs=1, batch_size=8, seed=3)


def _diverged(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every batch-norm running variance -1: finite weights (the site's check passes them)
    whose evaluation-mode outputs are NaN for every image."""
    out = {k: v.clone() for k, v in state.items()}
    variances = [k for k in out if k.endswith("running_var")]
    assert variances, "the model has no batch normalisation to make diverge"
    for key in variances:
        out[key].fill_(-1.0)
    assert all(torch.isfinite(v).all() for v in out.values() if v.is_floating_point())
    return out


def _evaluate(config: RunConfig, state: dict[str, torch.Tensor], site: Path) -> Message:
    content = RecordDict({"arrays": pack(state), "config": ConfigRecord({"server-round": 1})})
    request = make_message(content, message_type="evaluate", src_node_id=0, dst_node_id=1)
    return handle_evaluate(request, make_context(config.to_run_config(), site_node(site)))


@pytest.fixture(scope="module")
def detection_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("det") / "data"
    synth_sites(root, task="detection", sites=1, cases_per_site=24, image_size=32, seed=1)
    return root


@pytest.mark.parametrize("task", ["classification", "detection"])
def test_a_model_that_outputs_nan_is_evaluated_not_failed(
    task: str,
    site_copy: Path,
    detection_root: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: the task's model made to diverge, and, as the control, the same model sane;
    # each evaluated at a fresh copy of the site
    config = dataclasses.replace(CONFIG, task=TaskName(task))
    if task == "detection":
        source = next(p for p in sorted(detection_root.iterdir()) if p.is_dir())
        site_copy = tmp_path / "detection" / source.name
        shutil.copytree(source, site_copy, ignore=shutil.ignore_patterns(".radfed"))
    other = tmp_path / "control" / site_copy.name
    shutil.copytree(site_copy, other, ignore=shutil.ignore_patterns(".radfed"))
    sane = dict(get_task(task).build_model(config).state_dict())
    caplog.set_level(logging.INFO, logger="radfed")

    # Execute
    diverged = _evaluate(config, _diverged(sane), site_copy)
    control = _evaluate(config, sane, other)

    # Assert: statistics of the same shape in both, read by the server's own parser; for
    # classification every case counts at the uniform probability (AUC exactly 0.5) and the
    # site's own log says how many cases had no number
    for reply in (diverged, control):
        assert not reply.has_error(), reply.error
    assert diverged.content.keys() == control.content.keys()
    cells = unpack_cells(
        get_task(task),
        diverged.content["metrics"],  # type: ignore[arg-type]
        diverged.content.config_records.get("cells"),
        config,
    )
    stats = next(iter(cells.values()))[0].stats
    assert stats.n > 0
    if task == "classification":
        assert get_task(task).metrics(stats)["auc"] == pytest.approx(0.5)
        assert "the model's output is not a number for" in caplog.text


def test_binary_nan_is_one_half_and_the_rest_untouched() -> None:
    # Prepare
    logits = torch.tensor([0.0, float("nan"), 2.0, float("inf"), float("-inf")])

    # Execute
    probabilities, unknown = _probabilities(logits, 2)

    # Assert: only the NaN is replaced; infinite logits are certain, not unknown
    expected = torch.sigmoid(torch.tensor([0.0, 0.0, 2.0, float("inf"), float("-inf")]))
    assert unknown == 1
    assert torch.equal(probabilities, expected)


def test_a_multiclass_row_that_is_not_a_number_is_uniform() -> None:
    # Prepare: a sane row, a row with one NaN logit, a row with +inf (softmax: NaN)
    logits = torch.tensor([[1.0, 2.0, 3.0], [1.0, float("nan"), 0.0], [float("inf"), 0.0, 0.0]])

    # Execute
    probabilities, unknown = _probabilities(logits, 3)

    # Assert
    assert unknown == 2
    assert torch.allclose(probabilities[0], torch.softmax(logits[0], dim=0))
    assert torch.equal(probabilities[1:], torch.full((2, 3), 1 / 3))
    np.testing.assert_allclose(probabilities.sum(dim=1).numpy(), 1.0, rtol=1e-6)


def test_detection_training_still_sees_what_the_network_gives() -> None:
    # Prepare: a diverged detector in training mode with targets
    config = dataclasses.replace(CONFIG, task=TaskName("detection"))
    model = get_task("detection").build_model(config)
    model.load_state_dict(_diverged(dict(model.state_dict())))
    model.eval()  # batch norm on its (negative) running variance
    images = torch.rand(2, 1, 32, 32)
    targets = [
        {"boxes": torch.tensor([[4.0, 4.0, 12.0, 12.0]]), "labels": torch.tensor([0])}
        for _ in range(2)
    ]

    # Execute / Assert: MONAI's own refusal of NaN heads while training stands (the hook
    # changes detections only); detections come out finite
    with pytest.raises(ValueError, match="NaN or Inf"):
        model(images, targets)
    with torch.no_grad():
        found = model(images)
    assert all(torch.isfinite(f["boxes"]).all() for f in found)
