"""DP statistics at a site's real evaluate handler: what leaves, what it costs, that the
budget refuses, that one patient moves the release by no more than its stated sensitivity,
and the threshold sweep of a server that crafts its models, measured under noise.

The site is generated DICOM whose manifest sets sex, age and split (``_site``), with a
policy that turns DP statistics on.
"""

from __future__ import annotations

import csv
import dataclasses
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from scipy.special import expit

from radfed.config import RunConfig
from radfed.data.attributes import AgeBands
from radfed.data.loading import SplitData, load_site_for
from radfed.data.synth import synth_classification
from radfed.errors import DataError
from radfed.federation.codes import ErrorCode
from radfed.federation.packing import pack
from radfed.federation.schema import CellStats, unpack_cells
from radfed.metrics.binary import BinaryStats
from radfed.metrics.cells import SMALL_GROUPS, Cell, listed_groups, subgroup_cells
from radfed.privacy import load_policy
from radfed.privacy import noise as noise_module
from radfed.privacy.accountant import PrivacyLedger
from radfed.site import evaluate as site_evaluate
from radfed.site import handlers
from radfed.site.handlers import handle_evaluate, handle_train
from radfed.tasks.classification import TASK, build_model
from tests.helpers import make_context, make_message
from tests.site.test_disclosure_attacks import MEN, WOMEN, _site

NOISE, EPSILON = 4.0, 10.0
POLICY = f"[policy.dp-statistics]\nnoise = {NOISE}\nepsilon = {EPSILON}\n"
CONFIG = RunConfig(
    image_size=32, eval_splits=("val",), seed=3, score_bins=20, num_server_rounds=100
)
#: Cells each case is in: all, sex, age_band, manufacturer, sex*age_band.
CELLS_PER_CASE = 5


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dp") / "data"
    synth_classification(root, sites=1, cases_per_site=200, seed=5, image_size=32)
    return root / "site-a"


@pytest.fixture
def site(generated: Path, tmp_path: Path) -> Path:
    path = _site(generated, tmp_path, WOMEN + MEN)
    (path / "site-policy.toml").write_text(POLICY)
    return path


def _send(
    site: Path,
    state: dict[str, torch.Tensor],
    config: RunConfig = CONFIG,
    *,
    server_round: int = 1,
    run_id: int = 1,
    kind: str = "evaluate",
) -> Message:
    content = RecordDict(
        {"arrays": pack(state), "config": ConfigRecord({"server-round": server_round})}
    )
    message = make_message(content, message_type=kind, src_node_id=0, dst_node_id=1, run_id=run_id)
    node = {"site-name": "site-a", "data-path": str(site)}
    handler = handle_evaluate if kind == "evaluate" else handle_train
    return handler(message, make_context(config.to_run_config(), node))


def _cells(reply: Message, config: RunConfig = CONFIG) -> list[CellStats]:
    return unpack_cells(
        TASK,
        reply.content["metrics"],  # type: ignore[arg-type]
        reply.content.config_records["cells"],
        config,
    )["val"]


def test_every_listed_cell_leaves_noisy_and_none_is_suppressed(site: Path) -> None:
    # Prepare
    state = build_model(CONFIG).state_dict()

    # Execute
    reply = _send(site, state)

    # Assert: the server reads the noisy reply; every group of each vocabulary is a cell
    # (which cells leave does not depend on the data), none suppressed, every cell's noise
    # variance is the policy's, and the counts are not the exact ones
    assert not reply.has_error()
    cells = _cells(reply)
    bands = ("18-39", "40-59", "60-79", "80+")
    names = {(c.attribute, c.group) for c in cells}
    for attribute in ("sex", "age_band", "sex*age_band"):
        groups = listed_groups(attribute, bands, {})
        assert {(attribute, g) for g in groups} <= names
    assert ("sex", SMALL_GROUPS) in names and ("sex", "other") in names  # empty, listed
    assert all(isinstance(c.stats, BinaryStats) for c in cells)
    assert all(c.stats.noise == NOISE**2 and not c.stats.suppressed for c in cells)
    val = load_site_for(site, CONFIG).splits["val"]
    model = build_model(CONFIG)
    model.load_state_dict(state)
    exact = TASK.predict(model, val, CONFIG).stats(range(len(val)))
    assert cells[0].stats != exact and cells[0].stats.pos_hist != exact.pos_hist


def test_each_release_is_accounted_and_the_budget_refuses_the_one_beyond(site: Path) -> None:
    # Prepare: releases cost rho = A / (2 noise^2); the policy's epsilon 10 at delta 1e-6
    # allows 8 of them
    state = build_model(CONFIG).state_dict()
    rho = CELLS_PER_CASE / (2 * NOISE**2)

    # Execute
    replies = [_send(site, state, server_round=r) for r in range(1, 10)]

    # Assert: eight answered, each recorded before the data was read; the ninth refused
    # with a policy code, and nothing but the code left
    assert [r.has_error() for r in replies] == [False] * 8 + [True]
    assert replies[-1].error.code == ErrorCode.POLICY
    assert not replies[-1].has_content()
    spent = PrivacyLedger(site / ".radfed" / "privacy.jsonl").spent("statistics")
    assert spent.rounds == 8 and spent.rho == pytest.approx(8 * rho)
    assert spent.epsilon(1e-6) <= EPSILON


def test_a_run_of_another_task_is_refused_before_any_data_is_read(site: Path) -> None:
    config = dataclasses.replace(CONFIG, num_classes=3)
    reply = _send(site, build_model(config).state_dict(), config)
    assert reply.has_error() and reply.error.code == ErrorCode.POLICY
    assert not (site / ".radfed" / "privacy.jsonl").exists()


def test_a_training_reply_sends_no_exact_loss_under_dp_statistics(
    generated: Path, tmp_path: Path
) -> None:
    # Prepare: every case trains; DP statistics on (and no DP on the update)
    site = _site(generated, tmp_path, [])
    (site / "site-policy.toml").write_text(POLICY)
    config = dataclasses.replace(CONFIG, local_epochs=1, batch_size=16)

    # Execute
    reply = _send(site, build_model(config).state_dict(), config, kind="train")

    # Assert: the loss is a statistic of the training cases: not sent; the count leaves
    # with noise, accounted as one count (rho = 1 / (2 noise^2)) before training
    assert not reply.has_error()
    metrics = reply.content["metrics"]
    assert metrics["train-loss"] == 0.0 and metrics["num-examples"] >= 1  # type: ignore[index]
    spent = PrivacyLedger(site / ".radfed" / "privacy.jsonl").spent("statistics")
    assert spent.rounds == 1 and spent.rho == pytest.approx(1 / (2 * NOISE**2))


def test_a_model_that_scores_cases_nan_still_gets_a_noisy_release(site: Path) -> None:
    # Prepare: finite weights whose logit overflows to +inf - inf = NaN (a crafted model
    # can make this happen for some cases only: whether the reply is an error would then
    # be an exact answer about the data)
    state = build_model(CONFIG).state_dict()
    weight = state["fc.weight"]
    state["fc.weight"] = (
        torch.where(torch.arange(weight.shape[1]) % 2 == 0, torch.tensor(3e38), torch.tensor(-3e38))
        .expand_as(weight)
        .clone()
    )

    # Execute
    reply = _send(site, state)

    # Assert: the same kind of reply as for any model (NaN scores count as 0)
    assert not reply.has_error()
    assert all(c.stats.noise == NOISE**2 for c in _cells(reply))


def test_non_finite_weights_are_refused_before_anything_is_spent(site: Path) -> None:
    state = build_model(CONFIG).state_dict()
    state["fc.bias"] = torch.tensor([float("nan")])
    reply = _send(site, state)
    assert reply.has_error() and reply.error.code == ErrorCode.CONFIG
    assert not (site / ".radfed" / "privacy.jsonl").exists()


def test_work_that_fails_after_the_release_was_spent_sends_noise_not_an_error(
    site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the site's data cannot be read under the run's settings (whether it can may
    # depend on the data, so the reply must not tell)
    def unreadable(*args: object, **kwargs: object) -> None:
        raise DataError("no readable image")

    monkeypatch.setattr(handlers, "load_site_once", unreadable)

    # Execute
    reply = _send(site, build_model(CONFIG).state_dict())

    # Assert: a release of the same cells, each only noise; spent like any other
    assert not reply.has_error()
    cells = _cells(reply)
    assert len(cells) > 40 and all(c.stats.noise == NOISE**2 for c in cells)
    assert PrivacyLedger(site / ".radfed" / "privacy.jsonl").spent("statistics").rounds == 1


def test_the_training_count_counts_each_patient_at_most_cases_per_patient_times(
    generated: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: every case trains; one patient has five of them (others several too); the
    # noise is set to 0 to see the count it is added to
    site = _site(generated, tmp_path, [])
    (site / "site-policy.toml").write_text(POLICY)
    with (site / "manifest.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    for row in rows[1:5]:
        row["patient_id"] = rows[0]["patient_id"]
    with (site / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    monkeypatch.setattr(handlers, "discrete_gaussian", lambda sigma: 0)
    config = dataclasses.replace(CONFIG, local_epochs=1, batch_size=16)
    train = load_site_for(site, config).splits["train"]

    # Execute
    reply = _send(site, build_model(config).state_dict(), config, kind="train")

    # Assert: the patients, each once (the charge is for a count of sensitivity 1)
    assert not reply.has_error()
    examples = reply.content["metrics"]["num-examples"]  # type: ignore[index]
    assert examples == len(set(train.patients)) < len(train)


def _exact_vector(monkeypatch: pytest.MonkeyPatch, site: Path, data: SplitData) -> np.ndarray:
    """The release of ``data`` before its noise: every cell's histograms, in cell order."""
    monkeypatch.setattr(site_evaluate, "noisy_release", lambda stats, noise: stats)
    policy = load_policy(site / "site-policy.toml")
    model = build_model(CONFIG)
    with torch.no_grad():
        _, cells = site_evaluate.evaluate_cells(TASK, model, data, CONFIG, 10, policy)
    return np.concatenate([np.r_[c.stats.pos_hist, c.stats.neg_hist] for c in cells])  # type: ignore[attr-defined]


def test_one_patient_moves_the_release_by_at_most_its_stated_sensitivity(
    site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: one patient has three images of the validation split; the release with and
    # without that patient
    with (site / "manifest.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    for row in rows[1:3]:
        row["patient_id"] = rows[0]["patient_id"]
        row.update(sex=rows[0]["sex"], age=rows[0]["age"])
    with (site / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    data = load_site_for(site, CONFIG).splits["val"]
    patient = data.patients[0]
    others = data.subset([i for i, p in enumerate(data.patients) if p != patient])

    # Execute
    with_patient = _exact_vector(monkeypatch, site, data)
    without = _exact_vector(monkeypatch, site, others)

    # Assert: the same cells either way, and the L2 distance is at most
    # cases-per-patient * sqrt(cells per case) (1 * sqrt(5)), the sensitivity the ledger
    # charges for: three images would give 3 * sqrt(5) without the bound per patient
    assert with_patient.shape == without.shape
    distance = float(np.linalg.norm(with_patient - without))
    assert 0 < distance <= np.sqrt(CELLS_PER_CASE) + 1e-9


# ---------------------------------------------------------------- the threshold sweep

#: Releases the sweep asks for at most (the site refuses before: its budget allows 8).
SWEEP_QUERIES = 15
#: The sweep's bias shifts: a dither over 0.6 in logit, wider than one score bin near the
#: target's score, so that the bin edges of the releases together cut it finely.
SHIFTS = [0.6 * q / SWEEP_QUERIES for q in range(SWEEP_QUERIES)]

Release = Callable[[dict[str, torch.Tensor], int], list[CellStats] | None]


def _head_shifted(state: dict[str, torch.Tensor], shift: float) -> dict[str, torch.Tensor]:
    out = {k: v.clone() for k, v in state.items()}
    last_bias = [k for k in out if k.endswith("bias")][-1]  # the logit's bias
    out[last_bias] = out[last_bias] + shift
    return out


def _partition(data: SplitData) -> list[Cell]:
    """The cells the site releases, as the attacker (who knows every case) computes them."""
    policy = load_policy(None)
    return subgroup_cells(
        data.attributes,
        policy.allowed_subgroups(CONFIG.subgroups),
        0,
        age_bands=AgeBands(CONFIG.age_bands).labels,
        vocabularies=policy.vocabularies(),
        listed=True,
    )


def _sweep(data: SplitData, target: int, release: Release) -> tuple[float, float, int]:
    """The best-informed attacker: it knows every case but the target (their exact
    statistics at each model it sends) and the target's label, and sends the model with its
    logit's bias shifted, one evaluation per round, until the site refuses. From each
    release it takes, in every cell of the target, the target's histogram minus what the
    other cases put there, and keeps the Gaussian log-likelihood of each value ``u`` of the
    target's logit (the target adds 1 to the bin of ``u + shift``). Returns the target's
    true score, the maximum-likelihood estimate and how many releases it got."""
    model = build_model(CONFIG)
    state = {k: v.clone() for k, v in model.state_dict().items()}  # not the model's own
    partition = _partition(data)
    mine = [n for n, cell in enumerate(partition) if target in cell.index]
    hist = "pos_hist" if int(data.labels[target]) else "neg_hist"
    grid = np.linspace(-10, 10, 40_001)
    loglik = np.zeros_like(grid)
    true_score, answered = 0.0, 0
    for number, shift in enumerate(SHIFTS, start=1):
        shifted = _head_shifted(state, shift)
        model.load_state_dict(shifted)
        with torch.no_grad():
            outputs = TASK.predict(model, data, CONFIG)
        if number == 1:
            true_score = float(outputs.scores[target])
        cells = release(shifted, number)
        if cells is None:
            break
        answered += 1
        residual = np.zeros(CONFIG.score_bins)
        for n in mine:
            known = outputs.stats([i for i in partition[n].index if i != target])
            residual += np.subtract(getattr(cells[n].stats, hist), getattr(known, hist))
        bins = np.minimum((expit(grid + shift) * CONFIG.score_bins).astype(int), 19)
        loglik += residual[bins] / NOISE**2
    estimate = float(expit(grid[int(np.argmax(loglik))]))
    return true_score, estimate, answered


def test_a_threshold_sweep_under_dp_statistics_fails_to_recover_a_score(
    generated: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: eight targets; for each, a fresh site (its own budget) answering through
    # its real evaluate handler, its noise drawn from a seeded source so that the measured
    # numbers repeat; and, for contrast, the same attacker on the exact release
    monkeypatch.setattr(noise_module, "_SYSTEM", random.Random(2026))
    targets = [79, 0, 20, 40, 60, 90, 120, 150]
    errors, exact_errors, answered = [], [], []

    # Execute
    for trial, target in enumerate(targets):
        site = _site(generated, tmp_path / f"t{trial}", WOMEN + MEN)
        (site / "site-policy.toml").write_text(POLICY)
        data = load_site_for(site, CONFIG).splits["val"]

        def noisy(state: dict[str, torch.Tensor], number: int) -> list[CellStats] | None:
            reply = _send(site, state, server_round=number)  # noqa: B023
            return None if reply.has_error() else _cells(reply)

        def exact(state: dict[str, torch.Tensor], number: int) -> list[CellStats] | None:
            model = build_model(CONFIG)
            model.load_state_dict(state)
            with torch.no_grad():
                outputs = TASK.predict(model, data, CONFIG)  # noqa: B023
            return [
                CellStats(c.attribute, c.group, outputs.stats(c.index), 0)
                for c in _partition(data)  # noqa: B023
            ]

        score, estimate, count = _sweep(data, target, noisy)
        errors.append(abs(estimate - score))
        answered.append(count)
        score, estimate, _ = _sweep(data, target, exact)
        exact_errors.append(abs(estimate - score))

    # Assert: the site answered 8 releases of each sweep (epsilon 10 at delta 1e-6) and
    # refused the rest; on exact statistics the same attacker pins every score to within
    # 0.01, under noise 4 its median error stays above 0.05, and it lands within 0.01 of
    # the score for at most a quarter of the targets (docs/privacy.md states these numbers)
    assert answered == [8] * len(targets)
    assert max(exact_errors) < 0.01, exact_errors
    assert float(np.median(errors)) > 0.05, errors
    assert sum(e < 0.01 for e in errors) <= len(targets) // 4, errors


def test_dp_statistics_cells_carry_no_exact_count_and_no_patient_sums(site: Path) -> None:
    # Prepare
    state = build_model(CONFIG).state_dict()

    # Execute
    reply = _send(site, state)

    # Assert: every cell says "not exact", every exact value and per-patient sum is 0
    assert not reply.has_error()
    record = reply.content["metrics"]
    flags = {k: v for k, v in record.items() if k.endswith(".auc-exact")}
    assert flags and set(flags.values()) == {0}
    for key, value in record.items():
        if key.rsplit(".", 1)[-1] in ("auc-mw2", "auc-v10-sq", "auc-v01-sq"):
            assert value == 0
        if key.rsplit(".", 1)[-1] in (
            "sens-clusters",
            "spec-clusters",
            "auc-clusters",
            "auc-cluster-sums",
        ):
            assert not any(value), key  # type: ignore[arg-type]
    cells = _cells(reply)
    assert all(not c.stats.exact and not c.stats.sens_clusters.clusters for c in cells)  # type: ignore[attr-defined]
