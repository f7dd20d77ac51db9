"""Issue #19 item 2: a full disk, on a real small file system (a tmpfs this test mounts;
skipped with a message where mounting is not allowed), through the CLI.

- pull: free space is checked before the first byte; what fits is fetched, smallest
  first, and only what does not is refused, naming bytes needed, free, and where;
  EXEC_SANDBOX_MIN_FREE keeps a margin free;
- gc keeps resumable downloads, gc --partials frees them;
- mirror into a full layout removes what it had written there.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import FaultProxyFactory
from exec_sandbox_assets.base.errors import ConfigError
from exec_sandbox_assets.cache.space import Need, need_of, plan
from exec_sandbox_assets.cli.commands import pull_specs
from exec_sandbox_assets.config import load_settings
from exec_sandbox_assets.release import catalog
from releases import SampleRelease, make_key_pair, publish_sample_release
from servers import RegistryServer
from test_cli import HOST, Result, layout_args
from test_cli_operator import cli

MiB = 1 << 20
ARCH = catalog.ARCH_OF_GOARCH[HOST[1]]
BIG = f"python-3.14-base-{ARCH}.qcow2"
PYTHON_FILES = [s.output_name for s in pull_specs(*HOST, ["python"])]


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A real small file system at `path`, unmounted afterwards."""
    path.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root: the full-disk tests run as root only")
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}): full-disk tests skipped")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file())


@pytest.fixture
def release(tmp_path: Path) -> SampleRelease:
    """1.0.0 for this host in a layout on the ordinary disk: small files, and a python
    base image of 8 MiB that can never fit in 5 MiB."""
    return publish_sample_release(
        f"oci:{tmp_path / 'layout'}",
        "1.0.0",
        tmp_path / "work",
        key=make_key_pair(tmp_path / "keys"),
        size=64 * 1024,
        sizes={BIG: 8 * MiB},
        platforms=[HOST],
    )


def pull(release: SampleRelease, cache: Path, min_free: str, *extra: str) -> Result:
    args = [*layout_args(release, cache), "--asset-version", "1.0.0"]
    env = {**os.environ, "EXEC_SANDBOX_MIN_FREE": min_free}
    return cli(*args, "pull", "--language", "python", *extra, env=env)


def test_pull_fetches_what_fits_and_refuses_the_rest_before_its_first_byte(
    tmp_path: Path, release: SampleRelease
) -> None:
    with tmpfs(tmp_path / "small", "5m") as small:
        cache = small / "cache"
        result = pull(release, cache, "0", "--json")
        assert result.code == 1, result.stdout + result.stderr
        doc = result.json()
        # The small files are not sacrificed for the base image that cannot fit.
        assert sorted(f["name"] for f in doc["files"]) == sorted(
            n for n in PYTHON_FILES if n != BIG
        )
        for name in (n for n in PYTHON_FILES if n != BIG):
            assert (cache / "v1.0.0" / name).read_bytes() == release.expected(name)
        [error] = doc["errors"]
        assert (error["files"], error["type"]) == ([BIG], "OutOfSpaceError")
        message = error["error"]
        assert re.search(
            rf"not enough space in {re.escape(str(small))}\S* for {re.escape(BIG)}: "
            r"it needs up to [\d.]+ MiB \(\d+ bytes\) and [\d.]+ [KM]iB \(\d+ bytes\) are free",
            message,
        ), message
        assert "gc --partials" in message and "EXEC_SANDBOX_CACHE_DIR elsewhere" in message
        # Nothing of it was written: no partial, and the file system is not left full.
        assert not [p for p in files_under(cache / "blobs") if p.name.endswith(".partial")]
        assert not (cache / "v1.0.0" / BIG).exists()
        assert free(small) > 4 * MiB

        # A margin: with 5 MiB kept free nothing more fits, and nothing is written.
        other = small / "cache-2"
        text = pull(release, other, "5M")
        assert text.code == 1, text.stdout + text.stderr
        assert "5.0 MiB (5242880 bytes) kept free by EXEC_SANDBOX_MIN_FREE" in text.stderr
        assert "or lower EXEC_SANDBOX_MIN_FREE" in text.stderr
        assert [p for p in files_under(other) if p.parent.name in ("sha256", "v1.0.0")] == []
        assert pull(release, other, "lots").code == 2


def test_gc_keeps_partials_and_gc_partials_frees_them(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", "5m") as small:
        cache = small / "cache"
        blobs = cache / "blobs" / "sha256"
        blobs.mkdir(parents=True)
        partial = blobs / ("ab" * 32 + ".partial")
        partial.write_bytes(os.urandom(3 * MiB))  # an interrupted 3 MiB download
        before = free(small)

        kept = cli("--cache-dir", cache, "gc")
        assert kept.code == 0, kept.stderr
        assert partial.exists() and free(small) == before
        assert "kept 1 resumable download(s), 3.0 MiB" in kept.stdout, kept.stdout
        assert "`gc --partials` removes them" in kept.stdout

        freed = cli("--cache-dir", cache, "gc", "--partials", "--json")
        assert freed.code == 0, freed.stderr
        assert not partial.exists() and freed.json()["freed"] == 3 * MiB
        assert free(small) >= before + 3 * MiB


def test_mirror_into_a_small_layout_is_refused_before_the_first_blob(
    tmp_path: Path, release: SampleRelease
) -> None:
    key = ("--trusted-key", str(release.key.public))
    with tmpfs(tmp_path / "small", "1m") as small:
        dst = small / "layout"
        args = [*key, "--cache-dir", str(tmp_path / "cache")]
        result = cli(*args, "mirror", release.target, f"oci:{dst}", "--version", "1.0.0")
        assert result.code == 1, result.stdout + result.stderr
        assert re.search(
            rf"not enough space in {re.escape(str(dst))} for oci:{re.escape(str(dst))}: the "
            r"copy needs [\d.]+ MiB \(\d+ bytes\) \(\d+ blob\(s\) the destination lacks\) "
            r"and [\d.]+ [KM]iB \(\d+ bytes\) are free there; no blob was written",
            result.stderr,
        ), result.stderr
        assert files_under(dst / "blobs") == []


def test_mirror_into_a_layout_that_fills_up_removes_what_it_wrote(
    tmp_path: Path, release: SampleRelease
) -> None:
    """Bytes to spare but few inodes: the pre-check passes, the disk fills anyway (as with
    another writer at work), and what this run wrote there is removed."""
    key = ("--trusted-key", str(release.key.public))
    with tmpfs(tmp_path / "small", "64m,nr_inodes=12") as small:
        dst = small / "layout"
        args = [*key, "--cache-dir", str(tmp_path / "cache")]
        result = cli(*args, "mirror", release.target, f"oci:{dst}", "--version", "1.0.0")
        assert result.code == 1, result.stdout + result.stderr
        assert "no space left" in result.stderr, result.stderr
        assert re.search(
            r"removed the \d+ blob\(s\), [\d.]+ [KM]iB \(\d+ bytes\), this mirror had "
            rf"written to oci:{re.escape(str(dst))}",
            result.stderr,
        ), result.stderr
        assert "that no tag names" not in result.stderr, result.stderr
        assert files_under(dst / "blobs") == []


# -- the plan, pure ------------------------------------------------------------------------------


def test_plan_takes_everything_that_fits_else_the_smallest_first() -> None:
    needs = [Need("base", 8 * MiB), Need("kernel", 2 * MiB), Need("gvproxy", 3 * MiB)]
    where = Path("/cache")
    assert plan(needs, 20 * MiB, 5 * MiB, where).refused == ()
    room = plan(needs, 10 * MiB, 4 * MiB, where)  # 6 MiB usable: kernel + gvproxy
    assert room.refused == ("base",)
    message = str(room.error("base"))
    assert "it needs up to 8.0 MiB (8388608 bytes) and 10.0 MiB" in message
    assert "4.0 MiB (4194304 bytes) kept free by EXEC_SANDBOX_MIN_FREE" in message
    assert "1.0 MiB (1048576 bytes) left after the 2 file(s) that fit" in message
    assert plan(needs, 4 * MiB, 0, where).refused == ("gvproxy", "base")
    # Nothing left to write (a complete blob on disk) is never refused, even when full.
    assert plan([Need("done", 0), Need("x", 1)], 0, 64 * MiB, where).refused == ("x",)


def test_need_counts_what_is_on_disk_already(tmp_path: Path) -> None:
    blob = tmp_path / ("ab" * 32)
    assert need_of("f", blob, 1000, 4000, compressed=True) == Need("f", 5000)
    assert need_of("f", blob, 1000, 1000, compressed=False) == Need("f", 1000)
    blob.with_name(blob.name + ".partial").write_bytes(os.urandom(8192))
    assert need_of("f", blob, 10000, 40000, compressed=True).size <= 40000 + 10000 - 4096
    blob.write_bytes(b"x")  # a complete, verified blob a full disk kept
    assert need_of("f", blob, 10000, 40000, compressed=True) == Need("f", 40000)


def test_min_free_takes_sizes_with_units() -> None:
    sizes = {"0": 0, "512": 512, "64M": 64 * MiB, "1.5G": 3 << 29, "2GiB": 2 << 30, "1k": 1024}
    for text, value in sizes.items():
        settings = load_settings({"EXEC_SANDBOX_MIN_FREE": text}, cache_dir="/c")
        assert settings.min_free == value, text
    assert load_settings({}, cache_dir="/c").min_free == 64 * MiB
    for bad in ("lots", "-1", "5Q", "nan", "M"):
        with pytest.raises(ConfigError, match=r"EXEC_SANDBOX_MIN_FREE=.*expected a size"):
            load_settings({"EXEC_SANDBOX_MIN_FREE": bad}, cache_dir="/c")


def test_a_mirror_that_fails_otherwise_names_what_it_left(
    tmp_path: Path, registry: RegistryServer, repo_name: str, fault_proxy: FaultProxyFactory
) -> None:
    """Not a full disk (a blob arrives corrupt): what was written stays for the re-run,
    and the warning says exactly what and where."""
    release = publish_sample_release(
        registry.ref(repo_name),
        "1.0.0",
        tmp_path / "work",
        key=make_key_pair(tmp_path / "keys"),
        size=64 * 1024,
        platforms=[HOST],
    )
    proxy = fault_proxy(registry)
    proxy.match_path = release.layer(BIG).digest
    proxy.flip_byte_at = 100
    dst = tmp_path / "layout"
    args = ["--trusted-key", str(release.key.public), "--cache-dir", str(tmp_path / "cache")]
    mirror = [*args, "mirror", proxy.ref(repo_name), f"oci:{dst}", "--version", "1.0.0"]
    result = cli(*mirror)
    assert result.code == 3, result.stdout + result.stderr
    found = re.search(
        rf"mirror to oci:{re.escape(str(dst))} failed: left (\d+) blob\(s\), .* at "
        rf"oci:{re.escape(str(dst))} that no tag names \(sha256:\w+.*\); a re-run reuses them",
        result.stderr,
    )
    assert found, result.stderr
    assert len(files_under(dst / "blobs")) == int(found.group(1)) > 0
    # The re-run (the proxy fixed) completes, reusing them.
    proxy.reset()
    again = cli(*mirror, "--json")
    assert again.code == 0, again.stderr
    assert again.json()["releases"][0]["blobs_skipped"] >= int(found.group(1)) - 3
