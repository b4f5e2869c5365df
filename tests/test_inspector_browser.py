"""The Inspector page in headless Chromium, driven through the DevTools protocol (a
real browser clicking): from the status page's link to the list, a request appears;
its detail shows its headers (secrets masked); the Replay button (a form POST) adds
a new entry, and the backend sees the request twice."""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.harness import backend_stats, http
from tests.test_status_page import CHROMIUM

LOAD_TIMEOUT = 20.0


class Page:
    """One Chromium tab over the DevTools protocol: navigate, click, read the DOM."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.events: list[dict[str, Any]] = []

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        n = next(self.ids)
        await self.ws.send_json({"id": n, "method": method, "params": params})
        while True:
            msg = await asyncio.wait_for(self.ws.receive_json(), LOAD_TIMEOUT)
            if msg.get("id") == n:
                assert "error" not in msg, msg
                return msg.get("result", {})
            self.events.append(msg)

    async def loaded(self) -> None:
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            self.events.append(await asyncio.wait_for(self.ws.receive_json(), LOAD_TIMEOUT))
        self.events.clear()

    async def go(self, url: str) -> None:
        self.events.clear()
        await self.call("Page.navigate", url=url)
        await self.loaded()

    async def js(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    async def click(self, selector: str) -> None:
        """Click what `selector` finds and wait for the page it leads to."""
        self.events.clear()
        assert await self.js(f"!!document.querySelector({json.dumps(selector)})"), selector
        await self.js(f"document.querySelector({json.dumps(selector)}).click()")
        await self.loaded()


async def _drive(port: int, admin: str, rid: str) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/json/list") as r:
            target = next(t for t in await r.json() if t["type"] == "page")
        async with session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            page = Page(ws)
            await page.call("Page.enable")
            await page.go(f"{admin}/")  # the status page links to the Inspector
            await page.click("#inspector-link")
            seen["list_path"] = await page.js("location.pathname")
            seen["rows"] = await page.js("Array.from(document.querySelectorAll('tr.request')).map(r => r.dataset.id)")
            await page.click(f'tr[data-id="{rid}"] a')
            seen["detail_path"] = await page.js("location.pathname")
            seen["summary"] = await page.js("document.getElementById('summary').innerText")
            seen["headers"] = await page.js(
                "Array.from(document.querySelectorAll('#request-headers tr')).map(r => r.innerText)")
            seen["request_body"] = await page.js("document.getElementById('request-body').innerText")
            seen["response_body"] = await page.js("document.getElementById('response-body').innerText")
            await page.click("#replay")
            seen["after_replay_path"] = await page.js("location.pathname")
            seen["after_replay_text"] = await page.js("document.body.innerText")
            await page.go(f"{admin}/inspector")
            seen["rows_after"] = await page.js(
                "Array.from(document.querySelectorAll('tr.request')).map(r => r.dataset.id)")
    return seen


def _devtools_port(profile: Path, proc: subprocess.Popen) -> int:
    """The port Chromium chose (--remote-debugging-port=0 writes it to DevToolsActivePort)."""
    deadline = time.monotonic() + 30
    marker = profile / "DevToolsActivePort"
    while time.monotonic() < deadline:
        if marker.exists() and marker.read_text().strip():
            return int(marker.read_text().split()[0])
        assert proc.poll() is None, "chromium exited"
        time.sleep(0.1)
    raise AssertionError("chromium did not open its DevTools port")


def _stop_browser(proc: subprocess.Popen) -> None:
    """Stop Chromium and every process it started (its own group): a renderer or crash handler
    left running would still write in the profile while it is being removed."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + 10
    while _live_in_group(proc.pid) and time.monotonic() < deadline:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # what is left of the group
        time.sleep(0.05)
    proc.wait()


def _live_in_group(pgid: int) -> bool:
    """Whether a process of group `pgid` still runs (zombies, waiting for their reaper, do not)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if fields[0] != "Z" and int(fields[2]) == pgid:
                return True
    return False


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium); CI installs it")
def test_inspector_in_headless_chromium(make_stack):
    s = make_stack(settings={"workers": 2})
    original = http("POST", f"{s.url}/echo/browser?token=T9", body=b'{"from": "the browser test"}',
                    headers={"Authorization": "Bearer hunter2", "Content-Type": "application/json",
                             "X-Trace-Me": "yes"})
    assert original.status == 200
    rid = original.header("x-request-id")
    before = backend_stats(s)["requests"]
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            seen = asyncio.run(_drive(_devtools_port(Path(profile), proc), s.admin_url, rid))
        finally:
            _stop_browser(proc)
    print("\nchromium saw:", json.dumps(seen, indent=1)[:3000])  # shown with -s
    assert seen["list_path"] == "/inspector" and rid in seen["rows"]
    assert seen["detail_path"] == f"/inspector/{rid}"
    assert seen["summary"].startswith("POST ") and "/echo/browser?token=***" in seen["summary"]
    headers = "\n".join(seen["headers"])
    assert "Authorization\t***" in headers and "X-Trace-Me\tyes" in headers and "hunter2" not in headers
    assert json.loads(seen["request_body"]) == {"from": "the browser test"}
    assert '\n  "method": "POST"' in seen["response_body"]  # the echo, pretty-printed
    new_id = seen["after_replay_path"].rpartition("/")[2]
    assert seen["after_replay_path"].startswith("/inspector/") and new_id != rid
    assert f"replay of\t{rid}" in seen["after_replay_text"]
    assert seen["rows_after"][0] == new_id and rid in seen["rows_after"]
    # The backend saw it again (the replay; and the /stats request that reads the count).
    assert backend_stats(s)["requests"] - before == 2
