"""`cache_admin`'s gc plan, pure: a listing in, what to delete and why out."""

from __future__ import annotations

from pathlib import Path

import pytest

from exec_sandbox_assets.cache.admin import (
    CacheListing,
    FileEntry,
    LockRef,
    VersionListing,
    blob_digest,
    plan_gc,
    versions_to_keep,
)
from exec_sandbox_assets.cache.store import RecordInfo, temp_owner

ROOT = Path("/cache")
NOW = 1_000_000.0


def version(
    v: str, size: int = 100, names: tuple[str, ...] = ("vmlinuz-x86_64",)
) -> VersionListing:
    vdir = ROOT / f"v{v}"
    infos = tuple(
        RecordInfo(n, vdir / n, 10, "sha256:" + "a" * 64, "sha256:" + "b" * 64, "s", "t", True)
        for n in names
    )
    return VersionListing(v, vdir, size, infos, ())


def listing(*versions: VersionListing, **kw: object) -> CacheListing:
    fields: dict[str, object] = {
        "floating": {},
        "partials": (),
        "blobs": (),
        "state_temps": (),
    }
    fields.update(kw)
    return CacheListing(ROOT, tuple(versions), **fields)  # type: ignore[arg-type]


def test_keeps_the_newest_n_and_every_protected_version() -> None:
    assert versions_to_keep(["1.0.0", "1.2.0", "1.10.0"], 1) == ("1.10.0",)
    assert versions_to_keep(["1.0.0", "1.2.0", "1.10.0"], 2) == ("1.2.0", "1.10.0")
    assert versions_to_keep(["1.0.0", "1.2.0"], 0) == ()
    assert versions_to_keep(["1.0.0", "1.2.0"], 1, ["1.0.0", "9.9.9"]) == ("1.0.0", "1.2.0")


def test_plan_removes_old_versions_but_not_the_floating_refs_one() -> None:
    cache = listing(
        version("1.0.0", 10),
        version("1.1.0", 20),
        version("1.2.0", 30),
        floating={"latest": "1.0.0"},
    )
    plan = plan_gc(cache, keep=1, now=NOW)
    assert plan.kept_versions == ("1.0.0", "1.2.0")
    assert [(i.kind, i.path, i.size) for i in plan.items] == [("version", ROOT / "v1.1.0", 20)]
    assert plan.items[0].locks == (LockRef("output", "1.1.0", "vmlinuz-x86_64"),)
    assert plan.total == 20
    assert plan_gc(cache, keep=0, protected=("1.1.0",), now=NOW).kept_versions == (
        "1.0.0",
        "1.1.0",
    )


def test_plan_takes_blob_locks_for_blobs_and_partials_and_ages_state_temps() -> None:
    blob = ROOT / "blobs" / "sha256" / ("ab" * 32)
    partial = ROOT / "blobs" / "sha256" / (("cd" * 32) + ".partial")
    fresh = ROOT / "refs" / ".tag-latest.json.tmp-1-aa"
    stale = ROOT / "refs" / ".trust-x.json.tmp-2-bb"
    kept = version("2.0.0")
    kept = VersionListing(
        kept.version,
        kept.path,
        kept.size,
        kept.outputs,
        (FileEntry(kept.path / ".verified" / ".vmlinuz-x86_64.json.tmp-3-cc", 7, NOW),),
    )
    plan = plan_gc(
        listing(
            kept,
            blobs=(FileEntry(blob, 5, NOW),),
            partials=(FileEntry(partial, 6, NOW),),
            state_temps=(FileEntry(fresh, 1, NOW - 10), FileEntry(stale, 2, NOW - 7200)),
        ),
        keep=1,
        partials=True,
        now=NOW,
    )
    assert plan.resumable == ()
    assert [(i.kind, i.path.name, i.locks) for i in plan.items] == [
        ("blob", blob.name, (LockRef("blob", "sha256:" + "ab" * 32),)),
        ("partial", partial.name, (LockRef("blob", "sha256:" + "cd" * 32),)),
        ("temp", stale.name, ()),  # by path: refs/ sorts before v2.0.0/
        ("temp", ".vmlinuz-x86_64.json.tmp-3-cc", (LockRef("output", "2.0.0", "vmlinuz-x86_64"),)),
    ]
    assert plan.total == 5 + 6 + 7 + 2

    # Without `partials`, resumable downloads are kept, and said to be.
    plain = plan_gc(
        listing(kept, blobs=(FileEntry(blob, 5, NOW),), partials=(FileEntry(partial, 6, NOW),)),
        keep=1,
        now=NOW,
    )
    assert [i.kind for i in plain.items] == ["temp"]
    assert [e.path for e in plain.resumable] == [blob, partial]


def test_a_removed_versions_temp_files_are_part_of_it_and_locked_too() -> None:
    old = version("1.0.0", 50, names=())
    old = VersionListing(
        old.version,
        old.path,
        old.size,
        old.outputs,
        (FileEntry(old.path / ".initramfs-x86_64.tmp-9-dd", 4, NOW),),
    )
    plan = plan_gc(listing(old, version("2.0.0")), keep=1, now=NOW)
    (item,) = plan.items
    assert (item.kind, item.size) == ("version", 50)
    assert item.locks == (LockRef("output", "1.0.0", "initramfs-x86_64"),)


def test_names_read_back_from_paths() -> None:
    assert blob_digest(Path("/c/blobs/sha256/" + "ab" * 32)) == "sha256:" + "ab" * 32
    assert blob_digest(Path("/c/blobs/sha256/" + "ab" * 32 + ".partial")) == "sha256:" + "ab" * 32
    assert blob_digest(Path("/c/blobs/sha256/junk")) is None
    assert temp_owner(Path("/c/v1/.vmlinuz-x86_64.tmp-1-ab")) == "vmlinuz-x86_64"
    assert temp_owner(Path("/c/v1/.verified/.vmlinuz-x86_64.json.tmp-1-ab")) == ("vmlinuz-x86_64")
    assert temp_owner(Path("/c/v1/vmlinuz-x86_64")) is None


def test_negative_keep_is_refused() -> None:
    with pytest.raises(ValueError, match="keep"):
        plan_gc(listing(), keep=-1, now=NOW)
