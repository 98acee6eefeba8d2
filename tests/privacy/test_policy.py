"""The site policy: read from its TOML file, bad values refused by key, and enforced."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest

from radfed.config import RunConfig, TaskName
from radfed.errors import ConfigError, RadfedError
from radfed.privacy import DifferentialPrivacy, PolicyRefusal, SitePolicy, load_policy
from radfed.privacy.policy import QueryTemplates

FULL = """\
[policy]
min-cell-size = 20
tasks = ["classification"]
subgroups = ["sex", "age_band", "manufacturer"]
max-message-bytes = 104857600

[policy.dp]
required = true
clipping-norm = 1.0
noise-multiplier = 0.8
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "site-policy.toml"
    path.write_text(text)
    return path


def _dp(clip: float, noise: float) -> SitePolicy:
    return SitePolicy(dp=DifferentialPrivacy(clipping_norm=clip, noise_multiplier=noise))


def test_defaults() -> None:
    # Execute
    policy = load_policy(None)

    # Assert
    assert policy == SitePolicy.default()
    assert policy.k == 10
    assert policy.tasks == tuple(TaskName)
    assert policy.subgroups == ("sex", "age_band", "manufacturer", "sex*age_band")
    assert dict(policy.attribute_values)["manufacturer"][:3] == ("Agfa", "Canon", "Carestream")
    assert policy.templates is not None and policy.templates.age_bands == (18, 40, 60, 80)
    assert policy.max_message_bytes == 512 * 1024 * 1024
    assert policy.dp is None


def test_empty_file_is_the_default(tmp_path: Path) -> None:
    assert load_policy(_write(tmp_path, "")) == SitePolicy.default()


def test_full_file_is_read(tmp_path: Path) -> None:
    # Execute
    policy = load_policy(_write(tmp_path, FULL))

    # Assert
    assert policy == SitePolicy(
        k=20,
        tasks=("classification",),
        subgroups=("sex", "age_band", "manufacturer"),
        max_message_bytes=104857600,
        dp=DifferentialPrivacy(clipping_norm=1.0, noise_multiplier=0.8),
    )


def test_dp_table_not_required_means_no_dp(tmp_path: Path) -> None:
    text = "[policy.dp]\nrequired = false\nclipping-norm = 2\n"
    assert load_policy(_write(tmp_path, text)).dp is None


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[policy]\nmin-cell-size = 0\n", "policy.min-cell-size"),
        ("[policy]\nmin-cell-size = true\n", "policy.min-cell-size"),
        ("[policy]\nmin-cell-size = 2.5\n", "policy.min-cell-size"),
        ('[policy]\nmin-cell-size = "20"\n', "policy.min-cell-size"),
        ("[policy]\nmax-message-bytes = 0\n", "policy.max-message-bytes"),
        ("[policy]\nexact-auc = 1\n", "policy.exact-auc"),
        ('[policy]\ntasks = ["classification", "radiomics"]\n', "policy.tasks"),
        ('[policy]\ntasks = "classification"\n', "policy.tasks"),
        ("[policy]\ntasks = [1]\n", "policy.tasks"),
        ('[policy]\nsubgroups = ["model"]\n', "policy.subgroups"),  # no values listed
        ('[policy]\nsubgroups = ["age"]\n', "policy.subgroups"),
        ('[policy]\nsubgroups = ["Age"]\n', "policy.subgroups"),
        ('[policy]\nsubgroups = ["sex*a*b"]\n', "policy.subgroups"),
        ('[policy.attribute-values]\npatient_id = ["1"]\n', "policy.attribute-values.patient_id"),
        (
            '[policy.attribute-values]\nhome_postcode = ["AB1"]\n',
            "policy.attribute-values.home_postcode",
        ),
        (
            '[policy.attribute-values]\nreferring_physician = ["Dr X"]\n',
            "policy.attribute-values.referring_physician",
        ),
        ('[policy.attribute-values]\nsex = ["F"]\n', "policy.attribute-values.sex"),
        ("[policy.attribute-values]\nmodel = []\n", "policy.attribute-values.model"),
        ("[policy.attribute-values]\nmodel = 3\n", "policy.attribute-values.model"),
        ("[policy.templates]\nage-bands = [60, 40]\n", "policy.templates.age-bands"),
        ("[policy.templates]\nage-bands = []\n", "policy.templates.age-bands"),
        ("[policy.templates]\nthresholds = [1.5]\n", "policy.templates.thresholds"),
        ("[policy.templates]\nthresholds = [nan]\n", "policy.templates.thresholds"),
        ("[policy.templates]\nscore-bins = [5]\n", "policy.templates.score-bins"),
        ("[policy.templates]\nscore-bins = [100.5]\n", "policy.templates.score-bins"),
        ("[policy.templates]\nedges = [1]\n", "policy.templates.edges"),
        ("[policy]\nmin_cell_size = 20\n", "policy.min_cell_size"),
        ("[other]\nx = 1\n", "other"),
        ("policy = 3\n", "policy"),
        ("[policy]\ndp = 1\n", "policy.dp"),
        ('[policy.dp]\nrequired = "yes"\n', "policy.dp.required"),
        ("[policy.dp]\nclipping-norm = 0\nnoise-multiplier = 1\n", "policy.dp.clipping-norm"),
        ("[policy.dp]\nclipping-norm = -1.0\nnoise-multiplier = 1\n", "policy.dp.clipping-norm"),
        ("[policy.dp]\nclipping-norm = inf\nnoise-multiplier = 1\n", "policy.dp.clipping-norm"),
        ("[policy.dp]\nclipping-norm = true\nnoise-multiplier = 1\n", "policy.dp.clipping-norm"),
        ("[policy.dp]\nclipping-norm = 1\nnoise-multiplier = -0.1\n", "policy.dp.noise-multiplier"),
        ("[policy.dp]\nclipping-norm = 1\nnoise-multiplier = nan\n", "policy.dp.noise-multiplier"),
        ("[policy.dp]\nnoise-multiplier = 1\n", "policy.dp.clipping-norm"),
        ("[policy.dp]\nclipping-norm = 1\n", "policy.dp.noise-multiplier"),
        (
            "[policy.dp]\nclipping-norm = 1\nnoise-multiplier = 1\nsigma = 3\n",
            "policy.dp.sigma",
        ),
        ("[policy.dp]\nrequired = false\nclipping-norm = -1\n", "policy.dp.clipping-norm"),
        (
            "[policy.dp]\nclipping-norm = 1\nnoise-multiplier = 1\nepsilon = 0\n",
            "policy.dp.epsilon",
        ),
        ("[policy.dp]\nclipping-norm = 1\nnoise-multiplier = 1\ndelta = 1\n", "policy.dp.delta"),
        (
            "[policy.dp]\nclipping-norm = 1\nnoise-multiplier = 1\nmin-batch-size = 0\n",
            "policy.dp.min-batch-size",
        ),
    ],
)
def test_bad_values_are_refused_by_key(tmp_path: Path, text: str, key: str) -> None:
    # Prepare
    path = _write(tmp_path, text)

    # Execute
    with pytest.raises(ConfigError) as caught:
        load_policy(path)

    # Assert: the message names the file, the key and a fix
    message = str(caught.value)
    assert str(path) in message
    assert f"'{key}'" in message
    assert re.search(r"fix it|set it|rename or remove", message)


def test_invalid_toml_names_the_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "[policy]\nmin-cell-size = = 3\n")
    with pytest.raises(ConfigError, match=r"line 2") as caught:
        load_policy(path)
    assert str(path) in str(caught.value)


def test_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.toml"
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        load_policy(path)


def test_run_can_raise_but_never_lower_k() -> None:
    policy = SitePolicy(k=20)
    assert policy.min_cell_size(5) == 20
    assert policy.min_cell_size(30) == 30
    assert SitePolicy.default().min_cell_size(1) == 10


def test_check_task() -> None:
    # Prepare
    policy = SitePolicy(tasks=("classification",))

    # Execute / Assert
    policy.check_task("classification")
    with pytest.raises(PolicyRefusal, match=r"'segmentation'.*'tasks'") as caught:
        policy.check_task("segmentation")
    assert isinstance(caught.value, RadfedError)
    with pytest.raises(PolicyRefusal):
        SitePolicy(tasks=()).check_task("classification")


def test_allowed_subgroups_filters_attributes_and_intersections() -> None:
    # Prepare
    requested = ("sex", "age_band", "manufacturer", "sex*age_band", "sex*manufacturer")

    # Execute
    kept = SitePolicy(subgroups=("sex", "age_band")).allowed_subgroups(requested)

    # Assert: an intersection leaves only when it is listed itself
    assert kept == ("sex", "age_band")
    assert SitePolicy().allowed_subgroups(requested) == requested[:4]
    assert SitePolicy(subgroups=None).allowed_subgroups(requested) == requested
    assert SitePolicy(subgroups=()).allowed_subgroups(requested) == ()
    assert SitePolicy(subgroups=("age_band",)).allowed_subgroups(["sex*age_band"]) == ()


def test_check_size() -> None:
    policy = SitePolicy(max_message_bytes=1000)
    policy.check_size(1000)
    with pytest.raises(PolicyRefusal, match=r"1001 bytes.*'max-message-bytes'"):
        policy.check_size(1001)


def test_describe_is_json_and_names_no_path(tmp_path: Path) -> None:
    # Execute
    described = load_policy(_write(tmp_path, FULL)).describe()

    # Assert
    text = json.dumps(described)
    assert str(tmp_path) not in text
    assert described["min-cell-size"] == 20
    assert described["dp"] == {
        "clipping-norm": 1.0,
        "noise-multiplier": 0.8,
        "epsilon": None,
        "delta": 1e-5,
    }
    assert SitePolicy.default().describe()["dp"] == "off"
    assert SitePolicy.default().describe()["subgroups"] == list(SitePolicy().subgroups or ())
    assert SitePolicy(subgroups=None, templates=None).describe()["templates"] == "any"


# --- differential privacy on updates ---------------------------------------------------


def _weights(rng: np.random.Generator, scale: float) -> tuple[dict[str, np.ndarray], ...]:
    reference = {
        "conv.weight": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
        "bn.running_mean": rng.normal(size=4).astype(np.float32),
        "bn.num_batches_tracked": np.array(7, dtype=np.int64),
        "fc.bias": rng.normal(size=2),  # float64
    }
    update = {
        name: (a + scale * rng.normal(size=a.shape)).astype(a.dtype)
        if a.dtype.kind == "f"
        else np.array(9, dtype=a.dtype)
        for name, a in reference.items()
    }
    return update, reference


def _delta_norm(out: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    squares = [
        np.sum((out[n].astype(np.float64) - reference[n].astype(np.float64)) ** 2)
        for n in out
        if out[n].dtype.kind == "f"
    ]
    return float(np.sqrt(sum(squares)))


def test_no_dp_returns_the_update_unchanged() -> None:
    update, reference = _weights(np.random.default_rng(0), 5.0)
    out = SitePolicy().privatize(update, reference, np.random.default_rng(1))
    assert out.keys() == update.keys()
    assert all(out[n] is update[n] for n in update)


def test_large_update_is_clipped_along_its_direction() -> None:
    # Prepare
    update, reference = _weights(np.random.default_rng(0), 5.0)
    before = _delta_norm(update, reference)
    assert before > 10

    # Execute
    out = _dp(1.0, 0.0).privatize(update, reference, np.random.default_rng(1))

    # Assert: norm at the bound, same direction, dtypes and shapes kept
    assert _delta_norm(out, reference) == pytest.approx(1.0, rel=1e-5)
    for name, array in update.items():
        assert out[name].dtype == array.dtype
        assert out[name].shape == array.shape
        if array.dtype.kind == "f":
            expected = (array.astype(np.float64) - reference[name]) / before
            np.testing.assert_allclose(out[name] - reference[name], expected, atol=1e-6)


def test_small_update_is_left_as_it_is() -> None:
    update, reference = _weights(np.random.default_rng(0), 1e-3)
    assert _delta_norm(update, reference) < 1.0
    out = _dp(1.0, 0.0).privatize(update, reference, np.random.default_rng(1))
    for name, array in update.items():
        np.testing.assert_array_equal(out[name], array)


def test_noise_std_matches_multiplier_times_clip() -> None:
    # Prepare: no change, so everything that leaves is noise
    reference = {"w": np.zeros((500, 400), dtype=np.float32)}
    update = {"w": reference["w"].copy()}

    # Execute
    out = _dp(0.5, 0.8).privatize(update, reference, np.random.default_rng(42))

    # Assert
    noise = out["w"].astype(np.float64)
    assert out["w"].dtype == np.float32
    assert noise.std() == pytest.approx(0.4, rel=0.02)
    assert abs(noise.mean()) < 0.01


def test_noise_is_reproducible_from_the_seed() -> None:
    update, reference = _weights(np.random.default_rng(0), 1.0)
    policy = _dp(1.0, 1.0)
    first = policy.privatize(update, reference, np.random.default_rng(3))
    again = policy.privatize(update, reference, np.random.default_rng(3))
    other = policy.privatize(update, reference, np.random.default_rng(4))
    np.testing.assert_array_equal(first["conv.weight"], again["conv.weight"])
    assert not np.array_equal(first["conv.weight"], other["conv.weight"])


def test_integer_buffers_pass_unchanged_under_noise() -> None:
    update, reference = _weights(np.random.default_rng(0), 1.0)
    out = _dp(1.0, 2.0).privatize(update, reference, np.random.default_rng(1))
    assert out["bn.num_batches_tracked"].dtype == np.int64
    assert int(out["bn.num_batches_tracked"]) == 9


def test_clipping_matches_flowers_fixed_clipping() -> None:
    # Prepare: Flower's own client-side clipping, on the floating arrays as a list
    dp_utils = pytest.importorskip("flwr.supercore.differential_privacy")
    update, reference = _weights(np.random.default_rng(0), 5.0)
    names = [n for n in update if update[n].dtype.kind == "f"]
    flower = [update[n].astype(np.float64) for n in names]
    dp_utils.compute_clip_model_update(flower, [reference[n] for n in names], 1.0)

    # Execute
    out = _dp(1.0, 0.0).privatize(update, reference, np.random.default_rng(1))

    # Assert
    for name, expected in zip(names, flower, strict=True):
        np.testing.assert_allclose(out[name], expected.astype(update[name].dtype), rtol=1e-6)


def test_unchanged_model_is_not_a_division_by_zero() -> None:
    reference = {"w": np.ones(3, dtype=np.float32)}
    out = _dp(1.0, 0.0).privatize(dict(reference), reference, np.random.default_rng(0))
    np.testing.assert_array_equal(out["w"], reference["w"])


def test_non_finite_update_is_refused() -> None:
    reference = {"w": np.zeros(3, dtype=np.float32)}
    update = {"w": np.array([0.0, np.nan, 1.0], dtype=np.float32)}
    with pytest.raises(PolicyRefusal, match="non-finite"):
        _dp(1.0, 1.0).privatize(update, reference, np.random.default_rng(0))


def test_update_without_a_matching_reference_is_named() -> None:
    update = {"fc.weight": np.zeros((2, 3), dtype=np.float32)}
    with pytest.raises(ValueError, match=r"'fc\.weight'"):
        _dp(1.0, 1.0).privatize(update, {}, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"'fc\.weight'"):
        _dp(1.0, 1.0).privatize(
            update, {"fc.weight": np.zeros(6, np.float32)}, np.random.default_rng(0)
        )


# --- query templates -------------------------------------------------------------------

TEMPLATES = """\
[policy]
subgroups = ["sex", "model", "sex*model"]

[policy.attribute-values]
model = ["Ysio Max", "Discovery XR656"]

[policy.templates]
age-bands = [18, 50, 70]
thresholds = [0.3, 0.5]
score-bins = [200]
"""


def test_templates_and_attribute_values_are_read(tmp_path: Path) -> None:
    policy = load_policy(_write(tmp_path, TEMPLATES))

    assert policy.subgroups == ("sex", "model", "sex*model")
    assert policy.vocabularies() == {"model": ("Ysio Max", "Discovery XR656")}
    assert policy.templates == QueryTemplates(
        age_bands=(18, 50, 70), thresholds=(0.3, 0.5), score_bins=(200,), metric_bins=(100,)
    )


@pytest.mark.parametrize(
    ("change", "named"),
    [
        # two runs with band edges at 60 and at 66 would isolate everyone aged 60-65
        ({"age_bands": (18, 40, 66, 80)}, "age-bands 18,40,66,80"),
        # a second threshold gives the cases scored between the two
        ({"threshold": 0.52}, "threshold 0.52"),
        ({"score_bins": 998}, "score-bins 998"),
        ({"metric_bins": 50}, "metric-bins 50"),
    ],
)
def test_a_run_may_only_choose_among_the_templates(change: dict[str, object], named: str) -> None:
    policy = SitePolicy()
    policy.check_templates(RunConfig())  # the defaults are within

    with pytest.raises(PolicyRefusal, match=named) as caught:
        policy.check_templates(dataclasses.replace(RunConfig(), **change))  # type: ignore[arg-type]
    assert "[policy.templates]" in str(caught.value)
    SitePolicy(templates=None).check_templates(dataclasses.replace(RunConfig(), **change))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "name", ["patient_id", "PatientID", "home_postcode", "study_date", "Age", "sex*birth_year"]
)
def test_a_run_asking_for_an_identifying_attribute_is_refused(name: str) -> None:
    with pytest.raises(ConfigError, match="look like identifiers"):
        RunConfig.from_run_config({"subgroups": f"sex,{name}"})


def test_exact_auc_counts_leave_only_when_the_site_policy_says_so(tmp_path: Path) -> None:
    # A deployed site sends no exact pair counts unless its own file turns them on
    path = tmp_path / "site-policy.toml"
    path.write_text("[policy]\nmin-cell-size = 10\n")
    assert load_policy(path).exact_auc is False
    assert SitePolicy.default().exact_auc is False
    path.write_text("[policy]\nexact-auc = true\n")
    assert load_policy(path).exact_auc is True
