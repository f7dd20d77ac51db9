"""What a command's process loads before it works: the command line declines the optional
packages our dependencies import only because they are installed (`cli.startup`), the
cache-only commands load no network or crypto stack, and neither choice leaks into a
program that calls the library or `main(argv)` itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from exec_sandbox_assets.release import catalog
from releases import make_key_pair, publish_sample_release
from servers import RegistryServer

HOST = catalog.host_platform()

# Stands in for an installed package and records that it was imported; then behaves as
# an absent one, so the process works either way and only the record tells.
_STUB = (
    "import os\n"
    "with open(os.environ['STUB_IMPORTS'], 'a') as f:\n"
    "    f.write(__name__ + '\\n')\n"
    "raise ImportError(__name__ + ' is a test stub')\n"
)


def _stubbed_env(tmp_path: Path, *names: str) -> tuple[dict[str, str], Path]:
    stubs = tmp_path / "stubs"
    for name in names:
        (stubs / name).mkdir(parents=True)
        (stubs / name / "__init__.py").write_text(_STUB)
    record = tmp_path / "imported.txt"
    record.write_text("")
    path = os.pathsep.join(p for p in (str(stubs), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "STUB_IMPORTS": str(record)}, record


def test_a_registry_pull_never_imports_trio_or_httpx_own_command_line(
    tmp_path: Path, registry: RegistryServer, repo_name: str
) -> None:
    # trio: httpcore imports it when installed; click: httpx imports its `httpx` script
    # (click, rich, pygments) when installed. This command uses neither.
    key = make_key_pair(tmp_path / "keys")
    release = publish_sample_release(
        registry.ref(repo_name), "1.0.0", tmp_path / "work", key=key, platforms=[HOST]
    )
    env, record = _stubbed_env(tmp_path, "trio", "click")
    cache = tmp_path / "cache"
    args = ["--cache-dir", str(cache), "--airgap", "--trusted-key", str(key.public)]
    args += ["--mirror", release.target, "--asset-version", "1.0.0", "pull", "--json"]
    for entry in (
        ["-m", "exec_sandbox_assets.cli"],  # python -m
        ["-c", "from exec_sandbox_assets.cli import main; raise SystemExit(main())"],  # script
    ):
        proc = subprocess.run(
            [sys.executable, *entry, *args], env=env, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr
        files = json.loads(proc.stdout)["files"]
        assert files and all(
            Path(f["path"]).read_bytes() == release.expected(f["name"]) for f in files
        )
        assert record.read_text() == "", f"imported: {record.read_text().split()}"


def test_the_cache_commands_load_no_network_or_crypto_stack(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from exec_sandbox_assets.cli import main\n"
        f"cache = {str(tmp_path / 'cache')!r}\n"
        "for argv in (['status'], ['verify'], ['gc', '--dry-run'], ['status', '--json']):\n"
        "    main(['--cache-dir', cache, '--asset-version', '1.0.0', *argv])\n"
        "heavy = ('httpx', 'httpcore', 'cryptography', 'zstandard', 'rich', 'sigstore')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert proc.stdout.splitlines()[-1] == "[]", proc.stdout + proc.stderr


def test_a_program_calling_main_with_argv_keeps_trio_importable(tmp_path: Path) -> None:
    # Only the command line's own process declines those modules; a host program that
    # runs `main(argv)` (or the library) keeps whatever it has installed.
    code = (
        "import sys\n"
        "from exec_sandbox_assets.cli import main\n"
        f"main(['--cache-dir', {str(tmp_path / 'cache')!r}, 'status'])\n"
        "blocked = [n for n in ('trio', 'httpx._main') if n in sys.modules and not sys.modules[n]]\n"
        "print(blocked)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert proc.stdout.splitlines()[-1] == "[]", proc.stdout + proc.stderr
