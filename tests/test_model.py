"""OCI model, catalog and release documents: pure logic fed bytes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from exec_sandbox_assets.base.errors import AssetChecksumError, ConfigError, FormatError
from exec_sandbox_assets.config import load_settings, normalize_version
from exec_sandbox_assets.oci.model import (
    EMPTY_DESCRIPTOR,
    EMPTY_DIGEST,
    EMPTY_JSON,
    MAX_MANIFEST_SIZE,
    MEDIA_TYPE_INDEX,
    MEDIA_TYPE_MANIFEST,
    Descriptor,
    Index,
    Manifest,
    Platform,
    sha256_digest,
    signature_tag,
    verify_bytes,
)
from exec_sandbox_assets.release import catalog
from exec_sandbox_assets.release.chunks import MIN_CHUNK_SIZE, ChunkDigests
from exec_sandbox_assets.release.documents import (
    LayerFile,
    ReleaseInfo,
    build_release,
    read_asset_layers,
)

DIGEST_A = "sha256:" + "a" * 64
DIGEST_B = "sha256:" + "b" * 64


def test_empty_descriptor_matches_spec() -> None:
    assert sha256_digest(EMPTY_JSON) == EMPTY_DIGEST
    assert EMPTY_DESCRIPTOR.size == 2


def test_manifest_round_trip_keeps_bytes_stable() -> None:
    layer = Descriptor("application/x-test", DIGEST_A, 5, {"org.opencontainers.image.title": "f"})
    manifest = Manifest(EMPTY_DESCRIPTOR, (layer,), artifact_type="application/x-art")
    data = manifest.to_bytes()
    parsed = Manifest.from_bytes(data, "test")
    assert parsed == manifest
    assert parsed.to_bytes() == data
    assert json.loads(data)["artifactType"] == "application/x-art"


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (b"not json", "not valid JSON"),
        (b"[]", "expected a JSON object"),
        (b'{"schemaVersion": 1, "layers": []}', "schemaVersion"),
        (b'{"schemaVersion": 2, "config": {}}', "layers"),
        (
            b'{"schemaVersion": 2, "layers": [], "config": {"mediaType": "a/b", '
            b'"digest": "sha256:xyz", "size": 2}}',
            "invalid digest",
        ),
        (
            b'{"schemaVersion": 2, "layers": [], "config": {"mediaType": "a/b", '
            b'"digest": "' + DIGEST_A.encode() + b'", "size": -1}}',
            "invalid size",
        ),
        (
            b'{"schemaVersion": 2, "layers": [], "config": {"mediaType": "nope", '
            b'"digest": "' + DIGEST_A.encode() + b'", "size": 2}}',
            "invalid media type",
        ),
        (
            b'{"schemaVersion": 2, "mediaType": "' + MEDIA_TYPE_INDEX.encode() + b'"}',
            "not an image manifest",
        ),
    ],
)
def test_manifest_parse_errors_name_the_document(doc: bytes, message: str) -> None:
    with pytest.raises(FormatError, match=message) as info:
        Manifest.from_bytes(doc, "http://example.test/m")
    assert "http://example.test/m" in str(info.value)


def test_oversized_document_is_refused_before_parsing() -> None:
    with pytest.raises(FormatError, match="exceeds"):
        Index.from_bytes(b" " * (MAX_MANIFEST_SIZE + 1), "big")


def test_index_platform_lookup_and_layout_index_without_media_type() -> None:
    entry = Descriptor(MEDIA_TYPE_MANIFEST, DIGEST_A, 10, platform=Platform("linux", "arm64"))
    index = Index((entry,))
    assert index.for_platform("linux", "arm64") == entry
    assert index.for_platform("linux", "amd64") is None
    # skopeo writes an OCI layout's index.json without mediaType.
    raw = json.dumps({"schemaVersion": 2, "manifests": [entry.to_json()]}).encode()
    assert Index.from_bytes(raw, "index.json").manifests == (entry,)


def test_verify_bytes_and_signature_tag() -> None:
    assert verify_bytes(b"{}", EMPTY_DIGEST, "x") == b"{}"
    with pytest.raises(AssetChecksumError, match="expected sha256:"):
        verify_bytes(b"{ }", EMPTY_DIGEST, "x", "somewhere")
    assert signature_tag(DIGEST_A) == "sha256-" + "a" * 64 + ".sig"


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "", "a..b", "x y", "-x"])
def test_unsafe_titles_are_refused(name: str) -> None:
    assert not catalog.is_valid_title(name)
    with pytest.raises(ConfigError):
        catalog.check_title(name, "test")


def test_catalog_names_match_spec() -> None:
    assert catalog.kernel("x86_64").name == "vmlinuz-x86_64.zst"
    assert catalog.kernel("x86_64").output_name == "vmlinuz-x86_64"
    assert catalog.base_image("python", "aarch64").name == "python-3.14-base-aarch64.qcow2.zst"
    assert catalog.base_image("javascript", "x86_64").output_name == "node-1.3-base-x86_64.qcow2"
    assert catalog.base_image("raw", "x86_64").name == "raw-base-x86_64.qcow2.zst"
    gv = catalog.gvproxy("darwin", "arm64")
    assert (gv.name, gv.compressed, gv.arch) == (
        "gvproxy-wrapper-darwin-arm64",
        False,
        "darwin-arm64",
    )
    names = {s.name for s in catalog.platform_assets("linux", "amd64")}
    assert "vmlinux-x86_64.zst" in names
    assert "vmlinux-aarch64.zst" not in {s.name for s in catalog.platform_assets("linux", "arm64")}
    with pytest.raises(ConfigError, match="unknown language"):
        catalog.base_image("cobol", "x86_64")
    with pytest.raises(ConfigError, match="unknown arch"):
        catalog.kernel("riscv64")
    assert catalog.parse_platform("linux/x86_64") == ("linux", "amd64")


def _layer(spec: catalog.AssetSpec, digest: str, size: int) -> LayerFile:
    content = digest if not spec.compressed else DIGEST_B
    return LayerFile(spec, digest, size, content, size if not spec.compressed else size * 3)


def test_release_documents_follow_spec_and_read_back() -> None:
    info = ReleaseInfo("1.2.3", "2026-11-26T00:00:00Z")
    files = {
        ("linux", "amd64"): [
            _layer(s, DIGEST_A, 7) for s in catalog.platform_assets("linux", "amd64")
        ],
        ("linux", "arm64"): [
            _layer(s, DIGEST_A, 7) for s in catalog.platform_assets("linux", "arm64")
        ],
    }
    built = build_release(files, info)
    index = json.loads(built.index)
    assert index["artifactType"] == catalog.ARTIFACT_TYPE
    assert [m["platform"] for m in index["manifests"]] == [
        {"architecture": "amd64", "os": "linux"},
        {"architecture": "arm64", "os": "linux"},
    ]
    # skopeo 1.9 rewrites an index whose entries carry artifactType (SPEC section 3).
    assert all("artifactType" not in m for m in index["manifests"])
    assert index["annotations"][catalog.ANN_VERSION] == "1.2.3"
    manifest = Manifest.from_bytes(built.manifests[("linux", "amd64")], "m")
    assert manifest.config == EMPTY_DESCRIPTOR
    layers = read_asset_layers(manifest, "m")
    kernel = layers["vmlinuz-x86_64.zst"]
    assert (kernel.kind, kernel.output_name, kernel.content_size) == (
        catalog.Kind.KERNEL,
        "vmlinuz-x86_64",
        21,
    )
    assert layers["python-3.14-base-x86_64.qcow2.zst"].language is catalog.Language.PYTHON


def test_read_asset_layers_refuses_unsafe_or_inconsistent_layers() -> None:
    good = {
        catalog.ANN_TITLE: "gvproxy-wrapper-linux-amd64",
        catalog.ANN_KIND: "gvproxy",
        catalog.ANN_CONTENT_DIGEST: DIGEST_A,
        catalog.ANN_CONTENT_SIZE: "5",
    }
    ok = Descriptor(catalog.MEDIA_TYPES[catalog.Kind.GVPROXY], DIGEST_A, 5, good)
    assert read_asset_layers(Manifest(EMPTY_DESCRIPTOR, (ok,)), "m")
    cases = [
        ({**good, catalog.ANN_TITLE: "../../etc/passwd"}, "unsafe layer title"),
        ({**good, catalog.ANN_KIND: "rootkit"}, "unknown kind"),
        ({**good, catalog.ANN_CONTENT_SIZE: "-5"}, "invalid"),
        ({**good, catalog.ANN_CONTENT_DIGEST: DIGEST_B}, "content differs"),
    ]
    for ann, message in cases:
        bad = Descriptor(ok.media_type, DIGEST_A, 5, ann)
        with pytest.raises(FormatError, match=message):
            read_asset_layers(Manifest(EMPTY_DESCRIPTOR, (bad,)), "m")
    with pytest.raises(FormatError, match="duplicate"):
        read_asset_layers(Manifest(EMPTY_DESCRIPTOR, (ok, ok)), "m")


def test_settings_precedence(tmp_path: Path) -> None:
    env = {
        "EXEC_SANDBOX_CACHE_DIR": str(tmp_path / "env-cache"),
        "EXEC_SANDBOX_ASSET_VERSION": "v0.9.0",
        "EXEC_SANDBOX_REGISTRY_MIRRORS": "oci:/a, http://127.0.0.1:5000/b",
        "EXEC_SANDBOX_TRUSTED_KEYS": "/k1.pub:/k2.pub",
        "EXEC_SANDBOX_OFFLINE": "1",
    }
    s = load_settings(env=env)
    assert s.cache_dir == tmp_path / "env-cache"
    assert (s.version, s.tag, s.offline) == ("0.9.0", "v0.9.0", True)
    assert s.mirrors == ("oci:/a", "http://127.0.0.1:5000/b")
    assert s.trusted_keys == (Path("/k1.pub"), Path("/k2.pub"))
    explicit = load_settings(env=env, version="1.0.0", cache_dir=tmp_path / "x", offline=False)
    assert (explicit.version, explicit.cache_dir, explicit.offline) == (
        "1.0.0",
        tmp_path / "x",
        False,
    )
    # The embedding app's version is used only when nothing else says; .dev means latest.
    assert load_settings(env={}, app_version="0.5.0", cache_dir=tmp_path).version == "0.5.0"
    assert load_settings(env={}, app_version="0.5.1.dev3", cache_dir=tmp_path).floating
    with pytest.raises(ConfigError, match="EXEC_SANDBOX_OFFLINE"):
        load_settings(env={"EXEC_SANDBOX_OFFLINE": "maybe"})
    with pytest.raises(ConfigError, match="invalid asset version"):
        normalize_version("1.0/../../x")


def test_deeply_nested_documents_are_format_errors() -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(FormatError, match="not valid JSON"):
        Index.from_bytes(deep, "hostile")


def test_chunk_digests_round_trip_and_malformed_ones_are_refused() -> None:
    size = MIN_CHUNK_SIZE
    total = 2 * size + 5  # three chunks, the last one short
    hexes = "ab" * 32 + "cd" * 32 + "ef" * 32
    chunks = ChunkDigests(size, total, hexes)
    assert (chunks.count, chunks.span(2), chunks.digest(1)) == (3, (2 * size, total), b"\xcd" * 32)
    base = {
        catalog.ANN_TITLE: "vmlinuz-x86_64.zst",
        catalog.ANN_KIND: "kernel",
        catalog.ANN_CONTENT_DIGEST: DIGEST_B,
        catalog.ANN_CONTENT_SIZE: "9",
    }
    good = Descriptor(catalog.MEDIA_TYPES[catalog.Kind.KERNEL], DIGEST_A, total, base)
    layer = read_asset_layers(Manifest(EMPTY_DESCRIPTOR, (good,)), "m")["vmlinuz-x86_64.zst"]
    assert layer.chunks is None  # optional: a release without them reads as before
    signed = Descriptor(good.media_type, DIGEST_A, total, {**base, **chunks.annotations()})
    layer = read_asset_layers(Manifest(EMPTY_DESCRIPTOR, (signed,)), "m")["vmlinuz-x86_64.zst"]
    assert layer.chunks == chunks
    cases = [
        ({catalog.ANN_CHUNK_SIZE: str(size)}, "only one of"),
        ({catalog.ANN_CHUNK_SHA256: hexes}, "only one of"),
        ({catalog.ANN_CHUNK_SIZE: "4k", catalog.ANN_CHUNK_SHA256: hexes}, "invalid"),
        ({catalog.ANN_CHUNK_SIZE: "4096", catalog.ANN_CHUNK_SHA256: hexes}, "outside"),
        ({catalog.ANN_CHUNK_SIZE: str(size), catalog.ANN_CHUNK_SHA256: hexes[:-64]}, "192"),
        ({catalog.ANN_CHUNK_SIZE: str(size), catalog.ANN_CHUNK_SHA256: hexes.upper()}, "hex"),
    ]
    for extra, message in cases:
        bad = Descriptor(good.media_type, DIGEST_A, total, {**base, **extra})
        with pytest.raises(FormatError, match=message):
            read_asset_layers(Manifest(EMPTY_DESCRIPTOR, (bad,)), "m")
