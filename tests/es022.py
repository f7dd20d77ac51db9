"""exec-sandbox 0.22.0 from PyPI in a Python 3.12 venv, with and without the swap.

The venv (exec-sandbox==0.22.0 plus this package's dependencies) is built once and kept
in ~/.cache/esa-compat/venv312 (`.ci/run` builds it too). `shim_tree` copies its
`exec_sandbox` package into a directory whose `assets.py` is the README's one-line
switch; that directory goes first on PYTHONPATH, so the same venv runs either the
original module or ours. No pytest dependency.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ES_VERSION = "0.22.0"
VENV = Path.home() / ".cache" / "esa-compat" / "venv312"
SRC = Path(__file__).resolve().parent.parent / "src"
TESTS = Path(__file__).resolve().parent
SWITCH = (
    "from exec_sandbox_assets.compat import install; install(__name__, __file__)  # noqa: E702\n"
)
# This package's dependencies, and what exec-sandbox's own tests run with.
DEPS = (
    "httpx>=0.27",
    "zstandard>=0.22",
    "cryptography>=42",
    "platformdirs>=4",
    "pytest~=8.0",
    "pytest-asyncio~=1.1",
)
READY_MARK = VENV / f".exec-sandbox-{ES_VERSION}-ready-2"
SDIST_DIR = VENV.parent / "sdist"
UPSTREAM = SDIST_DIR / f"exec_sandbox-{ES_VERSION}"


def _runs(python: str) -> bool:
    try:
        out = subprocess.run(
            [python, "-c", "import sys; print(sys.version_info[:2] == (3, 12))"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except OSError:
        return False
    return out.stdout.strip() == "True"


def find_python312() -> str | None:
    """A working Python 3.12: the newest pyenv 3.12.x, else `python3.12` on PATH (a pyenv
    shim on PATH may exist without a 3.12 selected, so each candidate is run once)."""
    root = os.environ.get("PYENV_ROOT") or str(Path.home() / ".pyenv")
    candidates = sorted(glob.glob(f"{root}/versions/3.12.*/bin/python3"), reverse=True)
    if found := shutil.which("python3.12"):
        candidates.append(found)
    return next((c for c in candidates if _runs(c)), None)


def venv_python() -> Path:
    return VENV / "bin" / "python"


def ensure_venv(python: str) -> Path:
    """The cached venv, created (and filled from the configured package index) if needed."""
    if READY_MARK.exists() and venv_python().exists():
        return venv_python()
    VENV.parent.mkdir(parents=True, exist_ok=True)
    if not venv_python().exists():
        subprocess.run([python, "-m", "venv", str(VENV)], check=True)
    pip = [str(venv_python()), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, f"exec-sandbox=={ES_VERSION}", *DEPS], check=True)
    READY_MARK.write_text("ok\n")
    return venv_python()


def site_packages() -> Path:
    out = subprocess.run(
        [
            str(venv_python()),
            "-c",
            "import exec_sandbox, os; print(os.path.dirname(exec_sandbox.__file__))",
        ],
        check=True,
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    return Path(out.stdout.strip()).parent


def shim_tree(dest: Path) -> Path:
    """A copy of the venv's exec_sandbox package whose assets.py is the one-line switch."""
    package = dest / "exec_sandbox"
    if not package.exists():
        shutil.copytree(
            site_packages() / "exec_sandbox",
            package,
            ignore=shutil.ignore_patterns("__pycache__"),
        )
        (package / "assets.py").write_text(SWITCH)
    return dest


def upstream_sources() -> Path | None:
    """exec-sandbox 0.22.0's source distribution (it carries tests/), downloaded once
    with pip into ~/.cache/esa-compat/sdist; None when it cannot be had."""
    if (UPSTREAM / "tests" / "test_assets.py").is_file():
        return UPSTREAM
    SDIST_DIR.mkdir(parents=True, exist_ok=True)
    got = subprocess.run(
        [
            str(venv_python()),
            "-m",
            "pip",
            "download",
            "-q",
            "--no-binary",
            ":all:",
            "--no-deps",
            "-d",
            str(SDIST_DIR),
            f"exec-sandbox=={ES_VERSION}",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    archive = SDIST_DIR / f"exec_sandbox-{ES_VERSION}.tar.gz"
    if got.returncode != 0 or not archive.is_file():
        return None
    import tarfile

    with tarfile.open(archive) as tar:
        tar.extractall(SDIST_DIR, filter="data")
    return UPSTREAM if (UPSTREAM / "tests" / "test_assets.py").is_file() else None


def run_upstream_tests(shim: Path | None, junit: Path, env: dict[str, str]) -> Run:
    """exec-sandbox's own tests/test_assets.py, as its CI runs it (asyncio auto mode),
    serially and without its addopts (xdist is not installed)."""
    paths = [str(shim), str(SRC)] if shim else []
    base = {k: v for k, v in os.environ.items() if not k.startswith("EXEC_SANDBOX_")}
    base.pop("PYTHONPATH", None)
    full = {**base, **env, "PYTHONPATH": os.pathsep.join(paths), "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run(
        [
            str(venv_python()),
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-o",
            "addopts=",
            f"--junitxml={junit}",
            "tests/test_assets.py",
        ],
        cwd=UPSTREAM,
        env=full,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    return Run(proc.returncode, proc.stdout, proc.stderr)


def junit_outcomes(junit: Path) -> dict[str, str]:
    """test id (Class::test) -> passed / failed / skipped."""
    import xml.etree.ElementTree as ET

    outcomes: dict[str, str] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname', '').rpartition('.')[2]}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            outcomes[name] = "failed"
        elif case.find("skipped") is not None:
            outcomes[name] = "skipped"
        else:
            outcomes[name] = "passed"
    return outcomes


@dataclass(frozen=True)
class Run:
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        lines = [line for line in self.stdout.splitlines() if line.startswith("{")]
        if not lines:
            raise AssertionError(f"no JSON on stdout:\n{self.stdout}\n--- stderr:\n{self.stderr}")
        return json.loads(lines[-1])


def run(
    args: list[str],
    *,
    env: dict[str, str],
    shim: Path | None,
    timeout: float = 120,
) -> Run:
    """`python -m es022_probe ARGS` in the venv: with our module when `shim` is given,
    else exec-sandbox's original. `env` replaces EXEC_SANDBOX_* and HOME/XDG of the parent."""
    paths = ([str(shim)] if shim else []) + [str(TESTS)] + ([str(SRC)] if shim else [])
    base = {k: v for k, v in os.environ.items() if not k.startswith("EXEC_SANDBOX_")}
    base.pop("PYTHONPATH", None)
    full = {**base, **env, "PYTHONPATH": os.pathsep.join(paths)}
    proc = subprocess.run(
        [str(venv_python()), "-m", "es022_probe", *args],
        env=full,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return Run(proc.returncode, proc.stdout, proc.stderr)


__all__ = [
    "ES_VERSION",
    "SWITCH",
    "Run",
    "ensure_venv",
    "find_python312",
    "junit_outcomes",
    "run",
    "run_upstream_tests",
    "shim_tree",
    "upstream_sources",
]

if __name__ == "__main__":  # `python tests/es022.py`: build the venv (CI does this up front)
    py = find_python312()
    if py is None:
        print("no Python 3.12 found; the exec-sandbox 0.22.0 tests will skip", file=sys.stderr)
        sys.exit(0)
    print(ensure_venv(py))
    print(upstream_sources() or "exec-sandbox's sdist (its own tests) could not be downloaded")
