"""`mirror` copies the keyless signature of a release (issue 17; docs/format.md §8):
the bundle referrers of the index and the `sha256-<hex>` referrers tag, from registry to
archive to layout to another registry, so an air-gapped site verifies the bundle with no
network. Real docker-registry 2.8 processes (no referrers API) on both ends."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from exec_sandbox_assets.mirror import MirrorResult, mirror
from exec_sandbox_assets.oci.model import EMPTY_JSON, MEDIA_TYPE_MANIFEST, Descriptor
from exec_sandbox_assets.oci.referrers import BUNDLE_MEDIA_TYPE, fallback_tag, referrer_manifest
from exec_sandbox_assets.oci.targets import open_target
from exec_sandbox_assets.publish import PublishRequest, make_sample_inputs, publish
from exec_sandbox_assets.publish.keyless import KeylessOptions
from exec_sandbox_assets.release import keyless
from releases import TEST_WORKFLOW, KeyPair, make_key_pair, read_bundles, verify_keyless
from servers import RegistryServer
from sigstore_instance import SigstoreInstance

VERSION = "0.9.4"
CREATED = "2026-03-04T05:06:07Z"
WORKFLOW = TEST_WORKFLOW


def _copy(src: str, dst: str, tmp_path: Path, key: KeyPair) -> MirrorResult:
    return mirror(
        src, dst, versions=[VERSION], trusted_keys=[key.public], work_dir=tmp_path / "mirror-work"
    )


def _check(text: str, index_digest: str, bundle: bytes, root: Path) -> None:
    assert read_bundles(text, index_digest) == [bundle], text
    verify_keyless(bundle, index_digest, VERSION, root)


def test_mirror_registry_archive_layout_registry_keeps_the_bundle(
    registry: RegistryServer,
    repo_name: str,
    tmp_path: Path,
    sigstore_test_instance: SigstoreInstance,
    sigstore_root: Path,
) -> None:
    key = make_key_pair(tmp_path / "keys")
    origin = registry.ref(repo_name)

    def sign(statement: bytes) -> bytes:
        return sigstore_test_instance.bundle(
            statement, workflow_ref=f"{WORKFLOW}@refs/tags/v{VERSION}"
        )

    published = publish(
        PublishRequest(
            inputs=(make_sample_inputs(tmp_path / "dist", size=16 * 1024),),
            version=VERSION,
            targets=(origin,),
            keys=(key.private,),
            work_dir=tmp_path / "publish-work",
            created=CREATED,
            level=3,
            platforms=(("linux", "amd64"),),
            keyless=KeylessOptions(sign, (keyless.Workflow(WORKFLOW),), (sigstore_root,)),
        )
    )
    digest = published.index_digest
    (bundle,) = read_bundles(origin, digest)

    # A referrer that is more than a bundle (a large extra layer) is not copied.
    work = tmp_path / "junk-work"
    work.mkdir()
    target = open_target(origin, work)
    junk = b"x" * 200_000
    target.push_bytes(EMPTY_JSON, "config")
    target.push_bytes(junk, "junk")
    target.push_bytes(b'{"not": "checked"}', BUNDLE_MEDIA_TYPE)
    layers = [
        Descriptor.for_bytes(BUNDLE_MEDIA_TYPE, b'{"not": "checked"}'),
        Descriptor.for_bytes("application/octet-stream", junk),
    ]
    subject = Descriptor("application/vnd.oci.image.index.v1+json", digest, 1)
    target.put_referrer(
        referrer_manifest(subject, BUNDLE_MEDIA_TYPE, layers), MEDIA_TYPE_MANIFEST, digest
    )
    target.close(True)
    assert len(read_bundles(origin, digest)) == 2

    archive = f"oci-archive:{tmp_path / 'usb' / 'assets.tar'}"
    layout = f"oci:{tmp_path / 'layout'}"
    _copy(origin, archive, tmp_path, key)
    _check(archive, digest, bundle, sigstore_root)
    _copy(archive, layout, tmp_path, key)
    _check(layout, digest, bundle, sigstore_root)
    with RegistryServer(tmp_path / "site-registry") as site:
        _copy(layout, site.ref("assets"), tmp_path, key)
        _check(site.ref("assets"), digest, bundle, sigstore_root)
        # Mirroring again adds nothing to the referrers tag.
        _copy(layout, site.ref("assets"), tmp_path, key)
        _check(site.ref("assets"), digest, bundle, sigstore_root)
    index = json.loads((tmp_path / "layout" / "index.json").read_text())
    tags = {m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"]}
    assert fallback_tag(digest) in tags


@pytest.mark.parametrize("kind", ["oci", "oci-archive"])
def test_a_release_without_bundles_mirrors_without_a_referrers_tag(
    kind: str, registry: RegistryServer, repo_name: str, tmp_path: Path
) -> None:
    key = make_key_pair(tmp_path / "keys")
    published = publish(
        PublishRequest(
            inputs=(make_sample_inputs(tmp_path / "dist", size=16 * 1024),),
            version=VERSION,
            targets=(registry.ref(repo_name),),
            keys=(key.private,),
            work_dir=tmp_path / "publish-work",
            created=CREATED,
            level=3,
            platforms=(("linux", "amd64"),),
        )
    )
    dst = f"{kind}:{tmp_path / 'copy'}"
    _copy(registry.ref(repo_name), dst, tmp_path, key)
    assert read_bundles(dst, published.index_digest) == []
