"""Regenerate the stubs in this package from proto/dataplane.proto: `python -m cluster.rpc.generate`.

protoc sees the proto under the virtual path cluster/rpc/ (`-Icluster/rpc=proto`), so the generated
`dataplane_pb2_grpc.py` imports `from cluster.rpc import dataplane_pb2` and works wherever the
`cluster` package is importable, with no sys.path tricks. Needs grpcio-tools (a dev dependency).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROTO = "cluster/rpc/dataplane.proto"  # virtual path; the file is proto/dataplane.proto
OUTPUTS = ("dataplane_pb2.py", "dataplane_pb2.pyi", "dataplane_pb2_grpc.py")


def generate(out: Path = REPO) -> list[Path]:
    """Write the stubs under `out`/cluster/rpc/ (the repo itself by default); returns their paths."""
    import grpc_tools
    from grpc_tools import protoc

    out.mkdir(parents=True, exist_ok=True)
    wkt = Path(grpc_tools.__file__).parent / "_proto"  # google/protobuf/*.proto, if ever imported
    rc = protoc.main(["grpc_tools.protoc", f"-Icluster/rpc={REPO / 'proto'}", f"-I{wkt}",
                      f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}", PROTO])
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc}")
    return [out / "cluster" / "rpc" / name for name in OUTPUTS]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO, help="root to write cluster/rpc/ under (default: the repo)")
    for path in generate(parser.parse_args(argv).out):
        print(path, file=sys.stderr)


if __name__ == "__main__":
    main()
