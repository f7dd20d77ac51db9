"""Delta upgrades (issue 16): what a host holding release N downloads to get N+1.

    python3 benchmarks/delta.py                      # the issue's scenario, full scale
    python3 benchmarks/delta.py --scale 0.02 --level 3 --ext4-mib 8   # CI-sized

Scenario (one platform, linux/amd64): base images of 96/48/24 MiB (qcow2-like clusters
from this machine's files, `compress_levels.qcow2_like`), each release rewriting 1.5% of
every image in three places, inserting 1 MiB part-way (everything after it shifts) and
appending 2%; new kernels (vmlinuz, vmlinux) every release; initramfs and gvproxy
unchanged. New material is fresh (words and random bytes the old image does not hold),
so a patch cannot find it elsewhere in the old file.

Three releases are published to a real registry (docker-registry) with `publish`
(patches from the last two, as by default), then pulled through a counting proxy by
`exec-sandbox-assets` in child processes: a full pull of N+1 into an empty cache, N ->
N+1, and N-1 -> N+1 (a skipped release). For each: bytes and requests on the wire,
seconds, the peak RSS above the process baseline. Also the first-install cost (bytes a
fresh host pulls with and without patches named) and, with `mke2fs` and `qemu-img`,
two ext4 file systems built reproducibly from a directory tree (the second with a few
percent of the files changed), as qcow2: the fraction of the layer a patch is.
Figures: docs/performance.md, "Delta upgrades".
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))  # this checkout's
sys.path.insert(1, str(ROOT / "tests"))  # servers
sys.path.insert(2, str(ROOT / "benchmarks"))

import zstandard  # noqa: E402
from compress_levels import qcow2_like  # noqa: E402

from exec_sandbox_assets.publish import PublishRequest, publish  # noqa: E402
from exec_sandbox_assets.publish.compress import DEFAULT_LEVEL  # noqa: E402
from exec_sandbox_assets.release import keys  # noqa: E402
from exec_sandbox_assets.release.patchcodec import make_patch  # noqa: E402
from servers import FaultProxy, RegistryServer  # noqa: E402

MiB = 1 << 20
IMAGES = {  # output name -> MiB at scale 1
    "python-3.14-base-x86_64.qcow2": 96,
    "node-1.3-base-x86_64.qcow2": 48,
    "raw-base-x86_64.qcow2": 24,
}
KERNELS = {"vmlinuz-x86_64": 6, "vmlinux-x86_64": 16}  # new every release
UNCHANGED = {"initramfs-x86_64": 4, "gvproxy-wrapper-linux-amd64": 12}
REWRITTEN, INSERTED_MIB, APPENDED = 0.015, 1, 0.02
_WORDS = (
    b"alpha beta gamma delta kernel module socket buffer python node import return class "
    b"void static const struct config release upgrade cluster sector inode extent journal"
).split()


def fresh(rng: random.Random, size: int) -> bytes:
    """New material: 3/4 text of random words and numbers, 1/4 random bytes."""
    text = bytearray()
    while len(text) < size * 3 // 4:
        text += b" ".join(rng.choices(_WORDS, k=64)) + b" %d\n" % rng.randrange(1 << 30)
    out = bytes(text[: size * 3 // 4]) + rng.randbytes(size - size * 3 // 4)
    return out[:size]


@dataclass
class Release:
    files: dict[str, bytes]
    material: bytes  # what is new in it (changed regions, insertions, appends, kernels)


def first_release(scale: float) -> Release:
    files: dict[str, bytes] = {}
    for i, (name, mib) in enumerate(IMAGES.items()):
        files[name] = qcow2_like(int(mib * MiB * scale), seed=i)
    rng = random.Random("unchanged")
    for name, mib in {**KERNELS, **UNCHANGED}.items():
        files[name] = fresh(rng, int(mib * MiB * scale))
    return Release(files, b"")


def next_release(prev: Release, number: int, scale: float) -> Release:
    rng = random.Random(f"release-{number}")
    files = dict(prev.files)
    material = bytearray()
    for name in IMAGES:
        data = bytearray(files[name])
        size = len(data)
        part = int(size * REWRITTEN / 3)
        for _ in range(3):
            at = rng.randrange(0, size - part)
            new = fresh(rng, part)
            data[at : at + part] = new
            material += new
        inserted = fresh(rng, int(INSERTED_MIB * MiB * scale))
        mid = rng.randrange(size // 3, 2 * size // 3)
        data[mid:mid] = inserted
        appended = fresh(rng, int(size * APPENDED))
        data += appended
        material += inserted + appended
        files[name] = bytes(data)
    for name, mib in KERNELS.items():
        files[name] = fresh(rng, int(mib * MiB * scale))
        material += files[name]
    return Release(files, bytes(material))


def write_dist(release: Release, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name, data in release.files.items():
        (dest / name).write_bytes(data)
        if name.startswith("gvproxy"):
            (dest / name).chmod(0o755)
    return dest


# -- pulls in child processes ---------------------------------------------------------------

_DRIVER = """
import asyncio, json, os, resource, sys, time
from exec_sandbox_assets.client import AssetClient
from exec_sandbox_assets.config import load_settings
from exec_sandbox_assets.release import catalog
source, cache, key, version = sys.argv[1:5]
settings = load_settings(env={
    "EXEC_SANDBOX_AIRGAP": "1", "EXEC_SANDBOX_REGISTRY_MIRRORS": source,
    "EXEC_SANDBOX_ASSET_VERSION": version, "EXEC_SANDBOX_CACHE_DIR": cache,
    "EXEC_SANDBOX_TRUSTED_KEYS": key,
}).with_(local_build_dir=None, host_os="linux", host_goarch="amd64")
import exec_sandbox_assets.cache.delta, exec_sandbox_assets.sources.registry, zstandard
import threading
def status():
    out = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmHWM", "RssAnon"):
            out[key] = int(value.split()[0])
    return out
# Peak RSS (VmHWM) counts the mapped reference's page-cache pages too; the peak of
# anonymous memory (sampled) is what the process itself allocated.
peak_anon = [status()["RssAnon"]]
base = status()
done = threading.Event()
def sample():
    while not done.wait(0.02):
        peak_anon[0] = max(peak_anon[0], status()["RssAnon"])
threading.Thread(target=sample, daemon=True).start()
client = AssetClient(settings)
t = time.perf_counter()
asyncio.run(client.fetch(catalog.platform_assets("linux", "amd64")))
took = time.perf_counter() - t
done.set()
end = status()
print(json.dumps({"seconds": took, "peak_kib": end["VmHWM"] - base["VmHWM"],
    "peak_anon_kib": max(peak_anon[0], end["RssAnon"]) - base["RssAnon"],
    "how": {n: [o.how, o.downloaded, o.full] for n, o in client.obtained.items()}}))
"""


def pull(proxy: FaultProxy, ref: str, cache: Path, key: Path, version: str) -> dict[str, Any]:
    proxy.reset()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXEC_SANDBOX_")}
    env["PYTHONPATH"] = str(ROOT / "src")
    out = subprocess.run(
        [sys.executable, "-c", _DRIVER, ref, str(cache), str(key), version],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"pull of {version} FAILED:\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    result["bytes"] = proxy.bytes_to_client
    result["requests"] = len(proxy.requests)
    result["blob_requests"] = sum(1 for r in proxy.requests if "/blobs/" in r.path)
    return result


# -- ext4 images ----------------------------------------------------------------------------


def _tree(dest: Path, budget: int, rng: random.Random) -> None:
    """A directory tree of ~`budget` bytes copied from this machine's Python library."""
    src_root = Path(sys.prefix) / "lib"
    used = 0
    for path in sorted(src_root.rglob("*")):
        if used >= budget:
            break
        if path.is_file() and not path.is_symlink() and path.stat().st_size < 4 * MiB:
            rel = path.relative_to(src_root)
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            used += path.stat().st_size
    del rng


def _mutate_tree(root: Path, share: float, rng: random.Random) -> int:
    """Rewrite about `share` of the files (new contents, some grown) and add a few."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    changed = rng.sample(files, max(1, int(len(files) * share)))
    for path in changed:
        data = path.read_bytes()
        path.write_bytes(fresh(rng, max(256, len(data) + rng.randrange(0, 4096))))
    extra = root / "usr-local-new"
    extra.mkdir(exist_ok=True)
    for i in range(max(1, len(changed) // 10)):
        (extra / f"added-{i}.py").write_bytes(fresh(rng, 8192))
    return len(changed)


def _ext4(tree: Path, image: Path, mib: int) -> Path:
    # Fixed times on the tree too: mke2fs -d copies each file's times, and reading the
    # tree for the previous image moved its atimes.
    for path in [tree, *tree.rglob("*")]:
        os.utime(path, (1700000000, 1700000000), follow_symlinks=False)
    env = dict(os.environ, E2FSPROGS_FAKE_TIME="1700000000")
    uuid = "8a2f6b4e-0c1d-4e5f-9a7b-3c2d1e0f9a8b"
    raw = image.with_suffix(".raw")
    subprocess.run(
        [
            *("mke2fs", "-q", "-F", "-t", "ext4", "-d", str(tree), "-U", uuid),
            *("-E", f"hash_seed={uuid},lazy_itable_init=0,lazy_journal_init=0"),
            *(str(raw), f"{mib}M"),
        ],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(image)], check=True)
    raw.unlink()
    return image


def ext4_case(tmp: Path, mib: int, level: int) -> dict[str, Any] | None:
    if not (shutil.which("mke2fs") and shutil.which("qemu-img")):
        print("ext4 images: skipped (mke2fs or qemu-img missing: e2fsprogs, qemu-utils)")
        return None
    rng = random.Random("ext4")
    tree = tmp / "tree"
    _tree(tree, int(mib * MiB * 0.6), rng)
    old = _ext4(tree, tmp / "old.qcow2", mib)
    changed = _mutate_tree(tree, 0.03, rng)
    new = _ext4(tree, tmp / "new.qcow2", mib)
    # Built twice from the same tree, the image is byte-identical: reproducible.
    again = _ext4(tree, tmp / "again.qcow2", mib)
    reproducible = again.read_bytes() == new.read_bytes()
    layer = len(zstandard.ZstdCompressor(level=level).compress(new.read_bytes()))
    with old.open("rb") as o, new.open("rb") as n, (tmp / "ext4.patch").open("wb") as p:
        make_patch(o, n, p, 9)
    patch = (tmp / "ext4.patch").stat().st_size
    return {
        "image_bytes": new.stat().st_size,
        "files_changed": changed,
        "layer_bytes": layer,
        "patch_bytes": patch,
        "fraction": patch / layer,
        "reproducible": reproducible,
    }


# -- main -----------------------------------------------------------------------------------


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="image sizes x this (1: 96 MiB)")
    parser.add_argument("--level", type=int, default=DEFAULT_LEVEL, help="the layers' zstd level")
    parser.add_argument("--ext4-mib", type=int, default=128, help="ext4 image size (0: skip)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    results: dict[str, Any] = {"scale": args.scale, "level": args.level}
    with tempfile.TemporaryDirectory(prefix="esa-delta-") as tmp_s:
        tmp = Path(tmp_s)
        key = tmp / "release.key"
        keys.write_key_pair(keys.generate_key("ecdsa-p256"), key, tmp / "release.pub", None)
        releases = [first_release(args.scale)]
        for number in (1, 2):
            releases.append(next_release(releases[-1], number, args.scale))
        material = releases[2].material
        new_material = len(zstandard.ZstdCompressor(level=args.level).compress(material))
        with RegistryServer(tmp / "registry") as registry, FaultProxy(registry) as proxy:
            ref = registry.ref("bench/delta")
            publish_s = []
            for number, release in enumerate(releases):
                t = time.perf_counter()
                publish(
                    PublishRequest(
                        inputs=(write_dist(release, tmp / f"dist-{number}"),),
                        version=f"1.{number}.0",
                        targets=(ref,),
                        keys=(key,),
                        work_dir=tmp / f"work-{number}",
                        platforms=(("linux", "amd64"),),
                        created=f"2026-01-0{number + 1}T00:00:00Z",
                        level=args.level,
                    )
                )
                publish_s.append(time.perf_counter() - t)
            # The same N+1 without patches: what a first install costs without the feature.
            plain = registry.ref("bench/plain")
            publish(
                PublishRequest(
                    inputs=(tmp / "dist-2",),
                    version="1.2.0",
                    targets=(plain,),
                    keys=(key,),
                    work_dir=tmp / "work-2",
                    platforms=(("linux", "amd64"),),
                    created="2026-01-03T00:00:00Z",
                    level=args.level,
                    deltas=False,
                )
            )
            via, via_plain = proxy.ref("bench/delta"), proxy.ref("bench/plain")
            pub = tmp / "release.pub"
            full = pull(proxy, via, tmp / "c-full", pub, "1.2.0")
            plain_full = pull(proxy, via_plain, tmp / "c-plain", pub, "1.2.0")
            pull(proxy, via, tmp / "c-n1", pub, "1.1.0")
            up1 = pull(proxy, via, tmp / "c-n1", pub, "1.2.0")
            pull(proxy, via, tmp / "c-n2", pub, "1.0.0")
            up2 = pull(proxy, via, tmp / "c-n2", pub, "1.2.0")
        layers = sum(o[2] for o in full["how"].values())
        results.update(
            new_material_bytes=new_material,
            layer_bytes=layers,
            publish_seconds=publish_s,
            full=full,
            upgrade_n1=up1,
            upgrade_n2=up2,
            first_install_ratio=full["bytes"] / plain_full["bytes"],
            largest_image_bytes=max(len(releases[2].files[n]) for n in IMAGES),
        )
        print(
            f"scenario: images {', '.join(f'{m * args.scale:g}' for m in IMAGES.values())} MiB,"
            f" layers at level {args.level}: N+1 is {human(layers)} compressed; its new"
            f" material is {human(new_material)} compressed"
        )
        print(
            f"publish (3 releases, patches from the last two): {', '.join(f'{s:.1f}s' for s in publish_s)}"
        )
        print(
            f"{'pull of N+1':24} {'bytes':>12} {'x new':>7} {'requests':>9} {'seconds':>8} {'peak RSS':>10}"
        )
        for label, r in (
            ("full pull (empty cache)", full),
            ("upgrade N -> N+1", up1),
            ("upgrade N-1 -> N+1", up2),
        ):
            print(
                f"{label:24} {human(r['bytes']):>12} {r['bytes'] / new_material:>6.2f}x"
                f" {r['requests']:>9} {r['seconds']:>8.2f} {human(r['peak_kib'] * 1024):>10}"
            )
        for label, r in (("N -> N+1", up1), ("N-1 -> N+1", up2)):
            ways = ", ".join(f"{n}: {h}" for n, (h, _d, _f) in sorted(r["how"].items()))
            print(f"  {label}: {ways}")
        print(
            f"upgrade N -> N+1 downloads {up1['bytes'] / full['bytes']:.1%} of a full pull,"
            f" {up1['bytes'] / new_material:.2f}x the new material (target <= 2.5x)"
        )
        print(
            f"first install with patches named: {results['first_install_ratio']:.4f}x the bytes"
            " of the same release without (target <= 1.05x)"
        )
        print(
            f"peak RSS above baseline: full pull {human(full['peak_kib'] * 1024)}, upgrade"
            f" {human(up1['peak_kib'] * 1024)} (of which anonymous: full pull"
            f" {human(full['peak_anon_kib'] * 1024)}, upgrade"
            f" {human(up1['peak_anon_kib'] * 1024)}); largest image"
            f" {human(results['largest_image_bytes'])} (limit: largest image + 100 MiB)"
        )
        if args.ext4_mib:
            ext4 = ext4_case(tmp, args.ext4_mib, args.level)
            if ext4 is not None:
                results["ext4"] = ext4
                print(
                    f"ext4 (mke2fs -d, {args.ext4_mib} MiB, {ext4['files_changed']} files"
                    f" changed, qcow2 {human(ext4['image_bytes'])}, reproducible:"
                    f" {ext4['reproducible']}): layer {human(ext4['layer_bytes'])},"
                    f" patch {human(ext4['patch_bytes'])} = {ext4['fraction']:.1%} downloaded"
                )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
