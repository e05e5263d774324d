"""Render the built book in headless Chromium: every chapter page shows its figures and its launch buttons.

The site is served from a local HTTP server on 127.0.0.1. The server adds a small script to each
page, which writes the natural size of every image and the page's links into the DOM; Chromium's
--dump-dom then returns them. Chromium resolves no host name other than 127.0.0.1, so a page
that refers to a CDN sends nothing off this machine.

Skips when the site has not been built (`bash scripts/main.sh` builds it into _build/html; set
$CLIFFKIT_BOOK_HTML for another folder) or when no Chromium is installed (Debian: `apt-get install
chromium`). With CLIFFKIT_REQUIRE_BOOK=1, as in CI, a missing site or browser fails the tests
instead. Run this file as a script to take screenshots of two chapter pages:
`python tests/test_book_render.py book/_static/screenshots`.
"""

from __future__ import annotations

import contextlib
import functools
import html
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parents[1]
HTML_DIR = Path(os.environ.get("CLIFFKIT_BOOK_HTML", ROOT / "_build" / "html"))
CHAPTER_PAGE = re.compile(r"^\d\d_.+\.html$")
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-extensions", "--hide-scrollbars",
    # Every host name but the local server's address fails to resolve, so no request leaves the machine.
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
)
PROBE_QUERY = "ck-probe"
OPEN_LAUNCH_QUERY = "ck-open-launch"
REPORT_ID = "ck-render-report"

# Added before </body> of a page requested with ?ck-probe: on the load event, it writes the
# article's images (with natural sizes) and the page's links into a <pre> element.
PROBE_SCRIPT = """
<script>
window.addEventListener("load", function () {
  var article = document.querySelector("article") || document.body;
  var images = Array.from(article.querySelectorAll("img")).map(function (img) {
    var box = img.getBoundingClientRect();
    return {src: img.getAttribute("src"), width: img.naturalWidth, height: img.naturalHeight,
            complete: img.complete, bottom: Math.ceil(box.bottom + window.scrollY)};
  });
  var links = Array.from(document.querySelectorAll("a[href]")).map(function (a) { return a.href; });
  var report = document.createElement("pre");
  report.id = "%s";
  report.textContent = JSON.stringify({title: document.title, images: images, links: links});
  document.body.appendChild(report);
});
</script>
""" % REPORT_ID

# Added for screenshots (?ck-open-launch): opens the launch-button menu (Binder, Colab).
OPEN_LAUNCH_SCRIPT = """
<script>
window.addEventListener("load", function () {
  var toggle = document.querySelector(".dropdown-launch-buttons button");
  if (toggle) { toggle.click(); }
});
</script>
"""


def find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


class _SiteHandler(SimpleHTTPRequestHandler):
    """Serve the site folder; pages requested with a probe query get the probe or screenshot script."""

    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        path, _, query = self.path.partition("?")
        scripts = {PROBE_QUERY: PROBE_SCRIPT, OPEN_LAUNCH_QUERY: OPEN_LAUNCH_SCRIPT}
        wanted = [script for key, script in scripts.items() if key in query.split("&")]
        if not wanted or not path.endswith(".html"):
            super().do_GET()
            return
        file = Path(self.translate_path(path))
        if not file.is_file():
            self.send_error(404, f"{path} not found")
            return
        page = file.read_text(encoding="utf-8").replace("</body>", "".join(wanted) + "</body>")
        body = page.encode("utf-8")
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - signature of the base class
        pass


@contextlib.contextmanager
def serve(folder: Path) -> Iterator[str]:
    """Serve `folder` on 127.0.0.1 at a free port and yield the base URL."""
    handler = functools.partial(_SiteHandler, directory=str(folder))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def run_chromium(chromium: str, arguments: list[str], timeout: float = 120.0) -> subprocess.CompletedProcess:
    """Run headless Chromium with a fresh profile folder and the flags that keep it offline."""
    with tempfile.TemporaryDirectory(prefix="ck-chromium-") as profile:
        command = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *arguments]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def page_report(chromium: str, url: str, width: int = 1400) -> dict:
    """Load `url` with the probe script and return its report: title, images with natural sizes, links.

    Each image also has `bottom`, its lower edge in page pixels for a window `width` pixels wide.
    """
    result = run_chromium(chromium, ["--virtual-time-budget=20000", f"--window-size={width},1600", "--dump-dom",
                                     f"{url}?{PROBE_QUERY}"])
    # The theme's scripts add attributes such as tabindex to every <pre>.
    match = re.search(rf'<pre id="{REPORT_ID}"[^>]*>(.*?)</pre>', result.stdout, re.DOTALL)
    if not match:
        raise AssertionError(f"no render report in the DOM of {url} (Chromium exit {result.returncode}); "
                             f"stderr tail: {result.stderr[-800:]}")
    return json.loads(html.unescape(match.group(1)))


def screenshot(chromium: str, url: str, path: Path, width: int = 1400, max_height: int = 8000) -> Path:
    """Save a PNG of the top of `url`, down to its first figure, with the launch menu open.

    Headless Chromium captures the window from the top of the page, so the window is
    made as tall as the first figure's bottom edge (measured in a first load, at most
    `max_height` pixels): the header with the launch buttons and that figure are in
    one image.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    report = page_report(chromium, url, width=width)
    figures = [image["bottom"] for image in report["images"] if "_images/" in (image["src"] or "")]
    height = min(max_height, figures[0] + 40) if figures else 1600
    run_chromium(chromium, ["--virtual-time-budget=20000", f"--window-size={width},{height}",
                            f"--screenshot={path}", f"{url}?{OPEN_LAUNCH_QUERY}"])
    if not path.exists():
        raise RuntimeError(f"Chromium wrote no screenshot of {url} to {path}.")
    return path


def chapter_pages() -> list[Path]:
    folder = HTML_DIR / "notebooks"
    return sorted(page for page in folder.glob("*.html") if CHAPTER_PAGE.match(page.name)) if folder.is_dir() else []


def _skip_reason() -> str | None:
    if not (HTML_DIR / "index.html").exists():
        return f"the book is not built in {HTML_DIR}; run `bash scripts/main.sh` (or set CLIFFKIT_BOOK_HTML)"
    if find_chromium() is None:
        return "no Chromium found; install Debian's chromium package to run this test"
    return None


def _skip_or_fail(reason: str) -> None:
    """Skip the test, or fail it where $CLIFFKIT_REQUIRE_BOOK=1 (CI builds the book first)."""
    if os.environ.get("CLIFFKIT_REQUIRE_BOOK") == "1":
        pytest.fail(f"CLIFFKIT_REQUIRE_BOOK=1, but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def site() -> Iterator[tuple[str, str]]:
    reason = _skip_reason()
    if reason:
        _skip_or_fail(reason)
    with serve(HTML_DIR) as base_url:
        yield find_chromium(), base_url


def test_every_chapter_has_a_page():
    if not (HTML_DIR / "index.html").exists():
        _skip_or_fail(f"the book is not built in {HTML_DIR}; run `bash scripts/main.sh`")
    chapters = sorted(path.stem for path in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    assert [page.stem for page in chapter_pages()] == chapters


@pytest.mark.parametrize("page", chapter_pages() or [None], ids=lambda page: page.stem if page else "no-site")
def test_chapter_page_renders_figures_and_launch_buttons(site, page):
    if page is None:
        _skip_or_fail(f"no chapter pages in {HTML_DIR / 'notebooks'}")
    chromium, base_url = site
    report = page_report(chromium, f"{base_url}/notebooks/{page.name}")

    figures = [image for image in report["images"] if "_images/" in (image["src"] or "")]
    assert figures, f"{page.name}: no figure in the article"
    broken = [image["src"] for image in report["images"] if not (image["width"] > 0 and image["height"] > 0)]
    assert not broken, f"{page.name}: images that did not load: {broken}"

    notebook = f"notebooks/{page.stem}.ipynb"
    colab = [link for link in report["links"] if link.startswith("https://colab.research.google.com/github/")]
    binder = [link for link in report["links"] if link.startswith("https://mybinder.org/v2/gh/")]
    assert any(link.endswith(notebook) for link in colab), f"{page.name}: no Colab launch button for {notebook}"
    assert any(notebook in link for link in binder), f"{page.name}: no Binder launch button for {notebook}"


def test_injected_parameters_hidden(site):
    pages = chapter_pages()
    if not pages:
        _skip_or_fail("no chapter pages")
    text = pages[0].read_text(encoding="utf-8")
    assert "injected-parameters" not in text, "papermill's injected-parameters cell reached the page"


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "book" / "_static" / "screenshots")
    chromium = find_chromium()
    reason = _skip_reason()
    if reason:
        sys.exit(f"Cannot take screenshots: {reason}.")
    names = [name for name in ("02_refusal_cliff", "03_head_attribution") if (HTML_DIR / "notebooks" / f"{name}.html").exists()]
    names = names or [page.stem for page in chapter_pages()[:2]]
    with serve(HTML_DIR) as base_url:
        for name in names:
            print(screenshot(chromium, f"{base_url}/notebooks/{name}.html", out / f"{name}.png"))
