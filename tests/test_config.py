"""Run configuration: kebab-case keys in, typed values out, bad values named."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from radfed.config import RunConfig
from radfed.errors import ConfigError


def test_round_trip_through_flower_run_config() -> None:
    config = RunConfig(
        num_server_rounds=5,
        eval_splits=("val",),
        learning_rate=0.01,
        data_root="/d",
        age_bands=(50,),
    )
    assert RunConfig.from_run_config(config.to_run_config()) == config


def test_flower_values_are_coerced_and_unknown_keys_kept() -> None:
    config = RunConfig.from_run_config(
        {
            "num-server-rounds": 2,
            "learning-rate": 1,
            "eval-splits": "train, val",
            "future-key": True,
        }
    )
    assert config.num_server_rounds == 2 and config.learning_rate == 1.0
    assert config.eval_splits == ("train", "val")
    assert config.extra == {"future-key": True}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"num-server-rounds": 0}, "'num-server-rounds' must be >= 1, got 0"),
        ({"num-server-rounds": 2.5}, "'num-server-rounds' must be of type int"),
        ({"eval-splits": "val,holdout"}, "'eval-splits' must be a comma-separated subset"),
        ({"val-fraction": 0.6, "test-fraction": 0.5}, "val-fraction \\+ test-fraction"),
        ({"threshold": 1.0}, "'threshold' must be in \\(0, 1\\)"),
        ({"task": 3}, "'task' must be of type str"),
        ({"age-bands": "60,40"}, "'age-bands' must be ascending"),
        ({"age-bands": "a,b"}, "'age-bands' must be of type"),
        # what a run may ask of every site and the server has bounds: no value makes a
        # model, statistics or a list as large as the run likes
        ({"learning-rate": float("inf")}, "'learning-rate' must be a finite number"),
        ({"round-timeout": float("nan")}, "'round-timeout' must be a finite number"),
        ({"target-spacing": "1.0,inf"}, "'target-spacing' must be a finite number"),
        ({"num-classes": 10**9}, "'num-classes' must be in \\[2, 1000\\]"),
        ({"det-detections-per-image": 10**9}, "'det-detections-per-image' must be in"),
        ({"det-batch-size-per-image": 10**9}, "'det-batch-size-per-image' must be in"),
        ({"subgroups": ",".join(f"a{i}" for i in range(33))}, "'subgroups' must be at most 32"),
        ({"age-bands": ",".join(str(i) for i in range(1, 34))}, "'age-bands' must be at most"),
        # each bound alone allows it, the product would make every cell ~100 MB
        ({"num-classes": 1000, "score-bins": 100_000}, "'num-classes x score-bins' must be"),
        (
            {"num-classes": 1000, "score-bins": 10, "metric-bins": 10_000},
            "'num-classes x metric-bins' must be",
        ),
    ],
)
def test_bad_values_are_named_with_the_fix(values: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_run_config(values)


def test_the_cell_bin_bound_admits_the_largest_sensible_settings() -> None:
    assert RunConfig.from_run_config({"num-classes": 20, "score-bins": 10_000}).score_bins
    assert RunConfig.from_run_config({"num-classes": 1000, "score-bins": 200}).num_classes


def test_the_threshold_must_fall_on_a_score_bin_edge() -> None:
    # a threshold inside a bin would let the confusion counts split that bin's cases
    with pytest.raises(ConfigError, match="on an edge of the 1000 score bins"):
        RunConfig.from_run_config({"threshold": 0.5005})
    assert RunConfig.from_run_config({"threshold": 0.3, "score-bins": 20}).threshold == 0.3


def test_the_apps_run_config_has_every_setting_with_its_default() -> None:
    # Prepare: the app's [tool.flwr.app.config], which `flwr run`/`radfed simulate` check
    # every --run-config key against
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    app = tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["config"]

    # Execute
    settings = RunConfig().to_run_config()

    # Assert: a setting missing there cannot be set at all (robust-f, trim-beta were)
    assert sorted(set(settings) - set(app)) == []
    assert sorted(set(app) - set(settings)) == []
    assert {k: (v, app[k]) for k, v in settings.items() if app[k] != v} == {}
