"""The committed protobuf modules are what proto/tunnel.proto generates now:
an edit of the .proto without `make proto` fails here."""
from __future__ import annotations

import shutil
import subprocess
import sys

from tests.harness import ROOT

GENERATED = ("tunnel_pb2.py", "tunnel_pb2.pyi")


def test_generated_modules_match_the_proto(tmp_path):
    run = subprocess.run([sys.executable, "scripts/gen_proto.py", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    for name in GENERATED:
        fresh = (tmp_path / name).read_text()
        committed = (ROOT / "gateway" / "tunnel" / name).read_text()
        assert fresh == committed, f"gateway/tunnel/{name} is stale: run `make proto` and commit the result"


def test_the_check_notices_an_edited_proto(tmp_path):
    """The comparison above is not vacuous: a changed .proto gives other modules."""
    proto = tmp_path / "proto"
    proto.mkdir()
    edited = (ROOT / "proto" / "tunnel.proto").read_text().replace("message Batch {", "message Batch {\n  string added_field = 99;", 1)
    assert "added_field" in edited
    (proto / "tunnel.proto").write_text(edited)
    out = tmp_path / "out"
    out.mkdir()
    from grpc_tools import protoc

    assert protoc.main(["protoc", f"-I{proto}", f"--python_out={out}", str(proto / "tunnel.proto")]) == 0
    assert (out / "tunnel_pb2.py").read_text() != (ROOT / "gateway" / "tunnel" / "tunnel_pb2.py").read_text()
    shutil.rmtree(out)
