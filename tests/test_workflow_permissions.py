"""The workflows ask for the least they need: release.yml grants `packages: write`,
`contents: write` (the release upload) and `id-token: write` (the keyless signature's
OIDC token) to its publish job only and nothing by default; ci.yml only reads."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def job_permissions(workflow: Path) -> tuple[dict[str, str] | None, dict[str, dict[str, str]]]:
    """(top-level permissions, {job: permissions}) read from a workflow's YAML text.

    A small reader for the two shapes used here: `permissions: {}` / `permissions:
    read-all` on one line, or a block of `scope: level` lines indented under it."""
    lines = workflow.read_text().splitlines()

    def block(start: int, indent: int) -> dict[str, str]:
        head = lines[start].split("#", 1)[0].strip()
        inline = head.removeprefix("permissions:").strip()
        if inline:
            return {"*": inline} if inline != "{}" else {}
        out: dict[str, str] = {}
        for line in lines[start + 1 :]:
            text = line.split("#", 1)[0].rstrip()
            if not text.strip():
                continue
            if len(text) - len(text.lstrip()) <= indent:
                break
            scope, _, level = text.strip().partition(":")
            out[scope.strip()] = level.strip()
        return out

    top: dict[str, str] | None = None
    jobs: dict[str, dict[str, str]] = {}
    job: str | None = None
    in_jobs = False
    for n, line in enumerate(lines):
        text = line.split("#", 1)[0].rstrip()
        if not text.strip():
            continue
        indent = len(text) - len(text.lstrip())
        if indent == 0:
            in_jobs = text == "jobs:"
            job = None
            if text.startswith("permissions:"):
                top = block(n, 0)
        elif in_jobs and indent == 2 and text.endswith(":"):
            job = text.strip().removesuffix(":")
            jobs[job] = {}
        elif job is not None and indent == 4 and text.strip().startswith("permissions:"):
            jobs[job] = block(n, 4)
    return top, jobs


def test_release_workflow_grants_packages_write_to_the_publish_job_only() -> None:
    top, jobs = job_permissions(ROOT / ".github" / "workflows" / "release.yml")
    assert top == {}, "release.yml must grant nothing by default"
    assert "publish" in jobs, sorted(jobs)
    assert jobs["publish"] == {"contents": "write", "packages": "write", "id-token": "write"}
    for name, perms in jobs.items():
        if name != "publish":
            assert set(perms.values()) <= {"read", "none"}, (name, perms)
    text = (ROOT / ".github" / "workflows" / "release.yml").read_text()
    publish_job = text.split("\n  publish:\n", 1)[1]
    # The push goes to ghcr.io with the workflow's own token, not a personal one.
    assert re.search(r"--to ghcr\.io/\S+", publish_job)
    assert "${{ secrets.GITHUB_TOKEN }}" in publish_job and "--password-stdin" in publish_job
    assert "gh release upload" in publish_job and "out/release" in publish_job


def test_ci_workflow_only_reads() -> None:
    top, jobs = job_permissions(ROOT / ".github" / "workflows" / "ci.yml")
    assert top == {"contents": "read"}
    assert jobs, "no job found: the reader is broken"
    for name, perms in jobs.items():
        assert set(perms.values()) <= {"read", "none"}, (name, perms)


def test_the_permission_reader_sees_a_broad_grant(tmp_path: Path) -> None:
    """The reader above must be able to fail: a write-all job is reported as such."""
    bad = tmp_path / "bad.yml"
    bad.write_text(
        "name: x\non: push\npermissions: write-all\njobs:\n  a:\n    runs-on: x\n"
        "    permissions:\n      contents: write # why\n      id-token: write\n"
        "    steps:\n      - run: echo\n  b:\n    permissions: read-all\n"
    )
    top, jobs = job_permissions(bad)
    assert top == {"*": "write-all"}
    assert jobs == {"a": {"contents": "write", "id-token": "write"}, "b": {"*": "read-all"}}
    assert json.dumps(jobs)  # plain data
