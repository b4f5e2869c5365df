#!/usr/bin/env python3
"""Regenerate gateway/tunnel/tunnel_pb2.py(i) from proto/tunnel.proto.

Usage: python scripts/gen_proto.py [OUTPUT_DIR]
Only the message classes are generated; the one RPC is registered by hand in
gateway/tunnel/transport.py, which avoids grpc_tools' absolute-import stubs.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "gateway" / "tunnel"


def generate(out_dir: Path) -> None:
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    rc = protoc.main(
        [
            "protoc",
            f"-I{ROOT / 'proto'}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            str(ROOT / "proto" / "tunnel.proto"),
        ]
    )
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc}")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT)
