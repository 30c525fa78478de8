"""A real headless Chromium for tests: find it, and look inside a live page through its DevTools protocol.

`--dump-dom` serialises only the light DOM, so pages built from web components with shadow roots
(TensorBoard's dashboards) are read with `evaluate`: Chromium is started with ``--remote-debugging-port=0``
(it picks a free port and writes it to ``DevToolsActivePort`` in its profile folder), and a JavaScript
expression is evaluated in the page until it returns something truthy or the time is up. Every wait is
bounded; the browser is always stopped.
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
]


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


def evaluate(
    binary: str,
    url: str,
    expression: str,
    profile: Path,
    *,
    timeout: float = 30.0,
    screenshot: Path | None = None,
    window: tuple[int, int] = (1400, 1000),
) -> Any:
    """Open ``url`` and evaluate ``expression`` (which must return a JSON string, or "" while not ready)
    every half second until it returns a non-empty one or ``timeout`` seconds pass; the parsed JSON (None
    on timeout). With ``screenshot``, a PNG of the page is saved there afterwards.
    """
    import websocket  # websocket-client (the dev extra): a small synchronous client

    profile.mkdir(parents=True, exist_ok=True)
    browser = subprocess.Popen(
        [
            binary,
            *FLAGS,
            f"--user-data-dir={profile}",
            "--remote-debugging-port=0",
            f"--window-size={window[0]},{window[1]}",
            url,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    socket = None
    try:
        deadline = time.monotonic() + timeout
        active = profile / "DevToolsActivePort"
        while not active.is_file() or not active.read_text().strip():
            if time.monotonic() > deadline or browser.poll() is not None:
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.1)
        port = int(active.read_text().split()[0])
        page = None
        while page is None and time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as response:
                    targets = json.loads(response.read())
                page = next((t for t in targets if t.get("type") == "page"), None)
            if page is None:
                time.sleep(0.2)
        if page is None:
            raise RuntimeError("chromium opened no page")
        socket = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=10, suppress_origin=True)
        ids = iter(range(1, 1_000_000))

        def call(method: str, **params: Any) -> dict[str, Any]:
            assert socket is not None
            request = next(ids)
            socket.send(json.dumps({"id": request, "method": method, "params": params}))
            while True:
                message = json.loads(socket.recv())
                if message.get("id") == request:
                    return message.get("result", {})

        result = None
        while time.monotonic() < deadline:
            value = call("Runtime.evaluate", expression=expression, returnByValue=True)
            text = value.get("result", {}).get("value")
            if isinstance(text, str) and text:
                result = json.loads(text)
                break
            time.sleep(0.5)
        if screenshot is not None:
            shot = call("Page.captureScreenshot", format="png")
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            screenshot.write_bytes(base64.b64decode(shot["data"]))
        return result
    finally:
        if socket is not None:
            socket.close()
        browser.terminate()
        try:
            browser.wait(10)
        except subprocess.TimeoutExpired:
            browser.kill()
            browser.wait(10)
