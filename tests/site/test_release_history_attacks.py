"""Differencing over time: a cell released before and again after the site's cases changed
differs by the cases that changed (last month's ``sex=F`` minus today's is one new woman).

Each test runs the site's real evaluate handler twice, as two runs of an honest-but-curious
server, on a generated site whose manifest gains cases between them, with the default site
policy (k = 10). What the two replies released together is checked by the independent
disclosure search (``tests.disclosure_search``) over the cases' own keys.
"""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import pytest
from flwr.app import Message

from radfed.config import RunConfig
from radfed.data.loading import load_site_for
from radfed.data.synth import synth_classification
from radfed.errors import DataError
from radfed.federation.checkpoint import save_checkpoint
from radfed.folders import SiteFolder
from radfed.privacy.releases import ReleaseRecord
from radfed.site.evaluate import evaluate_site
from radfed.tasks.classification import build_model
from tests.disclosure_search import exact_isolations, signed_sums
from tests.site.evaluation import evaluate, released_positions

CONFIG = RunConfig(image_size=32, eval_splits=("val",), seed=3)
K = 10


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("history") / "data"
    synth_classification(root, sites=1, cases_per_site=160, seed=5, image_size=32)
    return root / "site-a"


#: 40 women and 40 men aged 50.
EVEN = [("F", "50"), ("M", "50")] * 40


def _site(generated: Path, tmp_path: Path, val: Sequence[tuple[str, str]] = EVEN) -> Path:
    """A copy of the generated site, one image a patient: the validation split holds cases
    of the given sex and age, 20 more cases train; 20 more are left out of the manifest
    (cases that join later)."""
    site = tmp_path / "site-a"
    shutil.copytree(generated, site)
    rows = _rows(site)
    assert len(rows) >= 120
    for number, row in enumerate(rows[:100]):
        sex, age = val[number] if number < len(val) else ("M", "30")
        row.update(
            patient_id=f"Q{number:04d}",  # one image a patient
            sex=sex,
            age=age,
            split="val" if number < len(val) else "train",
        )
    _write(site, rows[:100])
    _write(site, rows[100:120], name="later.csv")
    return site


def _rows(site: Path, name: str = "manifest.csv") -> list[dict[str, str]]:
    with (site / name).open() as handle:
        return list(csv.DictReader(handle))


def _write(site: Path, rows: Sequence[dict[str, str]], name: str = "manifest.csv") -> None:
    with (site / name).open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _join(site: Path, count: int, sex: str, age: str = "50") -> None:
    """``count`` of the later cases join the validation split with the given sex, age."""
    later = _rows(site, "later.csv")
    joining, rest = later[:count], later[count:]
    for number, row in enumerate(joining):
        row.update(patient_id=f"J{len(rest)}-{number}", sex=sex, age=age, split="val")
    _write(site, _rows(site) + joining)
    if rest:
        _write(site, rest, name="later.csv")


def _evaluate(site: Path, run_id: int) -> Message:
    return evaluate(site, CONFIG, run_id=run_id)


def _released(site: Path, reply: Message) -> list[set[str]]:
    """The cases (by the site's own case keys) of every cell the reply released."""
    assert not reply.has_error()
    keys = load_site_for(site, CONFIG).splits["val"].cases
    return [{keys[i] for i in cell} for cell in released_positions(site, CONFIG, reply)]


def test_a_woman_who_joins_between_runs_is_no_difference_of_two_releases(
    generated: Path, tmp_path: Path
) -> None:
    # Prepare: run 1 sees 40 women and 40 men; then one woman joins
    site = _site(generated, tmp_path)
    first = _released(site, _evaluate(site, run_id=1))
    _join(site, 1, "F")

    # Execute: run 2
    second = _released(site, _evaluate(site, run_id=2))

    # Assert: both releases together cover no 1 to 9 cases by any sum or difference;
    # the whole split and both sexes left in the first run, and the unchanged men
    # (out already) in the second
    together = first + second
    assert signed_sums(together, K) == []
    assert exact_isolations(together, K) == []
    assert sorted(len(c) for c in first).count(40) >= 2 and 80 in map(len, first)
    men = next(c for c in first if len(c) == 40 and c in second)
    assert men in second


def test_a_lost_record_starts_afresh_and_that_is_the_attack_it_stops(
    generated: Path, tmp_path: Path
) -> None:
    # Prepare: as above, but the site's record of releases is lost between the runs
    site = _site(generated, tmp_path)
    first = _released(site, _evaluate(site, run_id=1))
    SiteFolder(site).state.releases.unlink()
    _join(site, 1, "F")

    # Execute
    second = _released(site, _evaluate(site, run_id=2))

    # Assert: without its record the site releases as at its first contact (documented:
    # the whole split of 81 and the 41 women leave), and the independent search then
    # finds the woman who joined, which the test above sees it does not with the record
    assert {81, 41} <= {len(c) for c in second}
    assert any("1 cases" in found for found in signed_sums(first + second, K))


@pytest.mark.parametrize(
    ("val", "joiner"),
    [
        # every woman is 65 and every man 45: sex=F equals age_band=60-79 in run 1; a
        # man aged 65 joins (the attack review's first layout)
        ([("F", "65")] * 10 + [("M", "45")] * 10, ("M", "65")),
        # 40 women and 40 men aged 50: each sex equals its intersection, and every margin
        # of age all; a woman aged 70 joins
        (EVEN, ("F", "70")),
    ],
    ids=["cells-equal-by-sex-and-band", "a-new-band"],
)
def test_a_joiner_outside_cells_that_were_equal_is_no_difference(
    generated: Path, tmp_path: Path, val: list[tuple[str, str]], joiner: tuple[str, str]
) -> None:
    # Prepare: run 1; then the joiner
    site = _site(generated, tmp_path, val)
    first = _released(site, _evaluate(site, run_id=1))
    _join(site, 1, *joiner)

    # Execute
    second = _released(site, _evaluate(site, run_id=2))

    # Assert: an earlier cell equal to a cell now still counts as released: the cell now
    # that adds the joiner to it is held back, and nothing together covers 1 to 9 cases
    assert signed_sums(first + second, K) == []
    assert exact_isolations(first + second, K) == []


def test_a_mended_label_is_a_case_that_left_and_one_that_joined(
    generated: Path, tmp_path: Path
) -> None:
    # Prepare: run 1; then one case's label is corrected (same patient, same image)
    site = _site(generated, tmp_path)
    first = _released(site, _evaluate(site, run_id=1))
    rows = _rows(site)
    rows[3]["label"] = str(1 - int(rows[3]["label"]))
    _write(site, rows)

    # Execute
    second = _released(site, _evaluate(site, run_id=2))

    # Assert: every cell holding the case differs from run 1's by the old and the new
    # case, so none of them leaves again: run 2 minus run 1 says nothing of its label
    assert signed_sums(first + second, K) == []
    assert exact_isolations(first + second, K) == []
    assert all(len(c) != 80 for c in second)


def test_moved_images_keep_their_cases(generated: Path, tmp_path: Path) -> None:
    # Prepare: run 1; the images move to another folder (the manifest follows), and one
    # woman joins
    site = _site(generated, tmp_path)
    first = _released(site, _evaluate(site, run_id=1))
    (site / "images").rename(site / "moved")
    for name in ("manifest.csv", "later.csv"):
        rows = _rows(site, name)
        for row in rows:
            row["image"] = row["image"].replace("images/", "moved/")
        _write(site, rows, name=name)
    _join(site, 1, "F")

    # Execute
    second = _released(site, _evaluate(site, run_id=2))

    # Assert: a case is known by its content, not its path: the cells with her are held
    # back, and the unchanged men leave as before
    assert signed_sums(first + second, K) == []
    assert exact_isolations(first + second, K) == []
    assert next(c for c in first if len(c) == 40 and c in second)


def test_cells_leave_again_once_k_cases_have_joined(generated: Path, tmp_path: Path) -> None:
    # Prepare: one woman joins (her cells are held back), then nine more
    site = _site(generated, tmp_path)
    first = _released(site, _evaluate(site, run_id=1))
    _join(site, 1, "F")
    second = _released(site, _evaluate(site, run_id=2))
    _join(site, 9, "F")

    # Execute
    third = _released(site, _evaluate(site, run_id=3))

    # Assert: the three releases together are safe, and the third releases the whole
    # split of 90 and the 50 women again
    assert signed_sums(first + second + third, K) == []
    assert exact_isolations(first + second + third, K) == []
    assert {90, 50} <= {len(c) for c in third}
    assert 81 not in {len(c) for c in second}  # the whole split with her was held back


def test_the_same_cases_again_leave_the_same_cells(generated: Path, tmp_path: Path) -> None:
    # Prepare / Execute: two runs on unchanged cases
    site = _site(generated, tmp_path)
    first = _released(site, _evaluate(site, run_id=1))
    second = _released(site, _evaluate(site, run_id=2))

    # Assert: the record changes nothing when nothing changed, and holds each set once
    assert sorted(map(sorted, first)) == sorted(map(sorted, second))
    lines = SiteFolder(site).state.releases.read_text().splitlines()
    assert len(lines) == len({frozenset(c) for c in first})


def test_a_local_evaluation_reads_the_record_and_adds_nothing(
    generated: Path, tmp_path: Path
) -> None:
    # Prepare: run 1 released; one woman joins; a checkpoint of the model
    site = _site(generated, tmp_path)
    _evaluate(site, run_id=1)
    _join(site, 1, "F")
    record = SiteFolder(site).state.releases
    before = record.read_bytes()
    checkpoint = tmp_path / "model.pt"
    save_checkpoint(checkpoint, 1, build_model(CONFIG).state_dict(), CONFIG)

    # Execute: what `radfed evaluate` shows the administrator
    result = evaluate_site(checkpoint, site, tmp_path / "out")

    # Assert: the record is unchanged, and the statistics shown hold back the whole
    # split with the new woman, as a run would
    assert record.read_bytes() == before
    shown = json.loads(result.statistics.read_text())["metrics"]
    assert shown["val.suppressed"] == 1


def test_a_record_that_is_not_radfeds_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "releases.jsonl"
    path.write_text('{"split": "val", "cases": [1, 2]}\n')
    with pytest.raises(DataError, match=r"releases\.jsonl: the site's record of released"):
        ReleaseRecord(path).read("val")


def test_an_append_cut_short_is_dropped_not_fatal(tmp_path: Path) -> None:
    # Prepare: a record whose last append was cut short by a crash (its reply never left)
    path = tmp_path / "releases.jsonl"
    path.write_text('{"split": "val", "cases": ["a", "b"]}\n{"split": "val", "cas')

    # Execute: a read, then an evaluation that records one more set
    earlier = ReleaseRecord(path).read("val").earlier
    with ReleaseRecord(path).locked() as released:
        released["val"].add([frozenset({"c", "d"})])

    # Assert: the cut line is gone, the record reads whole, and nothing else was lost
    assert earlier == {frozenset({"a", "b"})}
    assert ReleaseRecord(path).read("val").earlier == {frozenset({"a", "b"}), frozenset({"c", "d"})}
    assert path.read_text().count("\n") == 2
