"""benchmarks/peers.py runs end to end at a tiny scale and prints every row.

No timing is asserted: the figures are for docs/performance.md, not for CI. The
exec-sandbox 0.22.0 row (a PyPI install into its own venv) is skipped with
--no-legacy, so this stays fast and needs no network.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

ROWS = (
    "shell (curl+openssl+zstd, 4 parallel)",
    "skopeo copy + zstd -d",
    "oras-py pull + zstd -d",
    "ours: pull --all from registry (verified)",
    "ours: pull --all from releases folder (verified)",
    "warm ensure_assets()",
    'warm ensure_assets_available("python")',
    "peak RSS fetching",
    "resume:",
    "throttled link",
    "disk:",
    "publish (level 3)",
)


def run_benchmark(script: str, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """A benchmark in a child process, without the caller's EXEC_SANDBOX_ settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXEC_SANDBOX_")}
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=cwd,
    )


LINK_ROWS = (
    "shell (curl+openssl+zstd, 4 parallel)",
    "skopeo copy + zstd -d",
    "ours: pull --all from registry (verified)",
    "ours: pull --all from releases folder (verified)",
    "shell, the same 3 layers",
    "ours: ensure_assets() from registry (verified)",
)


def test_peers_benchmark_runs_at_tiny_scale(tmp_path: Path) -> None:
    out = tmp_path / "peers.json"
    proc = run_benchmark(
        "peers.py",
        tmp_path,
        *("--scale", "0.01", "--reps", "1", "--no-legacy", "--warm-calls", "50"),
        *("--rss-mib", "200", "--json", str(out)),
        # A link profile: every pull again through the simulated link.
        *("--link", "20:50:200"),
    )
    assert proc.returncode == 0, proc.stderr[-4000:] + proc.stdout[-4000:]
    assert "FAILED" not in proc.stdout, proc.stdout
    assert "exec-sandbox 0.22.0: skipped (--no-legacy)" in proc.stdout
    for row in ROWS:
        assert row in proc.stdout, f"missing {row!r} in:\n{proc.stdout}"
    assert "link: 20 ms, 50 MB/s per connection, 200 MB/s total" in proc.stdout
    for row in (*LINK_ROWS, "floor (bytes / total rate + 4 round trips)"):
        assert row in proc.stdout, f"missing link row {row!r} in:\n{proc.stdout}"
    results = json.loads(out.read_text())
    (link,) = results["links"]
    assert set(link["full"]) | set(link["kernel"]) == set(LINK_ROWS)
    assert all(row["runs_s"] for part in ("full", "kernel") for row in link[part].values())
    assert link["floor_full_s"] > 4 * 0.020
    assert set(results["cold"]) >= set(ROWS[:5])
    for key in ("warm_ours_us", "rss", "resume", "throttle", "disk", "publish"):
        assert key in results, key
    assert results["warm_ours_us"]["ensure_assets_connections"] == 0


DELTA_ROWS = (
    "full pull (empty cache)",
    "upgrade N -> N+1",
    "upgrade N-1 -> N+1",
    "first install with patches named",
    "peak RSS above baseline",
)


def test_delta_benchmark_runs_at_tiny_scale(tmp_path: Path) -> None:
    """benchmarks/delta.py (issue 16's scenario) at 2% scale: every row, and the upgrade
    really goes by patch and reuse (what the figures in docs/performance.md rest on)."""
    out = tmp_path / "delta.json"
    proc = run_benchmark(
        "delta.py",
        tmp_path,
        *("--scale", "0.02", "--level", "3", "--ext4-mib", "8", "--json", str(out)),
    )
    assert proc.returncode == 0, proc.stderr[-4000:] + proc.stdout[-4000:]
    for row in DELTA_ROWS:
        assert row in proc.stdout, f"missing {row!r} in:\n{proc.stdout}"
    results = json.loads(out.read_text())
    ways = {how for how, _got, _full in results["upgrade_n1"]["how"].values()}
    assert {"patch", "reuse"} <= ways
    assert results["upgrade_n1"]["bytes"] < results["full"]["bytes"]
