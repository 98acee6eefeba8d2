"""Run configuration: kebab-case keys in, typed values out, bad values named."""

from __future__ import annotations

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
    ],
)
def test_bad_values_are_named_with_the_fix(values: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_run_config(values)
