"""Push a release to a registry with oras-py (imported only here and in `registry_session`).

What oras-py 0.2.43 does and what we do around it (the connection, its request policy
and the login are `oci.registry_session`):
- blobs: POST, the whole blob in one PATCH, PUT ?digest=, as docker and skopeo send it
  (no Content-Range; the file is mapped, not read into memory, sent in 4 MiB pieces,
  and can be sent again when oras answers a 401 by re-sending). A registry that refuses that (ghcr.io caps
  a PATCH with Content-Range at 4 MiB; proxies cap bodies) gets oras's
  `chunked_upload` (POST, PATCH per 4 MiB chunk, PUT) from then on: the first failed
  attempt switches. One request per blob instead of one per 4 MiB: distribution
  spends ~4 ms CPU on each PATCH, a remote registry a round trip. Existing blobs are
  skipped after a HEAD, so re-runs upload nothing; a failed upload is restarted
  whole, and what the registry stored is checked by its size;
- manifests, the index and tags: PUT with its raw request helper and our own bytes
  and Content-Type (its `push` has no artifactType and its schema check refuses
  indexes); a registry that rewrote a manifest (another digest) is refused.

`RegistryTarget.connect` probes, logs in and checks push rights; constructing a
`RegistryTarget` from a connected `RegistrySession` does no I/O.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import oras.utils
import requests

from exec_sandbox_assets.base.errors import (
    AssetDownloadError,
    ConfigError,
    SizeLimitError,
    TransportError,
)
from exec_sandbox_assets.oci.model import (
    ACCEPT_MANIFESTS,
    MAX_MANIFEST_SIZE,
    is_digest,
    sha256_digest,
    verify_bytes,
)
from exec_sandbox_assets.oci.reference import parse_registry_ref
from exec_sandbox_assets.oci.registry_session import (
    CONNECT_TIMEOUT,
    READ_TIMEOUT,
    RETRY_DELAYS,
    RegistrySession,
)
from exec_sandbox_assets.oci.target import PushStats, store_referrer

log = logging.getLogger(__name__)

CHUNK_SIZE = 4 * 1024 * 1024  # ghcr.io's limit for one chunk (a PATCH with Content-Range)
UPLOAD_ATTEMPTS = 3
_OCTET_STREAM = "application/octet-stream"


def _check_chunk_size(chunk_size: int | None) -> int | None:
    if chunk_size is not None and not 0 < chunk_size <= CHUNK_SIZE:
        raise ConfigError(f"chunk size must be 1..{CHUNK_SIZE} bytes")
    return chunk_size


class _Slices:
    """A request body: the mapped file in CHUNK_SIZE slices, each sent on its own (a
    socket timeout bounds one send, and one sendall of a whole large blob would have to
    finish within it), and iterable again when oras re-sends after a 401."""

    def __init__(self, view: memoryview) -> None:
        self._view = view

    def __len__(self) -> int:  # requests sends it as Content-Length
        return len(self._view)

    def __iter__(self) -> Iterator[memoryview]:
        for start in range(0, len(self._view), CHUNK_SIZE):
            yield self._view[start : start + CHUNK_SIZE]


@contextlib.contextmanager
def _mapped(path: Path) -> Iterator[_Slices | bytes]:
    """The file as a request body, paged in by the kernel as it is sent."""
    with path.open("rb") as f:
        if f.seek(0, 2) == 0:
            yield b""  # an empty file cannot be mapped
            return
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        view = memoryview(mapping)
        try:
            yield _Slices(view)
        finally:
            view.release()
            # A view still held elsewhere (a traceback) keeps the mapping until it goes.
            with contextlib.suppress(BufferError):
                mapping.close()


class RegistryTarget:
    """A repository on a registry, written with oras-py (one client per repository)."""

    def __init__(
        self,
        session: RegistrySession,
        *,
        work_dir: Path | None = None,
        chunk_size: int | None = None,
    ) -> None:
        """A target over a connected session (no I/O here: see `connect`). `chunk_size`:
        upload in chunks of that size; None: each blob in one PATCH, chunks of
        CHUNK_SIZE once the registry refused that."""
        self.ref = session.ref
        self.name = str(session.ref)
        self.stats = PushStats()
        self._session = session
        self._chunk_size = _check_chunk_size(chunk_size)
        self._work_dir = work_dir
        self._host = session.ref.host
        self._repo_url = session.ref.repo_url

    @classmethod
    def connect(
        cls,
        ref: str,
        *,
        username: str | None = None,
        password: str | None = None,
        ca_bundle: Path | None = None,
        auth_files: Sequence[Path] = (),
        work_dir: Path | None = None,
        chunk_size: int | None = None,
        timeout: tuple[float, float] = (CONNECT_TIMEOUT, READ_TIMEOUT),
    ) -> RegistryTarget:
        """Check the options, then probe the registry, log in and prove push rights."""
        parsed = parse_registry_ref(ref)
        if parsed.tag or parsed.digest:
            raise ConfigError(
                f"target {ref!r}: give the repository without a tag or digest; "
                "the release is tagged vVERSION"
            )
        if (username is None) != (password is None):
            raise ConfigError("give both a registry username and a password, or neither")
        _check_chunk_size(chunk_size)
        session = RegistrySession.connect(
            parsed,
            username=username,
            password=password,
            ca_bundle=ca_bundle,
            auth_files=auth_files,
            timeout=timeout,
        )
        return cls(session, work_dir=work_dir, chunk_size=chunk_size)

    # -- Target ----------------------------------------------------------------

    def has_blob(self, digest: str) -> bool:
        resp = self._session.request(f"{self._repo_url}/blobs/{digest}", "HEAD")
        if resp.status_code == 200:
            return True
        if resp.status_code == 404:
            return False
        raise self._session.error(resp, f"checking blob {digest}")

    def _blob_size(self, digest: str) -> int | None:
        resp = self._session.request(f"{self._repo_url}/blobs/{digest}", "HEAD")
        if resp.status_code != 200:
            return None
        length = resp.headers.get("Content-Length", "")
        return int(length) if length.isdigit() else None

    def mount_blob(self, digest: str, from_repository: str) -> bool:
        """Cross-repository mount on this registry: `POST .../blobs/uploads/?mount=D&from=R`.

        True when the registry linked the blob (201, nothing uploaded); False when it
        cannot (it answers 202 with an upload session, cancelled here): copy it then.
        """
        resp = self._session.request(
            f"{self._repo_url}/blobs/uploads/?mount={digest}&from={from_repository}",
            "POST",
            headers={"Content-Length": "0"},
        )
        if resp.status_code == 201:
            log.info("mounted %s from %s into %s", digest, from_repository, self.name)
            return True
        if resp.status_code != 202:
            raise self._session.error(resp, f"mounting {digest} from {from_repository}")
        self._session.cancel_upload(resp, "the mount's upload session")
        return False

    def push_blob(self, path: Path, digest: str, size: int) -> None:
        if self.has_blob(digest):
            self.stats.blobs_skipped += 1
            return
        if self._chunk_size is not None or not self._push_whole(path, digest):
            self._push_chunked(path, digest, size)
        stored = self._blob_size(digest)
        if stored != size:
            raise TransportError(
                f"registry {self._host}: blob {digest} reads back as {stored} bytes, "
                f"expected {size}"
            )
        self.stats.blobs_uploaded += 1
        self.stats.bytes_uploaded += size
        log.info("uploaded %s (%d bytes) to %s", digest, size, self.name)

    def _push_whole(self, path: Path, digest: str) -> bool:
        """POST, the whole file in one PATCH, PUT ?digest=. False, and chunks for this
        target from now on, when any of it fails (an auth error is raised)."""
        try:
            resp = self._session.request(
                f"{self._repo_url}/blobs/uploads/", "POST", headers={"Content-Length": "0"}
            )
            if resp.status_code == 202 and (url := self._session.upload_url(resp)):
                with _mapped(path) as body:
                    resp = self._session.request(
                        url, "PATCH", data=body, headers={"Content-Type": _OCTET_STREAM}
                    )
            if resp.status_code == 202 and (url := self._session.upload_url(resp)):
                url = oras.utils.append_url_params(url, {"digest": digest})
                resp = self._session.request(url, "PUT", headers={"Content-Length": "0"})
            if resp.status_code == 201:
                return True
            why: Exception = self._session.error(resp, f"uploading {path.name} ({digest})")
        except (AssetDownloadError, requests.RequestException) as exc:
            why = exc
        log.info(
            "registry %s did not take %s in one request (%s); uploading in chunks of %d "
            "bytes from now on",
            self._host,
            digest,
            why,
            CHUNK_SIZE,
        )
        self._chunk_size = CHUNK_SIZE
        return False

    def _push_chunked(self, path: Path, digest: str, size: int) -> None:
        layer = {"digest": digest, "size": size}
        for attempt in range(1, UPLOAD_ATTEMPTS + 1):
            try:
                resp = self._session.client.chunked_upload(
                    str(path), self._session.container, layer, chunk_size=self._chunk_size
                )
            except (AssetDownloadError, requests.RequestException, ValueError) as exc:
                # ValueError: oras's own check of a PATCH answer; the session is lost.
                if attempt == UPLOAD_ATTEMPTS:
                    raise AssetDownloadError(
                        f"registry {self._host}: uploading {path.name} ({digest}) failed "
                        f"{attempt} times; last: {exc}"
                    ) from None
                log.info("restarting the upload of %s: %s", digest, exc)
                time.sleep(RETRY_DELAYS[min(attempt, len(RETRY_DELAYS)) - 1])
                continue
            if resp.status_code == 201:
                return
            error = self._session.error(resp, f"uploading {path.name} ({digest})")
            if attempt == UPLOAD_ATTEMPTS or not isinstance(error, AssetDownloadError):
                raise error

    def push_bytes(self, data: bytes, media_type_for_log: str) -> str:
        digest = sha256_digest(data)
        if self.has_blob(digest):
            self.stats.blobs_skipped += 1
            return digest
        # oras uploads from a path; these blobs are a few hundred bytes.
        with tempfile.NamedTemporaryFile(dir=self._work_dir, prefix=".blob-") as f:
            f.write(data)
            f.flush()
            self.push_blob(Path(f.name), digest, len(data))
        log.debug("pushed %s %s", media_type_for_log, digest)
        return digest

    def put_manifest(self, data: bytes, media_type: str, reference: str | None) -> None:
        digest = sha256_digest(data)
        ref = reference or digest
        resp = self._session.request(
            f"{self._repo_url}/manifests/{ref}",
            "PUT",
            data=data,
            headers={"Content-Type": media_type},
        )
        if resp.status_code not in (200, 201):
            raise self._session.error(resp, f"storing {media_type} {digest} as {ref}")
        stored = resp.headers.get("Docker-Content-Digest")
        if stored and stored != digest:
            raise TransportError(
                f"registry {self._host} stored {ref} as {stored}, not {digest}: it rewrote "
                "the manifest, which would break the signature"
            )

    def tag(self, data: bytes, media_type: str, tag: str) -> None:
        self.put_manifest(data, media_type, tag)

    def put_referrer(self, data: bytes, media_type: str, subject_digest: str) -> None:
        store_referrer(self, data, media_type, subject_digest)

    def read_manifest(self, reference: str) -> bytes | None:
        resp = self._session.request(
            f"{self._repo_url}/manifests/{reference}",
            "GET",
            headers={"Accept": ", ".join(ACCEPT_MANIFESTS)},
            stream=True,
        )
        try:
            if resp.status_code == 404:
                return None
            if resp.status_code != 200:
                raise self._session.error(resp, f"reading manifest {reference}")
            # Capped while reading (as `read_blob`), never read whole first.
            data = bytes(resp.raw.read(MAX_MANIFEST_SIZE + 1, decode_content=True))
        finally:
            resp.close()
        if len(data) > MAX_MANIFEST_SIZE:
            raise SizeLimitError(f"{self.name}: manifest {reference} exceeds {MAX_MANIFEST_SIZE}")
        if is_digest(reference):
            verify_bytes(data, reference, "manifest", self.name)
        return data

    def read_blob(self, digest: str, max_size: int) -> bytes:
        resp = self._session.request(f"{self._repo_url}/blobs/{digest}", "GET", stream=True)
        try:
            if resp.status_code != 200:
                raise self._session.error(resp, f"reading blob {digest}")
            data = resp.raw.read(max_size + 1, decode_content=True)
        finally:
            resp.close()
        if len(data) > max_size:
            raise SizeLimitError(f"{self.name}: blob {digest} exceeds {max_size} bytes")
        return verify_bytes(bytes(data), digest, "blob", self.name)

    def close(self, ok: bool) -> None:
        self._session.close()


__all__ = ["CHUNK_SIZE", "RegistryTarget"]
