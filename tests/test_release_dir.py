"""`publish --release-dir` and a folder that holds another release (issue #19 item 4):
refused, naming the version it holds, unless `--replace-release-dir`; then the old
release's files this one lacks go too. Through the CLI, on real files."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from exec_sandbox_assets.oci.model import Index
from exec_sandbox_assets.publish import make_sample_inputs
from exec_sandbox_assets.publish.release_dir import INDEX_FILE, SUMS_FILE, payload_file
from exec_sandbox_assets.release import catalog
from releases import KeyPair, make_key_pair
from test_cli import Result, run


def _publish(
    dist: Path, folder: Path, version: str, *keys: KeyPair, replace: bool = False
) -> Result:
    args: list[str | Path] = ["publish", "-i", dist, "--version", version, "--level", "3"]
    args += ["--platform", "linux/amd64", "--release-dir", folder]
    for key in keys:
        args += ["--key", key.private]
    return run(*args, *(["--replace-release-dir"] if replace else []))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _sums_hold(folder: Path) -> bool:
    """`sha256sum -c SHA256SUMS` in Python: every listed file, and only those, match."""
    listed = {}
    for line in (folder / SUMS_FILE).read_text().splitlines():
        digest, _, name = line.partition("  ")
        listed[name] = digest
    files = {p.name for p in folder.iterdir()} - {SUMS_FILE}
    return files == set(listed) and all(
        hashlib.sha256((folder / n).read_bytes()).hexdigest() == d for n, d in listed.items()
    )


def test_another_release_folder_is_refused_unless_replaced(tmp_path: Path) -> None:
    dist = make_sample_inputs(tmp_path / "dist", size=4096)
    a, b = make_key_pair(tmp_path / "keys", "a"), make_key_pair(tmp_path / "keys", "b")
    folder = tmp_path / "release"

    first = _publish(dist, folder, "1.0.0", a, b)  # two keys: two payload files
    assert first.code == 0, first.stderr
    before = _snapshot(folder)
    assert payload_file(1) in before

    refused = _publish(dist, folder, "1.1.0", a)
    assert refused.code == 2, refused.stderr
    assert f"release folder {folder} holds release 1.0.0" in refused.stderr
    assert "--replace-release-dir" in refused.stderr
    assert _snapshot(folder) == before  # nothing written

    replaced = _publish(dist, folder, "1.1.0", a, replace=True)
    assert replaced.code == 0, replaced.stderr
    index = Index.from_bytes((folder / INDEX_FILE).read_bytes(), "folder index")
    assert index.annotations[catalog.ANN_VERSION] == "1.1.0"
    assert payload_file(1) not in _snapshot(folder)  # 1.0.0's second signature is gone
    assert _sums_hold(folder)

    time.sleep(1.1)  # another second: a re-run keeps the folder's created, as a vV tag's
    again = _publish(dist, folder, "1.1.0", a)  # the same release: rewritten, not refused
    assert again.code == 0, again.stderr


def test_a_folder_with_files_of_no_release_is_still_refused(tmp_path: Path) -> None:
    dist = make_sample_inputs(tmp_path / "dist", size=4096)
    key = make_key_pair(tmp_path / "keys")
    folder = tmp_path / "release"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    refused = _publish(dist, folder, "1.0.0", key, replace=True)
    assert refused.code == 2, refused.stderr
    assert "not part of this release: notes.txt" in refused.stderr
    assert (folder / "notes.txt").read_text() == "mine"
