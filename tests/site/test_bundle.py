"""A run's app bundle at a site: read as data, accepted or refused by the site policy, and
never run. Bundles are built by Flower's own builder from the real app folder."""

from __future__ import annotations

import hashlib
import io
import re
import shutil
import zipfile
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, RecordDict
from flwr.cli.build import build_fab_from_disk

from radfed import __version__
from radfed.config import RunConfig
from radfed.federation.codes import ErrorCode
from radfed.federation.packing import pack
from radfed.folders import find_app_dir
from radfed.privacy import BundleRule, load_policy, read_entries
from radfed.site.bundle import BundleRefused, check_bundle, read_bundle
from radfed.site.runtime import load_site_app
from radfed.tasks.classification import build_model
from tests.helpers import make_context, make_message

CONFIG = RunConfig(image_size=32, local_epochs=1, batch_size=8, score_bins=1000, seed=3)


def _app_copy(tmp_path: Path, *, version: str | None = None, client: str | None = None) -> Path:
    """A copy of the radfed app folder, with another version or ClientApp code."""
    app = tmp_path / "app"
    source = find_app_dir()
    shutil.copytree(source / "server", app / "server", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(source / "client", app / "client", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "LICENSE"):
        shutil.copy(source / name, app / name)
    if version is not None:
        project = (app / "pyproject.toml").read_text()
        (app / "pyproject.toml").write_text(
            re.sub(r'(?m)^version = ".*"$', f'version = "{version}"', project, count=1)
        )
    if client is not None:
        (app / "client" / "app.py").write_text(client)
    return app


def test_the_release_bundle_is_read_as_radfed_and_accepted(tmp_path: Path) -> None:
    content = build_fab_from_disk(_app_copy(tmp_path))

    bundle = read_bundle(content)

    assert (bundle.publisher, bundle.name, bundle.version) == ("radfed", "radfed", __version__)
    assert bundle.sha256 == hashlib.sha256(content).hexdigest()
    check_bundle(BundleRule(), bundle)  # the default rule: this radfed's own release


def test_another_version_or_a_pinned_digest_is_refused(tmp_path: Path) -> None:
    other = read_bundle(build_fab_from_disk(_app_copy(tmp_path, version="9.9.9")))
    release = read_bundle(build_fab_from_disk(_app_copy(tmp_path / "r")))

    with pytest.raises(BundleRefused, match=re.escape("version 9.9.9")):
        check_bundle(BundleRule(), other)
    with pytest.raises(BundleRefused, match="not one of the digests"):
        check_bundle(BundleRule(sha256=("0" * 64,)), release)
    check_bundle(BundleRule(sha256=(release.sha256,)), release)


def _zip(**files: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not a zip file",
        _zip(**{"client/app.py": "import os"}),  # no pyproject.toml
        _zip(**{"pyproject.toml": "[project\nname ="}),  # not TOML
        _zip(**{"pyproject.toml": 'tool = "x"\nproject = [1]'}),  # tables of other types
        _zip(**{"pyproject.toml": "[tool]\nflwr = [1]\n[project]\nname = 2"}),
        _zip(**{"pyproject.toml": "x = " + "[" * 100_000}),  # nested past the recursion limit
    ],
)
def test_a_bundle_that_is_not_one_reads_as_nobody_and_is_refused(content: bytes) -> None:
    bundle = read_bundle(content)

    assert (bundle.publisher, bundle.name, bundle.version) == ("", "", "")
    with pytest.raises(BundleRefused):
        check_bundle(BundleRule(), bundle)


def test_a_bundle_whose_pyproject_is_huge_is_not_read() -> None:
    project = '[project]\nname = "radfed"\n' + "#" * (1024 * 1024)  # compresses to a few KB
    bundle = read_bundle(_zip(**{"pyproject.toml": project}))

    assert bundle.name == ""


def _request(kind: str) -> object:
    content = RecordDict(
        {
            "arrays": pack(build_model(CONFIG).state_dict()),
            "config": ConfigRecord({"server-round": 1}),
        }
    )
    return make_message(content, message_type=kind, src_node_id=0, dst_node_id=1)


def test_a_refused_bundle_gets_an_error_code_an_audit_entry_and_no_work(
    site_copy: Path, tmp_path: Path
) -> None:
    # Prepare: a bundle whose ClientApp would write a marker and send the manifest
    marker = tmp_path / "bundle-code-ran"
    malicious = (
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('ran')\n"
        "from radfed.site.app import app\n"
    )
    content = build_fab_from_disk(_app_copy(tmp_path, version="6.6.6", client=malicious))
    context = make_context(
        CONFIG.to_run_config(), {"site-name": "site-a", "data-path": str(site_copy)}
    )

    # Execute: what radfed's flwr-clientapp does with the task
    reply = load_site_app(content)(message=_request("train"), context=context)  # type: ignore[arg-type]

    # Assert
    assert reply.has_error() and reply.error.code == ErrorCode.BUNDLE
    assert not reply.has_content() and "6.6.6" not in (reply.error.reason or "")
    (entry,) = [e.to_json() for e in read_entries(site_copy / ".radfed" / "audit.jsonl")]
    assert entry["kind"] == "error" and entry["error-code"] == ErrorCode.BUNDLE
    assert not marker.exists()
    assert not (site_copy / ".radfed" / "cache").exists()  # no case was decoded


def test_an_accepted_bundle_is_answered_by_the_installed_code(
    site_copy: Path, tmp_path: Path
) -> None:
    # Prepare: a bundle of this release whose own ClientApp code would write a marker
    marker = tmp_path / "bundle-code-ran"
    malicious = f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
    content = build_fab_from_disk(_app_copy(tmp_path, client=malicious))
    context = make_context(
        CONFIG.to_run_config(), {"site-name": "site-a", "data-path": str(site_copy)}
    )

    # Execute
    reply = load_site_app(content)(message=_request("query"), context=context)  # type: ignore[arg-type]

    # Assert: the site's own query handler answered; the bundle's code never ran
    assert not reply.has_error()
    assert reply.content["site"]["name"] == "site-a"  # type: ignore[index]
    assert not marker.exists()


def test_the_bundle_rule_comes_from_the_policy_file(tmp_path: Path) -> None:
    file = tmp_path / "site-policy.toml"
    file.write_text(
        '[policy.bundle]\nversions = ["0.1.0", "0.1.1"]\nsha256 = ["' + "A" * 64 + '"]\n'
    )

    rule = load_policy(file).bundle

    assert rule.versions == ("0.1.0", "0.1.1") and rule.sha256 == ("a" * 64,)
    assert (rule.publisher, rule.name) == ("radfed", "radfed")
