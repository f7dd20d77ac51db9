"""Every documented command and env var appears in a test or an example that runs.

- Env vars: every `EXEC_SANDBOX_*` named in README.md or docs/*.md is really read by
  the code (a `load_settings` probe shows it changes the settings, or it is the
  publisher's key password variable), every variable config.py reads is documented
  in docs/configuration.md, and each one is used by a test under tests/ or by a
  runnable example.
- Commands: the commands docs/cli.md documents are exactly those of
  `exec-sandbox-assets --help`, and each one is exercised by a test or a runnable
  example.
- Runnable examples: fenced blocks whose info string carries the word `test`
  (```` ```sh test ````, ```` ```python test ````) run in order, per document, in one
  temporary directory: `/tmp/esa-` paths are moved into it, and a leading
  `python3 -m pip install -e '.[test]' &&` is dropped (the suite runs inside that
  very install, which .ci/run has just made).
- Errors: docs/troubleshooting.md quotes every error message the package raises (the
  longest literal part of each message, whitespace and backticks aside).
- Links: every relative link in the docs points at a file of the repository.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from exec_sandbox_assets.base import errors
from exec_sandbox_assets.config import ENV_PREFIX, load_settings

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TESTS = [p for p in sorted((ROOT / "tests").glob("*.py")) if p.name != Path(__file__).name]
CLI = "exec-sandbox-assets"
INSTALL_PREFIX = "python3 -m pip install -e '.[test]' && "
ENV_RE = re.compile(r"\bEXEC_SANDBOX_[A-Z][A-Z0-9_]*[A-Z0-9]\b")
FENCE_RE = re.compile(r"^```([^\n`]*)\n(.*?)^```\s*$", re.MULTILINE | re.DOTALL)
LINK_RE = re.compile(r"\]\(([^)\s]+)\)")

# Read outside config.py, by the publisher only.
PUBLISHER_VARS = {"EXEC_SANDBOX_SIGNING_KEY_PASSWORD"}


@dataclass(frozen=True)
class Block:
    doc: Path
    line: int
    lang: str
    runnable: bool
    text: str


def blocks(doc: Path) -> list[Block]:
    source = doc.read_text()
    out = []
    for m in FENCE_RE.finditer(source):
        words = m.group(1).split()
        out.append(
            Block(
                doc,
                source.count("\n", 0, m.start()) + 1,
                words[0] if words else "",
                "test" in words[1:],
                m.group(2),
            )
        )
    return out


def runnable_text() -> str:
    return "\n".join(b.text for doc in DOCS for b in blocks(doc) if b.runnable)


def _tests_text() -> str:
    return "\n".join(p.read_text() for p in TESTS)


# -------------------------------------------------------------------------- env vars


def documented_env_vars() -> set[str]:
    return {name for doc in DOCS for name in ENV_RE.findall(doc.read_text())}


def config_env_vars() -> set[str]:
    """The variables config.py reads, from its source (`ENV_PREFIX + "X"`, `_flag(env, "X")`)."""
    source = (ROOT / "src" / "exec_sandbox_assets" / "config.py").read_text()
    names = re.findall(r'(?:ENV_PREFIX \+ |_flag\(env, |_int\(env, )"([A-Z_]+)"', source)
    return {ENV_PREFIX + n for n in names}


PROBES = (
    "1",
    "2",
    "1.2.3",
    "/tmp/esa-probe",
    "example.com/probe",
    "http://127.0.0.1:9/probe",
    "https://github.com/o/r/.github/workflows/probe.yml",
)


def changes_settings(name: str, tmp_path: Path) -> bool:
    """Whether setting `name` to some valid value changes what load_settings builds."""
    base = {"EXEC_SANDBOX_CACHE_DIR": str(tmp_path / "cache")}
    reference = load_settings(env=base)
    for value in PROBES:
        try:
            settings = load_settings(env={**base, name: value})
        except Exception:  # a value of the wrong kind for this variable
            continue
        if settings != reference:
            return True
    return False


def test_docs_name_env_vars() -> None:
    assert len(documented_env_vars()) >= 10


def test_every_documented_env_var_is_read_by_the_code(tmp_path: Path) -> None:
    unread = []
    for name in sorted(documented_env_vars()):
        if name in PUBLISHER_VARS:
            continue
        if name not in config_env_vars() or not changes_settings(name, tmp_path):
            unread.append(name)
    assert unread == [], f"documented but not read by config.py: {unread}"


def test_publisher_env_vars_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    from exec_sandbox_assets.cli import publish as publish_cli

    assert {publish_cli.KEY_PASSWORD_ENV} == PUBLISHER_VARS
    monkeypatch.setenv(publish_cli.KEY_PASSWORD_ENV, "s3cret")
    assert publish_cli.key_password([]) == b"s3cret"


def test_every_env_var_config_reads_is_documented() -> None:
    text = (ROOT / "docs" / "configuration.md").read_text()
    missing = sorted(n for n in config_env_vars() if f"`{n}`" not in text)
    assert missing == [], f"read by config.py but not in docs/configuration.md: {missing}"
    assert "`DOCKER_CONFIG`" in text


def test_every_setting_is_documented() -> None:
    from exec_sandbox_assets.config import Settings

    text = (ROOT / "docs" / "configuration.md").read_text()
    missing = sorted(f for f in Settings.__dataclass_fields__ if f"`{f}`" not in text)
    assert missing == [], f"Settings fields missing from docs/configuration.md: {missing}"


def test_every_documented_env_var_is_used_by_a_test_or_example() -> None:
    corpus = _tests_text() + runnable_text()
    unused = sorted(n for n in documented_env_vars() if n not in corpus)
    assert unused == [], f"documented env vars no test or runnable example uses: {unused}"


# -------------------------------------------------------------------------- commands


def cli_help() -> str:
    exe = shutil.which(CLI)
    if exe is None:
        pytest.fail(f"{CLI} is not installed (pip install -e '.[test]')")
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def help_commands() -> set[str]:
    text = cli_help()
    listing = text.split("positional arguments:", 1)[1].split("options:", 1)[0]
    return set(re.findall(r"^    ([a-z][a-z-]*)\s", listing, re.MULTILINE))


def documented_commands() -> set[str]:
    text = (ROOT / "docs" / "cli.md").read_text()
    return set(re.findall(rf"^## `{CLI} ([a-z][a-z-]*)", text, re.MULTILINE))


def test_cli_md_documents_exactly_the_commands_of_help() -> None:
    documented, actual = documented_commands(), help_commands()
    assert actual, "no command found in --help"
    assert documented == actual, (
        f"in --help only: {sorted(actual - documented)}; "
        f"in docs/cli.md only: {sorted(documented - actual)}"
    )


def _exercised(command: str, tests: str, examples: str) -> bool:
    in_tests = re.search(rf"""["']{command}["']""", tests)
    in_examples = re.search(rf"{CLI}(?: +-[-\w]+(?:[ =][^-\s]\S*)?)* +{command}\b", examples)
    return bool(in_tests or in_examples)


def test_every_documented_command_is_exercised() -> None:
    tests, examples = _tests_text(), runnable_text()
    idle = sorted(c for c in documented_commands() if not _exercised(c, tests, examples))
    assert idle == [], f"commands no test or runnable example runs: {idle}"


# -------------------------------------------------------------------------- examples


def test_readme_starts_with_the_two_commands() -> None:
    first = blocks(ROOT / "README.md")[:2]
    assert [b.text.strip() for b in first] == [
        INSTALL_PREFIX + f"{CLI} demo --dir /tmp/esa-demo",
        "bash .ci/run",
    ]
    head = (ROOT / "README.md").read_text().split("## ", 1)[0]
    assert "bash .ci/run" in head


def _runnable_docs() -> list[Path]:
    return [d for d in DOCS if any(b.runnable for b in blocks(d))]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("doc", _runnable_docs(), ids=lambda p: p.name)
def test_runnable_examples(doc: Path, tmp_path: Path) -> None:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX) and k != "DOCKER_CONFIG"
    }
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg-cache")  # nothing lands in ~/.cache
    env["DOCKER_CONFIG"] = str(tmp_path / "docker")
    for block in (b for b in blocks(doc) if b.runnable):
        text = block.text.replace("/tmp/esa-", f"{tmp_path}/esa-")
        text = text.removeprefix(INSTALL_PREFIX)
        if block.lang in ("sh", "bash", "console"):
            cmd = ["bash", "-euo", "pipefail", "-c", text]
        elif block.lang == "python":
            cmd = [sys.executable, "-c", text]
        else:
            pytest.fail(f"{doc.name}:{block.line}: cannot run a {block.lang!r} block")
        proc = subprocess.run(
            cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, (
            f"{doc.name}:{block.line} exited {proc.returncode}\n"
            f"--- block\n{text}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
        )


def test_readme_runs_the_demo_and_help() -> None:
    runnable = [b.text for b in blocks(ROOT / "README.md") if b.runnable]
    assert any(f"{CLI} demo" in t for t in runnable)
    assert any(t.strip() == f"{CLI} --help" for t in runnable)


# -------------------------------------------------------------------------- errors

ERROR_CLASSES = {name for name in dir(errors) if name.endswith(("Error", "Locally"))} | {
    "TokenEndpointError"
}  # oci/auth.py's AuthError for token endpoints


def _normalize(text: str) -> str:
    return " ".join(text.replace("`", "").split())


def _literal_parts(node: ast.expr) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.JoinedStr):
        return [
            v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str)
        ]
    if isinstance(node, ast.BinOp):
        return _literal_parts(node.left) + _literal_parts(node.right)
    return []


def error_messages() -> list[tuple[str, str]]:
    """(where, the longest literal part) of each error the package constructs."""
    found = []
    for path in sorted((ROOT / "src" / "exec_sandbox_assets").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
            if name not in ERROR_CLASSES:
                continue
            parts = [_normalize(p).strip(" :;,.()") for p in _literal_parts(node.args[0])]
            parts = [p for p in parts if len(p) >= 10]
            if parts:
                where = f"{path.relative_to(ROOT)}:{node.lineno}"
                found.append((where, max(parts, key=len)))
    return found


def test_troubleshooting_quotes_every_error_message() -> None:
    doc = _normalize((ROOT / "docs" / "troubleshooting.md").read_text())
    messages = error_messages()
    assert len(messages) > 100
    missing = [f"{where}: {text!r}" for where, text in messages if text not in doc]
    assert missing == [], "add these messages to docs/troubleshooting.md:\n" + "\n".join(missing)


# -------------------------------------------------------------------------- links


def test_relative_links_resolve() -> None:
    broken = []
    for doc in DOCS:
        for target in LINK_RE.findall(doc.read_text()):
            if re.match(r"^[a-z]+:", target) or target.startswith("#"):
                continue
            path = (doc.parent / target.split("#", 1)[0]).resolve()
            if not path.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target}")
    assert broken == []
