"""Generate the Python stubs for protos/ into edge_llm/v1/ (a development tool: grpcio-tools).

`protos/edge_llm/v1/edge_llm.proto` has the package path edge_llm/v1, so generating into the
project root puts the stubs in the edge_llm.v1 package, importable as the proto names them.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTO = "edge_llm/v1/edge_llm.proto"


def generate(root: Path, out: Path) -> list[Path]:
    """Run protoc on root/protos into out; return the files it wrote."""
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"  # google/protobuf/*.proto
    args = [
        "protoc",
        f"-I{root / 'protos'}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        str(root / "protos" / PROTO),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO}")
    stem = out / PROTO.removesuffix(".proto")
    return [Path(f"{stem}{suffix}") for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")]


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve()
    for path in generate(root, root):
        print(f"wrote {path.relative_to(root)}")
