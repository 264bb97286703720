"""The checked-in stubs match protos/, and the proto passes buf lint."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from edge_llm import protogen

ROOT = Path(__file__).resolve().parents[1]


def test_checked_in_stubs_match_the_proto(tmp_path: Path) -> None:
    for generated in protogen.generate(ROOT, tmp_path):
        checked_in = ROOT / generated.relative_to(tmp_path)
        assert checked_in.read_bytes() == generated.read_bytes(), (
            f"{checked_in.relative_to(ROOT)} is stale: run scripts/gen-proto and commit the result"
        )


def test_buf_lint() -> None:
    buf = shutil.which("buf", path=str(Path(sys.executable).parent))
    assert buf, "buf is missing: it comes with the dev extra (buf-bin)"
    result = subprocess.run([buf, "lint"], cwd=ROOT / "protos", capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
