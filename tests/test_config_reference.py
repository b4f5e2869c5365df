"""README's settings reference is generated from the settings tables; this
fails when a setting was added or changed without regenerating it."""
from __future__ import annotations

import subprocess
import sys

from tests.harness import ROOT

sys.path.insert(0, str(ROOT / "scripts"))

import gen_config_reference as ref  # noqa: E402

from gateway.client.config import CLIENT_SETTINGS  # noqa: E402
from gateway.config import GATEWAY_SETTINGS  # noqa: E402


def test_readme_reference_is_current():
    run = subprocess.run([sys.executable, "scripts/gen_config_reference.py", "--check"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr


def test_reference_lists_every_setting_with_flag_env_and_default():
    text = ref.render()
    for s in GATEWAY_SETTINGS:
        assert f"| `{s.name}` |" in text and f"TUNNEL_GATEWAY_{s.name.upper()}" in text
    for s in CLIENT_SETTINGS:
        assert f"TUNNEL_CLIENT_{s.name.upper()}" in text
    assert "`--grpc-port`" in text and "`8002`" in text


def test_check_notices_a_stale_readme():
    readme = (ROOT / "README.md").read_text()
    stale = readme.replace("| `http_port` |", "| `http_port_old` |", 1)
    assert stale != readme
    assert ref.splice(stale, ref.render()) == readme
