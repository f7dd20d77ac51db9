"""Long work off a terminal, and stopping it (issue #19 item 3), through the CLI with
pipes against a real registry: `publish` and `mirror` print a plain progress line every
EXEC_SANDBOX_PROGRESS_INTERVAL seconds on stderr (pull: test_cli.py), which --quiet,
--no-progress and EXEC_SANDBOX_DISABLE_PROGRESS_BARS silence; Ctrl-C during a publish's
compression stops it (exit 130), moves no tag, and a re-run resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from hashlib import sha256
from pathlib import Path

import httpx

from conftest import FaultProxyFactory
from exec_sandbox_assets.cli.progress import LineProgress
from exec_sandbox_assets.publish import make_sample_inputs
from exec_sandbox_assets.publish.sample import sample_bytes
from exec_sandbox_assets.release import catalog
from releases import KeyPair, SampleRelease
from servers import RegistryServer
from test_cli import CLI, HOST, PROGRESS_LINE, big_release, key
from test_cli_operator import cli

SHARED_FIXTURES = (key, big_release)
PLATFORM = f"{HOST[0]}/{HOST[1]}"
BASE_IMAGE = catalog.base_image("python", catalog.ARCH_OF_GOARCH[HOST[1]])


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "EXEC_SANDBOX_PROGRESS_INTERVAL": "0.05", **extra}


def progress_lines(stderr: str) -> list[str]:
    lines = stderr.splitlines()
    assert all(PROGRESS_LINE.match(line) for line in lines), stderr
    return lines


def tags(registry: RegistryServer, repo: str) -> list[str]:
    response = httpx.get(f"{registry.url}/v2/{repo}/tags/list", timeout=10)
    if response.status_code == 404:
        return []
    found: list[str] = response.json().get("tags") or []
    return found


def publish_args(dist: Path, key: KeyPair, target: str, level: int) -> list[str | Path]:
    return [
        *("publish", "--input", dist, "--version", "5.0.0", "--key", key.private),
        *("--platform", PLATFORM, "--to", target, "--level", str(level)),
    ]


def test_publish_and_mirror_print_progress_lines_on_pipes_unless_silenced(
    tmp_path: Path,
    registry: RegistryServer,
    fault_proxy: FaultProxyFactory,
    key: KeyPair,
    repo_name: str,
    big_release: SampleRelease,
) -> None:
    dist = make_sample_inputs(tmp_path / "dist", size=512 * 1024)
    target = registry.ref("test/published")
    args = [*publish_args(dist, key, target, 19), "--work-dir", tmp_path / "w"]
    published = cli(*args, env=env())
    assert published.code == 0, published.stderr
    lines = progress_lines(published.stderr)
    assert any("; compress " in line for line in lines), lines
    assert any("; push " in line for line in lines), lines
    assert published.stdout.startswith("published 5.0.0"), published.stdout

    for silenced in (  # re-runs: nothing to compress or push, but still a second's work
        cli(*args, "--quiet", env=env()),
        cli(*args, "--no-progress", env=env()),
        cli(*args, env=env(EXEC_SANDBOX_DISABLE_PROGRESS_BARS="1")),
    ):
        assert silenced.code == 0 and silenced.stderr == "", silenced.stderr

    proxy = fault_proxy(registry)
    proxy.throttle_bytes_per_s = 2 * 1024 * 1024
    mirror: list[str | Path] = [
        *("--trusted-key", key.public, "mirror", proxy.ref(repo_name)),
        *(f"oci:{tmp_path / 'copy'}", "--version", "2.0.0"),
    ]
    mirrored = cli(*mirror, env=env())
    assert mirrored.code == 0, mirrored.stderr
    assert progress_lines(mirrored.stderr), mirrored.stderr
    assert mirrored.stdout.startswith("mirrored "), mirrored.stdout


def test_ctrl_c_during_a_publish_s_compression_exits_130_moves_no_tag_and_a_rerun_resumes(
    tmp_path: Path, registry: RegistryServer, key: KeyPair, repo_name: str
) -> None:
    dist = make_sample_inputs(tmp_path / "dist", size=64 * 1024)
    # Seconds to compress at level 19: still under way when Ctrl-C comes.
    (dist / BASE_IMAGE.output_name).write_bytes(sample_bytes(BASE_IMAGE, 8 << 20))
    args = [*publish_args(dist, key, registry.ref(repo_name), 19), "--work-dir", tmp_path / "w"]
    proc = subprocess.Popen(
        [*CLI, *map(str, args)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
    )
    assert proc.stderr is not None
    # SIGINT while the large file compresses, once gvproxy (published as it is, so
    # uploaded first) is on the registry: the re-run must skip it.
    gvproxy = dist / catalog.gvproxy(*HOST).output_name
    blob_url = (
        f"{registry.url}/v2/{repo_name}/blobs/sha256:{sha256(gvproxy.read_bytes()).hexdigest()}"
    )
    sent = None
    for line in proc.stderr:
        if (
            line.endswith(f"; compress {BASE_IMAGE.output_name}\n")
            and httpx.head(blob_url, timeout=10).status_code == 200
        ):
            proc.send_signal(signal.SIGINT)
            sent = time.monotonic()
            break
    rest = proc.communicate(timeout=120)[1]
    assert sent is not None, rest
    print(f"publish stopped {time.monotonic() - sent:.2f} s after SIGINT")
    assert proc.returncode == 130, rest
    assert "interrupted; tags were not moved" in rest
    assert "v5.0.0" not in tags(registry, repo_name)
    left = [p.name for p in (tmp_path / "w" / "compressed").iterdir()]
    assert not [n for n in left if n.startswith(".tmp-")], left

    rerun = cli(*args, "--json", "--no-progress")
    assert rerun.code == 0, rerun.stderr
    target = json.loads(rerun.stdout)["targets"][0]
    assert target["blobs_skipped"] >= 1, target  # gvproxy at least, pushed before
    assert "v5.0.0" in tags(registry, repo_name)


def test_a_progress_line_says_bytes_rate_files_and_the_file_under_way() -> None:
    now = [0.0]

    class Sink:
        def write(self, text: str) -> int:
            raise AssertionError("the ticker thread is not started here")

    lines = LineProgress(Sink(), 5.0, clock=lambda: now[0])  # type: ignore[arg-type]
    assert lines.line() is None  # nothing under way
    lines.start("a", 1024 * 1024)
    lines.start("b", 3 * 1024 * 1024)
    lines.finish("a")
    now[0] = 2.0
    lines.advance("b", 1024 * 1024)
    assert lines.line() == "progress: 2.0 MiB of 4.0 MiB (50%), 1.0 MiB/s, 1 of 2 done; b"
    now[0] = 4.0
    assert lines.line() == "progress: 2.0 MiB of 4.0 MiB (50%), 0 B/s, 1 of 2 done; b"
    lines.finish("b")
    assert lines.line() is None
