"""Fleet benchmark: N client processes behind one site registry, origin traffic counted.

Publishes a signed sample release (linux/amd64) to an origin `docker-registry` on
127.0.0.1, puts a counting TCP proxy in front of it and a second `docker-registry` in
proxy mode (`proxy: {remoteurl: ...}`) in front of that, then starts N processes at once
(each imports first, then all start on one signal), each running
`exec-sandbox-assets pull --platform linux/amd64` into its own cache with signature
verification. Three arrangements, each on fresh servers:

  cold     N clients on an empty pull-through cache (with --spread S: also N clients
           started evenly over S seconds, as a fleet with start-up jitter would)
  warm-up  one `pull` first (the operator recipe), then N clients
  mirror   `exec-sandbox-assets mirror` into a plain registry instead, then N clients

Prints, per arrangement: wall time, client failures, origin GETs per blob, blob bytes
that left the origin / release bytes (the amplification), manifest requests.
Run: `python benchmarks/fleet.py [--clients 32] [--size 1M] [--spread 0] [--json]`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from fleets import PLATFORM, Fleet, FleetRun, OriginTraffic

_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}


def parse_size(text: str) -> int:
    """`262144`, `256K`, `1M`, `1.5M` -> bytes."""
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = text[-1:] if text[-1:] in _UNITS else ""
    return int(float(text.removesuffix(unit)) * _UNITS[unit])


def phase(
    name: str, run: FleetRun | None, fleet: Fleet, traffic: OriginTraffic | None = None
) -> dict[str, Any]:
    """One phase's figures: `run` (clients) or `traffic` alone (a mirror)."""
    origin = run.origin if run is not None else traffic
    assert origin is not None
    names = fleet.names()
    release = fleet.release_bytes()
    blob_bytes = origin.blob_bytes(fleet.blob_sizes)
    clients = run.clients if run is not None else ()
    return {
        "phase": name,
        "clients": len(clients),
        "seconds": round(run.seconds, 2) if run is not None else None,
        "failures": len(run.failures) if run is not None else 0,
        "failed": [
            {"client": c.index, "exit": c.returncode, "stderr": c.stderr[-500:]}
            for c in (run.failures if run is not None else ())
        ],
        "origin_blob_gets": {
            f"{names[d]} ({d[:19]})": origin.blob_gets.get(d, 0) for d in sorted(names)
        },
        "origin_blob_heads": sum(origin.blob_heads.values()),
        "origin_manifest_requests": origin.manifest_requests,
        "origin_blob_bytes": blob_bytes,
        "origin_bytes": origin.bytes_sent,
        "release_bytes": release,
        "amplification": round(blob_bytes / release, 2) if release else None,
    }


def print_phase(p: dict[str, Any]) -> None:
    gets = list(p["origin_blob_gets"].values())
    if p["seconds"] is None:
        print(f"\n{p['phase']}:")
    else:
        print(
            f"\n{p['phase']}: {p['clients']} client(s), {p['seconds']:.1f}s wall, "
            f"{p['failures']} failure(s)"
        )
    if gets:
        print(
            f"  origin GETs per blob: min {min(gets)}, max {max(gets)}, "
            f"total {sum(gets)} for {len(gets)} blobs"
        )
    for label, n in p["origin_blob_gets"].items():
        print(f"    {n:4d}  {label}")
    print(
        f"  origin blob bytes / release bytes: {p['origin_blob_bytes']:,} / "
        f"{p['release_bytes']:,} = {p['amplification']}x"
    )
    print(
        f"  origin also answered {p['origin_manifest_requests']} manifest/tag requests and "
        f"{p['origin_blob_heads']} blob HEADs ({p['origin_bytes']:,} bytes in all)"
    )
    for f in p["failed"]:
        print(f"  client {f['client']} exited {f['exit']}: {f['stderr']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32, help="client processes (32)")
    parser.add_argument(
        "--size", type=parse_size, default=parse_size("1M"),
        help="size of each sample file before compression (1M; they compress ~4:1)",
    )  # fmt: skip
    parser.add_argument(
        "--spread", type=float, default=0.0,
        help="also run a cold fleet whose starts are spread evenly over this many seconds",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args()

    phases: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="esa-fleet-") as tmp_s:
        tmp = Path(tmp_s)
        with Fleet(tmp / "cold", size=args.size) as fleet:
            phases.append(phase("cold cache", fleet.pull(args.clients), fleet))
        if args.spread > 0:
            with Fleet(tmp / "spread", size=args.size) as fleet:
                run = fleet.pull(args.clients, spread=args.spread)
                phases.append(phase(f"cold cache, starts spread over {args.spread}s", run, fleet))
        with Fleet(tmp / "warm", size=args.size) as fleet:
            phases.append(phase("warm-up (one pull)", fleet.pull(1), fleet))
            phases.append(phase("after warm-up", fleet.pull(args.clients), fleet))
            warm_total = {
                k: phases[-2]["origin_blob_gets"][k] + phases[-1]["origin_blob_gets"][k]
                for k in phases[-1]["origin_blob_gets"]
            }
        with Fleet(tmp / "mirror", size=args.size, site="mirror") as fleet:
            traffic = fleet.mirror()
            phases.append(phase("mirror into a plain registry", None, fleet, traffic))
            phases.append(phase("after the mirror", fleet.pull(args.clients), fleet))
    report = {
        "platform": "/".join(PLATFORM),
        "file_size": args.size,
        "cores": os.cpu_count(),
        "phases": phases,
        "recipe_max_origin_gets_per_blob": max(warm_total.values()),
        "mirror_max_origin_gets_per_blob": max(
            a + b
            for a, b in zip(
                phases[-2]["origin_blob_gets"].values(),
                phases[-1]["origin_blob_gets"].values(),
                strict=True,
            )
        ),
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(
            f"release {report['platform']}: {len(warm_total)} blobs, "
            f"{phases[0]['release_bytes']:,} bytes (files of {args.size:,} bytes "
            f"before compression); {report['cores']} cores"
        )
        for p in phases:
            print_phase(p)
        print(
            "\nwarm-up recipe, in all: at most "
            f"{report['recipe_max_origin_gets_per_blob']} origin GET(s) per blob; "
            f"mirror recipe: at most {report['mirror_max_origin_gets_per_blob']}"
        )
    return 1 if any(p["failures"] for p in phases) else 0


if __name__ == "__main__":
    sys.exit(main())
