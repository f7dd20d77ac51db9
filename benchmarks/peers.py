"""Peer benchmark: this project's pull path against the tools and the module it replaces.

    python benchmarks/peers.py [--scale 1.0] [--reps 3] [--no-legacy] [--json FILE]

Builds a synthetic one-platform (linux/amd64) release: 7 layers, base images of 300,
200 and 60 MB (qcow2 header, then 64 KiB clusters of zeros, text and random bytes),
kernels, initramfs and gvproxy of 8-10 MB, zstd level 3 (~160 MB of layers, ~596 MB
decompressed at --scale 1). It is published with this project's publisher (signed
with a key made by `keygen`) to a `docker-registry` on 127.0.0.1 and to a GitHub
Release folder served by a static HTTP server on 127.0.0.1. Then, in one run:

cold pull of all 7 layers into an empty directory, --reps times, median:
  shell      curl | tee fifo | openssl dgst -sha256, zstd -d from the fifo; 4 layers in
             parallel (xargs -P4); checks the layer digests only
  skopeo     skopeo copy --all docker://... oci:DIR, then zstd -d of each layer (-P4)
  oras-py    OrasClient.pull of the manifest (no digest check), then zstd -d (-P4)
  0.22.0     exec-sandbox 0.22.0 (PyPI), in its own Python 3.12 venv under
             ~/.cache/esa-bench/venv-0.22: prefetch_all_assets() plus the vmlinuz it
             does not prefetch, from the static server. A small driver monkeypatches
             AsyncPooch.load_registry_from_github (reads a GitHub-API-like JSON file
             from the static server, with each asset's sha256 digest) and the
             download base URL (github.com -> the static server). --no-legacy skips it.
  ours/registry   `exec-sandbox-assets pull --all` (signature, manifest, layer and
             content digests verified) into a fresh cache, from the registry
  ours/releases   the same from the GitHub Release folder (EXEC_SANDBOX_RELEASES_URL)
plus, once each:
  warm       ensure_assets() and ensure_assets_available("python") in-process on a
             filled cache, median µs, with the registry behind a counting proxy
             (network connections must stay 0); the same calls of 0.22.0
  rss        peak RSS (VmHWM) above the interpreter's RSS after import, of a child
             process fetching the python base image
  resume     a pull killed (SIGKILL) once the python image's .partial holds half its
             blob, then run again: bytes over the wire beyond one clean pull, split
             into what sat in kernel socket buffers at the kill (/proc/net/tcp; lost to
             any client) and what the killed process had read and not kept
  throttle   each connection limited to 50 MB/s by a loopback proxy: curl over one
             connection of a python image blob of --throttle-mib random MiB vs this
             project pulling that image through the same proxy
  disk       allocated (du) vs apparent size of the installed python image
  publish    `exec-sandbox-assets publish --level 3` to a new repository vs
             `zstd -T0 -3` of the same files + `skopeo copy` of a plain OCI layout

Everything listens on 127.0.0.1 only; servers stop and temp dirs go at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import os
import platform
import random
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))  # this checkout's
sys.path.insert(1, str(Path(__file__).resolve().parent.parent / "tests"))  # servers.py

import exec_sandbox_assets as esa
from exec_sandbox_assets.release import catalog
from servers import FaultProxy, RegistryServer, StaticServer, request_rounds

ROOT = Path(__file__).resolve().parent.parent
MB = 1_000_000
CLUSTER = 64 * 1024
VERSION = "1.0.0"
REPO = "bench/assets"
OWNER_REPO = "dualeai/exec-sandbox"
LEGACY_VERSION = "0.22.0"
LEGACY_PYTHON = Path("/root/.pyenv/versions/3.12.1/bin/python3")
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "esa-bench"
THROTTLE = 50 * MB  # bytes/s per connection

# name -> (bytes at --scale 1, share of zero / text / random clusters)
SIZES: dict[str, tuple[int, tuple[float, float, float]]] = {
    "python-3.14-base-x86_64.qcow2": (300 * MB, (0.30, 0.56, 0.14)),
    "node-1.3-base-x86_64.qcow2": (200 * MB, (0.30, 0.56, 0.14)),
    "raw-base-x86_64.qcow2": (60 * MB, (0.40, 0.48, 0.12)),
    "vmlinux-x86_64": (10 * MB, (0.20, 0.45, 0.35)),
    "vmlinuz-x86_64": (8 * MB, (0.02, 0.03, 0.95)),  # already compressed inside
    "initramfs-x86_64": (8 * MB, (0.05, 0.15, 0.80)),  # likewise (a cpio of .zst files)
    "gvproxy-wrapper-linux-amd64": (10 * MB, (0.05, 0.60, 0.35)),  # stored uncompressed
}
BIG = "python-3.14-base-x86_64.qcow2"

_WORDS = (
    b"import os\n def main():\n    return 0\n /usr/lib/python3.14/site-packages/ "
    b"libc.so.6 GLIBC_2.34 console=ttyS0 quiet node_modules/.bin/ #!/bin/sh exec "
    b"Copyright (c) the exec-sandbox authors __init__ self return None else elif "
    b"const require module.exports function async await Promise /etc/ssl/certs "
).split(b" ")


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


def _text_pool(rng: random.Random, size: int) -> bytes:
    words = rng.choices(_WORDS, k=size // 5)
    numbers = [str(rng.randrange(10**6)).encode() for _ in range(len(words) // 8)]
    mixed = words + numbers
    rng.shuffle(mixed)
    return b" ".join(mixed)[:size]


def write_file(path: Path, size: int, mix: tuple[float, float, float], seed: str) -> int:
    """`size` bytes of 64 KiB clusters (zero / text / random in `mix` shares); qcow2 files
    start with a qcow2 magic. Returns the number of zero clusters."""
    z, t, _r = mix
    rng = random.Random(seed)  # deterministic contents
    pool = _text_pool(rng, 4 * 1024 * 1024)
    header = b"QFI\xfb" + bytes(CLUSTER - 4) if path.name.endswith(".qcow2") else b""
    count = 0
    with path.open("wb") as f:
        f.write(header)
        written = len(header)
        while written < size:
            roll = rng.random()
            if roll < z:
                chunk, count = bytes(CLUSTER), count + 1
            elif roll < z + t:
                start = rng.randrange(len(pool) - CLUSTER)
                chunk = pool[start : start + CLUSTER]
            else:
                chunk = rng.randbytes(CLUSTER)
            chunk = chunk[: size - written]
            f.write(chunk)
            written += len(chunk)
    return count


def write_inputs(dest: Path, scale: float) -> dict[str, int]:
    """The build output: one file per asset; returns name -> zero clusters written."""
    dest.mkdir(parents=True)
    zeros: dict[str, int] = {}
    for name, (full, mix) in SIZES.items():
        assert catalog.spec_for_name(name) is not None, name
        zeros[name] = write_file(dest / name, max(int(full * scale), 2 * CLUSTER), mix, name)
        if name.startswith("gvproxy"):
            (dest / name).chmod(0o755)
    return zeros


@dataclass(frozen=True)
class Layer:
    title: str  # release asset name / layer title
    output: str  # installed file name
    digest: str
    size: int
    content_size: int
    compressed: bool


# ---------------------------------------------------------------------------
# A loopback TCP proxy: counts bytes, optionally limits each connection's rate
# ---------------------------------------------------------------------------


class _Relay:
    """127.0.0.1:port -> 127.0.0.1:upstream: the listening socket, the accept loop and the
    counters the proxies below share; `_relay` moves one accepted connection's bytes."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.connections = 0
        self.bytes_down = 0
        self._lock = threading.Lock()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        self._open: set[socket.socket] = set()
        self._stopped = False
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stopped = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        with self._lock:
            for s in list(self._open):
                with contextlib.suppress(OSError):
                    s.close()
        self._thread.join(5)

    def reset(self) -> None:
        with self._lock:
            self.connections = 0
            self.bytes_down = 0

    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            accepted = time.monotonic()
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self.connections += 1
                self._open.update((client, upstream))
            self._relay(client, upstream, accepted)

    def _relay(self, client: socket.socket, upstream: socket.socket, accepted: float) -> None:
        raise NotImplementedError


class Proxy(_Relay):
    """127.0.0.1:port -> 127.0.0.1:upstream. `rate` bytes/s per connection (downstream)."""

    def __init__(self, upstream_port: int, rate: float | None = None) -> None:
        super().__init__(upstream_port)
        self.rate = rate

    def _relay(self, client: socket.socket, upstream: socket.socket, accepted: float) -> None:
        if self.rate is not None:
            # A link, not a queue: without this the kernel takes up to 4 MB ahead of
            # the rate per connection, counted as sent though no client read it.
            client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
        threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, down: bool) -> None:
        buf = bytearray(256 * 1024 if self.rate is None else 16 * 1024)
        view = memoryview(buf)
        start, sent = time.monotonic(), 0
        try:
            while True:
                n = src.recv_into(buf)
                if n == 0:
                    break
                dst.sendall(view[:n])
                if down:
                    with self._lock:
                        self.bytes_down += n
                    if self.rate is not None:
                        sent += n
                        ahead = sent / self.rate - (time.monotonic() - start)
                        if ahead > 0:
                            time.sleep(ahead)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
                with self._lock:
                    self._open.discard(s)


# ---------------------------------------------------------------------------
# A link: round trip, per-connection and total rates (the kernel here has no netem)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LinkProfile:
    """`--link RTT:PER_CONN:TOTAL`: round trip in ms, rates in MB/s."""

    rtt: float  # seconds
    per_conn: float  # bytes/s
    total: float  # bytes/s

    @classmethod
    def parse(cls, text: str) -> LinkProfile:
        try:
            rtt, per_conn, total = (float(x) for x in text.removesuffix("ms").split(":"))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"--link {text!r}: expected RTT_MS:PER_CONN_MB_S:TOTAL_MB_S, e.g. 50:25:125"
            ) from None
        if rtt < 0 or per_conn <= 0 or total <= 0:
            raise argparse.ArgumentTypeError(f"--link {text!r}: rates must be > 0, RTT >= 0")
        return cls(rtt / 1000, per_conn * MB, total * MB)

    @property
    def name(self) -> str:
        return f"{self.rtt * 1000:.0f} ms, {self.per_conn / MB:.0f} MB/s per connection, " \
            f"{self.total / MB:.0f} MB/s total"  # fmt: skip

    def floor(self, nbytes: int, round_trips: int) -> float:
        """The least time any client needs: the bytes at the total rate, plus the round
        trips the protocol needs before the first byte (a connection's included)."""
        return nbytes / self.total + round_trips * self.rtt


class _Pacer:
    """When the next bytes may leave, at `rate` bytes/s (shared by a link's connections
    for the total rate, one per connection for its own)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.free = 0.0
        self.lock = threading.Lock()


class LinkProxy(_Relay):
    """127.0.0.1:port -> 127.0.0.1:upstream through a simulated link: every piece of data
    leaves half a round trip after it came in, in each direction; a new connection's
    first request waits a round trip more (the TCP handshake a real link costs); data
    leaves each connection at most at `per_conn` and all connections of `pacers` together
    at `total` bytes/s. A connection holds at most about a bandwidth-delay product in
    flight, as a TCP window would."""

    PIECE = 64 * 1024

    def __init__(self, upstream_port: int, link: LinkProfile, total: _Pacer) -> None:
        super().__init__(upstream_port)
        self.link = link
        self.total = total
        self._window = max(256 * 1024, int(2 * link.per_conn * max(link.rtt, 0.01)))

    def _relay(self, client: socket.socket, upstream: socket.socket, accepted: float) -> None:
        for sock in (client, upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        # Upstream: the handshake's round trip before the first byte can be sent.
        self._pipe(client, upstream, False, accepted + self.link.rtt)
        self._pipe(upstream, client, True, 0.0)

    def _pipe(self, src: socket.socket, dst: socket.socket, down: bool, not_before: float) -> None:
        queue: collections.deque[tuple[float, bytes]] = collections.deque()
        cond = threading.Condition()
        queued = [0]
        half = self.link.rtt / 2

        def receive() -> None:
            try:
                while data := src.recv(self.PIECE):
                    due = max(time.monotonic(), not_before) + half
                    with cond:
                        while queued[0] > self._window and not self._stopped:
                            cond.wait(0.05)
                        queue.append((due, data))
                        queued[0] += len(data)
                        cond.notify_all()
            except OSError:
                pass
            with cond:
                queue.append((time.monotonic() + half, b""))
                cond.notify_all()

        def send() -> None:
            own = _Pacer(self.link.per_conn)
            try:
                while True:
                    with cond:
                        while not queue:
                            cond.wait()
                        due, data = queue.popleft()
                        queued[0] -= len(data)
                        cond.notify_all()
                    if (wait := due - time.monotonic()) > 0:
                        time.sleep(wait)
                    if not data:
                        break
                    if down:  # requests are small: only the answers are paced
                        at = self._reserve(own, len(data))
                        if (wait := at - time.monotonic()) > 0:
                            time.sleep(wait)
                    dst.sendall(data)
                    if down:
                        with self._lock:
                            self.bytes_down += len(data)
            except OSError:
                pass
            finally:
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)

        threading.Thread(target=receive, daemon=True).start()
        threading.Thread(target=send, daemon=True).start()

    def _reserve(self, own: _Pacer, n: int) -> float:
        """When `n` bytes may leave: after this connection's and the link's earlier bytes."""
        with self.total.lock:
            at = max(time.monotonic(), own.free, self.total.free)
            own.free = at + n / own.rate
            self.total.free = at + n / self.total.rate
            return at


# ---------------------------------------------------------------------------
# The bench context
# ---------------------------------------------------------------------------


@dataclass
class Bench:
    tmp: Path
    scale: float
    registry: RegistryServer
    static: StaticServer
    key: Path
    pub: Path
    inputs: Path
    zeros: dict[str, int]
    layers: list[Layer] = field(default_factory=list)
    manifest_digest: str = ""
    env: dict[str, str] = field(default_factory=dict)
    _n: int = 0
    last: Path | None = None  # the directory of the latest fresh() run

    @property
    def ref(self) -> str:
        return self.registry.ref(REPO)

    @property
    def releases_url(self) -> str:
        return f"{self.static.url}/{OWNER_REPO}/releases/download"

    def blob_url(self, layer: Layer) -> str:
        return f"{self.registry.url}/v2/{REPO}/blobs/{layer.digest}"

    def layer(self, title_prefix: str) -> Layer:
        return next(lyr for lyr in self.layers if lyr.title.startswith(title_prefix))

    def fresh(self, name: str) -> Path:
        self._n += 1
        path = self.tmp / "runs" / f"{self._n:03d}-{name}"
        path.mkdir(parents=True)
        self.last = path
        return path

    def check_outputs(self, directory: Path, only: tuple[str, ...] = ()) -> None:
        """Every layer's (or `only` those outputs') decompressed file is under `directory`
        with its content size."""
        for x in self.layers:
            if only and x.output not in only:
                continue
            sizes = {p.stat().st_size for p in directory.rglob(x.output) if p.is_file()}
            if x.content_size not in sizes:
                raise RuntimeError(f"{x.output}: no file of {x.content_size} bytes in {directory}")

    @property
    def compressed_bytes(self) -> int:
        return sum(lyr.size for lyr in self.layers)

    @property
    def content_bytes(self) -> int:
        return sum(lyr.content_size for lyr in self.layers)


def compile_package(src: Path = ROOT / "src") -> None:
    """Byte-compile the package, as `pip install` does: with PYTHONDONTWRITEBYTECODE set
    (some machines set it) every run of ours would otherwise compile its ~55 modules
    again, 50-100 ms that no installed copy pays (0.22.0's venv was compiled by pip).
    The bytecode goes where Python looks for it (`__pycache__`, or PYTHONPYCACHEPREFIX)."""
    import compileall

    compileall.compile_dir(src / "exec_sandbox_assets", quiet=1)


def _child_env(src: Path | None = None) -> dict[str, str]:
    """The environment of a child running this checkout's package, or the one under
    `src` (`--baseline-src`: the "before" rows)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXEC_SANDBOX_")}
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(src or ROOT / "src"), env.get("PYTHONPATH", "")) if p
    )
    return env


CLI = [sys.executable, "-c", "from exec_sandbox_assets.cli import main; raise SystemExit(main())"]


def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run, raise with its stderr on failure."""
    kw.setdefault("env", _child_env())
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{cmd[:4]}... exited {proc.returncode}:\n{proc.stderr[-3000:]}{proc.stdout[-1000:]}"
        )
    return proc


# CPU seconds (user + system) of the child processes each `_timed` call ran, latest last:
# a figure the machine's load moves far less than the wall time.
CHILD_CPU: list[float] = []


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _timed(fn: Callable[[], object]) -> float:
    cpu = _children_cpu()
    t = time.perf_counter()
    fn()
    took = time.perf_counter() - t
    CHILD_CPU.append(_children_cpu() - cpu)
    return took


def _platform_manifest(registry_url: str, repo: str) -> tuple[str, dict[str, Any]]:
    """The digest and document of the (only) platform manifest of v{VERSION} in `repo`."""
    import httpx

    accept = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json"
    index = httpx.get(f"{registry_url}/v2/{repo}/manifests/v{VERSION}", headers={"Accept": accept})
    digest: str = index.raise_for_status().json()["manifests"][0]["digest"]
    manifest = httpx.get(f"{registry_url}/v2/{repo}/manifests/{digest}", headers={"Accept": accept})
    return digest, manifest.raise_for_status().json()


def setup(tmp: Path, scale: float, registry: RegistryServer, static: StaticServer) -> Bench:
    t0 = time.perf_counter()
    zeros = write_inputs(tmp / "in", scale)
    run([*CLI, "keygen", "--out", str(tmp / "k")])
    bench = Bench(
        tmp, scale, registry, static, tmp / "k.key", tmp / "k.pub", tmp / "in", zeros=zeros
    )
    release_dir = static.root / OWNER_REPO / "releases" / "download" / f"v{VERSION}"
    release_dir.parent.mkdir(parents=True)
    run(
        [
            *CLI,
            "publish",
            "--input", str(bench.inputs),
            "--version", VERSION,
            "--to", bench.ref,
            "--key", str(bench.key),
            "--platform", "linux/amd64",
            "--release-dir", str(release_dir),
            "--level", "3",
        ]
    )  # fmt: skip
    bench.manifest_digest, manifest = _platform_manifest(registry.url, REPO)
    for lyr in manifest["layers"]:
        ann = lyr["annotations"]
        title = ann[catalog.ANN_TITLE]
        spec = catalog.spec_for_name(title)
        assert spec is not None, title
        bench.layers.append(
            Layer(
                title,
                spec.output_name,
                lyr["digest"],
                lyr["size"],
                int(ann[catalog.ANN_CONTENT_SIZE]),
                title.endswith(".zst"),
            )
        )
    # What api.github.com/repos/OWNER/REPO/releases/tags/vV says about each asset.
    api = static.root / "api" / "repos" / OWNER_REPO / "releases" / "tags" / f"v{VERSION}"
    api.parent.mkdir(parents=True)
    assets = []
    for path in sorted(release_dir.iterdir()):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        assets.append(
            {"name": path.name, "size": path.stat().st_size, "digest": f"sha256:{digest}"}
        )
    api.write_text(json.dumps({"tag_name": f"v{VERSION}", "assets": assets}))
    print(
        f"release: {len(bench.layers)} layers, {bench.compressed_bytes / MB:.1f} MB compressed, "
        f"{bench.content_bytes / MB:.1f} MB decompressed (setup {time.perf_counter() - t0:.1f}s)",
        flush=True,
    )
    return bench


# ---------------------------------------------------------------------------
# Cold pulls: each returns the seconds of one pull into a fresh directory
# ---------------------------------------------------------------------------

_SHELL = r"""
set -euo pipefail
fetch() {  # URL OUT DIGEST COMPRESSED
  if [ "$4" = 1 ]; then
    mkfifo "$2.fifo"
    zstd -dqf -o "$2" < "$2.fifo" & z=$!
    got=$(curl -sSf "$1" | tee "$2.fifo" | openssl dgst -sha256 -r)
    wait $z || { echo "zstd failed: $2" >&2; exit 1; }
    rm "$2.fifo"
  else
    got=$(curl -sSf "$1" | tee "$2" | openssl dgst -sha256 -r)
  fi
  [ "sha256:${got%% *}" = "$3" ] || { echo "digest mismatch: $2" >&2; exit 1; }
}
export -f fetch
xargs -P4 -n4 bash -c 'fetch "$@"' _ < "$1"
"""

_UNZSTD = r"""
set -euo pipefail
# SRC OUT COMPRESSED, 4 at a time
xargs -P4 -n3 sh -c 'if [ "$3" = 1 ]; then zstd -dqf "$1" -o "$2"; else cp "$1" "$2"; fi' _ < "$1"
"""


def pull_shell(b: Bench) -> float:
    out = b.fresh("shell")
    lines = [f"{b.blob_url(x)} {out / x.output} {x.digest} {int(x.compressed)}" for x in b.layers]
    (out / "list").write_text("\n".join(lines) + "\n")
    return _timed(lambda: run(["bash", "-c", _SHELL, "shell", str(out / "list")]))


def _unzstd_from(b: Bench, blobs: Callable[[Layer], Path], out: Path) -> None:
    lines = [f"{blobs(x)} {out / x.output} {int(x.compressed)}" for x in b.layers]
    (out / "unzstd").write_text("\n".join(lines) + "\n")
    run(["bash", "-c", _UNZSTD, "unzstd", str(out / "unzstd")])


def pull_skopeo(b: Bench) -> float:
    out = b.fresh("skopeo")
    src = f"docker://{b.registry.host}/{REPO}:v{VERSION}"

    def go() -> None:
        run(["skopeo", "copy", "-q", "--all", "--src-tls-verify=false", src, f"oci:{out}/oci:v1"])
        _unzstd_from(b, lambda x: out / "oci" / "blobs" / "sha256" / x.digest[7:], out)

    return _timed(go)


_ORAS = """
import sys
import oras.client
host, target, outdir = sys.argv[1:]
oras.client.OrasClient(hostname=host, insecure=True).pull(target=target, outdir=outdir)
"""


def pull_oras(b: Bench) -> float:
    out = b.fresh("oras")
    target = f"{b.registry.host}/{REPO}@{b.manifest_digest}"

    def go() -> None:
        run([sys.executable, "-c", _ORAS, b.registry.host, target, str(out / "dl")])
        _unzstd_from(b, lambda x: out / "dl" / x.title, out)

    return _timed(go)


def _pull_args(b: Bench, cache: Path) -> list[str]:
    return [
        "pull", "--all", "--platform", "linux/amd64",
        "--cache-dir", str(cache),
        "--asset-version", VERSION,
        "--trusted-key", str(b.pub),
        "--airgap",
    ]  # fmt: skip


def pull_ours_registry(b: Bench, keep: list[Path] | None = None, src: Path | None = None) -> float:
    cache = b.fresh("ours-reg")
    if keep is not None:
        keep.append(cache)
    cmd = [*CLI, *_pull_args(b, cache), "--registry", b.ref]
    return _timed(lambda: run(cmd, env=_child_env(src)))


def pull_ours_releases(b: Bench) -> float:
    cache = b.fresh("ours-rel")
    env = _child_env() | {"EXEC_SANDBOX_RELEASES_URL": b.releases_url}
    # --airgap: the default registry (ghcr.io) is skipped, the local releases URL is not.
    return _timed(lambda: run([*CLI, *_pull_args(b, cache)], env=env))


# ---------------------------------------------------------------------------
# exec-sandbox 0.22.0
# ---------------------------------------------------------------------------

_LEGACY_DRIVER = '''
"""Drive exec-sandbox 0.22.0's asset download against a local GitHub look-alike."""
import asyncio, json, sys, time
import aiohttp
from exec_sandbox import assets
from exec_sandbox.asset_downloader import AsyncPooch, decompress_zstd

BASE = sys.argv[1]  # http://127.0.0.1:PORT standing for https://github.com and its API
MODE = sys.argv[2]


async def load_registry_from_github(self, owner, repo, tag):
    # Same as 0.22.0's, with api.github.com replaced by the static server.
    url = f"{BASE}/api/repos/{owner}/{repo}/releases/tags/{tag}"
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        resp.raise_for_status()
        data = await resp.json(content_type=None)
    self._github_release_cache = {a["name"]: a for a in data["assets"]}
    self._resolved_version = data.get("tag_name")
    for a in data["assets"]:
        self.registry[a["name"]] = a.get("digest") or ""


AsyncPooch.load_registry_from_github = load_registry_from_github
_create = assets._create_assets_registry


def _local_registry():
    pooch = _create()
    pooch.base_url = pooch.base_url.replace("https://github.com", BASE)
    return pooch


assets._create_assets_registry = _local_registry


async def pull():
    await assets.ensure_registry_loaded()
    # prefetch_all_assets takes vmlinux (PVH) only; the vmlinuz is fetched too, so
    # that all 7 layers are downloaded as by the other methods.
    result, _ = await asyncio.gather(
        assets.prefetch_all_assets(),
        assets.get_assets().fetch("vmlinuz-x86_64.zst", processor=decompress_zstd),
    )
    assert result.success, result.errors


async def warm(n):
    out = {}
    for name, call in (
        ("ensure_assets", lambda: assets.ensure_assets()),
        ("ensure_assets_available", lambda: assets.ensure_assets_available("python")),
    ):
        await call()
        times = []
        for _ in range(n):
            t = time.perf_counter_ns()
            await call()
            times.append(time.perf_counter_ns() - t)
        times.sort()
        out[name] = times[len(times) // 2] / 1000
    print(json.dumps(out))


async def kernel():
    await assets.ensure_registry_loaded()
    await assets.ensure_assets()  # kernel, initramfs and gvproxy: no base image


asyncio.run(
    pull() if MODE == "pull" else kernel() if MODE == "kernel" else warm(int(sys.argv[3]))
)
'''


def legacy_python() -> Path | None:
    """The venv's python with exec-sandbox 0.22.0, created and installed once."""
    venv = CACHE / f"venv-{LEGACY_VERSION}"
    py = venv / "bin" / "python"
    check = [str(py), "-c", "import exec_sandbox.assets, exec_sandbox.asset_downloader"]
    if py.exists() and subprocess.run(check, capture_output=True, check=False).returncode == 0:
        return py
    base = LEGACY_PYTHON if LEGACY_PYTHON.exists() else shutil.which("python3.12")
    if base is None:
        print("exec-sandbox 0.22.0: no Python 3.12 found; skipping its rows", flush=True)
        return None
    print(f"exec-sandbox 0.22.0: installing into {venv} (once)", flush=True)
    steps = [
        [str(base), "-m", "venv", str(venv)],
        [
            str(py),
            "-m",
            "pip",
            "install",
            "-q",
            "--timeout",
            "20",
            "--retries",
            "1",
            f"exec-sandbox=={LEGACY_VERSION}",
        ],
        check,
    ]
    for step in steps:
        proc = subprocess.run(step, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            print(
                f"exec-sandbox {LEGACY_VERSION} could not be installed (no network to PyPI?); "
                f"skipping its rows: {proc.stderr.strip().splitlines()[-1:]}",
                flush=True,
            )
            return None
    return py


def _legacy_env(cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EXEC_SANDBOX_", "PYTHON"))}
    return env | {"EXEC_SANDBOX_CACHE_DIR": str(cache), "EXEC_SANDBOX_ASSET_VERSION": VERSION}


def pull_legacy(b: Bench, py: Path, keep: list[Path] | None = None) -> float:
    cache = b.fresh("legacy")
    if keep is not None:
        keep.append(cache)
    driver = b.tmp / "legacy_driver.py"
    driver.write_text(_LEGACY_DRIVER)
    cmd = [str(py), str(driver), b.static.url, "pull"]
    return _timed(lambda: run(cmd, env=_legacy_env(cache), cwd=cache))


def legacy_kernel(b: Bench, py: Path) -> float:
    """0.22.0's `ensure_assets()` on an empty cache: kernel, initramfs, gvproxy."""
    cache = b.fresh("legacy-kernel")
    driver = b.tmp / "legacy_driver.py"
    driver.write_text(_LEGACY_DRIVER)
    cmd = [str(py), str(driver), b.static.url, "kernel"]
    return _timed(lambda: run(cmd, env=_legacy_env(cache), cwd=cache))


def legacy_warm(b: Bench, py: Path, cache: Path, n: int) -> dict[str, float]:
    out = run(
        [str(py), str(b.tmp / "legacy_driver.py"), b.static.url, "warm", str(n)],
        env=_legacy_env(cache) | {"EXEC_SANDBOX_OFFLINE": "1"},
        cwd=cache,
    )
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


# ---------------------------------------------------------------------------
# Link profiles: the same pulls through a simulated link
# ---------------------------------------------------------------------------

# What ensure_assets() fetches without a language (ours and 0.22.0's): no base image.
KERNEL_ONLY = ("vmlinuz-x86_64", "initramfs-x86_64", "gvproxy-wrapper-linux-amd64")
BEFORE_FULL = "before (--baseline-src): pull --all from registry"
BEFORE_KERNEL = "before (--baseline-src): ensure_assets() from registry"
# Round trips before the first blob byte any client needs: a connection, the index,
# the platform manifest (the signature alongside), the blob request.
FLOOR_ROUND_TRIPS = 4


@dataclass(frozen=True)
class _Via:
    """A server as seen through a LinkProxy (what the pull functions read of one)."""

    port: int
    root: Path

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def ref(self, repo: str) -> str:
        return f"{self.url}/{repo}"


_ENSURE = """
import asyncio, sys
import exec_sandbox_assets as esa
esa.configure(version=sys.argv[1], registry=sys.argv[2], trusted_keys=(sys.argv[3],),
              airgap=True, cache_dir=sys.argv[4])
asyncio.run(esa.ensure_assets(download=True))
"""


def ensure_ours(b: Bench, src: Path | None = None) -> float:
    """`ensure_assets()` in a fresh process on an empty cache: no base image."""
    cache = b.fresh("ours-kernel")
    cmd = [sys.executable, "-c", _ENSURE, VERSION, b.ref, str(b.pub), str(cache)]
    return _timed(lambda: run(cmd, env=_child_env(src)))


def shell_kernel(b: Bench) -> float:
    out = b.fresh("shell-kernel")
    lines = [
        f"{b.blob_url(x)} {out / x.output} {x.digest} {int(x.compressed)}"
        for x in b.layers
        if x.output in KERNEL_ONLY
    ]
    (out / "list").write_text("\n".join(lines) + "\n")
    return _timed(lambda: run(["bash", "-c", _SHELL, "shell", str(out / "list")]))


def run_link(
    b: Bench, link: LinkProfile, reps: int, legacy: Path | None, baseline: Path | None
) -> dict[str, Any]:
    """Every cold pull, and the kernel-only ones, through `link` (methods interleaved)."""
    total = _Pacer(link.total)
    with (
        LinkProxy(b.registry.port, link, total) as reg,
        LinkProxy(b.static.port, link, total) as sta,
    ):
        via = dataclasses.replace(
            b,
            registry=_Via(reg.port, b.static.root),
            static=_Via(sta.port, b.static.root),
        )
        via._n = b._n + 1000  # its own run directories
        full: dict[str, Callable[[], float]] = {
            "shell (curl+openssl+zstd, 4 parallel)": lambda: pull_shell(via),
            "skopeo copy + zstd -d": lambda: pull_skopeo(via),
        }
        kernel: dict[str, Callable[[], float]] = {
            "shell, the same 3 layers": lambda: shell_kernel(via),
        }
        if legacy is not None:
            py = legacy
            full[f"exec-sandbox {LEGACY_VERSION} (GitHub Releases path)"] = lambda: pull_legacy(
                via, py
            )
            kernel[f"exec-sandbox {LEGACY_VERSION} ensure_assets()"] = lambda: legacy_kernel(
                via, py
            )
        if baseline is not None:
            base = baseline
            full[BEFORE_FULL] = lambda: pull_ours_registry(via, src=base)
            kernel[BEFORE_KERNEL] = lambda: ensure_ours(via, src=base)
        full["ours: pull --all from registry (verified)"] = lambda: pull_ours_registry(via)
        full["ours: pull --all from releases folder (verified)"] = lambda: pull_ours_releases(via)
        kernel["ours: ensure_assets() from registry (verified)"] = lambda: ensure_ours(via)
        times: dict[str, list[float]] = {m: [] for m in [*full, *kernel]}
        cpu: dict[str, list[float]] = {m: [] for m in [*full, *kernel]}
        for _ in range(reps):
            for group, only in ((full, ()), (kernel, KERNEL_ONLY)):
                for name, fn in group.items():
                    try:
                        took = fn()
                        assert via.last is not None
                        check = only if "0.22.0" not in name else KERNEL_ONLY[1:]
                        via.check_outputs(via.last, check)
                        times[name].append(took)
                        cpu[name].append(CHILD_CPU[-1])
                    except Exception as exc:
                        print(f"  link {name}: FAILED: {exc}", flush=True)
                    if via.last is not None:
                        shutil.rmtree(via.last, ignore_errors=True)
        kernel_bytes = sum(x.size for x in b.layers if x.output in KERNEL_ONLY)
    return {
        "profile": link.name,
        "rtt_s": link.rtt,
        "per_conn_mb_s": link.per_conn / MB,
        "total_mb_s": link.total / MB,
        "floor_full_s": link.floor(b.compressed_bytes, FLOOR_ROUND_TRIPS),
        "floor_kernel_s": link.floor(kernel_bytes, FLOOR_ROUND_TRIPS),
        "full": {m: _row(times[m], cpu[m]) for m in full},
        "kernel": {m: _row(times[m], cpu[m]) for m in kernel},
    }


ROUND_TRIP_DELAY = 0.3  # s each answer is held back while round trips are counted


def count_round_trips(b: Bench, src: Path | None = None) -> dict[str, Any]:
    """Round trips of a kernel-only `ensure_assets()` through a FaultProxy holding every
    answer back ROUND_TRIP_DELAY s: which requests go in which round (load-independent:
    requests sent together share a round). Rounds before the first layer request = round
    trips before the first blob byte, a connection's handshake not counted."""
    layers = {x.digest for x in b.layers}
    with FaultProxy(b.registry) as proxy:
        proxy.stall_seconds = ROUND_TRIP_DELAY
        via = dataclasses.replace(b, registry=_Via(proxy.port, b.static.root))
        via._n = b._n + 5000 + (0 if src is None else 100)
        ensure_ours(via, src)
        seen = request_rounds(proxy.requests)

    def role(path: str) -> str:
        kind, _, ref = path.rpartition("/")
        if kind.endswith("/manifests"):
            return "index" if ref == f"v{VERSION}" else "signature" if ".sig" in ref else "manifest"
        return "layer" if ref in layers else "payload"

    rounds: dict[int, list[str]] = {}
    for n, record in seen:
        rounds.setdefault(n, []).append(role(record.path))
    first = min((n for n, names in rounds.items() if "layer" in names), default=0)
    return {
        "before_first_blob": first - 1,
        "rounds": {n: sorted(set(names)) for n, names in sorted(rounds.items())},
        "requests": len(seen),
        "connections": proxy.connections,
    }


def print_round_trips(label: str, x: dict[str, Any]) -> None:
    shown = ", ".join(f"{n}: {'+'.join(names)}" for n, names in list(x["rounds"].items())[:4])
    print(
        f"round trips before the first blob request ({label}): {x['before_first_blob']} "
        f"({shown}; {x['requests']} requests, {x['connections']} connections)"
    )


def _row(times: list[float], cpu: list[float]) -> dict[str, Any]:
    return {"median_s": _median(times), "runs_s": times, "cpu_s": _median(cpu), "cpu_runs_s": cpu}


def print_link(x: dict[str, Any]) -> None:
    print(f"\nlink: {x['profile']}")
    for part, floor in (("full", x["floor_full_s"]), ("kernel", x["floor_kernel_s"])):
        rows = {k: v["median_s"] for k, v in x[part].items()}
        legacy = next((v for k, v in rows.items() if "0.22.0" in k), float("nan"))
        what = "cold pull, all layers" if part == "full" else "ensure_assets(), no base image"
        width = max(len(k) for k in rows) + 2
        print(f"{what:<{width}} {'median s':>9} {'vs floor':>9} {'vs 0.22.0':>10} {'CPU s':>6}")
        for name, secs in rows.items():
            vs = f"{legacy / secs:>9.2f}x" if legacy == legacy else f"{'-':>10}"
            cpu = x[part][name].get("cpu_s", float("nan"))
            print(f"{name:<{width}} {secs:>9.2f} {secs / floor:>8.2f}x {vs} {cpu:>6.2f}")
        print(f"{'floor (bytes / total rate + 4 round trips)':<{width}} {floor:>9.2f}")


# ---------------------------------------------------------------------------
# Warm path, RSS, resume, throttle, disk, publish
# ---------------------------------------------------------------------------


def warm_ours(b: Bench, cache: Path, n: int) -> dict[str, float]:
    """Median µs of the two warm calls in this process; the registry sits behind a
    counting proxy so that any network use would show."""
    with Proxy(b.registry.port) as proxy:
        esa.configure(
            version=VERSION,
            registry=f"http://127.0.0.1:{proxy.port}/{REPO}",
            trusted_keys=(str(b.pub),),
            airgap=True,
            cache_dir=str(cache),
        )

        async def go() -> dict[str, float]:
            calls: dict[str, Callable[[], Any]] = {
                "ensure_assets": lambda: esa.ensure_assets(),
                "ensure_assets_available": lambda: esa.ensure_assets_available("python"),
            }
            out: dict[str, float] = {}
            for name, call in calls.items():
                await call()  # the first call may read state from disk
                proxy.reset()
                times = []
                for _ in range(n):
                    t = time.perf_counter_ns()
                    await call()
                    times.append(time.perf_counter_ns() - t)
                out[name] = statistics.median(times) / 1000
                out[name + "_connections"] = proxy.connections
            return out

        try:
            return asyncio.run(go())
        finally:
            esa.configure(cache_dir=str(b.tmp / "unused"), airgap=True)


_FETCH_ONE = """
import asyncio, json, sys, time
import exec_sandbox_assets as esa
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
esa.configure(version=sys.argv[1], registry=sys.argv[2], trusted_keys=(sys.argv[3],),
              airgap=True, cache_dir=sys.argv[4])
base = status("VmRSS:")
t = time.perf_counter()
path = asyncio.run(esa.fetch_base_image("python"))
took = time.perf_counter() - t
print(json.dumps({"seconds": took, "baseline": base, "hwm": status("VmHWM:"), "path": str(path)}))
"""


_FETCH_BLOB = """
import asyncio, json, sys, time
import exec_sandbox_assets as esa
from exec_sandbox_assets.cache.download import BlobRequest
client = esa.configure(version=sys.argv[1], registry=sys.argv[2], trusted_keys=(sys.argv[3],),
                       airgap=True, cache_dir=sys.argv[4])

async def main():
    t = time.perf_counter()
    sources = client.sources(client.settings)
    part = await client.platform_release(sources, ("linux", "amd64"))
    layer = part.layers[sys.argv[5]]
    req = BlobRequest(layer.digest, layer.size, sources[0].name, layer.chunks)
    await client.store.fetch_blob(req, sources[0].opener(layer))
    took = time.perf_counter() - t
    await asyncio.gather(*(s.aclose() for s in sources))
    return took, layer.chunks is not None

took, chunked = asyncio.run(main())
print(json.dumps({"seconds": took, "chunked": chunked}))
"""


def _drive(b: Bench, driver: str, ref: str, *extra: str) -> dict[str, Any]:
    """Run a driver against `ref` with a fresh cache (removed after: GBs at full scale);
    its last line of output is its JSON result."""
    cache = b.fresh("drive")
    out = run([sys.executable, "-c", driver, VERSION, ref, str(b.pub), str(cache), *extra])
    shutil.rmtree(cache)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def fetch_blob(b: Bench, ref: str, title: str) -> dict[str, Any]:
    """The verified blob of layer `title` (each chunk checked as it lands), nothing else."""
    return _drive(b, _FETCH_BLOB, ref, title)


def fetch_one(b: Bench, ref: str) -> dict[str, Any]:
    return _drive(b, _FETCH_ONE, ref)


def measure_rss(b: Bench, size: int) -> dict[str, Any]:
    """Peak RSS of a child fetching a python image of `size` bytes, published for this
    measurement to its own repository (the other files are those of the release)."""
    ref = _publish_variant(b, "bench/rss", size, SIZES[BIG][1])
    r = fetch_one(b, ref)
    return {
        "image_mb": size / MB,
        "baseline_mib": r["baseline"] / 2**20,
        "peak_mib": r["hwm"] / 2**20,
        "above_baseline_mib": (r["hwm"] - r["baseline"]) / 2**20,
    }


def _publish_variant(b: Bench, repo: str, size: int, mix: tuple[float, float, float]) -> str:
    """Publish the release again to `repo` with a python image of `size` bytes of `mix`;
    returns the ref. Inputs and compressed copies are deleted: only the registry keeps it."""
    src = b.fresh(f"{repo.rpartition('/')[2]}-in")
    for name in SIZES:
        if name != BIG:
            os.link(b.inputs / name, src / name)
    write_file(src / BIG, size, mix, repo)
    ref = b.registry.ref(repo)
    work = b.fresh(f"{repo.rpartition('/')[2]}-work")
    run(
        [
            *CLI, "publish", "--input", str(src), "--version", VERSION, "--to", ref,
            "--key", str(b.key), "--platform", "linux/amd64", "--level", "1",
            "--work-dir", str(work),
        ]
    )  # fmt: skip
    shutil.rmtree(src)
    shutil.rmtree(work)
    return ref


def _layer_digest(registry_url: str, repo: str, title: str) -> tuple[str, int]:
    for lyr in _platform_manifest(registry_url, repo)[1]["layers"]:
        if lyr["annotations"][catalog.ANN_TITLE] == title:
            return lyr["digest"], lyr["size"]
    raise KeyError(title)


def measure_throttle(b: Bench, size: int) -> dict[str, Any]:
    """A python image of `size` random bytes (a blob of the same size), through a proxy
    limiting each connection to THROTTLE: curl of the blob into a file over one
    connection, against this project fetching the verified blob (ranged connections,
    each 4 MiB chunk checked as it lands, the layer digest at the end)."""
    repo = "bench/throttle"
    _publish_variant(b, repo, size, (0.0, 0.0, 1.0))
    digest, blob_size = _layer_digest(b.registry.url, repo, BIG + ".zst")
    with Proxy(b.registry.port, rate=THROTTLE) as proxy:
        url = f"http://127.0.0.1:{proxy.port}/v2/{repo}/blobs/{digest}"
        out = b.fresh("curl") / "blob"
        curl = _timed(lambda: run(["curl", "-sSf", "-o", str(out), url]))
        out.unlink()
        proxy.reset()
        blob = fetch_blob(b, f"http://127.0.0.1:{proxy.port}/{repo}", BIG + ".zst")
        conns = proxy.connections
        pull = fetch_one(b, f"http://127.0.0.1:{proxy.port}/{repo}")["seconds"]
    return {
        "blob_mb": blob_size / MB,
        "rate_mb_s": THROTTLE / MB,
        "curl_one_connection_s": curl,
        "ours_s": blob["seconds"],
        "chunks_verified": blob["chunked"],
        "ours_connections": conns,
        "speedup": curl / blob["seconds"],
        # For information: the whole pull of that image (blob, decompression, content
        # digest, fsync of 2x the blob size on this disk) through the same proxy.
        "pull_s": pull,
    }


def measure_resume(b: Bench) -> dict[str, Any]:
    big = b.layer("python")
    # Slow enough that "half way" is caught by polling, whatever the scale, and that the
    # bytes sent between the snapshot of the socket queues and the kill stay few.
    rate = min(THROTTLE / 5, big.size / 8.0)
    with Proxy(b.registry.port, rate=rate) as proxy:
        ref = f"http://127.0.0.1:{proxy.port}/{REPO}"
        args = [
            *CLI, "pull", "--language", "python", "--platform", "linux/amd64",
            "--asset-version", VERSION, "--trusted-key", str(b.pub), "--airgap",
            "--registry", ref,
        ]  # fmt: skip
        clean_cache = b.fresh("resume-clean")
        run([*args, "--cache-dir", str(clean_cache)])
        clean = proxy.bytes_down
        proxy.reset()
        cache = b.fresh("resume")
        child = subprocess.Popen(
            [*args, "--cache-dir", str(cache)],
            env=_child_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        partial_at_kill = in_kernel = 0
        partial: Path | None = None
        try:
            deadline = time.monotonic() + 120
            while child.poll() is None and time.monotonic() < deadline:
                if partial is None:
                    partial = next(cache.rglob(f"{big.digest[7:]}.partial"), None)
                if partial is not None:
                    # Bytes on disk, not the apparent size: ranged downloads write near
                    # the end first, so st_size says "almost done" at once.
                    with contextlib.suppress(FileNotFoundError):
                        partial_at_kill = partial.stat().st_blocks * 512
                    if partial_at_kill >= big.size // 2:
                        in_kernel = _queued_between(proxy.port)
                        child.send_signal(signal.SIGKILL)
                        break
                time.sleep(0.002)
        finally:
            if child.poll() is None:
                child.kill()
            child.wait()
        killed = child.returncode == -signal.SIGKILL
        first = proxy.bytes_down
        proxy.reset()
        run([*args, "--cache-dir", str(cache)])
        second = proxy.bytes_down
    return {
        "blob_mb": big.size / MB,
        "killed_half_way": killed,
        "partial_at_kill_mb": partial_at_kill / MB,
        "first_run_mb": first / MB,
        "second_run_mb": second / MB,
        "clean_pull_mb": clean / MB,
        # Bytes that crossed the wire twice: both runs minus one uninterrupted pull.
        "downloaded_again_mb": (first + second - clean) / MB,
        # Of those, what sat in kernel socket buffers at the kill (the proxy's send queues
        # and the client's receive queues): counted as sent, read by no process, lost to
        # any client. The rest is what the killed process had read and not kept.
        "in_kernel_at_kill_mb": in_kernel / MB,
        "lost_by_process_mb": (first + second - clean - in_kernel) / MB,
    }


def _queued_between(port: int) -> int:
    """Bytes queued in the kernel on the connections of the proxy listening on `port`
    (its send queues, its clients' receive queues), from /proc/net/tcp; 0 off Linux."""
    total = 0
    with contextlib.suppress(OSError), open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            local, remote, state, queues = fields[1], fields[2], fields[3], fields[4]
            if state != "01":  # ESTABLISHED
                continue
            tx, rx = (int(x, 16) for x in queues.split(":"))
            if int(local.rpartition(":")[2], 16) == port:
                total += tx
            elif int(remote.rpartition(":")[2], 16) == port:
                total += rx
    return total


def _du(path: Path) -> int:
    return path.stat().st_blocks * 512


def measure_disk(b: Bench, cache: Path) -> dict[str, Any]:
    image = next(cache.rglob(BIG))
    zero_share = b.zeros[BIG] * CLUSTER / image.stat().st_size
    allocated = _du(image)
    total = sum(_du(p) for p in cache.rglob("*") if p.is_file() and not p.is_symlink())
    return {
        "apparent_mb": image.stat().st_size / MB,
        "allocated_mb": allocated / MB,
        "allocated_share": allocated / image.stat().st_size,
        "zero_share": zero_share,
        "holes": allocated <= image.stat().st_size * (1 - zero_share) * 1.05 + CLUSTER,
        "cache_allocated_mb": total / MB,
    }


def publish_ours(b: Bench) -> float:
    work = b.fresh("publish")
    b._n += 1
    args = [
        *CLI, "publish", "--input", str(b.inputs), "--version", VERSION,
        "--to", b.registry.ref(f"pub/ours{b._n}"), "--key", str(b.key),
        "--platform", "linux/amd64", "--level", "3", "--work-dir", str(work / "w"),
    ]  # fmt: skip
    return _timed(lambda: run(args))


def publish_plain(b: Bench) -> float:
    """zstd -T0 -3 of the same files, then skopeo copy of a plain OCI layout.

    skopeo remembers in its blob-info cache (/var/lib/containers/cache for root) which
    repositories hold a blob, and mounts it from there instead of uploading: from the
    second run on it would push nothing. Each run gets an empty cache of its own
    (`_CONTAINERS_ROOTLESS_UID` makes containers/image honour `XDG_DATA_HOME` as root),
    so the bytes really go over the wire, as in `publish_ours`.
    """
    work = b.fresh("plain")
    b._n += 1
    dest = f"docker://{b.registry.host}/pub/plain{b._n}:v1"
    env = {**_child_env(), "_CONTAINERS_ROOTLESS_UID": "1000", "XDG_DATA_HOME": str(work / "xdg")}

    def go() -> None:
        layout = work / "oci"
        blobs = layout / "blobs" / "sha256"
        blobs.mkdir(parents=True)
        layers = []
        for x in b.layers:
            src = b.inputs / x.output
            out = work / x.title
            if x.compressed:
                run(["zstd", "-q", "-T0", "-3", str(src), "-o", str(out)])
            else:
                shutil.copyfile(src, out)
            h = hashlib.sha256()
            with out.open("rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            os.link(out, blobs / h.hexdigest())
            layers.append(
                {
                    "mediaType": "application/octet-stream",
                    "digest": f"sha256:{h.hexdigest()}",
                    "size": out.stat().st_size,
                    "annotations": {"org.opencontainers.image.title": x.title},
                }
            )
        (blobs / ("44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a")).write_text(
            "{}"
        )
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {
                    "mediaType": "application/vnd.oci.empty.v1+json",
                    "digest": "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a",
                    "size": 2,
                },
                "layers": layers,
            }
        ).encode()
        mdigest = hashlib.sha256(manifest).hexdigest()
        (blobs / mdigest).write_bytes(manifest)
        (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
        (layout / "index.json").write_text(
            json.dumps(
                {
                    "schemaVersion": 2,
                    "manifests": [
                        {
                            "mediaType": "application/vnd.oci.image.manifest.v1+json",
                            "digest": f"sha256:{mdigest}",
                            "size": len(manifest),
                            "annotations": {"org.opencontainers.image.ref.name": "v1"},
                        }
                    ],
                }
            )
        )
        run(["skopeo", "copy", "-q", "--dest-tls-verify=false", f"oci:{layout}:v1", dest], env=env)

    return _timed(go)


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "load": " ".join(f"{x:.1f}" for x in os.getloadavg()),
    }


@contextlib.contextmanager
def _servers(tmp: Path) -> Iterator[tuple[RegistryServer, StaticServer]]:
    (tmp / "static").mkdir()
    registry = RegistryServer(tmp / "registry")
    static = StaticServer(tmp / "static")
    try:
        registry.start()
        static.start()
        yield registry, static
    finally:
        static.stop()
        registry.close()


def _clear(paths: list[Path]) -> None:
    for p in paths:
        shutil.rmtree(p, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="size factor (1 = ~596 MB)")
    parser.add_argument("--reps", type=int, default=3, help="cold pulls per method (median)")
    parser.add_argument("--no-legacy", action="store_true", help="skip exec-sandbox 0.22.0")
    parser.add_argument("--warm-calls", type=int, default=2000)
    parser.add_argument(
        "--rss-mib", type=float, default=1024, help="image size for the RSS run (x --scale)"
    )
    parser.add_argument(
        "--throttle-mib",
        type=float,
        default=1024,
        help="blob size for the throttled-link run (x --scale)",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--link",
        type=LinkProfile.parse,
        action="append",
        default=[],
        metavar="RTT:PER_CONN:TOTAL",
        help="also pull through a simulated link: round trip in ms, MB/s per connection "
        "and in total (e.g. 50:25:125 and 150:10:60); may be repeated",
    )
    parser.add_argument(
        "--link-only", action="store_true", help="only the link runs (no loopback figures)"
    )
    parser.add_argument(
        "--baseline-src",
        type=Path,
        help="another checkout's src/ (e.g. main's): adds its registry pull as 'before' rows, "
        "interleaved with ours",
    )
    args = parser.parse_args(argv)
    for tool in ("docker-registry", "skopeo", "zstd", "curl", "openssl"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} not found (apt-get install docker-registry skopeo zstd curl)")

    started = time.perf_counter()
    compile_package()
    if args.baseline_src is not None:
        compile_package(args.baseline_src)
    results: dict[str, Any] = {"machine": _machine(), "scale": args.scale, "reps": args.reps}
    legacy = None if args.no_legacy else legacy_python()
    if args.no_legacy:
        print("exec-sandbox 0.22.0: skipped (--no-legacy)")
    with (
        tempfile.TemporaryDirectory(prefix="esa-peers-") as tmp_s,
        _servers(Path(tmp_s)) as (registry, static),
    ):
        b = setup(Path(tmp_s), args.scale, registry, static)
        results["release"] = {
            "layers": len(b.layers),
            "compressed_mb": b.compressed_bytes / MB,
            "decompressed_mb": b.content_bytes / MB,
        }
        methods: dict[str, Callable[[], float]] = {
            "shell (curl+openssl+zstd, 4 parallel)": lambda: pull_shell(b),
            "skopeo copy + zstd -d": lambda: pull_skopeo(b),
            "oras-py pull + zstd -d": lambda: pull_oras(b),
        }
        ours_caches: list[Path] = []
        legacy_caches: list[Path] = []
        if legacy is not None:
            py = legacy
            methods[f"exec-sandbox {LEGACY_VERSION} (GitHub-like static server)"] = lambda: (
                pull_legacy(b, py, legacy_caches)
            )
        if args.baseline_src is not None:
            base = args.baseline_src
            methods[BEFORE_FULL] = lambda: pull_ours_registry(b, src=base)
        methods["ours: pull --all from registry (verified)"] = lambda: pull_ours_registry(
            b, ours_caches
        )
        methods["ours: pull --all from releases folder (verified)"] = lambda: pull_ours_releases(b)
        times: dict[str, list[float]] = {m: [] for m in methods}
        cpu: dict[str, list[float]] = {m: [] for m in methods}
        for rep in range(0 if args.link_only else args.reps):
            for name, fn in methods.items():
                try:
                    took = fn()
                    assert b.last is not None
                    b.check_outputs(b.last)
                    times[name].append(took)
                    cpu[name].append(CHILD_CPU[-1])
                except Exception as exc:
                    print(f"  {name}: FAILED: {exc}", flush=True)
                # Keep only the last cache of ours and of 0.22.0 (for warm/disk).
                _clear(ours_caches[:-1] + legacy_caches[:-1])
                del ours_caches[:-1], legacy_caches[:-1]
                for p in (b.tmp / "runs").iterdir():
                    if p not in ours_caches and p not in legacy_caches:
                        shutil.rmtree(p)
            print(f"rep {rep + 1}/{args.reps} done", flush=True)
        results["cold"] = {m: _row(times[m], cpu[m]) for m in methods}
        results["link_only"] = args.link_only
        results["round_trips"] = {"ours": count_round_trips(b)}
        if args.baseline_src is not None:
            results["round_trips"]["before"] = count_round_trips(b, args.baseline_src)
        results["links"] = []
        for link in args.link:
            results["links"].append(run_link(b, link, args.reps, legacy, args.baseline_src))
            print(f"link {link.name} done", flush=True)

        extra: dict[str, Any] = {}
        steps: dict[str, Callable[[], Any]] = {}
        if ours_caches:
            steps["warm_ours_us"] = lambda: warm_ours(b, ours_caches[-1], args.warm_calls)
            steps["disk"] = lambda: measure_disk(b, ours_caches[-1])
        if legacy is not None and legacy_caches:
            lpy = legacy
            steps["warm_legacy_us"] = lambda: legacy_warm(
                b, lpy, legacy_caches[-1], args.warm_calls
            )
        rss_size = max(int(args.rss_mib * args.scale * 2**20), 2 * CLUSTER)
        steps["cli_startup_s"] = lambda: _median(
            [_timed(lambda: run([*CLI, "--help"])) for _ in range(args.reps)]
        )
        steps["rss"] = lambda: measure_rss(b, rss_size)
        steps["resume"] = lambda: measure_resume(b)
        throttle_size = max(int(args.throttle_mib * args.scale * 2**20), 2 * CLUSTER)
        steps["throttle"] = lambda: measure_throttle(b, throttle_size)

        def publish() -> dict[str, Any]:
            ours = [publish_ours(b) for _ in range(args.reps)]
            plain = [publish_plain(b) for _ in range(args.reps)]
            return {"ours_s": _median(ours), "zstd_T0_skopeo_s": _median(plain)}

        steps["publish"] = publish
        for name, step in {} if args.link_only else steps.items():
            try:
                extra[name] = step()
            except Exception as exc:
                print(f"  {name}: FAILED: {exc}", flush=True)
            keep = ours_caches + legacy_caches
            _clear([p for p in (b.tmp / "runs").iterdir() if p not in keep])
        results.update(extra)
    results["total_s"] = time.perf_counter() - started
    results["targets"] = [] if args.link_only else targets(results)
    print_report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


RESUME_CHUNK = 1 << 20  # the client's download chunk (store.CHUNK)


def targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue #10's targets: what was measured and whether it is met (None: not measured)."""
    cold = {k: v["median_s"] for k, v in r["cold"].items()}
    ours = next((v for k, v in cold.items() if k.startswith("ours: pull --all from registry")), 0)
    shell = next((v for k, v in cold.items() if k.startswith("shell")), 0)
    legacy = next((v for k, v in cold.items() if k.startswith("exec-sandbox")), 0)
    out: list[dict[str, Any]] = []

    def add(name: str, measured: str, met: bool | None) -> None:
        out.append({"target": name, "measured": measured, "met": met})

    ok = bool(ours and shell)
    add(
        "cold pull <= 1.1x the shell pipeline",
        f"{ours / shell:.2f}x" if ok else "n/a",
        ours <= 1.1 * shell if ok else None,
    )
    ok = bool(ours and legacy)
    add(
        f"cold pull >= 2x faster than exec-sandbox {LEGACY_VERSION}",
        f"{legacy / ours:.2f}x" if ok else "n/a",
        legacy >= 2 * ours if ok else None,
    )
    w = r.get("warm_ours_us", {})
    for call, arg, limit in (
        ("ensure_assets", "()", 45),
        ("ensure_assets_available", '("python")', 130),
    ):
        add(
            f"warm {call}{arg} <= {limit} µs median, 0 requests",
            f"{w[call]:.1f} µs, {w[call + '_connections']} conn." if call in w else "n/a",
            w[call] <= limit and w[call + "_connections"] == 0 if call in w else None,
        )
    x = r.get("rss")
    add(
        "peak RSS < 100 MiB above baseline pulling a 1 GiB image",
        f"{x['above_baseline_mib']:.1f} MiB ({x['image_mb']:.0f} MB image)" if x else "n/a",
        x["above_baseline_mib"] < 100 if x else None,
    )
    x = r.get("resume")
    add(
        "resume re-downloads at most one chunk (1 MiB)",
        (
            f"{x['lost_by_process_mb']:.2f} MB lost by the process "
            f"(+{x['in_kernel_at_kill_mb']:.2f} MB in socket buffers)"
            if x
            else "n/a"
        ),
        x["killed_half_way"] and x["lost_by_process_mb"] * MB <= RESUME_CHUNK if x else None,
    )
    x = r.get("throttle")
    add(
        "throttled link (50 MB/s per connection) >= 3x faster than one connection",
        f"{x['speedup']:.2f}x ({x['blob_mb']:.0f} MB blob)" if x else "n/a",
        x["speedup"] >= 3 and x["chunks_verified"] if x else None,
    )
    x = r.get("disk")
    add(
        "zero runs stored as holes",
        f"{x['allocated_share']:.0%} of apparent allocated, {x['zero_share']:.0%} zeros"
        if x
        else "n/a",
        bool(x["holes"]) if x else None,
    )
    x = r.get("publish")
    add(
        "publish at least as fast as zstd -T0 + plain push",
        f"{x['ours_s'] / x['zstd_T0_skopeo_s']:.2f}x its time" if x else "n/a",
        x["ours_s"] <= x["zstd_T0_skopeo_s"] if x else None,
    )
    return out


def print_report(r: dict[str, Any]) -> None:
    m = r["machine"]
    rel = r["release"]
    print()
    print(
        f"{m['date']}, {m['nproc']} CPUs ({m['cpu']}), Python {m['python']}; scale {r['scale']}: "
        f"{rel['layers']} layers, {rel['compressed_mb']:.1f} MB compressed -> "
        f"{rel['decompressed_mb']:.1f} MB; median of {r['reps']}; load average "
        f"{m['load']}"
    )
    for label, x in r.get("round_trips", {}).items():
        print_round_trips(label, x)
    for link in r.get("links", []):
        print_link(link)
    if r.get("link_only"):
        return
    cold = {k: v["median_s"] for k, v in r["cold"].items()}
    shell = next((v for k, v in cold.items() if k.startswith("shell")), float("nan"))
    legacy = next((v for k, v in cold.items() if k.startswith("exec-sandbox")), float("nan"))
    width = max(len(k) for k in cold)
    print(f"\n{'cold pull, all layers':<{width}} {'median s':>9} {'MB/s out':>9} "
          f"{'vs shell':>9} {'vs 0.22.0':>10} {'CPU s':>6}")  # fmt: skip
    for name, secs in cold.items():
        vs_legacy = f"{legacy / secs:>9.2f}x" if legacy == legacy else f"{'-':>10}"
        cpu = r["cold"][name].get("cpu_s", float("nan"))
        print(
            f"{name:<{width}} {secs:>9.2f} {rel['decompressed_mb'] / secs:>9.0f} "
            f"{secs / shell:>8.2f}x {vs_legacy} {cpu:>6.2f}"
        )
    print(
        "  (vs shell: time / shell time, lower is better; vs 0.22.0: 0.22.0 time / time;"
        " CPU s: user + system of the command's processes, median)"
    )
    if "cli_startup_s" in r:
        print(
            f"  (ours includes a Python start: `exec-sandbox-assets --help` takes "
            f"{r['cli_startup_s']:.2f}s)"
        )
    print()
    if "warm_ours_us" in r:
        w = r["warm_ours_us"]
        lw = r.get("warm_legacy_us", {})
        for call in ("ensure_assets", "ensure_assets_available"):
            lv = f", 0.22.0 {lw[call]:.1f} µs" if call in lw else ""
            arg = '("python")' if call.endswith("available") else "()"
            print(
                f"warm {call}{arg}: {w[call]:.1f} µs median{lv}; "
                f"network connections: {w[call + '_connections']}"
            )
    if "rss" in r:
        x = r["rss"]
        print(
            f"peak RSS fetching a {x['image_mb']:.0f} MB image: {x['above_baseline_mib']:.1f} MiB "
            f"above the interpreter's {x['baseline_mib']:.1f} MiB (peak {x['peak_mib']:.1f} MiB)"
        )
    if "resume" in r:
        x = r["resume"]
        print(
            f"resume: killed at {x['partial_at_kill_mb']:.1f} of {x['blob_mb']:.1f} MB "
            f"(killed: {x['killed_half_way']}); downloaded again {x['downloaded_again_mb']:.1f} MB "
            f"(runs {x['first_run_mb']:.1f} + {x['second_run_mb']:.1f} MB, "
            f"clean pull {x['clean_pull_mb']:.1f} MB): {x['in_kernel_at_kill_mb']:.2f} MB were in "
            f"socket buffers at the kill, {x['lost_by_process_mb']:.2f} MB lost by the process"
        )
    if "throttle" in r:
        x = r["throttle"]
        print(
            f"throttled link ({x['rate_mb_s']:.0f} MB/s per connection), {x['blob_mb']:.1f} MB blob: "
            f"curl {x['curl_one_connection_s']:.2f}s, ours {x['ours_s']:.2f}s "
            f"({x['ours_connections']} connections, chunks verified: {x['chunks_verified']}): "
            f"{x['speedup']:.2f}x; the whole pull of that image {x['pull_s']:.2f}s"
        )
    if "disk" in r:
        x = r["disk"]
        print(
            f"disk: installed image {x['apparent_mb']:.1f} MB apparent, {x['allocated_mb']:.1f} MB "
            f"allocated ({x['allocated_share']:.0%}; zero clusters {x['zero_share']:.0%}; "
            f"holes: {'yes' if x['holes'] else 'no'}); whole cache {x['cache_allocated_mb']:.1f} MB"
        )
    if "publish" in r:
        x = r["publish"]
        print(
            f"publish (level 3): ours {x['ours_s']:.2f}s, zstd -T0 -3 + skopeo copy "
            f"{x['zstd_T0_skopeo_s']:.2f}s ({x['ours_s'] / x['zstd_T0_skopeo_s']:.2f}x)"
        )
    print()
    width = max(len(t["target"]) for t in r["targets"])
    print(f"{'target (issue #10)':<{width}}  {'measured':<40} met")
    for t in r["targets"]:
        met = {True: "yes", False: "NO", None: "-"}[t["met"]]
        print(f"{t['target']:<{width}}  {t['measured']:<40} {met}")
    print(f"\ntotal {r['total_s']:.0f}s")


if __name__ == "__main__":
    raise SystemExit(main())
