"""The attacks of issue 13 against a site's real evaluate handler, as an honest-but-curious
server would run them, with the default site policy (k = 10): each fails, and each test
says why.

The site is generated DICOM whose manifest sets each case's sex, age and split, so that
the validation split holds exactly the cases of the attack.
"""

from __future__ import annotations

import csv
import shutil
from collections.abc import Sequence
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from radfed.config import RunConfig
from radfed.data.synth import synth_classification
from radfed.federation.codes import ErrorCode
from radfed.federation.packing import pack
from radfed.metrics.cells import SMALL_GROUPS
from radfed.privacy import read_entries
from radfed.site.handlers import handle_evaluate
from radfed.site.review import review
from radfed.tasks.classification import build_model
from tests.disclosure_search import exact_isolations, signed_sums
from tests.helpers import make_context, make_message
from tests.site.evaluation import evaluate, released_positions

CONFIG = RunConfig(image_size=32, eval_splits=("val",), seed=3)
K = 10

#: 80 women, 79 aged 40-59 and one aged 60-79; 80 men, 20 in each band from 18.
WOMEN = [("F", 50)] * 79 + [("F", 70)]
MEN = [("M", age) for age in (25, 50, 70, 85) for _ in range(20)]


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("attack") / "data"
    synth_classification(root, sites=1, cases_per_site=200, seed=5, image_size=32)
    return root / "site-a"


def _site(generated: Path, tmp_path: Path, val: Sequence[tuple[str, int]]) -> Path:
    """A copy of the generated site whose first ``len(val)`` cases are the validation split
    with the given sex and age; the others train."""
    site = tmp_path / "site-a"
    shutil.copytree(generated, site)
    with (site / "manifest.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    for number, row in enumerate(rows):
        sex, age = val[number] if number < len(val) else ("M", 30)
        row.update(sex=sex, age=str(age), split="val" if number < len(val) else "train")
    with (site / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return site


def _released_members(site: Path, config: RunConfig, reply: Message) -> list[set[int]]:
    """The cases of every cell the reply released, from the site's own attributes."""
    return [set(cell) for cell in released_positions(site, config, reply)]


def test_a_margin_minus_its_intersections_isolates_no_woman(
    generated: Path, tmp_path: Path
) -> None:
    # Prepare: the attack's cases, the default subgroups (margins and sex*age_band)
    site = _site(generated, tmp_path, WOMEN + MEN)

    # Execute
    reply = evaluate(site, CONFIG)

    # Assert: sex=F (80) and sex*age_band=F|40-59 (79) would give the woman aged 60-79;
    # the site suppressed jointly over margins and intersections, so no signed sum or
    # rational combination of what left covers 1 to 9 cases, and the margins still left
    assert not reply.has_error()
    released = _released_members(site, CONFIG, reply)
    assert signed_sums(released, K) == []
    assert exact_isolations(released, K) == []
    sizes = sorted(len(members) for members in released)
    assert 160 in sizes and sizes.count(80) >= 2  # all, and both sexes


def test_what_two_runs_ask_of_the_same_split_adds_up_to_no_isolation(
    generated: Path, tmp_path: Path
) -> None:
    # Prepare: one run asks for the intersection only, another for the margins only
    site = _site(generated, tmp_path, WOMEN + MEN)
    first = RunConfig(**{**CONFIG.__dict__, "subgroups": ("sex*age_band",)})
    second = RunConfig(**{**CONFIG.__dict__, "subgroups": ("sex", "age_band")})

    # Execute
    replies = [evaluate(site, first, run_id=1), evaluate(site, second, run_id=2)]

    # Assert: each run gets part of the one release the site computes over every cell its
    # policy allows, so together they are no more than that release
    assert not any(r.has_error() for r in replies)
    together = _released_members(site, first, replies[0])
    together += _released_members(site, second, replies[1])
    assert signed_sums(together, K) == []
    assert exact_isolations(together, K) == []


def test_a_run_choosing_its_own_band_edges_is_refused(generated: Path, tmp_path: Path) -> None:
    # Prepare: two runs with band edges at 60 and at 66 would isolate everyone aged 60-65
    site = _site(generated, tmp_path, WOMEN + MEN)
    moved = RunConfig(**{**CONFIG.__dict__, "age_bands": (18, 40, 66, 80)})

    # Execute
    usual, shifted = evaluate(site, CONFIG, run_id=1), evaluate(site, moved, run_id=2)

    # Assert: the site's policy fixes the bands; the second run gets a policy refusal
    assert not usual.has_error()
    assert shifted.has_error() and shifted.error.code == ErrorCode.POLICY
    assert "66" not in shifted.error.reason  # a code leaves, never the text


def test_free_text_values_the_policy_does_not_list_leave_pooled(
    generated: Path, tmp_path: Path
) -> None:
    # Prepare: a labels file copied a home postcode and the scanner's model into the
    # manifest; the site reports model, naming only the models it lists
    site = _site(generated, tmp_path, WOMEN + MEN)
    with (site / "manifest.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    for number, row in enumerate(rows):
        row["model"] = ("Ysio Max", "Secret Prototype 9")[number % 2]
        row["home_postcode"] = f"AB{number % 3} 1CD"
    with (site / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (site / "site-policy.toml").write_text(
        '[policy]\nsubgroups = ["sex", "model"]\n[policy.attribute-values]\nmodel = ["Ysio Max"]\n'
    )
    config = RunConfig(**{**CONFIG.__dict__, "subgroups": ("sex", "model")})

    # Execute
    reply = evaluate(site, config)

    # Assert: "Secret Prototype 9" is not named; the postcode cannot even be asked for
    names = list(reply.content.config_records["cells"]["val"])  # type: ignore[arg-type]
    assert "model=Ysio Max" in names and f"model={SMALL_GROUPS}" in names
    assert not any("Prototype" in n for n in names)
    with pytest.raises(Exception, match="look like identifiers"):
        RunConfig.from_run_config({"subgroups": "sex,home_postcode"})


def test_a_threshold_sweep_within_a_round_is_refused_and_the_audit_shows_it(
    generated: Path, tmp_path: Path
) -> None:
    # Prepare: the server re-sends the model with its final bias shifted, 22 times in one
    # round, to move one patient's score across the threshold
    site = _site(generated, tmp_path, WOMEN + MEN)
    model = build_model(CONFIG)
    replies = []

    # Execute
    for shift in range(22):
        state = model.state_dict()
        last_bias = [k for k in state if k.endswith("bias")][-1]
        state[last_bias] = state[last_bias] + 0.01 * shift
        content = RecordDict({"arrays": pack(state), "config": ConfigRecord({"server-round": 1})})
        message = make_message(content, message_type="evaluate", src_node_id=0, dst_node_id=1)
        node = {"site-name": "site-a", "data-path": str(site)}
        replies.append(handle_evaluate(message, make_context(CONFIG.to_run_config(), node)))

    # Assert: the site answers one evaluation per round; the other 21 get a policy
    # refusal, and the site's audit review names the repeats
    assert not replies[0].has_error()
    assert all(r.has_error() and r.error.code == ErrorCode.POLICY for r in replies[1:])
    findings = review(read_entries(site / ".radfed" / "audit.jsonl"))
    assert any(f.kind == "repeated evaluation" for f in findings)
