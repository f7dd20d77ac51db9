"""Operator experience of the CLI (issue #11), each behaviour through a real process:
progress without `rich`, --quiet/--no-progress, --version, one report per release-level
failure, the verified digest and signer of a pull, `versions`, rough errors (TLS to a
plain-HTTP registry, a cache that cannot be written, a closed stdout), completion and
"did you mean"."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from exec_sandbox_assets import __version__
from exec_sandbox_assets.cli.commands import pull_specs
from exec_sandbox_assets.release.keys import load_public_key_file
from releases import KeyPair, SampleRelease, make_key_pair, publish_sample_release
from servers import RegistryServer
from test_cli import (
    ANSI,
    CLI,
    HOST,
    HOST_FILES,
    Result,
    key,
    layout_args,
    layout_release,
    run,
    run_in_pty,
)

# The CLI with `rich` made unimportable, as on an install without the `cli` extra.
NO_RICH = [
    sys.executable,
    "-c",
    "import sys; sys.modules['rich'] = None; "
    "from exec_sandbox_assets.cli.app import main; sys.exit(main())",
]


def cli(*args: str | Path, stdin: str = "", env: dict[str, str] | None = None) -> Result:
    proc = subprocess.run(
        [*CLI, *map(str, args)],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


# test_cli's fixtures, used here under their names.
SHARED_FIXTURES = (key, layout_release)


def args_for(release: SampleRelease, cache: Path) -> list[str]:
    return [*layout_args(release, cache), "--asset-version", release.version]


@pytest.fixture
def release(layout_release: SampleRelease) -> SampleRelease:
    """1.0.0 for this host in an OCI layout (test_cli's fixture)."""
    return layout_release


# -- progress --------------------------------------------------------------------------------


def test_without_rich_a_terminal_gets_plain_progress_lines(
    tmp_path: Path, release: SampleRelease
) -> None:
    args = args_for(release, tmp_path / "cache")
    code, screen = run_in_pty(*args, "pull", command=NO_RICH)
    text = ANSI.sub("", screen)
    assert code == 0, text
    assert "Traceback" not in text and "No module named" not in text, text
    for name in HOST_FILES:
        assert re.search(rf"^{re.escape(name)}: started \(", text, re.MULTILINE), text
        assert re.search(rf"^{re.escape(name)}: done \(", text, re.MULTILINE), text
    assert "7 file(s)" in text


@pytest.mark.parametrize(
    ("flag", "env"),
    [
        ("--no-progress", {}),
        ("--quiet", {}),
        ("", {"EXEC_SANDBOX_DISABLE_PROGRESS_BARS": "1"}),
    ],
)
def test_no_progress_quiet_and_the_environment_turn_progress_off(
    tmp_path: Path, release: SampleRelease, flag: str, env: dict[str, str]
) -> None:
    args = args_for(release, tmp_path / "cache")
    code, screen = run_in_pty(
        *args, "pull", *([flag] if flag else []), command=NO_RICH, env={**os.environ, **env}
    )
    text = ANSI.sub("", screen)
    assert code == 0, text
    assert "started (" not in text and "done (" not in text, text
    if flag == "--quiet":
        assert text.strip() == "", text  # nothing but errors
    else:
        assert "7 file(s)" in text


def test_quiet_and_no_progress_are_accepted_by_every_command(tmp_path: Path) -> None:
    for command in ("status", "verify", "gc", "keygen", "completion bash", "publish"):
        for flag in ("--quiet", "--no-progress", "-q"):
            words = command.split()
            result = run("--cache-dir", tmp_path / "c", *words[:1], flag, *words[1:], "--help")
            assert result.code == 0, (command, flag, result.stderr)
            # --help exits before unknown options are reported: the help must list it.
            assert flag in result.stdout, (command, flag)


# -- --version -------------------------------------------------------------------------------


def test_version_prints_the_program_version_and_asset_version_selects_the_release(
    tmp_path: Path, release: SampleRelease
) -> None:
    result = run("--version")
    assert (result.code, result.stdout.strip()) == (0, f"exec-sandbox-assets {__version__}")
    args = args_for(release, tmp_path / "cache")
    assert run(*args, "--asset-version", "1.0.0", "pull").code == 0
    assert run(*args, "pull", "--asset-version", "9.9.9").code == 4


# -- failures and results --------------------------------------------------------------------


def test_a_missing_release_is_reported_once_in_full_in_text_and_json(
    tmp_path: Path, release: SampleRelease
) -> None:
    args = args_for(release, tmp_path / "cache")
    text = run(*args, "--asset-version", "9.9.9", "pull")
    assert text.code == 4
    errors = [line for line in text.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, text.stderr
    assert "release v9.9.9 for " in errors[0] and errors[0].endswith(
        "not found on any source; tried:"
    )
    # The reason of each source follows, uncut.
    assert f"  - {release.target}: tag 'v9.9.9' not found in" in text.stderr
    assert "(tags present:" in text.stderr and "v1.0.0)" in text.stderr
    assert "FAILED" not in text.stdout

    doc = run(*args, "--asset-version", "9.9.9", "pull", "--json").json()
    assert len(doc["errors"]) == 1, doc["errors"]
    error = doc["errors"][0]
    # The optional PVH kernel's absence is no failure of its own; the release-level
    # error names every required file once.
    required = [s.output_name for s in pull_specs(*HOST, None) if s.required]
    assert error["scope"] == "release" and sorted(error["files"]) == sorted(required)
    assert error["exit_code"] == 4 and "tags present" in error["error"]


def test_pull_prints_and_returns_the_verified_index_digest_and_signer(
    tmp_path: Path, release: SampleRelease
) -> None:
    key_id = load_public_key_file(release.key.public).key_id
    doc = run(*args_for(release, tmp_path / "cache"), "pull", "--json").json()
    assert doc["ok"] and doc["index_digest"] == release.index_digest
    assert doc["signed_by"] == [key_id] and doc["source"] == release.target
    text = run(*args_for(release, tmp_path / "cache2"), "pull")
    assert f"index {release.index_digest} from {release.target}, signed by {key_id[:16]}" in (
        text.stdout
    )


def test_versions_lists_releases_with_digest_date_and_signature(
    tmp_path: Path, key: KeyPair, registry: RegistryServer, repo_name: str
) -> None:
    target = registry.ref(repo_name)
    old = publish_sample_release(
        target, "1.0.0", tmp_path / "w1", key=key, platforms=[HOST], created="2026-01-01T00:00:00Z"
    )
    new = publish_sample_release(
        target,
        "1.1.0",
        tmp_path / "w2",
        key=key,
        platforms=[HOST],
        created="2026-02-01T00:00:00Z",
        tag_latest=True,
    )
    key_id = load_public_key_file(key.public).key_id
    result = run("--trusted-key", key.public, "versions", target, "--json")
    assert result.code == 0, result.stderr
    doc = result.json()
    assert [r["tag"] for r in doc["releases"]] == ["latest", "v1.1.0", "v1.0.0"]  # no .sig
    by_tag = {r["tag"]: r for r in doc["releases"]}
    assert by_tag["v1.0.0"]["digest"] == old.index_digest
    assert by_tag["latest"]["digest"] == by_tag["v1.1.0"]["digest"] == new.index_digest
    assert by_tag["v1.0.0"]["created"] == "2026-01-01T00:00:00Z"
    assert by_tag["v1.0.0"]["signature"] == {
        "verified": True,
        "signed_by": [key_id],
        "signed_by_identity": [],
        "error": None,
    }

    other = make_key_pair(tmp_path / "other")
    text = run("--trusted-key", other.public, "versions", target)
    assert text.code == 0, text.stderr
    assert re.search(r"v1\.0\.0\s+2026-01-01T00:00:00Z\s+sha256:\w{12}\s+NOT verified", text.stdout)

    layout = publish_sample_release(
        f"oci:{tmp_path / 'layout'}", "2.0.0", tmp_path / "w3", key=key, platforms=[HOST]
    )
    listed = run("--trusted-key", key.public, "versions", layout.target, "--json").json()
    assert [(r["tag"], r["digest"]) for r in listed["releases"]] == [
        ("v2.0.0", layout.index_digest)
    ]


# -- rough errors ----------------------------------------------------------------------------


def test_tls_to_a_plain_http_registry_fails_at_once_and_suggests_http(
    registry: RegistryServer, repo_name: str
) -> None:
    result = run("-v", "inspect", f"https://{registry.host}/{repo_name}:v1.0.0")
    assert result.code == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    # The reference to type, not the API URL.
    assert f"it serves http, not https; name it http://{registry.host}/{repo_name}:" in errors[0]
    assert "retrying" not in result.stderr and "attempts" not in errors[0]


@contextlib.contextmanager
def read_only_dir(path: Path) -> Iterator[Path]:
    """A directory nothing can be written into, even by root (a read-only tmpfs)."""
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        yield path
        return
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", path], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", path], check=True)


def test_a_cache_that_is_a_file_or_unwritable_exits_1_naming_it(
    tmp_path: Path, release: SampleRelease
) -> None:
    file_cache = tmp_path / "cache-file"
    file_cache.write_text("not a directory")
    result = run(*args_for(release, file_cache), "pull")
    assert result.code == 1, result.stderr
    assert str(file_cache) in result.stderr and "Traceback" not in result.stderr
    assert "[Errno" not in result.stderr, result.stderr

    with read_only_dir(tmp_path / "ro") as ro:
        result = run(*args_for(release, ro / "cache"), "pull", "--json")
    assert result.code == 1, result.stderr
    assert str(ro) in result.stderr and "Traceback" not in result.stderr
    assert result.json()["errors"][0]["exit_code"] == 1


def test_a_closed_stdout_ends_quietly(tmp_path: Path, release: SampleRelease) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first line, as after `| head -0`
    try:
        proc = subprocess.run(
            [*CLI, "--trusted-key", release.key.public, "inspect", f"{release.target}:v1.0.0"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write_end)
    assert proc.returncode == 141, proc.stderr
    assert proc.stderr == "", proc.stderr


# -- completion, suggestions -----------------------------------------------------------------


def _bash_complete(line: str) -> list[str]:
    words = line.split(" ")
    script = (
        f"source <({' '.join(CLI)} completion bash)\n"
        "complete -p exec-sandbox-assets\n"
        f"COMP_WORDS=({' '.join(repr(w) for w in words)}); COMP_CWORD={len(words) - 1}\n"
        "_exec_sandbox_assets\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "complete -o default -F _exec_sandbox_assets exec-sandbox-assets"
    return lines[1:]


def test_bash_completion_completes_commands_and_their_options() -> None:
    assert _bash_complete("exec-sandbox-assets ver") == ["verify", "versions"]
    assert sorted(_bash_complete("exec-sandbox-assets --cache-dir /x pu")) == ["publish", "pull"]
    assert "--require-signature" in _bash_complete("exec-sandbox-assets inspect --re")
    assert _bash_complete("exec-sandbox-assets completion z") == ["zsh"]


def test_zsh_and_fish_scripts_name_every_command() -> None:
    commands = ["pull", "versions", "login", "mirror", "completion"]
    zsh = run("completion", "zsh")
    fish = run("completion", "fish")
    assert zsh.code == fish.code == 0
    assert zsh.stdout.startswith("#compdef exec-sandbox-assets")
    for name in commands:
        assert re.search(rf"^\s+{name}\) cands=\(", zsh.stdout, re.MULTILINE), name
        assert f"-a {name} " in fish.stdout, name
    assert "__fish_seen_subcommand_from inspect' -l require-signature" in fish.stdout


def test_a_mistyped_command_gets_suggestions() -> None:
    result = run("verions")
    assert result.code == 2
    assert "unknown command 'verions'; did you mean versions" in result.stderr
    far = run("frobnicate")
    assert far.code == 2 and "the commands are: pull, status" in far.stderr


def test_help_lists_the_new_commands(capsys: pytest.CaptureFixture[str]) -> None:
    from exec_sandbox_assets.cli.app import main

    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for name in ("versions", "login", "completion"):
        assert re.search(rf"^    {name}\s", text, re.MULTILINE), name


# -- publish ---------------------------------------------------------------------------------


def test_publish_shows_progress_prints_json_and_has_examples(tmp_path: Path, key: KeyPair) -> None:
    from exec_sandbox_assets.publish import make_sample_inputs
    from exec_sandbox_assets.release import catalog

    dist = make_sample_inputs(
        tmp_path / "dist", arches=(catalog.ARCH_OF_GOARCH[HOST[1]],), oses=(HOST[0],)
    )
    target = f"oci:{tmp_path / 'published'}"
    base: list[str | Path] = ["publish", "-i", dist, "--version", "3.0.0"]
    base += ["--key", key.private, "--level", "3"]
    code, screen = run_in_pty(*base, "--to", target, command=NO_RICH)
    text = ANSI.sub("", screen)
    assert code == 0, text
    assert re.search(r"^compress vmlinuz-x86_64: started \(", text, re.MULTILINE), text
    assert re.search(rf"^push vmlinuz-x86_64.zst -> {re.escape(target)}: done", text, re.MULTILINE)
    assert "published 3.0.0" in text

    result = run(*base, "--to", target, "--json", "--work-dir", tmp_path / "w")
    assert result.code == 0, result.stderr
    doc = result.json()
    assert doc["ok"] and doc["version"] == "3.0.0" and doc["signers"] == 1
    listed = run("--trusted-key", key.public, "versions", target, "--json").json()
    assert listed["releases"][0]["digest"] == doc["index_digest"]
    assert [t["name"] for t in doc["targets"]] == [target]

    failed = run(*base, "--to", "oci-archive:", "--json")
    assert failed.code == 2 and failed.json()["ok"] is False

    help_text = run("publish", "--help").stdout
    assert "examples:" in help_text and "--password-stdin --json" in help_text
