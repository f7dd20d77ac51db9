"""Refresh the Sigstore trusted root vendored in the package, through TUF.

    python scripts/refresh_sigstore_root.py            # fetch, verify, write if changed
    python scripts/refresh_sigstore_root.py --check    # exit 1 when the vendored one is stale

Run before each release (docs/keys.md): Sigstore rotates its CA, CT and Rekor keys
several times a year, and a client verifies keyless releases offline against the root it
shipped with. The root is fetched with sigstore-python's TUF client, which checks it
against the TUF root embedded in the sigstore wheel (and every root since): no byte of
it is taken on trust from the network. Needs the network and `sigstore`.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

from sigstore._internal.tuf import DEFAULT_TUF_URL, TrustUpdater

VENDORED = (
    Path(__file__).resolve().parents[1]
    / "src"
    / "exec_sandbox_assets"
    / "release"
    / "sigstore_trusted_root.json"
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only say whether it is stale")
    parser.add_argument("--url", default=DEFAULT_TUF_URL, help="TUF repository")
    args = parser.parse_args(argv)

    fresh = Path(TrustUpdater(args.url).get_trusted_root_path()).read_bytes()
    old = VENDORED.read_bytes() if VENDORED.exists() else b""
    old_id, new_id = (hashlib.sha256(b).hexdigest()[:16] for b in (old, fresh))
    if fresh == old:
        print(f"vendored Sigstore root is current (sha256 {new_id}...)")
        return 0
    if args.check:
        print(f"vendored Sigstore root is stale: {old_id}... (TUF has {new_id}...)")
        return 1
    VENDORED.write_bytes(fresh)
    print(f"vendored Sigstore root updated: {old_id}... -> {new_id}...: commit {VENDORED}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
