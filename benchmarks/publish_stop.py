"""How long Ctrl-C takes to stop `publish` in the middle of a compression.

    python benchmarks/publish_stop.py [--size-mib 32] [--level 19] [--after 2]

Publishes a sample build with one large base image (`--size-mib`) into an OCI layout
through the CLI, with pipes, and sends SIGINT `--after` seconds into that file's
compression (seen on the progress lines). Prints the time from SIGINT to the exit,
and, as the baseline measured in the same run, the time the same publish, not
interrupted, still needed from that moment: what stopping cost when the
compression had to finish first (issue #19: ~16 s). No bound is asserted; the
figures go to docs/publishing.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from exec_sandbox_assets.publish import make_sample_inputs
from exec_sandbox_assets.publish.sample import sample_bytes
from exec_sandbox_assets.release import catalog, keys

CLI = [sys.executable, "-m", "exec_sandbox_assets.cli"]
BASE = catalog.base_image("python", "x86_64")


def publish(work: Path, args: list[str], interrupt_after: float | None) -> tuple[int, float, float]:
    """(exit code, seconds from the large file's compression start to SIGINT or the end,
    seconds from SIGINT to the exit, or 0)."""
    shutil.rmtree(work / "out", ignore_errors=True)
    env = {**os.environ, "EXEC_SANDBOX_PROGRESS_INTERVAL": "0.1"}
    proc = subprocess.Popen(
        [*CLI, *args, "--to", f"oci:{work / 'out'}", "--work-dir", str(work / "out-work")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stderr is not None
    started = None
    for line in proc.stderr:
        if started is None and line.endswith(f"; compress {BASE.output_name}\n"):
            started = time.monotonic()
        if (
            started is not None
            and interrupt_after is not None
            and time.monotonic() - started >= interrupt_after
        ):
            sent = time.monotonic()
            proc.send_signal(signal.SIGINT)
            code = proc.wait()
            return code, sent - started, time.monotonic() - sent
    code = proc.wait()
    assert started is not None, "the large file's compression was never seen"
    return code, time.monotonic() - started, 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=32)
    parser.add_argument("--level", type=int, default=19)
    parser.add_argument("--after", type=float, default=2.0)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="publish-stop-") as tmp:
        work = Path(tmp)
        dist = make_sample_inputs(work / "dist", size=64 * 1024)
        (dist / BASE.output_name).write_bytes(sample_bytes(BASE, opts.size_mib << 20))
        key = work / "release.key"
        keys.write_key_pair(keys.generate_key("ecdsa-p256"), key, work / "release.pub", None)
        args = [
            *("publish", "--input", str(dist), "--version", "1.0.0", "--key", str(key)),
            *("--platform", "linux/amd64", "--level", str(opts.level)),
        ]
        code, into, stop = publish(work, args, opts.after)
        print(f"interrupted {into:.1f} s into compressing {opts.size_mib} MiB at level "
              f"{opts.level}: exit {code}, stopped {stop:.2f} s after SIGINT")  # fmt: skip
        shutil.rmtree(work / "out-work", ignore_errors=True)
        code, total, _ = publish(work, args, None)
        left = max(total - into, 0.0)
        print(f"baseline, not interrupted: exit {code}, {left:.1f} s more to finish from then "
              f"(compression {total:.1f} s); stop/baseline = {stop / left if left else 0:.3f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
