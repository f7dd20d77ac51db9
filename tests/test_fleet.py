"""A fleet of separate client processes behind one site registry: every client ends up
with verified files; behind a pull-through cache (distribution in proxy mode), after the
documented warm-up (one `pull` through the cache) the fleet takes nothing more from the
origin; behind a plain registry filled by `mirror`, each blob left the origin once.

The counts come from a counting proxy between the cache and the origin (tests/fleets.py);
`benchmarks/fleet.py` runs the same with 32 clients and prints the figures.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from fleets import Fleet, FleetRun

SIZE = 64 * 1024
CLIENTS = 4


def assert_verified_files(fleet: Fleet, run: FleetRun) -> None:
    """Every client exited 0 with every file of the platform, verified, byte for byte."""
    assert not run.failures, [(c.returncode, c.stderr[-400:]) for c in run.failures]
    for client in run.clients:
        assert client.report is not None
        files = client.report["files"]
        assert len(files) >= 6  # kernels, initramfs, three base images, gvproxy
        for entry in files:
            path = Path(entry["path"])
            assert path.is_relative_to(client.cache_dir), entry
            assert entry["verified"] is True, entry
            data = path.read_bytes()
            assert data == fleet.expected(entry["name"]), entry["name"]
            assert entry["digest"] == "sha256:" + hashlib.sha256(data).hexdigest()


def test_fleet_on_a_cold_pull_through_cache_gets_verified_files(tmp_path: Path) -> None:
    # No count asserted: how often distribution goes to the origin for concurrent
    # requests of a blob it has not stored yet depends on timing (docs/airgap.md).
    with Fleet(tmp_path, size=SIZE) as fleet:
        run = fleet.pull(CLIENTS)
        assert_verified_files(fleet, run)
        assert set(run.origin.blob_gets) == set(fleet.blob_sizes)  # each blob came from there


def test_after_one_warm_up_pull_the_fleet_takes_no_blob_from_the_origin(tmp_path: Path) -> None:
    with Fleet(tmp_path, size=SIZE) as fleet:
        warm = fleet.pull(1)
        assert_verified_files(fleet, warm)
        needed = set(fleet.blob_sizes)
        assert needed and set(warm.origin.blob_gets) == needed
        # distribution 2.8 fetches a blob twice when it first serves it: once for the
        # client, once in the background to store it. Never more for a single client.
        assert max(warm.origin.blob_gets.values()) <= 2, warm.origin.blob_gets

        run = fleet.pull(CLIENTS)
        assert_verified_files(fleet, run)
        assert run.origin.blob_gets == {}, run.origin.blob_gets
        assert run.origin.blob_heads == {}, run.origin.blob_heads
        assert run.origin.blob_bytes(fleet.blob_sizes) == 0


def test_after_a_mirror_into_a_plain_registry_each_blob_left_the_origin_once(
    tmp_path: Path,
) -> None:
    with Fleet(tmp_path, size=SIZE, site="mirror") as fleet:
        copied = fleet.mirror()
        assert copied.blob_gets and set(copied.blob_gets.values()) == {1}, copied.blob_gets

        run = fleet.pull(CLIENTS)
        assert_verified_files(fleet, run)
        assert run.origin.blob_gets == {} and run.origin.manifest_requests == 0
