"""A simulated node's process keeps the sites it served loaded (radfed.site.node)."""

from __future__ import annotations

from pathlib import Path

import pytest

from radfed.config import RunConfig
from radfed.data.loading import SiteData
from radfed.data.synth import synth_classification
from radfed.privacy import ResourceLimits
from radfed.site import node

CONFIG = RunConfig(image_size=32, local_epochs=1, batch_size=8, seed=3)


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every real load of a site, by folder name; an empty memo to start from."""
    loads: list[str] = []
    real = node.load_site_within

    def load(path: Path, config: RunConfig, limits: ResourceLimits) -> SiteData:
        loads.append(path.name)
        return real(path, config, limits)

    monkeypatch.setattr(node, "load_site_within", load)
    monkeypatch.setattr(node, "_SITE_MEMO", type(node._SITE_MEMO)())
    return loads


def test_sites_served_in_turn_are_loaded_once_each(tmp_path: Path, counted: list[str]) -> None:
    # Prepare
    synth_classification(tmp_path, sites=3, cases_per_site=12, seed=1, image_size=32)
    sites = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    limits = ResourceLimits.unbounded()

    # Execute: three rounds of a worker that serves every site in turn
    seen = [node.load_site_once(site, CONFIG, limits) for _ in range(3) for site in sites]

    # Assert: one load per site; the same data object after that
    assert counted == [s.name for s in sites]
    assert all(seen[i] is seen[i + len(sites)] for i in range(len(sites)))
    # new data settings load the site again, and replace what was kept of it
    node.load_site_once(sites[0], RunConfig(image_size=48, seed=3), limits)
    assert counted[-1] == sites[0].name
    assert sum(1 for key in node._SITE_MEMO if key[0] == str(sites[0].resolve())) == 1


def test_what_is_kept_stays_within_the_memory_bound(
    tmp_path: Path, counted: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a bound that holds about one site (12 cases of 32 x 32 float32 = 49 kB)
    synth_classification(tmp_path, sites=3, cases_per_site=12, seed=1, image_size=32)
    sites = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    monkeypatch.setattr(node, "_MEMO_BYTES", 60_000)
    limits = ResourceLimits.unbounded()

    # Execute
    for _ in range(2):
        for site in sites:
            node.load_site_once(site, CONFIG, limits)

    # Assert: each site loaded again once evicted; never more than the newest kept
    assert counted == [s.name for s in sites] * 2
    assert len(node._SITE_MEMO) == 1
