"""The preprocessed cache: a second load reads no DICOM; a changed file or setting misses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import radfed.data.loading as site_module
from radfed.data.cache import CaseCache
from radfed.data.loading import load_site

SETTINGS = {"image_size": 32, "val_fraction": 0.25, "test_fraction": 0.25, "seed": 5}


def test_second_load_comes_from_the_cache(site_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    first = load_site(site_copy, **SETTINGS)
    calls: list[Path] = []
    original = site_module.read_image
    monkeypatch.setattr(
        site_module, "read_image", lambda p, b, **kw: calls.append(p) or original(p, b, **kw)
    )
    # Execute
    second = load_site(site_copy, **SETTINGS)
    # Assert: nothing decoded, same tensors and attributes
    assert calls == []
    for name in ("train", "val", "test"):
        assert np.array_equal(first.splits[name].images.numpy(), second.splits[name].images.numpy())
        assert first.splits[name].attributes == second.splits[name].attributes


def test_changed_setting_or_file_is_decoded_again(
    site_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    load_site(site_copy, **SETTINGS)
    calls: list[Path] = []
    original = site_module.read_image
    monkeypatch.setattr(
        site_module, "read_image", lambda p, b, **kw: calls.append(p) or original(p, b, **kw)
    )
    # Another image size: every case misses
    bigger = load_site(site_copy, **{**SETTINGS, "image_size": 48})
    assert len(calls) == bigger.num_cases and bigger.splits["train"].images.shape[-1] == 48
    # One changed file at the original size: only that case misses
    calls.clear()
    victim = sorted((site_copy / "images").glob("*.dcm"))[0]
    victim.write_bytes(victim.read_bytes() + b"\0\0")  # same pixels, different content
    load_site(site_copy, **SETTINGS)
    assert calls == [victim.resolve()]


def test_damaged_entry_is_rebuilt(tmp_path: Path) -> None:
    source = tmp_path / "image.bin"
    source.write_bytes(b"abc")
    cache = CaseCache(tmp_path / "state", {"image_size": 8})
    value = (np.ones((2, 2), dtype=np.float32), {"sex": "F"})
    cache.get_or_compute(source, lambda p: value)
    entry = next((tmp_path / "state" / "cache").glob("*.npz"))
    entry.write_bytes(b"not a zip file")
    _, attributes = cache.get_or_compute(source, lambda p: value)
    assert attributes == {"sex": "F"} and cache.misses == 2
    assert cache.get_or_compute(source, lambda p: (np.zeros(1), {}))[1] == {"sex": "F"}
    assert cache.hits == 1
