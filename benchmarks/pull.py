"""Pull-path benchmark: cold pull throughput, memory, and warm-path latency.

Starts a real `docker-registry` on 127.0.0.1, publishes a sample release whose files
are SIZE MiB each, then measures in the same run:

  baseline  curl of the largest blob to /dev/null and to a file (what the wire allows)
  baseline  httpx download + sha256, then zstd decompress + sha256, sequential, no fsync
  ours      cold fetch of kernel + python base image: download, verify, decompress,
            verify content, atomic install (in a subprocess, for its peak RSS), and
            the disk the installed image takes (zero runs are written as holes)
  ours      warm `ensure_assets()` in a fresh interpreter (import + stat checks)
  baseline  a fresh interpreter that only stats the same files

Prints figures and ratios. Run: `python benchmarks/pull.py [--size-mib 256]`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import httpx

from exec_sandbox_assets.publish.publisher import PublishRequest, publish
from exec_sandbox_assets.publish.sample import make_sample_inputs
from exec_sandbox_assets.release import catalog, keys
from servers import RegistryServer

MiB = 1024 * 1024

_PULL = """
import asyncio, json, sys, time
from exec_sandbox_assets import configure, fetch_kernel, fetch_base_image
configure()
t = time.perf_counter()
# The cold path imports the network and crypto stack lazily: timed on its own.
import exec_sandbox_assets.sources, exec_sandbox_assets.oci.registry, exec_sandbox_assets.release.keys
imports = time.perf_counter() - t
t = time.perf_counter()
async def main():
    return await asyncio.gather(fetch_kernel(), fetch_base_image("python"))
paths = asyncio.run(main())
elapsed = time.perf_counter() - t
# VmHWM, not ru_maxrss: the latter counts the parent's pages from before exec().
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
rss = int(hwm.split()[1]) * 1024
print(json.dumps({"seconds": elapsed, "imports": imports, "rss": rss, "paths": [str(p) for p in paths]}))
"""

_WARM = """
import asyncio, time
t = time.perf_counter()
from exec_sandbox_assets import ensure_assets
asyncio.run(ensure_assets(download=False))
print(time.perf_counter() - t)
"""

_STAT = """
import os, sys, time
t = time.perf_counter()
for p in sys.argv[1:]:
    os.stat(p)
print(time.perf_counter() - t)
"""


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def _time(fn: object, repeat: int = 3) -> float:
    assert callable(fn)
    runs = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t)
    return _median(runs)


def _py(code: str, env: dict[str, str], *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code, *args], env=env, check=True, capture_output=True, text=True
    )
    return out.stdout.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256, help="size of each sample file")
    args = parser.parse_args()
    size = args.size_mib * MiB

    with tempfile.TemporaryDirectory(prefix="esa-bench-") as tmp_s:
        tmp = Path(tmp_s)
        inputs = make_sample_inputs(tmp / "in", arches=("x86_64",), size=size)
        key = keys.generate_key()
        keys.write_key_pair(key, tmp / "k.key", tmp / "k.pub", None)
        with RegistryServer(tmp / "reg") as reg:
            ref = reg.ref("bench/assets")
            t = time.perf_counter()
            result = publish(
                PublishRequest(
                    inputs=(inputs,),
                    version="1.0.0",
                    targets=(ref,),
                    keys=(tmp / "k.key",),
                    work_dir=tmp / "work",
                    level=3,  # the pull is measured here, not the release-time level
                )
            )
            print(
                f"publish (level 3, {len(result.manifest_digests)} platform): "
                f"{time.perf_counter() - t:.1f}s"
            )

            manifest = json.loads(
                httpx.get(
                    f"{reg.url}/v2/bench/assets/manifests/{result.manifest_digests[('linux', 'amd64')]}",
                    headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
                ).content
            )
            layers = {lyr["annotations"][catalog.ANN_TITLE]: lyr for lyr in manifest["layers"]}
            big = layers[catalog.base_image("python", "x86_64").name]
            kern = layers[catalog.kernel("x86_64").name]
            pulled_bytes = big["size"] + kern["size"]
            content_bytes = int(big["annotations"][catalog.ANN_CONTENT_SIZE]) + int(
                kern["annotations"][catalog.ANN_CONTENT_SIZE]
            )
            url = f"{reg.url}/v2/bench/assets/blobs/{big['digest']}"
            mb = big["size"] / 1e6

            curl = shutil.which("curl")
            if curl:
                t_null = _time(
                    lambda: subprocess.run([curl, "-sf", "-o", "/dev/null", url], check=True)
                )
                out = tmp / "curl.out"
                t_file = _time(
                    lambda: subprocess.run([curl, "-sf", "-o", str(out), url], check=True)
                )
                print(f"baseline curl -> /dev/null : {mb / t_null:8.0f} MB/s")
                print(f"baseline curl -> file      : {mb / t_file:8.0f} MB/s")

            def naive_pull() -> None:
                # The simplest correct pipeline, sequential, without fsync: download +
                # sha256 to a file, then decompress + sha256 to the output file.
                import zstandard

                for layer in (kern, big):
                    blob_url = f"{reg.url}/v2/bench/assets/blobs/{layer['digest']}"
                    h = hashlib.sha256()
                    blob = tmp / "naive.blob"
                    with httpx.stream("GET", blob_url) as r, blob.open("wb") as f:
                        for chunk in r.iter_raw(MiB):
                            h.update(chunk)
                            f.write(chunk)
                    assert "sha256:" + h.hexdigest() == layer["digest"]
                    h = hashlib.sha256()
                    with blob.open("rb") as src, (tmp / "naive.out").open("wb") as out:
                        reader = zstandard.ZstdDecompressor().stream_reader(src)
                        while chunk := reader.read(MiB):
                            h.update(chunk)
                            out.write(chunk)
                    content = layer["annotations"][catalog.ANN_CONTENT_DIGEST]
                    assert "sha256:" + h.hexdigest() == content

            t_naive = _time(naive_pull)
            print(
                f"baseline naive pipeline    : {pulled_bytes / 1e6 / t_naive:8.0f} MB/s compressed, "
                f"{content_bytes / 1e6 / t_naive:.0f} MB/s decompressed output, {t_naive:.2f}s"
            )

            env = {k: v for k, v in os.environ.items() if not k.startswith("EXEC_SANDBOX_")}
            env |= {
                "EXEC_SANDBOX_REGISTRY": ref,
                "EXEC_SANDBOX_TRUSTED_KEYS": str(tmp / "k.pub"),
                "EXEC_SANDBOX_ASSET_VERSION": "1.0.0",
                "EXEC_SANDBOX_AIRGAP": "1",
                "EXEC_SANDBOX_IMAGES_DIR": str(tmp / "none"),
            }
            colds: list[float] = []
            imports: list[float] = []
            rss = 0
            paths: list[str] = []
            for i in range(3):
                env["EXEC_SANDBOX_CACHE_DIR"] = str(tmp / f"cache{i}")
                run = json.loads(_py(_PULL, env))
                colds.append(run["seconds"])
                imports.append(run["imports"])
                rss = max(rss, run["rss"])
                paths = run["paths"]
            cold = _median(colds)
            print(
                f"ours cold pull (2 files)   : {pulled_bytes / 1e6 / cold:8.0f} MB/s compressed, "
                f"{content_bytes / 1e6 / cold:.0f} MB/s decompressed output, {cold:.2f}s"
            )
            print(
                f"ours cold-path imports     : {_median(imports) * 1e3:8.0f} ms (httpx, cryptography)"
            )
            print(f"ours peak RSS              : {rss / MiB:8.0f} MiB (files of {size // MiB} MiB)")
            print(
                f"speed ratio naive/ours     : {t_naive / cold:8.2f}x "
                "(ours also fsyncs and installs atomically, files in parallel)"
            )
            image = Path(paths[1]).stat()
            print(
                f"ours disk use of the image : {image.st_blocks * 512 / MiB:8.0f} MiB allocated "
                f"of {image.st_size / MiB:.0f} MiB (zero runs are holes)"
            )

            # Warm path: everything ensure_assets needs is in cache2; time a fresh process.
            env["EXEC_SANDBOX_OFFLINE"] = "1"
            # Installed packages have bytecode; this sandbox sets PYTHONDONTWRITEBYTECODE.
            env.pop("PYTHONDONTWRITEBYTECODE", None)
            gv = catalog.gvproxy(*catalog.host_platform()).output_name
            subprocess.run(
                [
                    sys.executable,
                    "-c",
                    "import asyncio; from exec_sandbox_assets import "
                    "fetch_gvproxy, fetch_initramfs; asyncio.run(fetch_initramfs());"
                    "asyncio.run(fetch_gvproxy())",
                ],
                env={**env, "EXEC_SANDBOX_OFFLINE": "0"},
                check=True,
            )
            warm = _median([float(_py(_WARM, env)) for _ in range(5)])
            files = [*paths, str(Path(paths[0]).parent / gv)]
            stat = _median([float(_py(_STAT, env, *files)) for _ in range(5)])
            print(
                f"ours warm ensure_assets    : {warm * 1e3:8.1f} ms (import + checks, fresh process)"
            )
            print(f"baseline stat of the files : {stat * 1e3:8.3f} ms")


if __name__ == "__main__":
    main()
