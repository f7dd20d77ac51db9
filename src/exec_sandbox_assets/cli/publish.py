"""`python -m exec_sandbox_assets.publish` / `exec-sandbox-assets publish`.

The main CLI mounts it with `build_parser(prog)` and `run(args)`; `main(argv)` is the
standalone entry point. Exit codes: 0 done, 2 bad input (arguments, files, keys,
passwords, conflicting tag), 1 any other failure (network, registry, auth), 130
interrupted.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from exec_sandbox_assets.base.errors import AssetError, ConfigError, FormatError
from exec_sandbox_assets.cli.arguments import add_json, add_output_options
from exec_sandbox_assets.cli.output import (
    emit_json,
    human_size,
    json_result,
    report_error,
    report_interrupted,
)
from exec_sandbox_assets.cli.progress import LogHandler, Ui, progress_display
from exec_sandbox_assets.config import progress_bars_enabled, progress_interval
from exec_sandbox_assets.publish.compress import DEFAULT_LEVEL
from exec_sandbox_assets.publish.keyless import KeylessOptions
from exec_sandbox_assets.publish.publisher import PublishRequest, PublishResult, publish
from exec_sandbox_assets.release import catalog, keyless

KEY_PASSWORD_ENV = "EXEC_SANDBOX_SIGNING_KEY_PASSWORD"  # noqa: S105 (a variable name)
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input",
        "-i",
        metavar="DIR",
        type=Path,
        action="append",
        required=True,
        help="build output directory (images/dist, the gvproxy build dir); "
        "repeatable, searched in order",
    )
    parser.add_argument(
        "--version",
        dest="release_version",
        metavar="V",
        required=True,
        help="release version, e.g. 0.22.0 (tagged v0.22.0)",
    )
    parser.add_argument(
        "--to",
        metavar="TARGET",
        action="append",
        default=[],
        help="where to publish, repeatable: http://HOST:PORT/REPO (plain HTTP), "
        "HOST/REPO (HTTPS), oci:DIR, oci-archive:FILE",
    )
    parser.add_argument(
        "--key",
        metavar="FILE",
        type=Path,
        action="append",
        default=[],
        help="PEM private signing key; repeat during a key rotation (each "
        f"signs). Password from ${KEY_PASSWORD_ENV}, else prompted on a tty. "
        "Optional with --keyless",
    )
    parser.add_argument(
        "--keyless",
        action="store_true",
        help="also sign keyless through Sigstore with the CI job's OIDC identity (GitHub "
        "Actions: `permissions: id-token: write`); the bundle is stored as an OCI "
        "referrer of the index and in the release folder, verified before tags move",
    )
    parser.add_argument(
        "--keyless-bundle",
        metavar="FILE",
        type=Path,
        help="store this Sigstore bundle (made elsewhere over this release's statement) "
        "instead of signing; verified like a new one. Implies --keyless",
    )
    parser.add_argument(
        "--keyless-workflow",
        metavar="URL",
        action="append",
        default=[],
        help="workflow the keyless signature must come from, at tag vVERSION; repeatable "
        f"(default {keyless.DEFAULT_TRUSTED_WORKFLOW})",
    )
    parser.add_argument(
        "--sigstore-root",
        metavar="FILE",
        type=Path,
        action="append",
        default=[],
        help="trusted_root.json the keyless signature must verify with; repeatable, each "
        "one checked (the release job adds the oldest supported client's). Default: the "
        "one packaged with this version",
    )
    parser.add_argument(
        "--platform",
        metavar="OS/ARCH",
        action="append",
        help="host platform to publish (linux/amd64, linux/arm64, darwin/arm64, "
        "darwin/amd64); repeatable. Default: those whose gvproxy binary exists",
    )
    parser.add_argument("--latest", action="store_true", help="also move the tag 'latest'")
    parser.add_argument(
        "--release-dir",
        metavar="DIR",
        type=Path,
        help="also write the GitHub Release asset folder here",
    )
    parser.add_argument(
        "--replace-release-dir",
        action="store_true",
        help="let --release-dir replace a folder that holds another release "
        "(refused by default, naming the version it holds)",
    )
    parser.add_argument(
        "--created",
        metavar="RFC3339",
        help="release time (default: that of an existing vV tag, else now)",
    )
    parser.add_argument("--revision", metavar="SHA", help="source revision (git commit)")
    parser.add_argument(
        "--level",
        type=int,
        default=DEFAULT_LEVEL,
        help=f"zstd level (default {DEFAULT_LEVEL}; 3 is fast for local runs)",
    )
    parser.add_argument(
        "--work-dir",
        metavar="DIR",
        type=Path,
        help="keep compressed files here so a re-run skips compressing (default: a temp dir)",
    )
    parser.add_argument("--username", help="registry user name")
    parser.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the registry password or token from stdin",
    )
    parser.add_argument(
        "--ca-bundle",
        metavar="FILE",
        type=Path,
        help="CA certificates (PEM) for a registry with a private CA",
    )
    parser.add_argument(
        "--docker-reference",
        default=catalog.DEFAULT_REPOSITORY,
        help="identity written into the signature payload",
    )
    parser.add_argument(
        "--replace",
        action="store_true",
        help="allow moving an existing vV tag to different content",
    )
    add_json(parser)
    add_output_options(parser)
    parser.add_argument(
        "--replace-signatures",
        action="store_true",
        help="keep only signatures by the given keys (default: add to the existing ones)",
    )


def keyless_options(args: argparse.Namespace) -> KeylessOptions | None:
    """--keyless, --keyless-bundle, --keyless-workflow, --sigstore-root as options."""
    if not (args.keyless or args.keyless_bundle):
        if args.keyless_workflow or args.sigstore_root:
            raise ConfigError("--keyless-workflow and --sigstore-root need --keyless")
        return None
    from exec_sandbox_assets.publish import keyless as keyless_step

    signer = (
        keyless_step.file_signer(args.keyless_bundle)
        if args.keyless_bundle
        else keyless_step.ambient_signer
    )
    workflows = tuple(
        keyless.Workflow.parse(w, "--keyless-workflow")
        for w in args.keyless_workflow or [keyless.DEFAULT_TRUSTED_WORKFLOW]
    )
    roots: tuple[Path | None, ...] = tuple(args.sigstore_root) or (None,)
    return KeylessOptions(signer, workflows, roots)


def _key_is_encrypted(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            head = f.read(4096)
    except OSError:
        return False  # the loader reports it properly
    return b"ENCRYPTED" in head


def key_password(keys: Sequence[Path]) -> bytes | None:
    """From the environment, else a prompt when a key needs one and we can ask."""
    # Read here, at the CLI edge, not in config.py: a secret of the publisher only, which
    # the library never sees (it takes `PublishRequest.key_password`).
    env = os.environ.get(KEY_PASSWORD_ENV)
    if env is not None:
        return env.encode()
    encrypted = [k for k in keys if _key_is_encrypted(k)]
    if not encrypted:
        return None
    if sys.stdin.isatty():
        return getpass.getpass("signing key password: ").encode()
    raise ConfigError(
        f"{encrypted[0]}: the private key is encrypted and no password is available: "
        f"set {KEY_PASSWORD_ENV} (or run on a terminal to be prompted)"
    )


def _parse_platforms(values: Sequence[str] | None) -> tuple[tuple[str, str], ...] | None:
    if not values:
        return None
    return tuple(catalog.parse_platform(v) for v in values)


def _registry_password(args: argparse.Namespace) -> str | None:
    if not args.username and not args.password_stdin:
        return None  # docker's or podman's credentials for each registry target
    # Imported here: cli.login brings httpx (~80 ms), which a publish without a login never needs.
    from exec_sandbox_assets.cli.login import read_registry_password

    return read_registry_password(args.username, args.password_stdin)


def result_json(result: PublishResult) -> dict[str, Any]:
    """`publish --json`: what was published where, with every digest."""
    return json_result(
        {
            "version": result.version,
            "created": result.created,
            "index_digest": result.index_digest,
            "manifests": {f"{o}/{a}": d for (o, a), d in result.manifest_digests.items()},
            "signature_tag": result.signature_tag,
            "signature_digest": result.signature_digest,
            "signers": result.signers,
            "signatures": result.signatures,
            "signatures_added": result.signatures_added,
            "keyless_identity": result.keyless_identity,
            "bundle_digest": result.bundle_digest,
            "targets": [
                {
                    "name": t.name,
                    "blobs_uploaded": t.blobs_uploaded,
                    "bytes_uploaded": t.bytes_uploaded,
                    "blobs_skipped": t.blobs_skipped,
                    "tags": list(t.tags),
                }
                for t in result.targets
            ],
            "release_dir": result.release_dir,
            "release_files": list(result.release_files),
        }
    )


def signature_count(result: PublishResult) -> str:
    """What the signature manifest holds now and how many of those this run made:
    "2 signatures (1 added)" after a second key (kept signatures count too)."""
    noun = "signature" if result.signatures == 1 else "signatures"
    return f"{result.signatures} {noun} ({result.signatures_added} added)"


def format_summary(result: PublishResult) -> str:
    lines = [
        f"published {result.version} (created {result.created})",
        f"  {'index':<12} {result.index_digest}",
    ]
    for (os_, goarch), digest in result.manifest_digests.items():
        lines.append(f"  {os_ + '/' + goarch:<12} {digest}")
    if result.signature_digest is not None:
        lines.append(f"  {'signature':<12} {result.signature_tag}: {signature_count(result)}")
    if result.keyless_identity is not None:
        lines.append(f"  {'keyless':<12} {result.bundle_digest} ({result.keyless_identity})")
    for t in result.targets:
        lines.append(
            f"  {t.name}: uploaded {t.blobs_uploaded} blob(s) ({human_size(t.bytes_uploaded)}), "
            f"skipped {t.blobs_skipped}; tagged {', '.join(t.tags)}"
        )
    if result.release_dir is not None:
        lines.append(f"  release folder {result.release_dir}: {len(result.release_files)} files")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.quiet and not args.verbose:
        level = logging.ERROR
    else:
        level = (
            logging.DEBUG if args.verbose > 1 else logging.INFO if args.verbose else logging.WARNING
        )
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    elif level < root.level:  # under the main CLI: its handler prints, this -v sets the level
        root.setLevel(level)
    log_handler = next((h for h in root.handlers if isinstance(h, LogHandler)), None)
    try:
        ui = Ui(args.quiet, not args.no_progress and progress_bars_enabled(), progress_interval())
        with tempfile.TemporaryDirectory(prefix="exec-sandbox-publish-") as tmp:
            request = PublishRequest(
                inputs=tuple(args.input),
                version=args.release_version,
                targets=tuple(args.to),
                keys=tuple(args.key),
                key_password=key_password(args.key),
                platforms=_parse_platforms(args.platform),
                tag_latest=args.latest,
                release_dir=args.release_dir,
                replace_release_dir=args.replace_release_dir,
                work_dir=args.work_dir or Path(tmp),
                created=args.created,
                revision=args.revision,
                docker_reference=args.docker_reference,
                level=args.level,
                username=args.username,
                password=_registry_password(args),
                ca_bundle=args.ca_bundle,
                replace=args.replace,
                replace_signatures=args.replace_signatures,
                keyless=keyless_options(args),
            )
            with progress_display(ui, log_handler) as bars:
                result = publish(replace(request, progress=bars))
    except (AssetError, OSError) as exc:
        code = EXIT_BAD_INPUT if isinstance(exc, ConfigError | FormatError) else EXIT_FAILURE
        return report_error(exc, code, args.json)
    except KeyboardInterrupt:
        return report_interrupted("interrupted; tags were not moved (a re-run resumes)", args.json)
    if args.json:
        emit_json(result_json(result))
    elif not args.quiet:
        print(format_summary(result))
    return 0


EPILOG = """\
examples:
  # sign with release.key (password from $EXEC_SANDBOX_SIGNING_KEY_PASSWORD) and push
  %(prog)s --input images/dist --input gvproxy-wrapper/bin --version 0.22.0 \\
      --key release.key --to ghcr.io/dualeai/exec-sandbox-assets --latest
  # a local registry (plain HTTP), a layout and an archive, plus the GitHub Release folder
  %(prog)s -i dist --version 0.22.0 --key release.key --to http://127.0.0.1:5000/assets \\
      --to oci:/srv/assets --to oci-archive:assets.tar --release-dir release/
  # in the release workflow: keyless (OIDC identity of this job) and a key
  %(prog)s -i dist --version 0.22.0 --keyless --key release.key \
      --to ghcr.io/dualeai/exec-sandbox-assets --release-dir release/
  # quick local run: fast compression, a registry login, the result as JSON
  echo "$TOKEN" | %(prog)s -i dist --version 0.22.0-rc1 --key release.key --level 3 \\
      --to registry.internal/assets --username ci --password-stdin --json

exit codes: 0 published, 1 failed (network, registry, auth), 2 bad input (arguments,
files, keys, passwords, a conflicting tag), 130 interrupted (tags not moved; a re-run
resumes).
"""


def build_parser(prog: str = "python -m exec_sandbox_assets.publish") -> argparse.ArgumentParser:
    from exec_sandbox_assets.cli.parser import Parser  # a usage error --json reports

    parser = Parser(
        prog=prog,
        description="Publish exec-sandbox assets as signed OCI artifacts "
        "(registry, OCI layout, archive) and a GitHub Release folder.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    from exec_sandbox_assets.cli.parser import parse_failed

    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return parse_failed(exc, argv)
    return run(args)


__all__ = [
    "KEY_PASSWORD_ENV",
    "add_arguments",
    "build_parser",
    "format_summary",
    "main",
    "result_json",
    "run",
]
