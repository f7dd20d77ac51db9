"""The command table: every command's name, help, examples, options and handler, and
the properties `app` acts on (whether it needs settings, prints JSON, contacts a
registry, draws progress). Handlers are named as `module:function` and imported only
when their command runs, so `--help` and completion load none of them.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from exec_sandbox_assets.cli import arguments as a

if TYPE_CHECKING:
    from exec_sandbox_assets.cli.progress import LogHandler, Ui
    from exec_sandbox_assets.config import Settings


@dataclass(frozen=True)
class Context:
    """What a handler gets: its arguments, the settings (when its command needs them),
    the log handler (bars route log lines through it) and the output choices."""

    args: argparse.Namespace
    ui: Ui
    log_handler: LogHandler | None = None
    loaded_settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        if self.loaded_settings is None:
            raise AssertionError(f"command {self.args.command!r} declared no settings")
        return self.loaded_settings


Handler = Callable[[Context], int]


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    description: str
    examples: tuple[str, ...]
    add_arguments: Callable[[argparse.ArgumentParser], None]
    handler: str  # "module:function", imported when the command runs
    settings: bool = True  # build Settings (a bad setting is then a usage error)
    json: bool = False  # has --json: one JSON document on stdout, errors included
    registry: str = ""  # contacts a registry: --username/--password-stdin, for this one
    progress: bool = False  # draws progress (bars on a terminal, lines without rich)
    own_parser: bool = False  # parses its own arguments (publish): `args.rest`

    def load(self) -> Handler:
        module, _, function = self.handler.partition(":")
        found: Handler = getattr(importlib.import_module(module), function)
        return found


_PKG = "exec_sandbox_assets.cli"

COMMANDS: tuple[Command, ...] = (
    Command(
        "pull",
        "prefetch a release's files into the cache",
        "Fetch and verify the kernel(s), initramfs, gvproxy and base images of one\n"
        "platform (default: this host) for the asset version, into the cache. Prints the\n"
        "verified index digest and the key(s) that signed it.",
        (
            "pull",
            "--asset-version 0.22.0 pull --arch aarch64 --language python",
            "pull --from oci-archive:/media/usb/assets.tar --trusted-key release.pub",
            "pull --json | jq -r '.files[].path'",
            "pull --force",
        ),
        a.pull_args,
        f"{_PKG}.commands:run_pull",
        json=True,
        registry="the --from registry, else the first registry source",
        progress=True,
    ),
    Command(
        "status",
        "show cached versions, files, partial downloads",
        "Show what the cache holds: versions, files, sizes, whether each still matches\n"
        "its verification record (a stat, no hashing), where it came from, partials.",
        ("status", "status --json", "--cache-dir /var/cache/exec-sandbox status"),
        a.no_args,
        f"{_PKG}.commands:run_status",
        json=True,
    ),
    Command(
        "verify",
        "re-check cached files (exit 3 on a mismatch)",
        "Check every cached file against its verification record (stat), or re-hash\n"
        "its content (--full). Exits 3 naming each file that does not match. A file\n"
        "whose content does not match loses its record, so the next pull or boot\n"
        "fetches it again; --repair fetches it at once (exit 0 once all are repaired).",
        (
            "verify",
            "verify --full",
            "verify --repair",
            "--asset-version 0.22.0 verify --full --json",
        ),
        a.verify_args,
        f"{_PKG}.commands:run_verify",
        json=True,
    ),
    Command(
        "gc",
        "free space: old versions, temp files (--partials: resumable downloads)",
        "Remove versions older than the newest N (the versions the floating tag and the\n"
        "configured asset version point to are kept) and temp files of interrupted\n"
        "writes. Resumable downloads (partials, verified blobs a full disk kept) are kept\n"
        "so the next pull resumes; --partials removes them too. What a running download\n"
        "holds is skipped. --dry-run prints the same plan without deleting.",
        ("gc --dry-run", "gc --keep 2", "gc --partials", "gc --json"),
        a.gc_args,
        f"{_PKG}.commands:run_gc",
        json=True,
    ),
    Command(
        "inspect",
        "show a release's platforms, files and signatures",
        "Show what a reference holds (platforms, files, sizes) and its signatures,\n"
        "and whether they verify with the trusted keys. Reports, never fails on an\n"
        "unverified signature unless --require-signature is given.",
        (
            "inspect docker://ghcr.io/dualeai/exec-sandbox-assets:v0.22.0",
            "--trusted-key release.pub inspect http://127.0.0.1:5000/assets:v0.22.0",
            "inspect oci:/srv/assets:v0.22.0 --json",
            "inspect oci-archive:assets.tar:v0.22.0 --require-signature",
        ),
        a.inspect_args,
        f"{_PKG}.inspect:run_inspect",
        json=True,
        registry="REF's registry",
    ),
    Command(
        "versions",
        "list the releases a source holds, with digest, date and signature",
        "List the release tags (vVERSION, latest) of a registry repository or an OCI\n"
        "layout, each with its index digest, its created date and whether its signature\n"
        "verifies with the trusted keys.",
        (
            "versions ghcr.io/dualeai/exec-sandbox-assets",
            "--trusted-key release.pub versions http://127.0.0.1:5000/assets --json",
            "versions oci-archive:assets.tar",
        ),
        a.versions_args,
        f"{_PKG}.versions:run_versions",
        json=True,
        registry="SOURCE's registry",
    ),
    Command(
        "mirror",
        "copy signed releases between registries, layouts and archives",
        "Copy releases from SRC to DST, verifying each signature with the trusted keys\n"
        "before anything is copied; blobs the destination has are skipped, and the tag\n"
        "is written last, so an interrupted mirror never leaves a tag naming an\n"
        "incomplete release (a re-run resumes). Digests and signatures are unchanged.",
        (
            "mirror ghcr.io/dualeai/exec-sandbox-assets oci-archive:assets.tar --version 0.22.0",
            "--trusted-key release.pub mirror ghcr.io/dualeai/exec-sandbox-assets "
            "http://10.0.0.5:5000/assets --version 0.22.0 --version latest",
            "mirror oci:/media/usb/assets registry.internal/exec-sandbox --version 0.22.0",
        ),
        a.mirror_args,
        f"{_PKG}.mirror:run_mirror",
        json=True,
        registry="DST's registry, else SRC's",
        progress=True,
    ),
    Command(
        "login",
        "store registry credentials (as docker login does)",
        "Check credentials against a registry, then store them the way docker does: with\n"
        "the credential helper config.json names (credHelpers, credsStore), else base64\n"
        "in its 'auths' (file mode 0600). Every command then uses them for that registry.",
        (
            "login ghcr.io --username me --password-stdin < token.txt",
            "login http://127.0.0.1:5000 -u admin --password-stdin",
        ),
        a.login_args,
        f"{_PKG}.login:run_login",
        registry="SERVER",
    ),
    Command(
        "keygen",
        "create a signing key pair",
        "Write a new signing key: PREFIX.key (private, mode 0600) and PREFIX.pub (the\n"
        "public key clients trust, as `cosign verify --key` takes it). With\n"
        "--password-env NAME the private key is encrypted with the password in $NAME.",
        (
            "keygen --out release",
            "keygen --algorithm ed25519 --out ci --password-env KEY_PASSWORD",
        ),
        a.keygen_args,
        f"{_PKG}.commands:run_keygen",
        settings=False,
    ),
    Command(
        "publish",
        "publish a signed release (needs the 'publish' extra)",
        "The publisher: compress build outputs, sign, push to registries, layouts,\n"
        "archives, and write the GitHub Release folder. See 'publish --help'.",
        (
            "publish --input images/dist --version 0.22.0 --key release.key "
            "--to ghcr.io/dualeai/exec-sandbox-assets",
        ),
        a.no_args,
        f"{_PKG}.app:run_publish",
        settings=False,
        own_parser=True,
    ),
    Command(
        "demo",
        "round trip: sample build, sign, publish, pull back, compare",
        "With no server and no real build: make a sample build, generate a key, publish\n"
        "a signed release into oci:DIR/layout, pull it back through the client with only\n"
        "that layout configured (air-gapped), and check every file is byte-identical.\n"
        "With --registry URL, the same against a running registry.",
        ("demo", "demo --dir /tmp/demo", "demo --registry http://127.0.0.1:5000/demo"),
        a.demo_args,
        f"{_PKG}.demo:run_demo",
        progress=True,
    ),
    Command(
        "completion",
        "print a shell completion script (bash, zsh, fish)",
        "Print a completion script for the shell, generated from this command's parser.\n"
        "Load it from the shell's startup file.",
        (
            "completion bash > ~/.local/share/bash-completion/completions/exec-sandbox-assets",
            "completion zsh > ~/.zfunc/_exec-sandbox-assets",
            "completion fish > ~/.config/fish/completions/exec-sandbox-assets.fish",
        ),
        a.completion_args,
        f"{_PKG}.completion:run_completion",
        settings=False,
    ),
)

BY_NAME = {c.name: c for c in COMMANDS}

__all__ = ["BY_NAME", "COMMANDS", "Command", "Context", "Handler"]
