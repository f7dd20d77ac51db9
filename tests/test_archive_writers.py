"""Concurrent writers of one `oci-archive`: two mirrors into the same archive at once
must both land (unpack, add, replace is a read-modify-write of the whole file)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from exec_sandbox_assets.mirror import mirror
from exec_sandbox_assets.oci.layout import LayoutReader
from exec_sandbox_assets.oci.layout_target import LayoutTarget
from releases import make_key_pair, publish_sample_release

SIZE = 64 * 1024


def test_two_mirrors_into_one_archive_at_once_keep_both_releases(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = make_key_pair(tmp_path / "keys")
    source = tmp_path / "source"
    for version in ("1.0.0", "2.0.0"):
        publish_sample_release(f"oci:{source}", version, tmp_path / "publish", key=key, size=SIZE)
    archive = tmp_path / "usb" / "assets.tar"

    # Slow each blob write so that both writers are inside their unpack-add-replace
    # at the same time (without the archive lock, the second unpacked the empty state).
    real_push = LayoutTarget.push_blob

    def slow_push(self: LayoutTarget, path: Path, digest: str, size: int) -> None:
        time.sleep(0.05)
        real_push(self, path, digest, size)

    monkeypatch.setattr(LayoutTarget, "push_blob", slow_push)
    errors: list[BaseException] = []

    def copy(version: str) -> None:
        try:
            mirror(
                f"oci:{source}",
                f"oci-archive:{archive}",
                versions=[version],
                trusted_keys=[key.public],
                work_dir=tmp_path / f"work-{version}",
            )
        except BaseException as exc:  # reported below with the version
            errors.append(exc)

    threads = [threading.Thread(target=copy, args=(v,)) for v in ("1.0.0", "2.0.0")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []

    with LayoutReader.open(archive, True) as reader:
        tags = set(reader.tags())
    assert {"v1.0.0", "v2.0.0"} <= tags, tags
    assert not any(p.name.endswith(".tmp") for p in archive.parent.iterdir())
