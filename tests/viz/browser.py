"""A real browser for the report tests: headless Chromium driven over the DevTools protocol.

:func:`ensure_chromium` finds Debian's ``chromium`` or installs it (``apt-get install -y chromium``,
after ``apt-get update`` if the first try fails; CI runs as root with apt access, like the dev
machine). :func:`open_page` starts a fresh headless Chromium (its own profile, remote debugging on a
free port, found in the profile's ``DevToolsActivePort``), loads a URL, waits for the ``load`` event
(every ``<img>`` has then loaded or failed), and returns what a reader would notice:

* each image's ``src``, ``complete`` and ``naturalWidth`` (0 for one that did not load);
* console errors: ``console.error``/``assert`` calls, uncaught exceptions, and the browser's own
  error entries (a resource that failed to load, a blocked file);
* a full-page PNG screenshot (``captureBeyondViewport``), if asked for.

The websocket client is aiohttp's (a dependency of fsspec[http], which lightning requires).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from base64 import b64decode
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

IMAGES_JS = (
    "JSON.stringify([...document.images].map(i => "
    "({src: i.getAttribute('src'), complete: i.complete, naturalWidth: i.naturalWidth})))"
)
MAX_SHOT_HEIGHT = 16000  # px; Chromium's largest texture


def ensure_chromium() -> str:
    """The ``chromium`` executable, installed with apt-get when it is not on PATH."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe:
        return exe
    if not shutil.which("apt-get"):
        raise RuntimeError("chromium is not on PATH and there is no apt-get to install it")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "chromium"]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=True)
        proc = subprocess.run(install, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"apt-get install chromium failed:\n{proc.stderr[-2000:]}")
    exe = shutil.which("chromium")
    if exe is None:
        raise RuntimeError("apt-get installed chromium but it is not on PATH")
    return exe


@dataclass
class PageCheck:
    """What the browser saw on one page."""

    url: str
    images: list[dict[str, Any]] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    screenshot: Path | None = None

    @property
    def broken_images(self) -> list[str]:
        return [i["src"] for i in self.images if not (i["complete"] and i["naturalWidth"] > 0)]


def _error_text(event: dict) -> str | None:
    """A console-error line of a DevTools event, ``None`` for anything else."""
    method, params = event.get("method"), event.get("params", {})
    if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
        args = [str(a.get("value", a.get("description", ""))) for a in params.get("args", [])]
        return f"console.{params['type']}: {' '.join(args)}"
    if method == "Runtime.exceptionThrown":
        details = params.get("exceptionDetails", {})
        desc = details.get("exception", {}).get("description", "")
        return f"uncaught: {details.get('text', '')} {desc}".strip()
    if method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
        entry = params["entry"]
        return f"{entry.get('source', 'log')}: {entry.get('text', '')} {entry.get('url', '')}".strip()
    return None


class _Cdp:
    """Commands and events over one page target's websocket."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, timeout: float) -> None:
        self.ws, self.timeout = ws, timeout
        self.ids = itertools.count(1)
        self.events: list[dict] = []

    async def _next(self) -> dict:
        msg = await asyncio.wait_for(self.ws.receive(), self.timeout)
        if msg.type != aiohttp.WSMsgType.TEXT:
            raise RuntimeError(f"DevTools connection closed ({msg.type})")
        return json.loads(msg.data)

    async def call(self, method: str, **params: Any) -> dict:
        i = next(self.ids)
        await self.ws.send_str(json.dumps({"id": i, "method": method, "params": params}))
        while True:
            msg = await self._next()
            if msg.get("id") == i:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    async def wait_for(self, method: str) -> dict:
        for event in self.events:
            if event.get("method") == method:
                return event
        while True:
            msg = await self._next()
            self.events.append(msg)
            if msg.get("method") == method:
                return msg

    async def drain(self, seconds: float) -> None:
        """Collect the events that arrive within ``seconds``."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            try:
                msg = await asyncio.wait_for(self.ws.receive(), left)
            except TimeoutError:
                return
            if msg.type != aiohttp.WSMsgType.TEXT:
                return
            self.events.append(json.loads(msg.data))


async def _inspect(port: int, url: str, screenshot: Path | None, timeout: float) -> PageCheck:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/json/list") as resp:
            targets = await resp.json()
        page = next(t for t in targets if t.get("type") == "page")
        async with http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            cdp = _Cdp(ws, timeout)
            for domain in ("Page", "Runtime", "Log"):
                await cdp.call(f"{domain}.enable")
            await cdp.call("Page.navigate", url=url)
            await cdp.wait_for("Page.loadEventFired")
            await cdp.drain(0.5)  # late console messages
            result = await cdp.call("Runtime.evaluate", expression=IMAGES_JS, returnByValue=True)
            check = PageCheck(url=url, images=json.loads(result["result"]["value"]))
            if screenshot is not None:
                size = (await cdp.call("Page.getLayoutMetrics"))["cssContentSize"]
                clip = dict(
                    x=0, y=0, width=size["width"], height=min(size["height"], MAX_SHOT_HEIGHT), scale=1
                )
                shot = await cdp.call(
                    "Page.captureScreenshot", format="png", captureBeyondViewport=True, clip=clip
                )
                screenshot.parent.mkdir(parents=True, exist_ok=True)
                screenshot.write_bytes(b64decode(shot["data"]))
                check.screenshot = screenshot
            await cdp.drain(0.2)
            check.console_errors = [t for t in map(_error_text, cdp.events) if t]
            return check


def _stop(proc: subprocess.Popen) -> None:
    """End the Chromium started here: its own process group (``start_new_session``), by its id."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(wait)
            break
        except subprocess.TimeoutExpired:
            continue


def open_page(
    url: str,
    screenshot: Path | None = None,
    width: int = 1280,
    timeout: float = 60.0,
    chromium: str | None = None,
) -> PageCheck:
    """Load ``url`` in a fresh headless Chromium (see the module docstring)."""
    exe = chromium or ensure_chromium()
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        cmd = [
            exe,
            "--headless=new",
            "--no-sandbox",  # root in CI and containers
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            "--remote-debugging-port=0",
            "--remote-allow-origins=*",
            f"--window-size={width},900",
            "about:blank",
        ]
        log = Path(profile) / "stderr.log"
        with open(log, "wb") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        try:
            port_file = Path(profile) / "DevToolsActivePort"
            deadline = time.monotonic() + timeout
            while not (port_file.is_file() and port_file.read_text().strip()):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"chromium did not start: {log.read_text(errors='replace')[-2000:]}")
                time.sleep(0.1)
            port = int(port_file.read_text().split()[0])
            return asyncio.run(_inspect(port, url, screenshot, timeout))
        finally:
            _stop(proc)


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.viz.browser <page.html or URL> [screenshot.png]``: load the page, print the images
    that did not load and the console errors, save a full-page screenshot; exit 1 if anything broke."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("page")
    parser.add_argument("screenshot", nargs="?", type=Path)
    parser.add_argument("--width", type=int, default=1280)
    args = parser.parse_args(argv)
    url = args.page if "://" in args.page else Path(args.page).resolve().as_uri()
    check = open_page(url, args.screenshot, width=args.width)
    print(
        f"{url}: {len(check.images)} images, {len(check.broken_images)} broken, "
        f"{len(check.console_errors)} console errors"
    )
    for line in [*check.broken_images, *check.console_errors]:
        print(f"  {line}")
    if check.screenshot:
        print(f"screenshot: {check.screenshot}")
    return int(bool(check.broken_images or check.console_errors))


if __name__ == "__main__":
    raise SystemExit(main())
