"""Property-based fuzzing of every parser of untrusted input: whatever bytes or shapes
a server, mirror, layout or config file hands it, it returns a value or raises one of
the package's own errors (an `AssetError` subclass); nothing else escapes.

Three kinds of input per parser: arbitrary bytes/text, JSON of arbitrary shape, and
structure-aware documents (the right keys, wrong or hostile values), which reach the
validation code behind the JSON parser. Bounded for CI: the whole file runs in
seconds (`max_examples` per test, no per-example deadline on a loaded machine).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exec_sandbox_assets.base import safejson
from exec_sandbox_assets.base.errors import AssetError
from exec_sandbox_assets.base.safetext import clean_text, redact_url
from exec_sandbox_assets.oci.auth import (
    Challenge,
    RegistryAuth,
    load_docker_credentials,
    parse_www_authenticate,
)
from exec_sandbox_assets.oci.bodies import parse_content_range
from exec_sandbox_assets.oci.model import (
    MEDIA_TYPE_INDEX,
    MEDIA_TYPE_MANIFEST,
    Descriptor,
    Index,
    Manifest,
    Platform,
    media_type_of,
    sha256_digest,
)
from exec_sandbox_assets.oci.reference import parse_registry_ref, parse_source_ref
from exec_sandbox_assets.oci.retry import RetryPolicy
from exec_sandbox_assets.release import signing

FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "150")),
    deadline=None,
    database=None,  # no .hypothesis/ directory written by CI runs
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# -- strategies ---------------------------------------------------------------------------

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.sampled_from(["sha256:" + "a" * 64, MEDIA_TYPE_MANIFEST, "", "\x00", "\ud800"])
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=20,
)
DIGEST = st.sampled_from(["sha256:" + "0" * 64, "sha512:" + "f" * 128]) | st.text(max_size=80)
SIZE = st.integers(min_value=-(2**70), max_value=2**70) | SCALARS


def _descriptor() -> st.SearchStrategy[Any]:
    fields = st.fixed_dictionaries(
        {},
        optional={
            "mediaType": st.sampled_from([MEDIA_TYPE_MANIFEST, "a/b", "bad", ""]) | SCALARS,
            "digest": DIGEST,
            "size": SIZE,
            "annotations": st.dictionaries(st.text(max_size=8), SCALARS, max_size=3) | SCALARS,
            "artifactType": st.sampled_from(["x/y", "no slash"]) | SCALARS,
            "platform": st.fixed_dictionaries(
                {}, optional={"os": SCALARS, "architecture": SCALARS, "variant": SCALARS}
            )
            | SCALARS,
        },
    )
    return fields | JSON_VALUES


DESCRIPTORS = _descriptor()
MANIFEST_DOCS = st.fixed_dictionaries(
    {},
    optional={
        "schemaVersion": st.just(2) | SCALARS,
        "mediaType": st.sampled_from([MEDIA_TYPE_MANIFEST, MEDIA_TYPE_INDEX]) | SCALARS,
        "config": DESCRIPTORS,
        "layers": st.lists(DESCRIPTORS, max_size=3) | SCALARS,
        "manifests": st.lists(DESCRIPTORS, max_size=3) | SCALARS,
        "subject": DESCRIPTORS,
        "artifactType": SCALARS,
        "annotations": st.dictionaries(st.text(max_size=8), SCALARS, max_size=3) | SCALARS,
    },
)
VALID_MANIFEST = json.dumps(
    {
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_MANIFEST,
        "config": {"mediaType": "a/b", "digest": "sha256:" + "0" * 64, "size": 2},
        "layers": [
            {
                "mediaType": signing.SIMPLESIGNING_MEDIA_TYPE,
                "digest": "sha256:" + "1" * 64,
                "size": 10,
                "annotations": {signing.SIGNATURE_ANNOTATION: "c2ln"},
            }
        ],
    }
).encode()


@st.composite
def mutated(draw: st.DrawFn, seed: bytes) -> bytes:
    """`seed` with a few bytes replaced, inserted or deleted (classic mutation fuzzing)."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["replace", "insert", "delete"]))
        chunk = draw(st.binary(min_size=1, max_size=6) | st.sampled_from([b"0" * 5000, b"[" * 50]))
        if op == "replace":
            data[pos : pos + len(chunk)] = chunk
        elif op == "insert":
            data[pos:pos] = chunk
        else:
            del data[pos : pos + len(chunk)]
    return bytes(data)


def as_json(doc: Any) -> bytes:
    return json.dumps(doc).encode()


DOCUMENT_BYTES = (
    st.binary(max_size=200)
    | JSON_VALUES.map(as_json)
    | MANIFEST_DOCS.map(as_json)
    | mutated(VALID_MANIFEST)
)


def only_asset_errors(parse: Callable[[], object]) -> None:
    try:
        parse()
    except AssetError:
        pass


# -- oci.model ----------------------------------------------------------------------------


@FUZZ
@given(DOCUMENT_BYTES)
def test_manifest_index_and_media_type(data: bytes) -> None:
    only_asset_errors(lambda: Manifest.from_bytes(data, "fuzz"))
    only_asset_errors(lambda: Index.from_bytes(data, "fuzz"))
    only_asset_errors(lambda: media_type_of(data, "fuzz"))
    only_asset_errors(lambda: safejson.loads(data, "fuzz"))


@FUZZ
@given(DESCRIPTORS)
def test_descriptor_and_platform(obj: Any) -> None:
    only_asset_errors(lambda: Descriptor.from_json(obj, "fuzz"))
    only_asset_errors(lambda: Platform.from_json(obj, "fuzz"))


def test_parsed_documents_round_trip() -> None:
    """The seed the mutations start from is valid: they probe near a real document."""
    manifest = Manifest.from_bytes(VALID_MANIFEST, "seed")
    assert manifest.layers[0].media_type == signing.SIMPLESIGNING_MEDIA_TYPE
    assert sha256_digest(VALID_MANIFEST).startswith("sha256:")


# -- trust (read-only use) ----------------------------------------------------------------

PAYLOADS = st.fixed_dictionaries(
    {},
    optional={
        "critical": st.fixed_dictionaries(
            {},
            optional={
                "type": st.just(signing.PAYLOAD_TYPE) | SCALARS,
                "image": st.fixed_dictionaries({}, optional={"docker-manifest-digest": DIGEST})
                | SCALARS,
                "identity": st.fixed_dictionaries({}, optional={"docker-reference": SCALARS})
                | SCALARS,
            },
        )
        | SCALARS,
        "optional": st.fixed_dictionaries(
            {},
            optional={
                signing.OPT_VERSION: SCALARS,
                signing.OPT_CREATED: st.sampled_from(
                    ["2024-01-01T00:00:00Z", "2024-13-01", "\u0662\u0660\u0662\u0664-01-01", "z"]
                )
                | SCALARS,
            },
        )
        | SCALARS,
    },
)
VALID_PAYLOAD = signing.make_payload("sha256:" + "0" * 64, "h/r", "1.0", "2024-01-01T00:00:00Z")


@FUZZ
@given(
    st.binary(max_size=200)
    | PAYLOADS.map(as_json)
    | mutated(VALID_PAYLOAD)
    | JSON_VALUES.map(as_json)
)
def test_signature_payload(data: bytes) -> None:
    only_asset_errors(lambda: signing.parse_payload(data, "fuzz"))


@FUZZ
@given(DOCUMENT_BYTES)
def test_signature_manifest(data: bytes) -> None:
    only_asset_errors(lambda: signing.read_signature_manifest(data, "fuzz"))


# -- headers --------------------------------------------------------------------------------

HEADER_TEXT = st.text(alphabet=st.characters(codec="latin-1"), max_size=120) | st.sampled_from(
    [
        'Bearer realm="https://auth.example/token",service="s",scope="repository:a/b:pull"',
        'Basic realm="r", Bearer realm="http://x/t", error="invalid_token"',
        'Bearer realm="a\\"b",,, scope=',
        "Basic dXNlcjpwYXNz==",
        "bytes 0-99/100",
        "bytes 5-1/*",
        "bytes 99999999999999999999-1/2",
    ]
)


@FUZZ
@given(HEADER_TEXT)
def test_www_authenticate_and_the_token_request(value: str) -> None:
    challenges = parse_www_authenticate(value)
    assert all(isinstance(c, Challenge) for c in challenges)
    auth = RegistryAuth("registry.example")
    for challenge in challenges:
        only_asset_errors(
            lambda c=challenge: auth._token_request(  # type: ignore[misc]
                c, httpx.URL("https://registry.example/v2/a/manifests/v1"), httpx.Headers()
            )
        )


@FUZZ
@given(HEADER_TEXT | st.text(max_size=60))
def test_content_range_and_retry_after(value: str) -> None:
    parsed = parse_content_range(value)
    if parsed is not None:
        first, last, total = parsed
        assert 0 <= first <= last and (total is None or last < total)
    delay = RetryPolicy().retry_after(value)
    assert delay is None or 0 <= delay <= RetryPolicy().max_retry_after


# -- references and docker config ---------------------------------------------------------


@FUZZ
@given(
    st.text(max_size=80)
    | st.sampled_from(["ghcr.io/a/b:v1", "http://127.0.0.1:5000/x", "oci:/d:t", "oci-archive:f"])
    .flatmap(lambda s: st.tuples(st.just(s), st.text(max_size=5)))
    .map(lambda t: t[0] + t[1])
)
def test_references(text: str) -> None:
    only_asset_errors(lambda: parse_registry_ref(text))
    only_asset_errors(lambda: parse_source_ref(text))


_CONFIG_DIR = Path(tempfile.mkdtemp(prefix="esa-fuzz-"))
DOCKER_CONFIGS = (
    st.binary(max_size=120)
    | JSON_VALUES.map(as_json)
    | st.fixed_dictionaries(
        {},
        optional={
            "auths": st.dictionaries(
                st.sampled_from(["h", "https://h", "http://h/v1/", "H"]) | st.text(max_size=6),
                st.fixed_dictionaries(
                    {},
                    optional={
                        "auth": st.sampled_from(["dTpw", "bm9jb2xvbg==", "!!", ""]) | SCALARS,
                        "identitytoken": SCALARS,
                        "username": SCALARS,
                        "password": SCALARS,
                    },
                )
                | SCALARS,
                max_size=3,
            )
            | SCALARS,
            "credHelpers": JSON_VALUES,
            "credsStore": SCALARS,
        },
    ).map(as_json)
)


@FUZZ
@given(DOCKER_CONFIGS)
def test_docker_config(data: bytes) -> None:
    path = _CONFIG_DIR / "config.json"
    path.write_bytes(data)
    only_asset_errors(lambda: load_docker_credentials("h", path))


# -- display helpers ----------------------------------------------------------------------


@FUZZ
@given(st.text(max_size=200), st.text("abcdef0123456789", min_size=4, max_size=12))
def test_display_helpers_hide_and_escape(text: str, secret: str) -> None:
    cleaned = clean_text(text)
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in cleaned)
    cleaned.encode("utf-8")  # printable anywhere: no lone surrogates left
    path = "".join(c for c in text if c.isalnum())
    for url in (
        f"https://user:{secret}@host/{path}?a=1&token={secret}",
        f"https://{secret}@host/{path}?X-Amz-Signature={secret}#frag",
    ):
        assert secret not in redact_url(url).replace(path, "")
