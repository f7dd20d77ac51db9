"""OCI image layouts and oci-archives: real files, real tar archives, real skopeo."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from exec_sandbox_assets.base.errors import (
    AssetChecksumError,
    AssetNotFoundError,
    ConfigError,
    FormatError,
    SizeLimitError,
)
from exec_sandbox_assets.oci.archive import extract_archive, write_archive
from exec_sandbox_assets.oci.layout import LayoutReader
from exec_sandbox_assets.oci.layout_files import REF_NAME
from exec_sandbox_assets.oci.layout_writer import LayoutWriter
from exec_sandbox_assets.oci.model import (
    EMPTY_DESCRIPTOR,
    EMPTY_JSON,
    MEDIA_TYPE_IMAGE_CONFIG,
    MEDIA_TYPE_INDEX,
    MEDIA_TYPE_MANIFEST,
    Descriptor,
    Index,
    Manifest,
    Platform,
    signature_tag,
)

SKOPEO = "/usr/bin/skopeo"
ARTIFACT_TYPE = "application/vnd.exec-sandbox.assets.v1"
KERNEL_TYPE = "application/vnd.exec-sandbox.kernel.v1+zstd"
SIG_TYPE = "application/vnd.dev.cosign.simplesigning.v1+json"


@dataclass(frozen=True)
class Release:
    index: Descriptor
    index_bytes: bytes
    manifests: dict[str, Descriptor]  # by platform string
    layers: dict[str, bytes]  # digest -> content
    signature: Descriptor


def _layer(data: bytes, title: str) -> Descriptor:
    return Descriptor.for_bytes(KERNEL_TYPE, data, {"org.opencontainers.image.title": title})


def build_release(root: Path) -> Release:
    """A layout like a mirrored release: index of two platforms, tag vV, signature tag."""
    writer = LayoutWriter(root)
    writer.put_blob_bytes(EMPTY_JSON)
    layers: dict[str, bytes] = {}
    manifests: dict[str, Descriptor] = {}
    entries = []
    for os_, arch, cpu in (("linux", "amd64", "x86_64"), ("linux", "arm64", "aarch64")):
        data = f"kernel for {cpu}\n".encode() * 1000
        layer = _layer(data, f"vmlinuz-{cpu}.zst")
        assert writer.put_blob_bytes(data) == layer.digest
        layers[layer.digest] = data
        manifest = Manifest(
            config=EMPTY_DESCRIPTOR,
            layers=(layer,),
            artifact_type=ARTIFACT_TYPE,
            annotations={"org.opencontainers.image.version": "1.0.0"},
        )
        desc = writer.put_manifest(manifest.to_bytes())
        assert desc.media_type == MEDIA_TYPE_MANIFEST
        platform = Platform(os_, arch)
        manifests[str(platform)] = desc
        # No artifactType on index entries: skopeo 1.9 would rewrite the index (SPEC 3).
        entries.append(Descriptor(desc.media_type, desc.digest, desc.size, platform=platform))
    index = Index(
        manifests=tuple(entries),
        artifact_type=ARTIFACT_TYPE,
        annotations={"org.opencontainers.image.version": "1.0.0"},
    )
    index_bytes = index.to_bytes()
    index_desc = writer.put_manifest(index_bytes, tag="v1.0.0")
    assert index_desc.media_type == MEDIA_TYPE_INDEX

    payload = json.dumps({"critical": {"image": {"docker-manifest-digest": index_desc.digest}}})
    payload_desc = Descriptor.for_bytes(SIG_TYPE, payload.encode())
    writer.put_blob_bytes(payload.encode())
    config = json.dumps(
        {
            "architecture": "",
            "os": "",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [payload_desc.digest]},
        }
    ).encode()
    config_desc = Descriptor.for_bytes(MEDIA_TYPE_IMAGE_CONFIG, config)
    writer.put_blob_bytes(config)
    sig_manifest = Manifest(config=config_desc, layers=(payload_desc,))
    sig_desc = writer.put_manifest(sig_manifest.to_bytes(), tag=signature_tag(index_desc.digest))
    return Release(index_desc, index_bytes, manifests, layers, sig_desc)


# ---------------------------------------------------------------------------
# directories


def test_write_then_read_layout(tmp_path: Path) -> None:
    root = tmp_path / "layout"
    rel = build_release(root)

    assert json.loads((root / "oci-layout").read_bytes()) == {"imageLayoutVersion": "1.0.0"}
    with LayoutReader.open(root) as reader:
        tags = reader.tags()
        assert set(tags) == {"v1.0.0", signature_tag(rel.index.digest)}
        resolved = reader.resolve("v1.0.0")
        assert (resolved.digest, resolved.size) == (rel.index.digest, rel.index.size)
        assert resolved.media_type == MEDIA_TYPE_INDEX
        assert resolved.annotations[REF_NAME] == "v1.0.0"
        assert reader.resolve(signature_tag(rel.index.digest)).digest == rel.signature.digest

        assert reader.read_blob(rel.index.digest, 1 << 20) == rel.index_bytes
        index = Index.from_bytes(reader.read_blob(rel.index.digest, 1 << 20), "test")
        assert [str(m.platform) for m in index.manifests] == ["linux/amd64", "linux/arm64"]
        for entry in index.manifests:
            manifest = Manifest.from_bytes(reader.read_blob(entry.digest, 1 << 20), "test")
            for layer in manifest.layers:
                data = rel.layers[layer.digest]
                assert reader.read_blob(layer.digest, 1 << 20) == data
                assert reader.has_blob(layer.digest)
                assert reader.blob_size(layer.digest) == len(data)
                with reader.open_blob(layer.digest, offset=1234) as fh:
                    assert fh.read() == data[1234:]

        absent = "sha256:" + "0" * 64
        assert not reader.has_blob(absent)
        with pytest.raises(AssetNotFoundError, match=absent):
            reader.read_blob(absent, 100)
        with pytest.raises(SizeLimitError):
            reader.read_blob(rel.index.digest, rel.index.size - 1)
        with pytest.raises(FormatError):
            reader.read_blob("sha256:../../etc/passwd", 100)


def test_reader_sees_tags_added_later(tmp_path: Path) -> None:
    root = tmp_path / "layout"
    rel = build_release(root)
    with LayoutReader.open(root) as reader:
        LayoutWriter(root).tag(rel.index, "latest")
        assert reader.resolve("latest").digest == rel.index.digest


def test_retag_replaces_entry(tmp_path: Path) -> None:
    root = tmp_path / "layout"
    rel = build_release(root)
    writer = LayoutWriter(root)
    writer.tag(rel.index, "latest")
    writer.tag(rel.signature, "latest")
    entries = json.loads((root / "index.json").read_bytes())["manifests"]
    refs = [e["annotations"][REF_NAME] for e in entries]
    assert sorted(refs) == sorted(["v1.0.0", signature_tag(rel.index.digest), "latest"])
    with LayoutReader.open(root) as reader:
        assert reader.resolve("latest").digest == rel.signature.digest


def test_corrupt_blob_names_path(tmp_path: Path) -> None:
    root = tmp_path / "layout"
    rel = build_release(root)
    digest = next(iter(rel.layers))
    path = root / "blobs" / "sha256" / digest.removeprefix("sha256:")
    data = bytearray(path.read_bytes())
    data[10] ^= 0xFF
    path.write_bytes(bytes(data))
    with LayoutReader.open(root) as reader, pytest.raises(AssetChecksumError) as info:
        reader.read_blob(digest, 1 << 20)
    assert str(path) in str(info.value)
    assert info.value.expected == digest


def test_missing_tag_lists_tags_present(tmp_path: Path) -> None:
    root = tmp_path / "layout"
    rel = build_release(root)
    with LayoutReader.open(root) as reader, pytest.raises(AssetNotFoundError) as info:
        reader.resolve("v9.9.9")
    message = str(info.value)
    assert "v9.9.9" in message
    assert str(root) in message
    assert "v1.0.0" in message
    assert signature_tag(rel.index.digest) in message


def test_malformed_layout_files(tmp_path: Path) -> None:
    root = tmp_path / "layout"
    build_release(root)
    (root / "index.json").write_text('{"schemaVersion": 2, "manifests": [{"digest": 1}]}')
    with pytest.raises(FormatError) as info:
        LayoutReader.open(root)
    assert str(root / "index.json") in str(info.value)

    (root / "index.json").write_text('{"schemaVersion":2,"manifests":[]}')
    (root / "oci-layout").write_text("not json")
    with pytest.raises(FormatError) as info:
        LayoutReader.open(root)
    assert str(root / "oci-layout") in str(info.value)

    with pytest.raises(AssetNotFoundError):
        LayoutReader.open(tmp_path / "absent")
    (tmp_path / "plain").mkdir()
    with pytest.raises(FormatError, match="oci-layout"):
        LayoutReader.open(tmp_path / "plain")


def test_writer_refuses_non_layout_dir(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "readme").write_text("hi")
    with pytest.raises(ConfigError):
        LayoutWriter(tmp_path / "docs")
    # An existing empty dir, and an existing layout, are fine.
    (tmp_path / "empty").mkdir()
    LayoutWriter(tmp_path / "empty")
    LayoutWriter(tmp_path / "empty")
    assert json.loads((tmp_path / "empty" / "index.json").read_bytes())["manifests"] == []


def _leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob(".tmp-*"))


def test_blob_writes_verify_before_rename(tmp_path: Path) -> None:
    writer = LayoutWriter(tmp_path / "layout")
    data = b"x" * (3 * 1024 * 1024 + 7)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    src = tmp_path / "src.bin"
    src.write_bytes(data)

    with pytest.raises(AssetChecksumError):
        writer.put_blob_file(src, "sha256:" + "1" * 64, len(data))
    assert not writer.has_blob("sha256:" + "1" * 64)
    with pytest.raises(SizeLimitError):
        writer.put_blob_file(src, digest, len(data) - 1)
    with pytest.raises(AssetChecksumError):
        writer.put_blob_file(src, digest, len(data) + 1)  # short: source ends first
    assert not writer.has_blob(digest)
    writer.put_blob_file(src, digest, len(data))
    assert writer.blob_path(digest).read_bytes() == data

    with pytest.raises(AssetChecksumError):
        writer.put_blob_bytes(b"abc", digest)

    other = b"streamed" * 1000
    other_digest = "sha256:" + hashlib.sha256(other).hexdigest()
    with (
        pytest.raises(AssetChecksumError),
        writer.open_blob_writer(other_digest, len(other)) as out,
    ):
        out.write(other[:-1] + b"!")
    assert not writer.has_blob(other_digest)
    with pytest.raises(RuntimeError), writer.open_blob_writer(other_digest, len(other)) as out:
        out.write(other[:100])
        raise RuntimeError("source failed")
    assert not writer.has_blob(other_digest)
    with writer.open_blob_writer(other_digest, len(other)) as out:
        for i in range(0, len(other), 999):
            out.write(other[i : i + 999])
    assert writer.blob_path(other_digest).read_bytes() == other
    assert _leftovers(tmp_path / "layout") == []


def test_tag_refuses_incomplete_content(tmp_path: Path) -> None:
    writer = LayoutWriter(tmp_path / "layout")
    layer = _layer(b"never stored", "vmlinuz-x86_64.zst")
    manifest = Manifest(config=EMPTY_DESCRIPTOR, layers=(layer,)).to_bytes()
    writer.put_blob_bytes(EMPTY_JSON)
    with pytest.raises(AssetNotFoundError, match=layer.digest):
        writer.put_manifest(manifest, tag="v1")
    desc = Descriptor.for_bytes(MEDIA_TYPE_MANIFEST, manifest)
    index = Index(manifests=(desc,)).to_bytes()
    writer.put_blob_bytes(index)
    with pytest.raises(AssetNotFoundError):
        writer.tag(Descriptor.for_bytes(MEDIA_TYPE_INDEX, index), "v1")
    with pytest.raises(ConfigError):
        writer.tag(desc, "bad/tag")
    with LayoutReader.open(tmp_path / "layout") as reader:
        assert reader.tags() == {}


def test_concurrent_tagging_keeps_every_tag(tmp_path: Path) -> None:
    root = tmp_path / "layout"
    rel = build_release(root)
    errors: list[BaseException] = []

    def tagger(prefix: str) -> None:
        try:
            writer = LayoutWriter(root)  # own instance, as two processes would have
            for i in range(25):
                writer.tag(rel.index, f"{prefix}-{i}")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=tagger, args=(p,)) for p in ("a", "b", "c")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with LayoutReader.open(root) as reader:
        tags = reader.tags()
    expected = {f"{p}-{i}" for p in "abc" for i in range(25)}
    assert expected <= set(tags)
    assert len(tags) == len(expected) + 2
    assert _leftovers(root) == []


# ---------------------------------------------------------------------------
# archives


def test_archive_round_trip_in_place(tmp_path: Path) -> None:
    root = tmp_path / "layout"
    rel = build_release(root)
    archive = tmp_path / "out" / "release.tar"
    write_archive(root, archive)

    with tarfile.open(archive) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names[:2] == ["oci-layout", "index.json"]
    assert "index.json.lock" not in names
    assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 for m in members)
    assert not any(".tmp-" in n for n in names)
    blob_names = [n for n in names if n.startswith("blobs/sha256/")]
    assert blob_names == sorted(blob_names)
    assert list(archive.parent.iterdir()) == [archive]

    again = tmp_path / "again.tar"
    write_archive(root, again)
    assert again.read_bytes() == archive.read_bytes()  # deterministic

    with LayoutReader.open(archive, archive=True) as reader:
        assert reader.resolve("v1.0.0").digest == rel.index.digest
        assert reader.read_blob(rel.index.digest, 1 << 20) == rel.index_bytes
        for digest, data in rel.layers.items():
            assert reader.read_blob(digest, 1 << 20) == data
            assert reader.blob_size(digest) == len(data)
            # Two open streams at once: each keeps its own position.
            with reader.open_blob(digest, 100) as a, reader.open_blob(digest, 5000) as b:
                assert a.read(10) == data[100:110]
                assert b.read(10) == data[5000:5010]
                assert a.read() == data[110:]
        with pytest.raises(AssetNotFoundError):
            reader.resolve("nope")


def test_archive_corrupt_blob_names_archive(tmp_path: Path) -> None:
    root = tmp_path / "layout"
    rel = build_release(root)
    archive = tmp_path / "release.tar"
    write_archive(root, archive)
    digest, data = next(iter(rel.layers.items()))
    raw = bytearray(archive.read_bytes())
    at = raw.find(data[:200])
    assert at > 0
    raw[at + 5] ^= 0xFF
    archive.write_bytes(bytes(raw))
    with LayoutReader.open(archive, archive=True) as reader, pytest.raises(AssetChecksumError) as i:
        reader.read_blob(digest, 1 << 20)
    assert str(archive) in str(i.value)


def test_write_archive_refuses_corrupt_layout(tmp_path: Path) -> None:
    root = tmp_path / "layout"
    rel = build_release(root)
    digest = next(iter(rel.layers))
    path = root / "blobs" / "sha256" / digest.removeprefix("sha256:")
    path.write_bytes(b"y" + path.read_bytes()[1:])
    archive = tmp_path / "release.tar"
    with pytest.raises(AssetChecksumError):
        write_archive(root, archive)
    assert list(tmp_path.iterdir()) == [root]


def _tar_with(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> None:
    with tarfile.open(path, "w") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def test_archive_with_dot_slash_members(tmp_path: Path) -> None:
    blob = b"hello"
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    manifest = Manifest(config=EMPTY_DESCRIPTOR, layers=()).to_bytes()
    mdigest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": MEDIA_TYPE_MANIFEST,
                "digest": mdigest,
                "size": len(manifest),
                "annotations": {REF_NAME: "t"},
            }
        ],
    }
    archive = tmp_path / "dot.tar"
    _tar_with(
        archive,
        [
            _file("./oci-layout", b'{"imageLayoutVersion": "1.0.0"}'),
            _file("./index.json", json.dumps(index).encode()),
            _file(f"./blobs/sha256/{digest[7:]}", blob),
            _file(f"blobs/sha256/{mdigest[7:]}", manifest),
        ],
    )
    with LayoutReader.open(archive, archive=True) as reader:
        assert reader.resolve("t").digest == mdigest
        assert reader.read_blob(digest, 10) == blob
        assert reader.read_blob(mdigest, 1 << 20) == manifest


def test_archive_reader_refuses_bad_archives(tmp_path: Path) -> None:
    gz = tmp_path / "x.tar.gz"
    with tarfile.open(gz, "w:gz") as tar:
        info, data = _file("oci-layout", b"{}")
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(FormatError, match="uncompressed"):
        LayoutReader.open(gz, archive=True)
    empty = tmp_path / "empty.tar"
    _tar_with(empty, [_file("README", b"hi")])
    with pytest.raises(FormatError, match="oci-layout"):
        LayoutReader.open(empty, archive=True)


def test_extract_round_trip(tmp_path: Path) -> None:
    root = tmp_path / "layout"
    rel = build_release(root)
    archive = tmp_path / "release.tar"
    write_archive(root, archive)
    dest = tmp_path / "extracted"
    extract_archive(archive, dest)
    with LayoutReader.open(dest) as reader:
        assert reader.resolve("v1.0.0").digest == rel.index.digest
        for digest, data in rel.layers.items():
            assert reader.read_blob(digest, 1 << 20) == data
    with pytest.raises(ConfigError):
        extract_archive(archive, dest)  # not empty: never merged into
    (tmp_path / "empty").mkdir()
    extract_archive(archive, tmp_path / "empty")  # an empty dir is replaced
    assert (tmp_path / "empty" / "oci-layout").is_file()
    with pytest.raises(AssetNotFoundError):
        extract_archive(tmp_path / "absent.tar", tmp_path / "other")


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "hardlink"])
def test_extract_refuses_escaping_members(tmp_path: Path, kind: str) -> None:
    members = [_file("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')]
    members.append(_file("index.json", b'{"schemaVersion":2,"manifests":[]}'))
    if kind == "dotdot":
        members.append(_file("blobs/../../evil", b"pwned"))
    elif kind == "absolute":
        members.append(_file(str(tmp_path / "evil"), b"pwned"))
    else:
        link = tarfile.TarInfo("blobs/sha256/" + "a" * 64)
        link.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
        link.linkname = "/etc/passwd" if kind == "symlink" else "oci-layout"
        members.append((link, b""))
    archive = tmp_path / "evil.tar"
    _tar_with(archive, [(i, d if i.isreg() else None) for i, d in members])
    dest = tmp_path / "sub" / "dest"
    with pytest.raises(FormatError) as info:
        extract_archive(archive, dest)
    assert str(archive) in str(info.value)
    assert not dest.exists()
    assert not (tmp_path / "evil").exists()
    assert [p.name for p in (tmp_path / "sub").iterdir()] == []


# ---------------------------------------------------------------------------
# interop with skopeo


def _skopeo(*args: str) -> subprocess.CompletedProcess[str]:
    if not os.access(SKOPEO, os.X_OK):
        pytest.fail(f"{SKOPEO} is missing (Debian: apt-get install -y skopeo)", pytrace=False)
    proc = subprocess.run(
        [SKOPEO, "--insecure-policy", *args], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, f"skopeo {' '.join(args)} failed:\n{proc.stderr}"
    return proc


def test_skopeo_copies_our_layout_preserving_digests(tmp_path: Path) -> None:
    src = tmp_path / "src"
    rel = build_release(src)
    dst = tmp_path / "dst"
    _skopeo("copy", "--all", "--preserve-digests", f"oci:{src}:v1.0.0", f"oci:{dst}:v1.0.0")
    sig = signature_tag(rel.index.digest)
    _skopeo("copy", "--preserve-digests", f"oci:{src}:{sig}", f"oci:{dst}:{sig}")

    with LayoutReader.open(dst) as reader:
        assert reader.resolve("v1.0.0").digest == rel.index.digest
        assert reader.resolve(sig).digest == rel.signature.digest
        index = Index.from_bytes(reader.read_blob(rel.index.digest, 1 << 20), str(dst))
        for entry in index.manifests:
            manifest = Manifest.from_bytes(reader.read_blob(entry.digest, 1 << 20), str(dst))
            assert manifest.artifact_type == ARTIFACT_TYPE
            for layer in manifest.layers:
                assert reader.read_blob(layer.digest, 1 << 20) == rel.layers[layer.digest]
    # skopeo's layout is writable by us too (tags added next to its entries).
    LayoutWriter(dst).tag(rel.index, "latest")
    with LayoutReader.open(dst) as reader:
        assert set(reader.tags()) == {"v1.0.0", sig, "latest"}


def test_skopeo_reads_our_archive_and_we_read_its(tmp_path: Path) -> None:
    src = tmp_path / "src"
    rel = build_release(src)
    ours = tmp_path / "ours.tar"
    write_archive(src, ours)
    theirs = tmp_path / "theirs.tar"
    _skopeo(
        "copy",
        "--all",
        "--preserve-digests",
        f"oci-archive:{ours}:v1.0.0",
        f"oci-archive:{theirs}:v1.0.0",
    )
    with LayoutReader.open(theirs, archive=True) as reader:
        assert reader.resolve("v1.0.0").digest == rel.index.digest
        assert reader.read_blob(rel.index.digest, 1 << 20) == rel.index_bytes
        for digest, data in rel.layers.items():
            assert reader.read_blob(digest, 1 << 20) == data
    raw = _skopeo("inspect", "--raw", f"oci-archive:{ours}:v1.0.0").stdout
    assert raw.encode() == rel.index_bytes
