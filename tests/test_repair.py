"""Issue #19 item 1: a cached file corrupted in place (size and mtime kept, so the stat
check of a boot cannot see it) is found by a content check, which removes its record;
the next pull or boot then fetches it again. Through the CLI (`verify --full` then
`pull`, `verify --repair`, `pull --force`) and the API (`ensure_assets`, with and
without EXEC_SANDBOX_VERIFY_CONTENT_AFTER), against a real registry."""

from __future__ import annotations

import json
import os
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest

import exec_sandbox_assets as esa
from exec_sandbox_assets.base.errors import ConfigError
from exec_sandbox_assets.cache.admin import verify_version
from exec_sandbox_assets.cache.content import due
from exec_sandbox_assets.cache.records import Record
from exec_sandbox_assets.config import load_settings
from releases import SampleRelease, make_key_pair, publish_sample_release
from servers import RegistryServer
from test_cli import HOST, layout_args, run
from test_client_e2e import PYTHON, VERSION, reconfigure, use
from test_full_disk import tmpfs


@pytest.fixture
def release(registry: RegistryServer, repo_name: str, tmp_path: Path) -> SampleRelease:
    """1.0.0 for this host on a real registry, small files."""
    key = make_key_pair(tmp_path / "keys")
    return publish_sample_release(
        registry.ref(repo_name),
        VERSION,
        tmp_path / "work",
        key=key,
        size=64 * 1024,
        platforms=[HOST],
    )


@pytest.fixture(autouse=True)
def fresh_singleton(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(esa, "_assets_singleton", None)


def flip_byte(path: Path, offset: int = 1000) -> None:
    """Bit rot: one byte changed in place; size, inode and mtime kept."""
    before = path.stat()
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_ino, after.st_mtime_ns) == (
        before.st_size,
        before.st_ino,
        before.st_mtime_ns,
    )


def cli_args(release: SampleRelease, cache: Path) -> list[str]:
    return [*layout_args(release, cache), "--asset-version", VERSION]


def statuses(result_stdout: str) -> dict[str, tuple[bool, str | None]]:
    doc = json.loads(result_stdout)
    return {f["name"]: (f["downloaded"], f.get("content_check")) for f in doc["files"]}


def test_a_corrupt_file_is_fetched_again_after_verify_full_repair_and_pull_force(
    tmp_path: Path, release: SampleRelease
) -> None:
    cache = tmp_path / "cache"
    args = cli_args(release, cache)
    first = run(*args, "pull", "--language", "python")
    assert first.code == 0, first.stderr
    victim = cache / f"v{VERSION}" / PYTHON
    good = release.expected(PYTHON)
    assert victim.read_bytes() == good

    # verify --full finds it and removes its record; the next pull fetches it again.
    flip_byte(victim)
    assert run(*args, "pull", "--language", "python").code == 0  # a stat: still "cached"
    assert victim.read_bytes() != good
    full = run(*args, "verify", "--full")
    assert full.code == 3, full.stdout + full.stderr
    assert f"MISMATCH 1.0.0/{PYTHON}" in full.stdout
    assert "the next pull or boot fetches it again" in full.stdout
    again = run(*args, "pull", "--language", "python", "--json")
    assert again.code == 0, again.stderr
    assert {n for n, (down, _) in statuses(again.stdout).items() if down} == {PYTHON}
    assert victim.read_bytes() == good
    assert run(*args, "verify", "--full").code == 0

    # verify --repair fetches it at once.
    flip_byte(victim, 5000)
    repaired = run(*args, "verify", "--repair")
    assert repaired.code == 0, repaired.stdout + repaired.stderr
    assert f"repaired 1.0.0/{PYTHON}: fetched again and verified" in repaired.stdout
    assert victim.read_bytes() == good
    assert run(*args, "verify").code == 0

    # pull --force hashes what is cached and fetches what does not match.
    flip_byte(victim, 20)
    forced = run(*args, "pull", "--language", "python", "--force", "--json")
    assert forced.code == 0, forced.stderr
    got = statuses(forced.stdout)
    assert got[PYTHON] == (True, "mismatch")
    assert {n: v for n, v in got.items() if n != PYTHON} == {
        n: (False, "ok") for n in got if n != PYTHON
    }
    assert victim.read_bytes() == good
    text = run(*args, "pull", "--language", "python", "--force")
    assert text.code == 0 and "cached, content checked" in text.stdout, text.stdout

    # A touched file whose bytes are intact: --repair records its new stat, no download.
    victim.touch()
    assert run(*args, "verify").code == 3
    restat = run(*args, "verify", "--repair", "--json")
    assert restat.code == 0, restat.stdout + restat.stderr
    [entry] = [r for r in restat.json()["results"] if r["name"] == PYTHON]
    assert entry["ok"] and entry["repaired"] is None and "now recorded" in entry["note"]
    assert run(*args, "verify").code == 0


def test_verify_repair_reports_what_it_could_not_fetch(
    tmp_path: Path, release: SampleRelease, registry: RegistryServer
) -> None:
    cache = tmp_path / "cache"
    args = cli_args(release, cache)
    assert run(*args, "pull", "--language", "python").code == 0
    victim = cache / f"v{VERSION}" / PYTHON
    flip_byte(victim)
    registry.stop()
    result = run(*args, "verify", "--repair")
    assert result.code == 1, result.stdout + result.stderr
    assert f"FAILED   1.0.0/{PYTHON}: not repaired" in result.stdout
    assert str(victim) in result.stderr


async def test_ensure_assets_refetches_a_file_a_content_check_found_corrupt(
    tmp_path: Path, release: SampleRelease, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = use(monkeypatch, tmp_path, release.target, release.key.public)
    images = await esa.ensure_assets(download=True, language="python")
    victim = images / PYTHON
    good = release.expected(PYTHON)
    flip_byte(victim)
    # The boot path is a stat: the damage is invisible to it...
    assert await esa.ensure_assets(download=True, language="python") == images
    assert victim.read_bytes() != good
    # ...until a content check (what `verify --full` runs) removes the record.
    client = esa.get_assets()
    bad = [r for r in verify_version(client.store, VERSION, full=True) if not r.ok]
    assert [r.name for r in bad] == [PYTHON]
    assert await esa.ensure_assets(download=True, language="python") == images
    assert victim.read_bytes() == good
    assert cache / f"v{VERSION}" == images


async def test_verify_content_after_checks_the_boot_path_once_per_start(
    tmp_path: Path, release: SampleRelease, monkeypatch: pytest.MonkeyPatch
) -> None:
    use(monkeypatch, tmp_path, release.target, release.key.public)
    images = await esa.ensure_assets(download=True, language="python")
    victim = images / PYTHON
    good = release.expected(PYTHON)
    record = images / ".verified" / f"{PYTHON}.json"
    assert json.loads(record.read_text())["content_checked_at"]

    # At most a day since the last check, and the last one was years ago.
    monkeypatch.setenv("EXEC_SANDBOX_VERIFY_CONTENT_AFTER", "1d")
    backdate(record, "2000-01-01T00:00:00+00:00")
    flip_byte(victim)
    reconfigure(tmp_path)
    # Due (the last check is years old): hashed at this start, found corrupt, fetched.
    assert await esa.ensure_assets(download=True, language="python") == images
    assert victim.read_bytes() == good
    checked = json.loads(record.read_text())["content_checked_at"]
    assert checked > "2000"

    # Checked just now: a second corruption waits for its age (or a restart with 0).
    flip_byte(victim)
    reconfigure(tmp_path)
    assert await esa.ensure_assets(download=True, language="python") == images
    assert victim.read_bytes() != good
    monkeypatch.setenv("EXEC_SANDBOX_VERIFY_CONTENT_AFTER", "0")
    reconfigure(tmp_path)
    assert await esa.ensure_assets(download=True, language="python") == images
    assert victim.read_bytes() == good
    # Once per start: the same client does not hash it again.
    flip_byte(victim)
    assert await esa.ensure_assets(download=True, language="python") == images
    assert victim.read_bytes() != good


def backdate(record: Path, when: str) -> None:
    doc = json.loads(record.read_text())
    doc["content_checked_at"] = when
    record.write_text(json.dumps(doc))


def test_verify_content_after_takes_ages_and_old_records_count_from_verified_at() -> None:
    ages = {"0": 0.0, "3600": 3600.0, "90m": 5400.0, "12h": 43200.0, "30d": 2592000.0}
    for text, seconds in ages.items():
        env = {"EXEC_SANDBOX_VERIFY_CONTENT_AFTER": text}
        assert load_settings(env, cache_dir="/c").verify_content_after == seconds, text
    assert load_settings({}, cache_dir="/c").verify_content_after is None
    for bad in ("soon", "-5", "3y", "d"):
        with pytest.raises(ConfigError, match="expected an age"):
            load_settings({"EXEC_SANDBOX_VERIFY_CONTENT_AFTER": bad}, cache_dir="/c")

    fields = {
        "format": 1,
        "content_digest": "sha256:" + "a" * 64,
        "size": 1,
        "mtime_ns": 1,
        "ino": 1,
        "layer_digest": "sha256:" + "b" * 64,
        "source": "s",
        "verified_at": "2026-01-01T00:00:00+00:00",
    }
    old = Record.from_bytes(json.dumps(fields).encode())  # written before content_checked_at
    now = datetime(2026, 1, 2, tzinfo=UTC)
    assert old.content_checked_at is None
    assert due(old, 86400, now) and not due(old, 86401, now)
    new = Record.from_bytes(
        json.dumps({**fields, "content_checked_at": "2026-01-01T12:00:00+00:00"}).encode()
    )
    assert not due(new, 86400, now) and due(new, 43200, now)


async def test_the_boot_path_check_on_a_read_only_cache_serves_intact_files_only(
    tmp_path: Path, release: SampleRelease, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cache shared read-only: a match cannot be recorded but is served; a mismatch
    cannot be repaired there, and is not served either."""
    with tmpfs(tmp_path / "ro", "16m") as mount:
        use(monkeypatch, tmp_path, release.target, release.key.public, EXEC_SANDBOX_MIN_FREE="0")
        monkeypatch.setenv("EXEC_SANDBOX_CACHE_DIR", str(mount / "cache"))
        reconfigure(tmp_path)
        images = await esa.ensure_assets(download=True, language="python")
        remount(mount, "ro")
        try:
            monkeypatch.setenv("EXEC_SANDBOX_VERIFY_CONTENT_AFTER", "0")
            reconfigure(tmp_path)
            assert await esa.ensure_assets(download=True, language="python") == images
            remount(mount, "rw")
            flip_byte(images / PYTHON)
            remount(mount, "ro")
            reconfigure(tmp_path)
            with pytest.raises(esa.AssetError, match="Read-only file system"):
                await esa.ensure_assets(download=True, language="python")
        finally:
            remount(mount, "rw")


def remount(path: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], check=True)
