"""A small Chrome DevTools Protocol client for headless Chromium (no dependencies).

The browser is started with `--remote-debugging-pipe`: it reads CDP messages from its file
descriptor 3 and writes replies and events to its descriptor 4, each message one JSON object
terminated by a NUL byte. One page target is attached in flat mode (messages carry its
`sessionId`).

  with Browser() as b:                      # finds chromium (CONTEXTBLIP_CHROMIUM or PATH)
    b.open("file:///tmp/page.html")         # navigate and wait for the load event
    b.evaluate("document.title")            # Runtime.evaluate -> the value
    b.screenshot("shot.png", 1280, 900)     # Page.captureScreenshot
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

INSTALL_HINT = ("run `bash tests/install_browser.sh` (Debian/Ubuntu: apt-get install chromium) "
                "or set CONTEXTBLIP_CHROMIUM=/path/to/chromium")
_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


class BrowserError(RuntimeError):
  """The browser could not be found or started, or a CDP command failed or timed out."""


def find_chromium() -> str:
  """CONTEXTBLIP_CHROMIUM, else the first Chromium / Chrome on PATH; raises BrowserError."""
  env = os.environ.get("CONTEXTBLIP_CHROMIUM", "").strip()
  if env:
    if not (os.path.isfile(env) and os.access(env, os.X_OK)):
      raise BrowserError(f"CONTEXTBLIP_CHROMIUM={env}: not an executable file; {INSTALL_HINT}")
    return env
  for name in _NAMES:
    found = shutil.which(name)
    if found:
      return found
  raise BrowserError(f"no Chromium found (looked for {', '.join(_NAMES)} on PATH); "
                     f"{INSTALL_HINT}")


def _above_9(fd: int) -> int:
  """`fd` moved to a descriptor number >= 10 (the original is closed)."""
  high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
  os.close(fd)
  return high


class Browser:
  """One headless Chromium with one page, driven over the DevTools pipe."""

  def __init__(self, executable: str | None = None, width: int = 1280, height: int = 900,
               timeout: float = 30.0):
    self.executable = executable or find_chromium()
    self.width, self.height, self.timeout = width, height, timeout
    self._next_id = 0
    self._buffer = b""
    self._events: list[dict[str, Any]] = []
    self.session = ""

  # ---------------------------------------------------------------- process and transport

  def __enter__(self) -> "Browser":
    self._profile = tempfile.mkdtemp(prefix="cdp-profile-")
    to_browser_r, self._to_browser = os.pipe()
    self._from_browser, from_browser_w = os.pipe()
    # The child's ends move above 9 first, so that putting them on 3 and 4 cannot overwrite
    # one with the other.
    to_browser_r, from_browser_w = (_above_9(to_browser_r), _above_9(from_browser_w))
    args = [self.executable, "--headless", "--no-sandbox", "--disable-gpu",
            "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check",
            "--disable-extensions", "--mute-audio", "--hide-scrollbars",
            # No background traffic (updates, sync, QUIC probes): CI machines have no network.
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-quic",
            f"--user-data-dir={self._profile}", "--remote-debugging-pipe",
            f"--window-size={self.width},{self.height}", "about:blank"]
    # The browser expects the pipe on descriptors 3 and 4: a small Python program puts them
    # there and execs it (no preexec_fn, which is unsafe in a process with threads).
    move = ("import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4); "
            "os.execv(sys.argv[3], sys.argv[3:])")
    self._proc = subprocess.Popen([sys.executable, "-c", move, str(to_browser_r),
                                   str(from_browser_w), *args],
                                  pass_fds=(to_browser_r, from_browser_w),
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE)
    os.close(to_browser_r)
    os.close(from_browser_w)
    try:
      self._attach()
    except BaseException:
      self.close()
      raise
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    """Closes the browser (Browser.close, then terminate / kill) and removes its profile."""
    if getattr(self, "_proc", None) is None:
      return
    try:
      if self._proc.poll() is None:
        self._send("Browser.close", {}, session=False)
    except (OSError, BrowserError):
      pass
    try:
      self._proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
      self._proc.terminate()
      try:
        self._proc.wait(timeout=5)
      except subprocess.TimeoutExpired:
        self._proc.kill()
        self._proc.wait()
    for fd in (self._to_browser, self._from_browser):
      try:
        os.close(fd)
      except OSError:
        pass
    if self._proc.stderr:
      self._proc.stderr.close()
    self._proc = None
    shutil.rmtree(self._profile, ignore_errors=True)

  def _send(self, method: str, params: dict[str, Any], session: bool = True) -> int:
    self._next_id += 1
    msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
    if session and self.session:
      msg["sessionId"] = self.session
    os.write(self._to_browser, json.dumps(msg).encode() + b"\0")
    return self._next_id

  def _read_message(self, deadline: float) -> dict[str, Any]:
    while b"\0" not in self._buffer:
      if time.monotonic() > deadline:
        raise BrowserError(f"no message from the browser within {self.timeout:.0f} s")
      ready, _, _ = select.select([self._from_browser], [], [], 0.2)
      if ready:
        chunk = os.read(self._from_browser, 1 << 20)
        if not chunk:
          err = self._proc.stderr.read().decode(errors="replace")[-2000:] if self._proc else ""
          raise BrowserError(f"the browser closed its DevTools pipe; its stderr:\n{err}")
        self._buffer += chunk
    raw, self._buffer = self._buffer.split(b"\0", 1)
    return json.loads(raw)

  def call(self, method: str, params: dict[str, Any] | None = None,
           session: bool = True) -> dict[str, Any]:
    """Sends one command and returns its `result` (events seen meanwhile are kept)."""
    sent = self._send(method, params or {}, session)
    deadline = time.monotonic() + self.timeout
    while True:
      msg = self._read_message(deadline)
      if msg.get("id") == sent:
        if "error" in msg:
          raise BrowserError(f"{method}: {msg['error']}")
        return msg.get("result", {})
      if "method" in msg:
        self._events.append(msg)

  def wait_event(self, method: str) -> dict[str, Any]:
    """The next event `method` of the page (one already received counts)."""
    deadline = time.monotonic() + self.timeout
    while True:
      for i, ev in enumerate(self._events):
        if ev["method"] == method and ev.get("sessionId", "") == self.session:
          return self._events.pop(i)
      msg = self._read_message(deadline)
      if "method" in msg:
        self._events.append(msg)

  def _attach(self) -> None:
    targets = self.call("Target.getTargets", session=False)["targetInfos"]
    page = next((t for t in targets if t["type"] == "page"), None)
    target_id = (page["targetId"] if page else
                 self.call("Target.createTarget", {"url": "about:blank"},
                           session=False)["targetId"])
    self.session = self.call("Target.attachToTarget", {"targetId": target_id, "flatten": True},
                             session=False)["sessionId"]
    self.call("Page.enable")
    self.call("Runtime.enable")
    self.call("Emulation.setDeviceMetricsOverride",
              {"width": self.width, "height": self.height, "deviceScaleFactor": 1,
               "mobile": False})

  # ---------------------------------------------------------------- page

  def open(self, url: str) -> None:
    """Navigates to `url` and waits for its load event (images included)."""
    self._events = [e for e in self._events if e["method"] != "Page.loadEventFired"]
    result = self.call("Page.navigate", {"url": url})
    if result.get("errorText"):
      raise BrowserError(f"{url}: {result['errorText']}")
    self.wait_event("Page.loadEventFired")

  def evaluate(self, expression: str, await_promise: bool = False) -> Any:
    """The value of a JavaScript expression (returned by value); raises on an exception."""
    r = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                       "awaitPromise": await_promise})
    if "exceptionDetails" in r:
      d = r["exceptionDetails"]
      raise BrowserError(f"{expression[:80]!r}: {d.get('exception', {}).get('description', d)}")
    return r["result"].get("value")

  def screenshot(self, path: str, full_page: bool = False) -> int:
    """A PNG of the viewport (or the whole page) at `path`; returns its size in bytes."""
    params: dict[str, Any] = {"format": "png"}
    if full_page:
      params["captureBeyondViewport"] = True
    data = base64.b64decode(self.call("Page.captureScreenshot", params)["data"])
    with open(path, "wb") as f:
      f.write(data)
    return len(data)
