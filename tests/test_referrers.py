"""OCI 1.1 referrers (oci/referrers.py): written through every `Target` kind with
`put_referrer`, read back through the matching `Source` with `referrers()` and
`bundles()`: a real docker-registry 2.8 (no referrers API, so the `sha256-<hex>` tag),
an OCI layout and an oci-archive."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import httpx
import pytest

from exec_sandbox_assets.base.errors import (
    AssetChecksumError,
    ConfigError,
    FormatError,
    SizeLimitError,
)
from exec_sandbox_assets.oci.http import HttpCore
from exec_sandbox_assets.oci.model import (
    ACCEPT_MANIFESTS,
    EMPTY_JSON,
    MEDIA_TYPE_INDEX,
    MEDIA_TYPE_MANIFEST,
    Descriptor,
    Index,
    canonical_json,
    sha256_digest,
)
from exec_sandbox_assets.oci.policy import DEFAULT_POLICY
from exec_sandbox_assets.oci.reference import parse_source_ref
from exec_sandbox_assets.oci.referrers import (
    BUNDLE_MEDIA_TYPE,
    MAX_BUNDLE_SIZE,
    MAX_REFERRERS,
    fallback_tag,
    merge_referrer,
    parse_referrers,
    referrer_descriptor,
    referrer_manifest,
)
from exec_sandbox_assets.oci.target import Target
from exec_sandbox_assets.oci.targets import open_target
from exec_sandbox_assets.release.documents import RELEASE_BUNDLE_FILE
from exec_sandbox_assets.release.keyless import MAX_BUNDLES
from exec_sandbox_assets.sources import ReleasesSource, Source, open_source
from servers import RegistryServer, StaticServer
from servers.scripted import Answer, HostileServer

OTHER_TYPE = "application/vnd.example.delta.v1"
T = TypeVar("T")


def _work(tmp_path: Path) -> Path:
    (tmp_path / "work").mkdir(exist_ok=True)
    return tmp_path / "work"


def _subject(target: Target) -> Descriptor:
    """A small stored manifest to hang referrers on (its empty config pushed first)."""
    target.push_bytes(EMPTY_JSON, "config")
    layer = b"subject layer"
    target.push_bytes(layer, "layer")
    data = canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.empty.v1+json",
                "digest": sha256_digest(EMPTY_JSON),
                "size": 2,
            },
            "layers": [Descriptor.for_bytes("application/octet-stream", layer).to_json()],
        }
    )
    target.put_manifest(data, MEDIA_TYPE_MANIFEST, "v1")
    return Descriptor.for_bytes(MEDIA_TYPE_MANIFEST, data)


def _add(
    target: Target, subject: Descriptor, blob: bytes, artifact_type: str = BUNDLE_MEDIA_TYPE
) -> str:
    """One referrer with one layer `blob`; returns the referrer manifest's digest."""
    target.push_bytes(EMPTY_JSON, "empty config")
    target.push_bytes(blob, artifact_type)
    layer = Descriptor.for_bytes(artifact_type, blob)
    data = referrer_manifest(
        subject, artifact_type, [layer], {"dev.sigstore.bundle.content": "dsse-envelope"}
    )
    target.put_referrer(data, MEDIA_TYPE_MANIFEST, subject.digest)
    return sha256_digest(data)


def _read(text: str, read: Callable[[Source], Awaitable[T]]) -> T:
    async def go() -> T:
        source = open_source(
            text, parse_source_ref(text), docker_config=None, ca_bundle=None, policy=DEFAULT_POLICY
        )
        try:
            return await read(source)
        finally:
            await source.aclose()

    return asyncio.run(go())


@pytest.fixture(params=["registry", "layout", "archive"])
def place(
    request: pytest.FixtureRequest, tmp_path: Path, repo_name: str
) -> Iterator[tuple[str, Callable[[], Target]]]:
    """(source text, a function opening a write target) for each kind of place."""
    if request.param == "registry":
        server: RegistryServer = request.getfixturevalue("registry")
        text = server.ref(repo_name)
    elif request.param == "layout":
        text = f"oci:{tmp_path / 'layout'}"
    else:
        text = f"oci-archive:{tmp_path / 'release.tar'}"
    yield text, lambda: open_target(text, _work(tmp_path))


def _session(open_: Callable[[], Target], write: Callable[[Target], T]) -> T:
    target = open_()
    ok = False
    try:
        out = write(target)
        ok = True
        return out
    finally:
        target.close(ok)


# ---------------------------------------------------------------- through real targets


def test_referrers_written_through_a_target_read_back_through_its_source(
    place: tuple[str, Callable[[], Target]],
) -> None:
    text, open_ = place
    bundle_a, bundle_b, delta = b'{"bundle": "a"}', b'{"bundle": "b"}', b"delta bytes"

    def first(target: Target) -> tuple[Descriptor, str]:
        subject = _subject(target)
        digest = _add(target, subject, bundle_a)
        _add(target, subject, delta, OTHER_TYPE)
        return subject, digest

    subject, digest_a = _session(open_, first)
    # A second session (an archive is unpacked and rewritten) adds one, and re-adding
    # the first changes nothing.
    digest_b = _session(
        open_, lambda t: (_add(t, subject, bundle_b), _add(t, subject, bundle_a))[0]
    )

    bundles = _read(text, lambda s: s.bundles(subject.digest))
    assert bundles == [bundle_a, bundle_b]
    listed = _read(text, lambda s: s.referrers(subject.digest, BUNDLE_MEDIA_TYPE))
    assert [d.digest for d in listed] == [digest_a, digest_b]
    assert all(d.artifact_type == BUNDLE_MEDIA_TYPE for d in listed)
    assert listed[0].annotations == {"dev.sigstore.bundle.content": "dsse-envelope"}
    every = _read(text, lambda s: s.referrers(subject.digest, None))
    assert len(every) == 3
    # The fallback tag holds the spec's index: three entries, the bundle twice not.
    index = _session(open_, lambda t: t.read_manifest(fallback_tag(subject.digest)))
    assert isinstance(index, bytes)
    assert len(Index.from_bytes(index, "fallback").manifests) == 3


def test_a_subject_without_referrers_has_no_bundles(
    place: tuple[str, Callable[[], Target]],
) -> None:
    text, open_ = place
    subject = _session(open_, _subject)
    assert isinstance(subject, Descriptor)
    assert _read(text, lambda s: s.bundles(subject.digest)) == []
    assert _read(text, lambda s: s.referrers(subject.digest, BUNDLE_MEDIA_TYPE)) == []


def test_put_referrer_refuses_a_manifest_naming_another_subject(tmp_path: Path) -> None:
    target = open_target(f"oci:{tmp_path / 'layout'}", _work(tmp_path))
    subject = _subject(target)
    other = Descriptor(MEDIA_TYPE_MANIFEST, sha256_digest(b"other"), 5)
    data = referrer_manifest(other, BUNDLE_MEDIA_TYPE, [])
    with pytest.raises(ConfigError, match="referrer names sha256:"):
        target.put_referrer(data, MEDIA_TYPE_MANIFEST, subject.digest)
    assert target.read_manifest(fallback_tag(subject.digest)) is None


def test_registry_fallback_tag_is_plain_oci(
    registry: RegistryServer, repo_name: str, tmp_path: Path
) -> None:
    """docker-registry 2.8 has no referrers API: the tag is what other tools (cosign,
    oras) read, so it must be a plain OCI index served under `sha256-<hex>`."""
    target = open_target(registry.ref(repo_name), _work(tmp_path))
    subject = _subject(target)
    digest = _add(target, subject, b'{"bundle": 1}')
    target.close(True)
    api = httpx.get(f"{registry.url}/v2/{repo_name}/referrers/{subject.digest}")
    assert api.status_code == 404  # why the fallback tag exists
    tag = fallback_tag(subject.digest)
    answer = httpx.get(
        f"{registry.url}/v2/{repo_name}/manifests/{tag}",
        headers={"Accept": ", ".join(ACCEPT_MANIFESTS)},
    )
    assert answer.status_code == 200
    assert answer.headers["content-type"] == MEDIA_TYPE_INDEX
    entry = json.loads(answer.content)["manifests"][0]
    assert entry["digest"] == digest and entry["artifactType"] == BUNDLE_MEDIA_TYPE


# ------------------------------------------------------------------- hostile content


def test_bundles_skip_a_broken_referrer_when_another_is_good(tmp_path: Path) -> None:
    root = tmp_path / "layout"
    target = open_target(f"oci:{root}", _work(tmp_path))
    subject = _subject(target)
    _add(target, subject, b"x" * (MAX_BUNDLE_SIZE + 1))  # oversized: never read whole
    _add(target, subject, b'{"good": true}')
    text = f"oci:{root}"
    assert _read(text, lambda s: s.bundles(subject.digest)) == [b'{"good": true}']


def test_bundles_report_why_when_no_referrer_is_readable(tmp_path: Path) -> None:
    root = tmp_path / "layout"
    target = open_target(f"oci:{root}", _work(tmp_path))
    subject = _subject(target)
    _add(target, subject, b'{"bundle": "tampered"}')
    blob = root / "blobs" / "sha256" / sha256_digest(b'{"bundle": "tampered"}').partition(":")[2]
    blob.write_bytes(b'{"bundle": "TAMPERED"}')
    with pytest.raises(AssetChecksumError):
        _read(f"oci:{root}", lambda s: s.bundles(subject.digest))


# ------------------------------------------------------------------------------ pure


def test_fallback_tag_follows_the_tag_schema() -> None:
    hexpart = "a" * 64
    assert fallback_tag(f"sha256:{hexpart}") == f"sha256-{hexpart}"
    assert fallback_tag(f"sha512:{'b' * 128}") == f"sha512-{'b' * 64}"  # cut to 64
    with pytest.raises(FormatError):
        fallback_tag("sha256:nothex")


def _entry(n: int, artifact_type: str = BUNDLE_MEDIA_TYPE) -> dict[str, object]:
    return {
        "mediaType": MEDIA_TYPE_MANIFEST,
        "digest": sha256_digest(str(n).encode()),
        "size": n,
        "artifactType": artifact_type,
    }


def test_merge_referrer_adds_once_and_keeps_what_others_wrote() -> None:
    first = merge_referrer(None, _entry(1))
    assert json.loads(first) == {
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_INDEX,
        "manifests": [_entry(1)],
    }
    assert merge_referrer(first, _entry(1)) is first  # unchanged: the tag does not move
    foreign = {
        **_entry(2, "application/vnd.dev.cosign.artifact.sig.v1+json"),
        "x-tool": {"kept": True},
    }
    written = json.dumps(
        {"schemaVersion": 2, "manifests": [foreign], "annotations": {"a": "b"}}
    ).encode()
    merged = json.loads(merge_referrer(written, _entry(3)))
    assert merged["manifests"] == [foreign, _entry(3)]
    assert merged["annotations"] == {"a": "b"} and merged["mediaType"] == MEDIA_TYPE_INDEX


def test_merge_referrer_refuses_a_tag_that_is_not_an_index() -> None:
    with pytest.raises(FormatError, match="referrers index"):
        merge_referrer(b'{"schemaVersion": 2, "layers": []}', _entry(1))


def test_referrer_descriptor_names_the_subject_and_type() -> None:
    subject = Descriptor(MEDIA_TYPE_INDEX, sha256_digest(b"index"), 5)
    data = referrer_manifest(subject, BUNDLE_MEDIA_TYPE, [], {"k": "v"})
    entry = referrer_descriptor(data, subject.digest, "test")
    assert entry == {
        "mediaType": MEDIA_TYPE_MANIFEST,
        "digest": sha256_digest(data),
        "size": len(data),
        "artifactType": BUNDLE_MEDIA_TYPE,
        "annotations": {"k": "v"},
    }
    manifest = json.loads(data)
    assert manifest["config"]["mediaType"] == "application/vnd.oci.empty.v1+json"
    assert manifest["subject"] == {
        "mediaType": MEDIA_TYPE_INDEX,
        "digest": subject.digest,
        "size": 5,
    }


def test_parse_referrers_filters_and_caps() -> None:
    subject = sha256_digest(b"s")
    many = canonical_json(
        {"schemaVersion": 2, "manifests": [_entry(n) for n in range(MAX_REFERRERS + 1)]}
    )
    with pytest.raises(SizeLimitError, match="listed, more than the 64"):
        parse_referrers(many, subject, BUNDLE_MEDIA_TYPE, "test")
    # Other artifact types do not count against the cap of the one asked for.
    assert parse_referrers(many, subject, OTHER_TYPE, "test") == []
    mixed = canonical_json({"schemaVersion": 2, "manifests": [_entry(1), _entry(2, OTHER_TYPE)]})
    assert [d.size for d in parse_referrers(mixed, subject, OTHER_TYPE, "test")] == [2]


# ----------------------------------------------------------------- GitHub Release folder


async def test_release_folder_bundle_file_is_read(static_server: StaticServer) -> None:
    folder = static_server.root / "o" / "r" / "releases" / "download" / "v1"
    folder.mkdir(parents=True)
    base = f"{static_server.url}/o/r/releases/download"
    index_digest = sha256_digest(b"index")
    source = ReleasesSource(HttpCore(peer="release server"), base, "v1")
    try:
        assert await source.bundles(index_digest) == []  # signed with keys only
        (folder / RELEASE_BUNDLE_FILE).write_bytes(b'{"bundle": 1}')
        assert await source.bundles(index_digest) == [b'{"bundle": 1}']
        assert await source.referrers(index_digest, BUNDLE_MEDIA_TYPE) == []
        (folder / RELEASE_BUNDLE_FILE).write_bytes(b" " * (MAX_BUNDLE_SIZE + 1))
        with pytest.raises(SizeLimitError):
            await source.bundles(index_digest)
    finally:
        await source.aclose()


# ------------------------------------------------------- a registry with the referrers API


def _api_registry(server: HostileServer, api: Answer) -> tuple[str, str, bytes]:
    """A scripted registry serving one bundle referrer of `subject`: through the
    referrers API as `api` says, and under the fallback tag. Returns (ref, subject
    digest, bundle)."""
    subject = Descriptor(MEDIA_TYPE_INDEX, sha256_digest(b"index"), 5)
    bundle = b'{"bundle": "api"}'
    layer = Descriptor.for_bytes(BUNDLE_MEDIA_TYPE, bundle)
    manifest = referrer_manifest(subject, BUNDLE_MEDIA_TYPE, [layer])
    listing = merge_referrer(None, referrer_descriptor(manifest, subject.digest, "test"))
    index_type = (("Content-Type", MEDIA_TYPE_INDEX),)
    repo = "/v2/test/repo"
    server.route(
        f"{repo}/referrers/{subject.digest}",
        api if api.body else Answer(api.status, listing, index_type),
    )
    server.route(
        f"{repo}/manifests/{fallback_tag(subject.digest)}", Answer(200, listing, index_type)
    )
    server.route(
        f"{repo}/manifests/{sha256_digest(manifest)}",
        Answer(200, manifest, (("Content-Type", MEDIA_TYPE_MANIFEST),)),
    )
    server.route(f"{repo}/blobs/{layer.digest}", Answer(200, bundle))
    return f"http://{server.host}/test/repo", subject.digest, bundle


@pytest.mark.parametrize(
    ("api", "uses_api"),
    [
        (Answer(200), True),  # an OCI index (filled in by _api_registry)
        (Answer(404, b"404 page not found\n"), False),  # distribution 2.8, ghcr.io
        (Answer(200, b"<html>not a registry API</html>", (("Content-Type", "text/html"),)), False),
    ],
)
def test_registry_referrers_api_first_then_the_fallback_tag(api: Answer, uses_api: bool) -> None:
    with HostileServer() as server:
        ref, subject, bundle = _api_registry(server, api)
        assert _read(ref, lambda s: s.bundles(subject)) == [bundle]
        paths = [r.path for r in server.requests]
    assert paths[0] == (
        f"/v2/test/repo/referrers/{subject}?artifactType="
        + BUNDLE_MEDIA_TYPE.replace("/", "%2F").replace("+", "%2B")
    )
    tag_read = f"/v2/test/repo/manifests/{fallback_tag(subject)}" in paths
    assert tag_read is not uses_api


def test_put_referrer_names_a_foreign_document_under_the_tag(tmp_path: Path) -> None:
    target = open_target(f"oci:{tmp_path / 'layout'}", _work(tmp_path))
    subject = _subject(target)
    # Something else (here the subject itself) already holds the referrers tag.
    data = target.read_manifest("v1")
    assert data is not None
    target.tag(data, MEDIA_TYPE_MANIFEST, fallback_tag(subject.digest))
    with pytest.raises(FormatError, match=rf"oci:.*:{fallback_tag(subject.digest)} \(referrers"):
        _add(target, subject, b'{"bundle": 1}')
    assert target.read_manifest(fallback_tag(subject.digest)) == data  # untouched


def test_bundles_reads_at_most_what_a_client_checks(tmp_path: Path) -> None:
    root = tmp_path / "layout"
    target = open_target(f"oci:{root}", _work(tmp_path))
    subject = _subject(target)
    for n in range(MAX_BUNDLES + 2):
        _add(target, subject, f'{{"bundle": {n}}}'.encode())
    bundles = _read(f"oci:{root}", lambda s: s.bundles(subject.digest))
    assert bundles == [f'{{"bundle": {n}}}'.encode() for n in range(2, MAX_BUNDLES + 2)]


def test_skopeo_copy_of_the_referrers_tag_stays_readable(
    registry: RegistryServer, repo_name: str, tmp_path: Path
) -> None:
    """skopeo 1.9 cannot keep an index whose entries carry artifactType
    (--preserve-digests fails), and without it drops them: the copy still yields the
    bundle (each manifest says its own type), as docs/airgap.md tells skopeo users."""
    skopeo = shutil.which("skopeo")
    if skopeo is None:  # fail, never skip: the interop proof must run
        pytest.fail("skopeo is not installed (Debian: apt-get install -y skopeo)", pytrace=False)
    target = open_target(registry.ref(repo_name), _work(tmp_path))
    subject = _subject(target)
    _add(target, subject, b'{"bundle": "copied"}')
    _add(target, subject, b"delta", OTHER_TYPE)
    target.close(True)
    tag = fallback_tag(subject.digest)
    layout = tmp_path / "skopeo-layout"
    for ref in ("v1", tag):
        src, dst = f"docker://{registry.host}/{repo_name}:{ref}", f"oci:{layout}:{ref}"
        subprocess.run(
            [skopeo, "copy", "--all", "--src-tls-verify=false", src, dst],
            check=True,
            capture_output=True,
        )
    copied = Index.from_bytes(
        open_target(f"oci:{layout}", _work(tmp_path)).read_manifest(tag) or b"", "copy"
    )
    assert [m.artifact_type for m in copied.manifests] == [None, None]  # what skopeo did
    assert _read(f"oci:{layout}", lambda s: s.bundles(subject.digest)) == [b'{"bundle": "copied"}']
