"""No lock file travels with what we write (issue #19 item 4): a layout is locked through
its directory (no file in it), an archive through a file beside it that its holder
removes under the lock, and `mirror` leaves no `mirror-work` in the cache after a
success. The removal under the lock must keep exclusion (the unlink race): checked with
processes that hammer one lock file."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

from exec_sandbox_assets.oci.layout_files import lock_file
from releases import make_key_pair, publish_sample_release
from test_cli import run

SIZE = 16 * 1024


def test_layouts_archives_and_the_cache_keep_no_lock_or_work_files(tmp_path: Path) -> None:
    key = make_key_pair(tmp_path / "keys")
    layout = tmp_path / "layout"
    publish_sample_release(f"oci:{layout}", "1.0.0", tmp_path / "publish", key=key, size=SIZE)
    usb = tmp_path / "usb"
    cache = tmp_path / "cache"
    for dst in (f"oci-archive:{usb / 'assets.tar'}", f"oci:{usb / 'copy'}"):
        copied = run(
            "--cache-dir", cache, "--trusted-key", key.public,
            "mirror", f"oci:{layout}", dst, "--version", "1.0.0",
        )  # fmt: skip
        assert copied.code == 0, copied.stderr

    assert sorted(p.name for p in layout.iterdir()) == ["blobs", "index.json", "oci-layout"]
    assert sorted(p.name for p in usb.iterdir()) == ["assets.tar", "copy"]
    assert sorted(p.name for p in (usb / "copy").iterdir()) == ["blobs", "index.json", "oci-layout"]
    assert not (cache / "mirror-work").exists()
    # A layout an earlier version locked through index.json.lock is still written to.
    (usb / "copy" / "index.json.lock").touch()
    again = run(
        "--cache-dir", cache, "--trusted-key", key.public,
        "mirror", f"oci:{layout}", f"oci:{usb / 'copy'}", "--version", "1.0.0",
    )  # fmt: skip
    assert again.code == 0, again.stderr


def _hold(path: str, log: str, rounds: int) -> None:
    for _ in range(rounds):
        with lock_file(Path(path)):
            fd = os.open(log, os.O_WRONLY | os.O_APPEND)
            try:
                os.write(fd, f"in {os.getpid()}\n".encode())
                time.sleep(0.001)
                os.write(fd, f"out {os.getpid()}\n".encode())
            finally:
                os.close(fd)


def test_a_lock_file_removed_by_its_holder_still_excludes(tmp_path: Path) -> None:
    """Was: the file stayed. Removing it opens a race (a waiter locks the removed inode
    while a newcomer locks a new file); `lock_file` re-checks the inode after locking."""
    path, log = tmp_path / ".assets.tar.lock", tmp_path / "log"
    log.touch()
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_hold, args=(str(path), str(log), 40)) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    lines = log.read_text().splitlines()
    assert len(lines) == 4 * 40 * 2
    for enter, leave in zip(lines[::2], lines[1::2], strict=True):
        assert enter.startswith("in ") and leave == enter.replace("in ", "out ", 1), lines
    assert not path.exists()
