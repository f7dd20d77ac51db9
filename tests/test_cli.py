"""The `exec-sandbox-assets` command, run as a real process: in a pseudo-terminal (progress
bars) and on pipes (summary only), against a real registry and OCI layouts.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import signal
import stat
import struct
import subprocess
import sys
import termios
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import FaultProxyFactory
from exec_sandbox_assets.cache.store import Store
from exec_sandbox_assets.cli.app import (
    _merge_global_options,
    build_parser,
    main,
    settings_from_args,
)
from exec_sandbox_assets.cli.commands import pull_specs
from exec_sandbox_assets.publish import make_sample_inputs
from exec_sandbox_assets.release import catalog
from releases import KeyPair, SampleRelease, make_key_pair, publish_sample_release
from servers import RegistryServer

HOST = catalog.host_platform()
HOST_PLATFORM = f"{HOST[0]}/{HOST[1]}"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
PROGRESS = re.compile(r"\d+%|[KMG]i?B/s")
# A progress line off a terminal (cli/progress.py, LineProgress).
PROGRESS_LINE = re.compile(
    r"progress: [\d.]+ (B|KiB|MiB|GiB) of [\d.]+ (B|KiB|MiB|GiB)( \(\d+%\))?, "
    r"[\d.]+ (B|KiB|MiB|GiB)/s, \d+ of \d+ done; \S"
)
HOST_FILES = [s.output_name for s in pull_specs(*HOST, None)]
CLI = [sys.executable, "-m", "exec_sandbox_assets.cli"]


@dataclass(frozen=True)
class Result:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


def run(*args: str | Path, timeout: float = 60) -> Result:
    """The CLI in a child process with pipes (no terminal anywhere)."""
    proc = subprocess.run(
        [*CLI, *map(str, args)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def run_in_pty(
    *args: str | Path,
    timeout: float = 60,
    interrupt_when: re.Pattern[str] | None = None,
    command: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> tuple[int, str]:
    """The CLI (or `command`) with stdin, stdout and stderr on a pseudo-terminal (120x40);
    all it drew. With `interrupt_when`, SIGINT (Ctrl-C) is sent once the screen matches."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = dict(os.environ if env is None else env, TERM="xterm-256color")
    proc = subprocess.Popen(
        [*(command or CLI), *map(str, args)], stdin=slave, stdout=slave, stderr=slave, env=env
    )
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if not ready:
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every slave end is closed, the child is gone
                break
            if not data:
                break
            chunks.append(data)
            if interrupt_when is not None:
                if interrupt_when.search(ANSI.sub("", b"".join(chunks).decode(errors="replace"))):
                    proc.send_signal(signal.SIGINT)
                    interrupt_when = None
        code = proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    return code, b"".join(chunks).decode(errors="replace")


def tree_size(root: Path) -> int:
    """Apparent size of every regular file under `root`."""
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def outputs(vdir: Path) -> list[Path]:
    return sorted(p for p in vdir.iterdir() if p.is_file() and not p.name.startswith("."))


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture
def key(tmp_path: Path) -> KeyPair:
    return make_key_pair(tmp_path / "keys")


@pytest.fixture
def layout_release(tmp_path: Path, key: KeyPair) -> SampleRelease:
    return publish_sample_release(
        f"oci:{tmp_path / 'layout'}", "1.0.0", tmp_path / "work", key=key, platforms=[HOST]
    )


@pytest.fixture
def big_release(
    tmp_path: Path, registry: RegistryServer, key: KeyPair, repo_name: str
) -> SampleRelease:
    """2.0.0 for this host on a registry, 2 MiB per file: slow to watch behind a throttle."""
    return publish_sample_release(
        registry.ref(repo_name),
        "2.0.0",
        tmp_path / "work",
        key=key,
        platforms=[HOST],
        size=2 * 1024 * 1024,
    )


def layout_args(release: SampleRelease, cache: Path) -> list[str]:
    return [
        "--cache-dir",
        str(cache),
        "--mirror",
        release.target,
        "--airgap",
        "--trusted-key",
        str(release.key.public),
    ]


# -- pull: terminal vs pipe, JSON ----------------------------------------------------------------


def test_pull_draws_progress_on_a_terminal_and_plain_lines_on_pipes(
    tmp_path: Path,
    registry: RegistryServer,
    fault_proxy: FaultProxyFactory,
    key: KeyPair,
    repo_name: str,
    big_release: SampleRelease,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    release = big_release
    proxy = fault_proxy(registry)
    proxy.throttle_bytes_per_s = 1024 * 1024
    common = ["--asset-version", "2.0.0", "--airgap", "--trusted-key", str(key.public)]
    source = ["--mirror", proxy.ref(repo_name)]

    started = time.monotonic()
    code, screen = run_in_pty(*common, *source, "--cache-dir", tmp_path / "tty-cache", "pull")
    seconds = time.monotonic() - started
    assert code == 0, screen
    text = ANSI.sub("", screen)
    assert PROGRESS.search(text), f"no progress drawn in {seconds:.1f}s:\n{text}"
    assert re.search(r"\d B/s|[kMG]B/s", text), text  # the transfer rate
    assert "all files" in text, text  # the overall bar
    assert "7 file(s)" in text and "7 downloaded" in text, text

    # On pipes: the summary on stdout; on stderr a plain line every interval (CI logs).
    monkeypatch.setenv("EXEC_SANDBOX_PROGRESS_INTERVAL", "0.2")
    plain = run(*common, *source, "--cache-dir", tmp_path / "pipe-cache", "pull")
    assert plain.code == 0, plain.stderr
    progress_lines = plain.stderr.splitlines()
    assert progress_lines and all(PROGRESS_LINE.match(line) for line in progress_lines), (
        plain.stderr
    )
    assert any(line.endswith(tuple(HOST_FILES)) for line in progress_lines), plain.stderr
    assert not ANSI.search(plain.stderr + plain.stdout), plain.stderr
    assert not PROGRESS.search(plain.stdout), plain.stdout
    lines = plain.stdout.splitlines()
    assert lines[0].startswith(f"release 2.0.0 (tag v2.0.0) for {HOST_PLATFORM} into ")
    assert lines[-1].startswith("7 file(s), ") and "7 downloaded" in lines[-1]
    assert re.match(r"  index sha256:[0-9a-f]{64} from .*, signed by [0-9a-f]{16}$", lines[1])
    assert sorted(line.split()[0] for line in lines[2:-1]) == sorted(HOST_FILES)
    # Both caches hold the inputs, byte for byte.
    for cache in ("tty-cache", "pipe-cache"):
        got = {p.name: p.read_bytes() for p in outputs(tmp_path / cache / "v2.0.0")}
        assert got == {name: release.expected(name) for name in HOST_FILES}


def test_ctrl_c_exits_130_and_keeps_what_was_fetched_for_the_next_run(
    tmp_path: Path,
    registry: RegistryServer,
    fault_proxy: FaultProxyFactory,
    key: KeyPair,
    repo_name: str,
    big_release: SampleRelease,
) -> None:
    release = big_release
    layer_bytes = sum(release.layer(name).size for name in HOST_FILES)
    proxy = fault_proxy(registry)
    proxy.throttle_bytes_per_s = 512 * 1024
    args: list[str | Path] = [
        *("--cache-dir", tmp_path / "cache", "--asset-version", "2.0.0", "--airgap"),
        *("--trusted-key", key.public, "--mirror", proxy.ref(repo_name), "pull"),
    ]
    code, screen = run_in_pty(*args, interrupt_when=re.compile(r"all files\s+\S+\s+[1-9]\d%"))
    assert code == 130, screen
    assert "interrupted: partial downloads are kept" in screen

    proxy.reset()
    again = run(*args)
    assert again.code == 0, again.stderr
    assert again.stdout.splitlines()[-1].startswith("7 file(s)")
    # What the interrupted run got (whole files, partials) was not fetched again.
    assert proxy.bytes_to_client < layer_bytes - 200_000, (proxy.bytes_to_client, layer_bytes)


def test_pull_json_carries_the_same_facts_as_status_json(
    tmp_path: Path, layout_release: SampleRelease
) -> None:
    cache = tmp_path / "cache"
    args = layout_args(layout_release, cache)
    pulled = run(*args, "--asset-version", "1.0.0", "pull", "--json")
    assert pulled.code == 0, pulled.stderr
    doc = pulled.json()
    assert doc["ok"] is True and doc["version"] == "1.0.0" and doc["errors"] == []
    assert doc["dir"] == str(cache / "v1.0.0")
    files = {f["name"]: f for f in doc["files"]}
    assert sorted(files) == sorted(HOST_FILES)
    for name, f in files.items():
        assert f["downloaded"] is True
        assert f["source"] == layout_release.target
        assert Path(f["path"]).read_bytes() == layout_release.expected(name)
        assert f["size"] == len(layout_release.expected(name))

    status = run("--cache-dir", cache, "status", "--json")
    assert status.code == 0, status.stderr
    sdoc = status.json()
    (version,) = sdoc["versions"]
    assert version["version"] == "1.0.0" and version["path"] == doc["dir"]
    by_name = {f["name"]: f for f in version["files"]}
    facts = ("path", "size", "digest", "layer_digest", "source", "verified_at", "verified")
    for name, f in files.items():
        assert {k: f[k] for k in facts} == {k: by_name[name][k] for k in facts}
        assert by_name[name]["verified"] is True
    assert sdoc["partials"] == [] and sdoc["orphan_blobs"] == []

    again = run(*args, "--asset-version", "1.0.0", "pull", "--json", "--language", "python")
    assert again.code == 0
    assert {f["name"]: f["downloaded"] for f in again.json()["files"]} == {
        name: False
        for name in files
        if not name.startswith(("node-", "raw-"))  # --language python: one base image
    }


# -- verify ----------------------------------------------------------------------------------


def test_verify_full_catches_a_file_modified_behind_the_records_back(
    tmp_path: Path, layout_release: SampleRelease
) -> None:
    cache = tmp_path / "cache"
    args = layout_args(layout_release, cache)
    assert run(*args, "--asset-version", "1.0.0", "pull").code == 0
    assert run("--cache-dir", cache, "verify").code == 0
    assert run("--cache-dir", cache, "verify", "--full").code == 0

    # Same size, same inode, mtime put back: the stat check cannot see it; --full can.
    victim = cache / "v1.0.0" / "initramfs-x86_64"
    if not victim.exists():
        victim = outputs(cache / "v1.0.0")[0]
    before = victim.stat()
    with victim.open("r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(victim, ns=(before.st_atime_ns, before.st_mtime_ns))

    quick = run("--cache-dir", cache, "verify")
    assert quick.code == 0, quick.stdout
    full = run("--cache-dir", cache, "verify", "--full")
    assert full.code == 3, full.stdout + full.stderr
    assert str(victim) in full.stderr
    assert f"MISMATCH 1.0.0/{victim.name}" in full.stdout
    doc = run("--cache-dir", cache, "verify", "--full", "--json").json()
    assert [r["name"] for r in doc["results"] if not r["ok"]] == [victim.name]

    victim.touch()  # a changed stat is what a boot (and plain verify) notices
    assert run("--cache-dir", cache, "verify").code == 3


# -- gc ----------------------------------------------------------------------------------------


def test_gc_dry_run_then_gc_frees_exactly_what_it_said(
    tmp_path: Path, layout_release: SampleRelease, key: KeyPair
) -> None:
    publish_sample_release(
        layout_release.target, "1.1.0", tmp_path / "work", key=key, platforms=[HOST]
    )
    cache = tmp_path / "cache"
    args = layout_args(layout_release, cache)
    for version in ("1.0.0", "1.1.0"):
        assert run(*args, "--asset-version", version, "pull").code == 0
    blobs = cache / "blobs" / "sha256"
    orphan = blobs / ("ab" * 32)
    orphan.write_bytes(b"o" * 5000)
    free_partial = blobs / (("cd" * 32) + ".partial")
    free_partial.write_bytes(b"p" * 7000)
    busy_partial = blobs / (("ef" * 32) + ".partial")
    busy_partial.write_bytes(b"b" * 9000)
    kept_temp = cache / "v1.1.0" / ".vmlinuz-x86_64.tmp-999-abcd"
    kept_temp.write_bytes(b"t" * 1100)
    (cache / "v1.0.0" / ".initramfs-x86_64.tmp-999-abcd").write_bytes(b"t" * 300)

    store = Store(cache)
    lock_path = store.blob_lock("sha256:" + "ef" * 32).path
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a download of that blob is running
    try:
        size_before = tree_size(cache)
        # Plain gc keeps what a pull resumes from (partials, blobs never installed).
        plain = run("--cache-dir", cache, "gc", "--dry-run", "--json")
        assert plain.code == 0, plain.stderr
        assert {Path(i["path"]) for i in plain.json()["items"]} == {cache / "v1.0.0", kept_temp}
        assert {Path(e["path"]) for e in plain.json()["kept_resumable"]} == {
            orphan,
            free_partial,
            busy_partial,
        }
        text_plain = run("--cache-dir", cache, "gc", "--dry-run")
        assert "kept 3 resumable download(s)" in text_plain.stdout, text_plain.stdout
        assert "`gc --partials` removes them" in text_plain.stdout
        plan = run("--cache-dir", cache, "gc", "--partials", "--dry-run", "--json")
        assert plan.code == 0, plan.stderr
        assert tree_size(cache) == size_before
        text_plan = run("--cache-dir", cache, "gc", "--partials", "--dry-run")
        done = run("--cache-dir", cache, "gc", "--partials", "--json")
        assert done.code == 0, done.stderr
    finally:
        os.close(fd)

    p, d = plan.json(), done.json()
    assert p["dry_run"] is True and d["dry_run"] is False
    assert p["items"] == d["items"] and p["freed"] == d["freed"]
    assert p["kept_versions"] == ["1.1.0"]
    removed = {Path(i["path"]) for i in d["items"] if i["removed"]}
    assert removed == {cache / "v1.0.0", orphan, free_partial, kept_temp}
    skipped = [i for i in d["items"] if not i["removed"]]
    assert [(Path(i["path"]), i["skipped"]) for i in skipped] == [
        (busy_partial, "in use by another process")
    ]
    assert size_before - tree_size(cache) == d["freed"]
    assert busy_partial.exists() and not (cache / "v1.0.0").exists()
    assert "would free " in text_plan.stdout and f"({d['freed']} bytes)" in text_plan.stdout
    # What is kept still verifies, and a second gc has nothing left but the busy partial.
    assert run("--cache-dir", cache, "verify", "--full").code == 0
    again = run("--cache-dir", cache, "gc", "--partials", "--json").json()
    assert [Path(i["path"]) for i in again["items"]] == [busy_partial]
    assert again["freed"] == 9000  # no longer locked: now it goes


# -- keys, publish, inspect, trust -----------------------------------------------------------


def test_keygen_publish_inspect_shows_the_signature_verified(
    tmp_path: Path, registry: RegistryServer, repo_name: str
) -> None:
    prefix = tmp_path / "ci"
    made = run("keygen", "--out", prefix)
    assert made.code == 0, made.stderr
    private, public = Path(f"{prefix}.key"), Path(f"{prefix}.pub")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert public.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert run("keygen", "--out", prefix).code == 2  # never overwrites a key

    inputs = make_sample_inputs(tmp_path / "dist", arches=("x86_64",), size=64 * 1024)
    ref = registry.ref(repo_name)
    published = run(
        "publish",
        "--input",
        inputs,
        "--version",
        "3.0.0",
        "--key",
        private,
        "--to",
        ref,
        "--platform",
        "linux/amd64",
        "--level",
        "3",
        "-v",
    )
    assert published.code == 0, published.stderr
    assert published.stdout.startswith("published 3.0.0")
    assert "compressing" in published.stderr  # the publisher's own -v, under the main CLI

    seen = run("--trusted-key", public, "inspect", f"{ref}:v3.0.0", "--json")
    assert seen.code == 0, seen.stderr
    doc = seen.json()
    assert doc["version"] == "3.0.0"
    assert doc["signature"]["verified"] is True and doc["signature"]["error"] is None
    ((entry,),) = [doc["signature"]["entries"]]
    assert entry["matches_index"] is True and len(entry["signed_by"]) == 1
    (plat,) = doc["platforms"]
    assert plat["platform"] == "linux/amd64"
    files = {f["title"]: f for f in plat["files"]}
    assert files["vmlinuz-x86_64.zst"]["kind"] == "kernel"
    assert files["vmlinuz-x86_64.zst"]["content_size"] == 64 * 1024
    assert files["gvproxy-wrapper-linux-amd64"]["size"] == 64 * 1024
    text = run("--trusted-key", public, "inspect", f"{ref}:v3.0.0")
    assert "verdict: VERIFIED by 1 trusted key(s)" in text.stdout

    # Another key: reported, not fatal, unless a signature is required.
    other = make_key_pair(tmp_path / "other", "other")
    untrusted = run("--trusted-key", other.public, "inspect", f"{ref}:v3.0.0", "--json")
    assert untrusted.code == 0
    assert untrusted.json()["signature"]["verified"] is False
    assert untrusted.json()["signature"]["entries"][0]["signed_by"] == []
    required = run("--trusted-key", other.public, "inspect", f"{ref}:v3.0.0", "--require-signature")
    assert required.code == 3 and "NOT VERIFIED" in required.stdout

    # And the client refuses to pull it: exit 3 (trust), nothing cached.
    pulled = run(
        "--cache-dir",
        tmp_path / "cache",
        "--asset-version",
        "3.0.0",
        "--mirror",
        ref,
        "--airgap",
        "--trusted-key",
        other.public,
        "pull",
        "--json",
    )
    assert pulled.code == 3, pulled.stderr
    assert {e["exit_code"] for e in pulled.json()["errors"]} == {3}
    assert "signature" in pulled.stderr.lower()
    assert not (tmp_path / "cache" / "v3.0.0").exists()


def test_mirror_copies_a_release_that_pulls_back_and_refuses_an_untrusted_one(
    tmp_path: Path, layout_release: SampleRelease, registry: RegistryServer, repo_name: str
) -> None:
    dst = registry.ref(repo_name)
    trusted = ["--trusted-key", str(layout_release.key.public)]
    other = make_key_pair(tmp_path / "other", "other")
    refused = run(
        "--trusted-key", other.public, "mirror", layout_release.target, dst, "--version", "1.0.0"
    )
    assert refused.code == 3, refused.stderr

    copied = run(*trusted, "mirror", layout_release.target, dst, "--version", "1.0.0", "--json")
    assert copied.code == 0, copied.stderr
    doc = copied.json()
    (release,) = doc["releases"]
    assert release["tags"] == ["v1.0.0"] and release["signed_by"]
    assert release["index_digest"] == layout_release.index_digest
    assert doc["blobs_copied"] > 0 and doc["bytes_copied"] > 0

    again = run(*trusted, "mirror", layout_release.target, dst, "--version", "1.0.0", "--json")
    assert again.code == 0 and again.json()["blobs_copied"] == 0

    cache = tmp_path / "cache"
    pulled = run(
        *trusted,
        "--cache-dir",
        cache,
        "--airgap",
        "--mirror",
        dst,
        "--asset-version",
        "1.0.0",
        "pull",
        "--json",
    )
    assert pulled.code == 0, pulled.stderr
    assert {f["source"] for f in pulled.json()["files"]} == {f"registry {dst}"}
    for f in pulled.json()["files"]:
        assert Path(f["path"]).read_bytes() == layout_release.expected(f["name"])


def test_demo_succeeds_from_a_clean_directory_and_against_a_registry(
    tmp_path: Path, registry: RegistryServer, repo_name: str
) -> None:
    result = run("demo", "--dir", tmp_path / "demo")
    assert result.code == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert [line[:2] for line in lines[:5]] == ["1.", "2.", "3.", "4.", "5."]
    assert "byte-identical" in lines[4]
    assert (tmp_path / "demo" / "layout" / "index.json").is_file()
    cached = outputs(next((tmp_path / "demo" / "cache").glob("v*")))
    assert sorted(p.name for p in cached) == sorted(HOST_FILES)
    # Run again in the same directory: the key is reused, the release unchanged.
    assert run("demo", "--dir", tmp_path / "demo").code == 0

    ref = registry.ref(repo_name)
    remote = run("demo", "--dir", tmp_path / "demo-registry", "--registry", ref)
    assert remote.code == 0, remote.stdout + remote.stderr
    assert f"published 0.0.1-demo to {ref}" in remote.stdout
    assert "byte-identical" in remote.stdout


# -- exit codes --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["inspect", "http://not a host/repo:v1"],
        ["pull", "--from", "oci:"],
        ["--mirror", "ftp://example.com/x", "--offline", "pull"],
        ["pull", "--arch", "sparc"],
        ["pull", "--language", "cobol"],
        ["gc", "--keep", "-1"],
        ["nonsense"],
    ],
)
def test_bad_usage_exits_2(tmp_path: Path, argv: list[str]) -> None:
    assert main(["--cache-dir", str(tmp_path / "cache"), *argv]) == 2


def test_offline_miss_exits_4_naming_the_places_searched(tmp_path: Path) -> None:
    result = run("--cache-dir", tmp_path / "cache", "--offline", "pull", "--json")
    assert result.code == 4, result.stderr
    doc = result.json()
    assert doc["ok"] is False and {e["exit_code"] for e in doc["errors"]} == {4}
    assert str(tmp_path / "cache") in result.stderr


def test_missing_tag_exits_4(tmp_path: Path, layout_release: SampleRelease) -> None:
    args = layout_args(layout_release, tmp_path / "cache")
    result = run(*args, "--asset-version", "9.9.9", "pull")
    assert result.code == 4, result.stderr


# -- help, import hygiene ----------------------------------------------------------------------


def test_every_command_has_examples_and_the_exit_codes_in_its_help(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for command in ("pull", "status", "verify", "gc", "inspect", "keygen", "demo"):
        assert main([command, "--help"]) == 0
        text = capsys.readouterr().out
        assert "examples:" in text and f"exec-sandbox-assets {command}" in text, command
        assert "4    not found" in text, command
    assert main(["--help"]) == 0
    assert "3    verification or trust failure" in capsys.readouterr().out
    assert main(["publish", "--help"]) == 0
    assert "--to TARGET" in capsys.readouterr().out


def test_settings_may_come_before_or_after_the_command_and_beat_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("EXEC_SANDBOX_REGISTRY_MIRRORS", "oci:/from-env")
    monkeypatch.setenv("EXEC_SANDBOX_CACHE_DIR", str(tmp_path / "env-cache"))
    argv = ["-v", "--mirror", "oci:/a", "pull", "-v", "--mirror", "oci:/b", "--offline"]
    args = _merge_global_options(build_parser().parse_args(argv))
    assert (args.verbose, args.mirror, args.offline) == (2, ["oci:/a", "oci:/b"], True)
    settings = settings_from_args(args)
    assert settings.mirrors == ("oci:/a", "oci:/b") and settings.offline
    assert settings.cache_dir == tmp_path / "env-cache"  # not given: the environment's
    args = _merge_global_options(
        build_parser().parse_args(["--cache-dir", "/x", "status", "--cache-dir", "/y"])
    )
    assert settings_from_args(args).cache_dir == Path("/y")


def test_the_library_never_loads_the_cli_or_rich() -> None:
    code = (
        "import sys, exec_sandbox_assets as a, exec_sandbox_assets.client, "
        "exec_sandbox_assets.sources\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('rich', 'oras', 'requests') "
        "or m.split('.')[:2] in (['exec_sandbox_assets', 'cli'], ['exec_sandbox_assets', 'publish'])]\n"
        "assert not bad, bad\n"
        "import exec_sandbox_assets.cli\n"
        "assert 'rich' not in sys.modules  # only drawn bars import it\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
