"""One `--json` shape for every command, and each message said once (issue #19 item 4):
every document has `ok` and `errors` (docs/cli.md, "JSON output"), a failed pull prints
nothing on stdout, a failed source's reason is printed once, and `versions` without a
trusted key gives the hint how to configure one once, not once per tag. Each through
the CLI in a child process, against OCI layouts and a real registry."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from exec_sandbox_assets.cli.versions import NO_TRUSTED_KEY
from exec_sandbox_assets.config import packaged_keys
from exec_sandbox_assets.publish import make_sample_inputs
from releases import KeyPair, SampleRelease, make_key_pair, publish_sample_release
from servers import RegistryServer, free_port
from test_cli import HOST, Result, key, layout_args, layout_release, run
from test_cli_operator import cli

SHARED_FIXTURES = (key, layout_release)
ERROR_KEYS = {"scope", "files", "error", "type", "exit_code"}


def check_shape(result: Result, code: int) -> dict[str, Any]:
    """The document of `result`: `ok` first, `errors` last, as the exit code says."""
    assert result.code == code, (result.code, result.stderr)
    doc: dict[str, Any] = result.json()
    keys = list(doc)
    assert keys[0] == "ok" and keys[-1] == "errors", keys
    assert doc["ok"] is (code == 0), doc
    if code == 0:
        assert doc["errors"] == [], doc["errors"]
        return doc
    assert doc["errors"], doc
    for error in doc["errors"]:
        assert ERROR_KEYS <= set(error), error
        assert (
            error["error"]
            and error["type"]
            and error["scope"]
            in (
                "command",
                "release",
                "file",
            )
        )
    assert max(e["exit_code"] for e in doc["errors"]) == code, doc["errors"]
    return doc


def test_every_command_s_json_has_ok_and_errors_on_success_and_on_failure(
    tmp_path: Path, layout_release: SampleRelease, key: KeyPair
) -> None:
    release = layout_release
    cache = tmp_path / "cache"
    settings = [*layout_args(release, cache), "--asset-version", "1.0.0"]
    ref = f"{release.target}:v1.0.0"
    stranger = make_key_pair(tmp_path / "stranger")

    check_shape(run(*settings, "pull", "--json"), 0)
    missing = check_shape(run(*settings, "--asset-version", "9.9.9", "pull", "--json"), 4)
    assert missing["errors"][0]["scope"] == "release" and missing["files"] == []

    check_shape(run(*settings, "status", "--json"), 0)
    bad_setting = cli(
        *settings, "status", "--json", env={**os.environ, "EXEC_SANDBOX_CONCURRENCY": "0"}
    )
    assert check_shape(bad_setting, 2)["errors"][0]["scope"] == "command"

    check_shape(run(*settings, "verify", "--json"), 0)
    not_cached = check_shape(run(*settings, "--asset-version", "9.9.9", "verify", "--json"), 4)
    assert not_cached["results"] == []
    changed = next(p for p in (cache / "v1.0.0").iterdir() if p.name == "vmlinux-x86_64")
    with changed.open("ab") as f:
        f.write(b"!")  # the size no longer matches its record
    mismatch = check_shape(run(*settings, "verify", "--json"), 3)
    assert mismatch["errors"][0]["files"] == ["vmlinux-x86_64"], mismatch["errors"]

    check_shape(run(*settings, "gc", "--dry-run", "--json"), 0)
    check_shape(run(*settings, "gc", "--keep", "-1", "--json"), 2)
    usage = check_shape(run(*settings, "gc", "--keep", "two", "--json"), 2)
    assert "--keep" in usage["errors"][0]["error"] and usage["errors"][0]["type"] == "ConfigError"

    check_shape(run("--trusted-key", key.public, "inspect", ref, "--json"), 0)
    refused = run("--trusted-key", stranger.public, "inspect", ref, "--require-signature", "--json")
    doc = check_shape(refused, 3)
    assert doc["digest"] == release.index_digest  # the report is still there
    check_shape(run("inspect", f"oci:{tmp_path / 'nowhere'}:v1.0.0", "--json"), 4)

    check_shape(run("--trusted-key", key.public, "versions", release.target, "--json"), 0)
    check_shape(run("versions", f"oci:{tmp_path / 'nowhere'}", "--json"), 4)

    mirror = ["mirror", release.target, f"oci:{tmp_path / 'copy'}", "--version", "1.0.0"]
    check_shape(run("--trusted-key", key.public, *mirror, "--json"), 0)
    check_shape(run("--trusted-key", stranger.public, *mirror, "--json"), 3)

    dist = make_sample_inputs(tmp_path / "dist", size=4096)
    publish: list[str | Path] = [
        *("publish", "--input", dist, "--version", "3.0.0", "--key", key.private),
        *("--platform", f"{HOST[0]}/{HOST[1]}", "--level", "1", "--json"),
    ]
    check_shape(run(*publish, "--to", f"oci:{tmp_path / 'published'}"), 0)
    check_shape(run(*publish, "--to", f"oci:{tmp_path / 'published'}", "--bogus"), 2)
    no_input = [a if a != dist else tmp_path / "no-such-dir" for a in publish]
    check_shape(run(*no_input, "--to", f"oci:{tmp_path / 'published2'}"), 2)


def test_a_pull_that_gets_nothing_prints_nothing_on_stdout(
    tmp_path: Path, layout_release: SampleRelease
) -> None:
    args = [*layout_args(layout_release, tmp_path / "cache"), "--asset-version", "9.9.9"]
    result = run(*args, "pull")
    assert result.code == 4, result.stderr
    assert result.stdout == "", result.stdout
    assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == 1


def test_a_failed_source_s_reason_is_printed_once_whether_the_next_one_serves_or_not(
    tmp_path: Path, registry: RegistryServer, key: KeyPair, repo_name: str
) -> None:
    release = publish_sample_release(
        registry.ref(repo_name), "1.0.0", tmp_path / "work", key=key, platforms=[HOST]
    )
    down = f"http://127.0.0.1:{free_port()}/{repo_name}"  # nothing listens there
    absent = registry.ref("test/absent")
    common: list[str | Path] = ["--airgap", "--trusted-key", key.public, "--asset-version", "1.0.0"]

    served = run(*common, "--cache-dir", tmp_path / "c1", "--mirror", down, "--mirror",
                 release.target, "pull")  # fmt: skip
    assert served.code == 0, served.stderr
    assert served.stderr.count("is unreachable") == 1, served.stderr
    warning = served.stderr.strip()
    assert warning.startswith(f"warning: release v1.0.0 for {HOST[0]}/{HOST[1]}: registry {down}")
    assert warning.endswith(f"used registry {release.target} instead"), warning

    failed = run(*common, "--cache-dir", tmp_path / "c2", "--mirror", down, "--mirror", absent,
                 "pull")  # fmt: skip
    assert failed.code == 1, failed.stderr
    assert failed.stderr.count("is unreachable") == 1, failed.stderr
    assert failed.stderr.count("manifest unknown") == 1, failed.stderr
    assert "warning:" not in failed.stderr and "trying the next" not in failed.stderr
    assert failed.stdout == ""


@pytest.mark.skipif(bool(packaged_keys()), reason="the package ships trusted keys")
def test_versions_without_a_trusted_key_gives_the_hint_once(
    tmp_path: Path, registry: RegistryServer, key: KeyPair, repo_name: str
) -> None:
    target = registry.ref(repo_name)
    for version in ("1.0.0", "1.1.0"):
        publish_sample_release(
            target, version, tmp_path / "w", key=key, platforms=[HOST], tag_latest=True
        )
    # Keyless trust off too (the default trusts the release workflow): nobody is trusted.
    text = run("--trusted-workflow", "", "versions", target)
    assert text.code == 0, text.stderr
    rows = text.stdout.splitlines()[1:]
    assert len(rows) == 3 and all(r.endswith(f"NOT verified: {NO_TRUSTED_KEY}")
                                  for r in rows), rows  # fmt: skip
    assert text.stderr.count("EXEC_SANDBOX_TRUSTED_KEYS") == 1, text.stderr
    assert "EXEC_SANDBOX_TRUSTED_KEYS" not in text.stdout

    doc = run("--trusted-workflow", "", "versions", target, "--json").json()
    assert doc["ok"] and "EXEC_SANDBOX_TRUSTED_KEYS" in doc["hint"]
    assert {r["signature"]["error"] for r in doc["releases"]} == {NO_TRUSTED_KEY}
    # With the key, the hint is gone and each release verifies.
    trusted = run("--trusted-key", key.public, "versions", target, "--json").json()
    assert trusted["hint"] is None and all(r["signature"]["verified"] for r in trusted["releases"])
