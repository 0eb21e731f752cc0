"""Render clip-ping's HTML pages in headless Chromium and fail on what a reader would see broken.

    python benchmarks/check_pages.py runs/demo/report/index.html

Each page given, and every local ``.html`` page it links (the report links the
neighbour page), is opened in Debian's ``chromium`` (``apt-get install chromium``)
and fails the check on:

- a broken image: an ``<img>`` that does not decode (lazy images are loaded first);
- a broken link: an ``<a href>`` to a local file or folder that does not exist,
  a ``#fragment`` with no element of that id on its page, or an absolute local
  path (the folder could not be moved);
- a console error: ``console.error``, an uncaught exception, or an error the
  browser logs itself (a resource that fails to load, a blocked request).

Links to other sites are listed but not followed (the machine is offline).
Chromium is driven through its own DevTools protocol over a pipe
(``--remote-debugging-pipe``), so nothing beyond the standard library is needed.
Exit status 0 when every page is clean, 1 otherwise; ``--json`` keeps the findings.
"""

from __future__ import annotations

import argparse
import datetime as dt
import fcntl
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

# Runs in the page once it has loaded: make lazy images load, wait for every image to
# decode (or fail), then list images, links and ids for the checks done in Python.
PAGE_SCRIPT = """
(async () => {
  const imgs = [...document.images];
  imgs.forEach(img => { img.loading = "eager"; });
  const images = await Promise.all(imgs.map(async img => {
    let ok = true;
    try { await img.decode(); } catch (e) { ok = false; }
    ok = ok && img.naturalWidth > 0;
    return {src: img.getAttribute("src") || "", url: img.currentSrc || img.src, ok};
  }));
  const links = [...document.querySelectorAll("a[href]")].map(a => ({href: a.getAttribute("href"), url: a.href}));
  const ids = [...document.querySelectorAll("[id], a[name]")].map(e => e.id || e.getAttribute("name"));
  return {images, links, ids, title: document.title, text_chars: document.body ? document.body.innerText.length : 0};
})()
"""


class Chromium:
    """A headless Chromium and one tab, spoken to with the DevTools protocol over fds 3/4."""

    def __init__(self, binary: str, timeout: float) -> None:
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="check-pages-")
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        # Chromium reads commands on fd 3 and writes replies on fd 4. Its ends are first moved
        # above 3/4 (close-on-exec), so the child's dup2 to 3 and 4 cannot overwrite one another.
        child_in = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD_CLOEXEC, 10)
        child_out = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD_CLOEXEC, 10)

        def wire_fds() -> None:
            os.dup2(child_in, 3)
            os.dup2(child_out, 4)

        args = [binary, "--headless", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu",
                "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                "--disable-background-networking", f"--user-data-dir={self.profile}", "about:blank"]
        self.log_path = Path(self.profile) / "chromium.log"
        with open(self.log_path, "wb") as log:
            # close_fds=False keeps the 3 and 4 made in wire_fds; every other descriptor of this
            # process is close-on-exec (PEP 446), so nothing else leaks into Chromium.
            self.proc = subprocess.Popen(args, close_fds=False, preexec_fn=wire_fds, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=log)
        for fd in (to_chrome_r, from_chrome_w, child_in, child_out):
            os.close(fd)
        self._messages: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self._next_id = 0
        self.events: list[dict[str, Any]] = []
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable", session=True)

    def _read(self) -> None:
        buf = b""
        with os.fdopen(self._from_chrome, "rb", buffering=0) as pipe:
            while chunk := pipe.read(1 << 16):
                buf += chunk
                *messages, buf = buf.split(b"\0")
                for raw in messages:
                    self._messages.put(json.loads(raw))
        self._messages.put(None)

    def _wait(self, done: Any) -> dict[str, Any]:
        """Messages until ``done(message)``; events on the way are kept in ``self.events``."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                message = self._messages.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"chromium did not answer within {self.timeout:.0f} s") from None
            if message is None:
                tail = self.log_path.read_text(errors="replace").strip().splitlines()[-5:]
                raise RuntimeError("chromium exited: " + " | ".join(tail))
            if done(message):
                return message
            if "method" in message:
                self.events.append(message)

    def call(self, method: str, params: dict[str, Any] | None = None, session: bool = False) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        reply = self._wait(lambda m: m.get("id") == message["id"])
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error'].get('message')}")
        return reply.get("result", {})

    def render(self, url: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Load ``url``; return what PAGE_SCRIPT reports and the protocol events seen meanwhile."""
        self.events = []
        navigation = self.call("Page.navigate", {"url": url}, session=True)
        if navigation.get("errorText"):
            raise RuntimeError(f"cannot open {url}: {navigation['errorText']}")
        # the load event may have come while waiting for the reply above
        if not any(e["method"] == "Page.loadEventFired" for e in self.events):
            self._wait(lambda m: m.get("method") == "Page.loadEventFired")
        result = self.call("Runtime.evaluate", {"expression": PAGE_SCRIPT, "awaitPromise": True,
                                                "returnByValue": True}, session=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed on {url}: {result['exceptionDetails'].get('text')}")
        return result["result"]["value"], list(self.events)

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_chrome)
        shutil.rmtree(self.profile, ignore_errors=True)


def _local_path(url: str) -> Path | None:
    parts = urllib.parse.urlsplit(url)
    return Path(urllib.request.url2pathname(parts.path)) if parts.scheme == "file" else None


def console_errors(events: list[dict[str, Any]]) -> list[str]:
    """Errors a reader of the console would see: console.error/assert, exceptions, the browser's own errors."""
    errors = []
    for event in events:
        params = event.get("params", {})
        if event["method"] == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            errors.append("console." + params["type"] + ": "
                          + " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", [])))
        elif event["method"] == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            errors.append("exception: " + str(details.get("exception", {}).get("description") or details.get("text")))
        elif event["method"] == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            errors.append(f"{entry.get('source', 'browser')}: {entry.get('text')} {entry.get('url', '')}".strip())
    return errors


def check_page(browser: Chromium, page: Path) -> dict[str, Any]:
    """Findings of one page: broken images, broken links, console errors, and the local pages it links."""
    page = page.resolve()
    info, events = browser.render(page.as_uri())
    broken_images = [img["src"][:120] for img in info["images"] if not img["ok"]]
    broken_links, external, pages = [], [], []
    ids = set(info["ids"])
    for link in info["links"]:
        href, url = link["href"], link["url"]
        parts = urllib.parse.urlsplit(url)
        if href.startswith("#"):
            if href[1:] and urllib.parse.unquote(href[1:]) not in ids:
                broken_links.append(f"{href} (no element with that id)")
            continue
        if parts.scheme != "file":
            external.append(url)
            continue
        if urllib.parse.urlsplit(href).scheme == "file" or href.startswith("/"):
            broken_links.append(f"{href} (absolute local path: breaks when the folder moves)")
            continue
        target = _local_path(url)
        if target is None or not target.exists():
            broken_links.append(f"{href} (no such file: {target})")
        elif target.suffix.lower() in (".html", ".htm") and target.is_file():
            pages.append(target)
    return {"page": str(page), "title": info["title"], "text_chars": info["text_chars"],
            "images": len(info["images"]), "links": len(info["links"]), "broken_images": broken_images,
            "broken_links": broken_links, "console_errors": console_errors(events), "external_links": external,
            "linked_pages": [str(p) for p in pages]}


def check_pages(pages: list[Path], binary: str = "chromium", timeout: float = 60.0,
                follow: bool = True) -> list[dict[str, Any]]:
    """Check ``pages`` and (``follow``) every local page they link, each once."""
    browser = Chromium(binary, timeout)
    try:
        todo, done, results = [p.resolve() for p in pages], set(), []
        while todo:
            page = todo.pop(0)
            if page in done:
                continue
            done.add(page)
            result = check_page(browser, page)
            results.append(result)
            if follow:
                todo += [Path(p) for p in result["linked_pages"] if Path(p) not in done]
        return results
    finally:
        browser.close()


def _failures(result: dict[str, Any]) -> list[str]:
    return ([f"broken image: {x}" for x in result["broken_images"]]
            + [f"broken link: {x}" for x in result["broken_links"]]
            + [f"console error: {x}" for x in result["console_errors"]])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pages", nargs="+", type=Path, help="HTML pages to render (e.g. runs/demo/report/index.html)")
    parser.add_argument("--chromium", default=os.environ.get("CHROMIUM", "chromium"), help="Chromium binary")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for Chromium per step")
    parser.add_argument("--no-follow", action="store_true", help="do not check the local pages the pages link")
    parser.add_argument("--json", type=Path, help="write the findings here")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.pages if not p.is_file()]
    if missing:
        print(f"check_pages: no such page: {', '.join(missing)}", file=sys.stderr)
        return 2
    if shutil.which(args.chromium) is None:
        print(f"check_pages: '{args.chromium}' not found (apt-get install chromium, or --chromium PATH)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    results = check_pages(args.pages, args.chromium, args.timeout, follow=not args.no_follow)
    failed = 0
    for result in results:
        failures = _failures(result)
        failed += bool(failures)
        status = "FAIL" if failures else "ok"
        print(f"{status}  {result['page']}: {result['images']} images, {result['links']} links "
              f"({len(result['external_links'])} external, not followed), {result['text_chars']} characters of text")
        for line in failures:
            print(f"      {line}")
    print(f"{len(results)} page(s), {failed} with problems, {time.perf_counter() - t0:.1f} s")
    if args.json:
        version = subprocess.run([args.chromium, "--version"], capture_output=True, text=True).stdout.strip()
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                                         "command": "python benchmarks/check_pages.py " + " ".join(map(str, args.pages)),
                                         "chromium": version, "failed_pages": failed, "pages": results}, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
