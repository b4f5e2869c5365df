"""Prometheus metrics in the gateway's multiprocess mode (gateway/metrics.py)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.harness import ROOT

SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = sys.argv[1]
    from gateway.metrics import Metrics, render
    from gateway.observe import AccessRecord

    def record():
        rec = AccessRecord(request_id="r", trace_id="t", method="GET", host="h", path="/", worker="0",
                           direction="ingress")
        rec.status, rec.group, rec.rule, rec.duration, rec.bytes_out = 200, "g", "r", 0.004, 100
        return rec

    m = Metrics()
    m.observe(record())  # labelled children made
    calls = 0
    def count_getpid(frame, event, arg):  # sees calls of C functions, however they were bound
        global calls
        if event == "c_call" and arg is os.getpid:
            calls += 1
    sys.setprofile(count_getpid)
    for _ in range(1000):
        m.observe(record())
    sys.setprofile(None)
    print("getpid calls", calls)
    child = os.fork()
    if child == 0:
        m.observe(record())
        os._exit(0)
    os.waitpid(child, 0)
    print("files", sorted(os.listdir(sys.argv[1])), "parent", os.getpid(), "child", child)
    sys.stdout.write(render().decode())
""")


def test_multiprocess_values_skip_getpid_yet_a_fork_gets_its_own_file(tmp_path):
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert "getpid calls 0" in out  # a system call on every write otherwise
    files_line = next(line for line in out.splitlines() if line.startswith("files"))
    parent, child = files_line.split("parent ")[1].split(" child ")
    assert f"counter_{parent.strip()}.db" in files_line and f"counter_{child.strip()}.db" in files_line
    # Parent and child add up: 1001 + 1 requests.
    assert 'tunnel_requests_total{direction="ingress",group="g",rule="r",status_class="2xx"} 1002.0' in out
