"""A fleet of client processes behind one pull-through cache, with the origin's traffic
counted: what `benchmarks/fleet.py` prints and `tests/test_fleet.py` asserts.

    origin docker-registry  <-  FaultProxy (counts)  <-  docker-registry, proxy mode
                                                          <-  N x `exec-sandbox-assets pull`

Each client is its own process with its own cache directory, verifying the signature
with the release's key, as schedulers on separate hosts would. No pytest dependency.

    with Fleet(tmp_path, size=64 * 1024) as fleet:
        warm = fleet.pull(1)          # one pull warms the cache
        run = fleet.pull(32)          # then the fleet
        run.origin.blob_gets          # digest -> GETs the origin answered
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

from releases import SampleRelease, publish_sample_release
from servers import FaultProxy, RegistryServer

REPO = "fleet/assets"
VERSION = "1.0.0"
PLATFORM = ("linux", "amd64")
CLI = (sys.executable, "-m", "exec_sandbox_assets.cli")
# A client process: import everything a pull needs, say it is ready, wait for the start
# signal (and its delay), then run `exec-sandbox-assets ARGS`. All clients thus hit the
# cache at once, as a fleet restarted together does, not spread out by 2 cores importing
# 32 interpreters; or spread evenly over a chosen time.
_CLIENT = """
import os, sys, time
from pathlib import Path
from exec_sandbox_assets.cli.app import main
import exec_sandbox_assets.client, exec_sandbox_assets.sources, exec_sandbox_assets.release.keys
ready, go, delay = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
ready.touch()
while not go.exists():
    time.sleep(0.005)
time.sleep(delay)
sys.exit(main(sys.argv[4:]))
"""


@dataclass(frozen=True)
class ClientRun:
    """One client process: its exit code, its `pull --json` report, its stderr."""

    index: int
    cache_dir: Path
    returncode: int
    report: Mapping[str, Any] | None
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.report is not None and bool(self.report["ok"])


@dataclass(frozen=True)
class OriginTraffic:
    """What the origin answered during one phase (requests through the counting proxy)."""

    blob_gets: Mapping[str, int]  # blob digest -> GETs answered 200/206
    blob_heads: Mapping[str, int]  # blob digest -> HEADs
    manifest_requests: int  # GET/HEAD of manifests and tags
    bytes_sent: int  # every byte the origin sent, headers included

    def blob_bytes(self, sizes: Mapping[str, int]) -> int:
        """Blob bytes that left the origin (each answered GET counted as the whole blob)."""
        return sum(n * sizes[d] for d, n in self.blob_gets.items())


@dataclass(frozen=True)
class FleetRun:
    clients: tuple[ClientRun, ...]
    seconds: float  # start signal -> last client exited
    origin: OriginTraffic

    @property
    def failures(self) -> tuple[ClientRun, ...]:
        return tuple(c for c in self.clients if not c.ok)


class Fleet:
    """The origin (with a sample release of one platform), the counting proxy, the site
    registry, and `pull(n)` to run n clients at once against the site registry.

    The site registry is a pull-through cache of the origin (`site="pull-through"`), or
    a plain registry that `mirror()` fills with `exec-sandbox-assets mirror`
    (`site="mirror"`)."""

    def __init__(
        self,
        work: Path,
        *,
        size: int = 256 * 1024,
        site: Literal["pull-through", "mirror"] = "pull-through",
    ) -> None:
        self.work = work
        self.size = size
        self.site = site
        self.origin = RegistryServer(work / "origin")
        self.counter: FaultProxy | None = None
        self.cache: RegistryServer | None = None
        self.release: SampleRelease | None = None
        self.blob_sizes: dict[str, int] = {}
        self._runs = 0

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> Self:
        self.origin.start()
        self.release = publish_sample_release(
            self.origin.ref(REPO), VERSION, self.work / "publish", size=self.size,
            platforms=(PLATFORM,),
        )  # fmt: skip
        self.counter = FaultProxy(self.origin).start()
        remote = self.counter.url if self.site == "pull-through" else None
        self.cache = RegistryServer(self.work / self.site, proxy_remote=remote)
        self.cache.start()
        return self

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()
        if self.counter is not None:
            self.counter.close()
        self.origin.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- the release ------------------------------------------------------------

    @property
    def key(self) -> Path:
        assert self.release is not None
        return self.release.key.public

    def release_bytes(self) -> int:
        """Bytes of the blobs one client of the platform needs: its files, the manifests'
        configs and the signature's blobs (every blob the origin ever served)."""
        return sum(self.blob_sizes.values())

    def expected(self, name: str) -> bytes:
        assert self.release is not None
        return self.release.expected(name)

    # -- running clients -------------------------------------------------------

    def client_env(self, cache_dir: Path) -> dict[str, str]:
        assert self.cache is not None
        env = {k: v for k, v in os.environ.items() if not k.startswith("EXEC_SANDBOX_")}
        return env | {
            "EXEC_SANDBOX_REGISTRY": self.cache.ref(REPO),
            "EXEC_SANDBOX_TRUSTED_KEYS": str(self.key),
            "EXEC_SANDBOX_ASSET_VERSION": VERSION,
            "EXEC_SANDBOX_AIRGAP": "1",
            "EXEC_SANDBOX_CACHE_DIR": str(cache_dir),
        }

    def pull(self, clients: int, spread: float = 0.0) -> FleetRun:
        """Start `clients` processes at once (or evenly over `spread` seconds), each
        `pull`ing the whole platform into its own fresh cache through the pull-through
        cache; wait for all, then for the origin to go quiet (distribution stores a blob
        in the background)."""
        assert self.counter is not None
        self._runs += 1
        run_dir = self.work / "clients" / f"run{self._runs}"
        (run_dir / "ready").mkdir(parents=True)
        go = run_dir / "go"
        procs: list[tuple[int, Path, subprocess.Popen[str]]] = []
        for i in range(clients):
            cache_dir = run_dir / f"cache-{i:02d}"
            proc = subprocess.Popen(
                [sys.executable, "-c", _CLIENT, str(run_dir / "ready" / str(i)), str(go),
                 str(spread * i / clients),
                 "pull", "--platform", "/".join(PLATFORM), "--json"],
                env=self.client_env(cache_dir),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            procs.append((i, cache_dir, proc))
        while len(list((run_dir / "ready").iterdir())) < clients:
            if any(p.poll() is not None for _, _, p in procs):
                break  # a client died before it was ready: its report says why
            time.sleep(0.01)
        mark = self._mark()
        started = time.monotonic()
        go.touch()
        runs: list[ClientRun] = []
        for i, cache_dir, proc in procs:
            out, err = proc.communicate(timeout=300)
            try:
                report = json.loads(out)
            except ValueError:
                report = None
            runs.append(ClientRun(i, cache_dir, proc.returncode, report, err))
        seconds = time.monotonic() - started
        return FleetRun(tuple(runs), seconds, self._traffic_since(mark))

    def mirror(self) -> OriginTraffic:
        """`exec-sandbox-assets mirror` the release from the origin into the site registry
        (verifying it first), as section 3a of docs/airgap.md does."""
        assert self.counter is not None and self.cache is not None
        mark = self._mark()
        subprocess.run(
            [*CLI, "--trusted-key", str(self.key), "mirror", self.counter.ref(REPO),
             self.cache.ref(REPO), "--version", VERSION, "--work-dir", str(self.work / "mw")],
            env=self.client_env(self.work / "mirror-cache"), check=True, capture_output=True,
            timeout=300,
        )  # fmt: skip
        return self._traffic_since(mark)

    def _mark(self) -> tuple[int, int]:
        assert self.counter is not None
        return len(self.counter.requests), self.counter.bytes_to_client

    def _traffic_since(self, mark: tuple[int, int]) -> OriginTraffic:
        assert self.counter is not None
        self._settle()
        return self._traffic(mark[0], self.counter.bytes_to_client - mark[1])

    def _settle(self, quiet: float = 0.5, limit: float = 30.0) -> None:
        """Wait until the origin has sent nothing for `quiet` seconds."""
        assert self.counter is not None
        deadline = time.monotonic() + limit
        last = -1
        while time.monotonic() < deadline:
            now = self.counter.bytes_to_client
            if now == last:
                return
            last = now
            time.sleep(quiet)

    def _traffic(self, first: int, nbytes: int) -> OriginTraffic:
        assert self.counter is not None
        gets: Counter[str] = Counter()
        heads: Counter[str] = Counter()
        manifests = 0
        for rec in self.counter.requests[first:]:
            kind, _, ref = rec.path.split("?")[0].rpartition("/")
            if kind.endswith("/blobs"):
                if rec.method == "GET" and rec.status in (200, 206):
                    gets[ref] += 1
                elif rec.method == "HEAD":
                    heads[ref] += 1
                self._learn_size(ref)
            elif kind.endswith("/manifests"):
                manifests += 1
        return OriginTraffic(dict(gets), dict(heads), manifests, nbytes)

    def _learn_size(self, digest: str) -> None:
        """A blob's size, asked of the origin directly (not through the counter)."""
        if digest in self.blob_sizes:
            return
        conn = http.client.HTTPConnection(self.origin.host, timeout=10)
        try:
            conn.request("HEAD", f"/v2/{REPO}/blobs/{digest}")
            resp = conn.getresponse()
            resp.read()
            self.blob_sizes[digest] = int(resp.headers["Content-Length"])
        finally:
            conn.close()

    def names(self) -> dict[str, str]:
        """Blob digest -> a readable name: the file's release name, or what else it is."""
        assert self.release is not None
        known = {b.digest: name for name, b in self.release.blobs.items()}
        return {d: known.get(d, "config/signature") for d in self.blob_sizes}


__all__ = ["PLATFORM", "REPO", "VERSION", "ClientRun", "Fleet", "FleetRun", "OriginTraffic"]
