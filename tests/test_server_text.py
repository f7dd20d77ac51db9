"""Text a server chose is shown on one line (issue #19 item 6): a line break in an index
annotation (or any server text) is escaped, so it cannot print a forged line such as
`  - registry https://ghcr.io/x: OK` under ours. Through `inspect` and `versions` on a
layout whose release index was rewritten with such annotations, and `clean_text`."""

from __future__ import annotations

import json
from pathlib import Path

from exec_sandbox_assets.base.safetext import clean_text
from exec_sandbox_assets.oci.layout import LayoutReader
from exec_sandbox_assets.oci.layout_writer import LayoutWriter
from exec_sandbox_assets.oci.model import MAX_MANIFEST_SIZE
from exec_sandbox_assets.release import catalog
from releases import make_key_pair, publish_sample_release
from test_cli import HOST, run

FORGED = "  - registry https://ghcr.io/x: OK"
LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


def test_clean_text_keeps_every_kind_of_line_break_off_the_line() -> None:
    for brk in LINE_BREAKS:
        shown = clean_text(f"bad{brk}{FORGED}")
        assert len(shown.splitlines()) == 1, repr(shown)
        assert shown.startswith("bad\\")


def test_annotations_with_line_breaks_stay_on_their_line(tmp_path: Path) -> None:
    key = make_key_pair(tmp_path / "keys")
    layout = tmp_path / "layout"
    publish_sample_release(f"oci:{layout}", "1.0.0", tmp_path / "w", key=key, platforms=[HOST])
    with LayoutReader.open(layout) as reader:
        index = json.loads(reader.read_blob(reader.tags()["v1.0.0"].digest, MAX_MANIFEST_SIZE))
    for name in (catalog.ANN_CREATED, catalog.ANN_SOURCE, catalog.ANN_REVISION):
        index["annotations"][name] = f"x\n{FORGED}\r\n{FORGED}\u2028{FORGED}"
    LayoutWriter(layout).put_manifest(json.dumps(index).encode(), tag="v1.0.0")

    for args in (["inspect", f"oci:{layout}:v1.0.0"], ["versions", f"oci:{layout}"]):
        result = run("--trusted-key", key.public, *args)
        assert result.code == 0, result.stderr
        lines = (result.stdout + result.stderr).splitlines()
        assert not [line for line in lines if line.startswith(FORGED)], result.stdout
        assert "x\\x0a  - registry" in result.stdout
