"""What a run may cost a site: each limit of the site policy refuses the run before the work
it bounds (tested against the real handlers, data loader and cache)."""

from __future__ import annotations

import gzip
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict

from radfed.config import RunConfig
from radfed.data.cache import CaseCache
from radfed.data.image import ImageReadError
from radfed.data.reader import read_image
from radfed.data.synth import synth_classification
from radfed.federation.codes import ErrorCode
from radfed.federation.packing import pack
from radfed.privacy import ResourceLimits, read_entries
from radfed.site.handlers import handle_evaluate, handle_train
from radfed.site.node import site_policy
from radfed.tasks.classification import build_model
from radfed.tasks.training import model_size
from tests.helpers import make_context, make_message

CONFIG = RunConfig(image_size=32, local_epochs=1, batch_size=8, score_bins=1000, seed=3)


def _request(kind: str, config: RunConfig = CONFIG, server_round: int = 1) -> Message:
    content = RecordDict(
        {
            "arrays": pack(build_model(config).state_dict()),
            "config": ConfigRecord({"server-round": server_round}),
        }
    )
    return make_message(content, message_type=kind, src_node_id=0, dst_node_id=1)


def _node(site: Path, limits: str = "") -> dict[str, bool | float | int | str]:
    node: dict[str, bool | float | int | str] = {"site-name": "site-a", "data-path": str(site)}
    if limits:
        path = site.parent / "site-policy.toml"
        path.write_text("[policy.limits]\n" + limits)
        node["policy-path"] = str(path)
    return node


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"image-size": 1_000_000}, "limits.image-size"),
        ({"local-steps": 1_000_000_000}, "limits.steps-per-round"),
        ({"num-workers": 100_000}, "limits.workers"),
        ({"num-server-rounds": 1_000_000}, "limits.rounds"),
        ({"batch-size": 100_000}, "limits.batch-size"),
        ({"image-size": 400, "spatial-dims": 3}, "limits.input-voxels"),
    ],
)
def test_a_run_beyond_the_default_limits_is_refused_before_any_work(
    site_copy: Path, settings: dict[str, int], named: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: a deployed site with the default policy; the run asks for too much
    context = make_context({**CONFIG.to_run_config(), **settings}, _node(site_copy))

    # Execute
    reply = handle_train(_request("train"), context)

    # Assert: an error code leaves, audited; the limit is named at the site only
    assert reply.has_error() and reply.error.code == ErrorCode.LIMIT
    assert "limits" not in (reply.error.reason or "")
    assert named in caplog.text
    (entry,) = read_entries(site_copy / ".radfed" / "audit.jsonl")
    assert entry.error_code == ErrorCode.LIMIT
    assert not (site_copy / ".radfed" / "cache").exists()  # no case was decoded


def test_a_model_beyond_the_parameter_limit_is_refused_before_it_is_built(
    site_copy: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: a site that builds models of at most a million parameters; ResNet-18 has 11
    settings = {**CONFIG.to_run_config(), "model": "resnet18"}
    context = make_context(settings, _node(site_copy, "model-parameters = 1000000\n"))

    # Execute
    reply = handle_evaluate(_request("evaluate"), context)

    # Assert
    assert reply.has_error() and reply.error.code == ErrorCode.LIMIT
    assert "limits.model-parameters" in caplog.text
    assert not (site_copy / ".radfed" / "cache").exists()  # refused before the data loaded


def test_the_model_is_counted_without_taking_its_memory() -> None:
    # A model of 3 * 10**9 parameters (12 GB as float32) is counted, not allocated
    def build(config: RunConfig) -> torch.nn.Module:
        return torch.nn.Linear(30_000, 100_000)

    assert model_size(build, CONFIG) == 30_000 * 100_000 + 100_000


def test_a_round_beyond_the_steps_limit_is_refused_before_training(site_copy: Path) -> None:
    # Prepare: 2 optimiser steps allowed; ten epochs over the train split take 20
    node = _node(site_copy, "steps-per-round = 2\n")
    ten_epochs = make_context({**CONFIG.to_run_config(), "local-epochs": 10}, node)
    two_steps = make_context({**CONFIG.to_run_config(), "local-steps": 2}, node)

    # Execute
    refused = handle_train(_request("train"), ten_epochs)
    accepted = handle_train(_request("train"), two_steps)

    # Assert
    assert refused.has_error() and refused.error.code == ErrorCode.LIMIT
    assert not accepted.has_error()


def test_weights_larger_than_the_inbound_limit_are_refused(site_copy: Path) -> None:
    context = make_context(CONFIG.to_run_config(), _node(site_copy, "inbound-bytes = 1000\n"))

    reply = handle_evaluate(_request("evaluate"), context)

    assert reply.has_error() and reply.error.code == ErrorCode.LIMIT


def test_a_round_number_beyond_the_run_limit_is_refused(site_copy: Path) -> None:
    context = make_context(CONFIG.to_run_config(), _node(site_copy, "rounds = 5\n"))

    reply = handle_evaluate(_request("evaluate", server_round=6), context)

    assert reply.has_error() and reply.error.code == ErrorCode.LIMIT


def test_a_simulated_site_without_a_policy_file_has_no_limits(tmp_path: Path) -> None:
    policy = site_policy({"partition-id": 0, "num-partitions": 1}, tmp_path)

    assert policy.limits.image_size > 10**12 and policy.limits == ResourceLimits.unbounded()


def _nifti(path: Path, shape: tuple[int, int, int]) -> None:
    """A gzipped NIfTI-1 file whose header declares ``shape`` (float32) and holds no voxels."""
    header = bytearray(352)
    struct.pack_into("<i", header, 0, 348)
    struct.pack_into("<8h", header, 40, 3, *shape, 1, 1, 1, 1)
    struct.pack_into("<2h", header, 70, 16, 32)  # datatype float32, bitpix
    struct.pack_into("<8f", header, 76, 1, 1, 1, 1, 1, 1, 1, 1)
    struct.pack_into("<f", header, 108, 352.0)  # vox_offset
    header[344:348] = b"n+1\0"
    path.write_bytes(gzip.compress(bytes(header)))


def test_an_image_declaring_too_many_voxels_is_not_decoded(tmp_path: Path) -> None:
    # Prepare: a few hundred bytes on disk that declare 30000^2 x 300 voxels (1 TB)
    path = tmp_path / "huge.nii.gz"
    _nifti(path, (30000, 30000, 300))
    assert path.stat().st_size < 1000

    # Execute / Assert: refused from the header, with the limit named
    with pytest.raises(ImageReadError, match="declares 270000000000 voxels"):
        read_image(path)
    with pytest.raises(ImageReadError, match=re.escape("limits.decoded-voxels")):
        read_image(path, max_voxels=10)


def test_a_dicom_case_larger_than_the_site_decodes_is_skipped(site_copy: Path) -> None:
    # Prepare: the site decodes images of at most 100 voxels (the synth images hold 32 x 32)
    context = make_context(CONFIG.to_run_config(), _node(site_copy, "decoded-voxels = 100\n"))

    # Execute: every case is skipped, so the site has no data
    reply = handle_evaluate(_request("evaluate"), context)

    # Assert
    assert reply.has_error() and reply.error.code == ErrorCode.DATA
    assert not list((site_copy / ".radfed" / "cache").glob("*.npz"))


def test_the_cache_stays_under_its_cap_evicting_the_least_recently_used(tmp_path: Path) -> None:
    # Prepare: a cap of three and a half entries
    value = (np.random.default_rng(0).random((32, 32), dtype=np.float32), {"sex": "F"})
    sources = []
    for i in range(4):
        source = tmp_path / f"case-{i}.bin"
        source.write_bytes(bytes([i]))
        sources.append(source)
    probe = CaseCache(tmp_path / "probe", {"image_size": 32})
    probe.get_or_compute(sources[0], lambda p: value)
    size = next((tmp_path / "probe" / "cache").glob("*.npz")).stat().st_size
    cache = CaseCache(tmp_path / "state", {"image_size": 32}, max_bytes=3 * size + size // 2)

    # Execute: three entries, the first used again, then a fourth
    for source in sources[:3]:
        cache.get_or_compute(source, lambda p: value)
    cache.get_or_compute(sources[0], lambda p: value)  # a hit: now the most recently used
    cache.get_or_compute(sources[3], lambda p: value)

    # Assert: under the cap, and the entries removed were the least recently used
    folder = tmp_path / "state" / "cache"
    assert sum(f.stat().st_size for f in folder.glob("*.npz")) <= 3 * size + size // 2
    kept = {p.name for p in sources if (folder / f"{cache.key(p)}.npz").exists()}
    assert kept == {"case-0.bin", "case-2.bin", "case-3.bin"} and cache.evicted == 1


def test_a_site_loaded_within_a_small_cache_cap_keeps_it(tmp_path: Path) -> None:
    root = tmp_path / "data"
    synth_classification(root, sites=1, cases_per_site=24, seed=2, image_size=32)
    site = root / "site-a"
    context = make_context(CONFIG.to_run_config(), _node(site, "cache-bytes = 40000\n"))

    assert not handle_evaluate(_request("evaluate"), context).has_error()
    files = list((site / ".radfed" / "cache").glob("*.npz"))
    assert files and sum(f.stat().st_size for f in files) <= 40_000
