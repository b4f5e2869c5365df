"""The admin status page, looked at in a real headless browser."""
from __future__ import annotations

import shutil
import subprocess
import tempfile

import pytest

from tests.harness import http

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def test_status_page_renders_without_a_browser(stack):
    r = http("GET", f"http://127.0.0.1:{stack.admin_port}/")
    assert r.status == 200 and r.header("Content-Type").startswith("text/html")
    page = r.body.decode()
    assert "c1/0" in page and "g1" in page
    assert "http://" not in page.split("<body>", 1)[1] and "https://" not in page  # no external assets


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium); CI installs it")
def test_status_page_in_headless_chromium_shows_the_connected_client(stack):
    http("GET", f"{stack.url}/hello")
    with tempfile.TemporaryDirectory() as profile:
        out = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--virtual-time-budget=3000", "--dump-dom",
             f"http://127.0.0.1:{stack.admin_port}/"],
            capture_output=True, text=True, timeout=60,
        )
    dom = out.stdout
    assert "tunnel-gateway" in dom, out.stderr[-2000:]
    clients = dom.split('id="clients"', 1)[1].split("</table>", 1)[0]
    assert "c1" in clients and "g1" in clients and "healthy" in clients
