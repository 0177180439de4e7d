"""One real-browser test: Debian's Chromium (headless) visits every page.

The app runs as a real ``streamlit run`` subprocess on 127.0.0.1 against the
tiny fixture cache; Playwright drives the system Chromium (no browser is ever
downloaded). Screenshots go to ``out/screenshots/``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
REPO = Path(__file__).resolve().parents[1]
SCREENSHOTS = REPO / "out" / "screenshots"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# (url path, a title the page must show)
PAGES = [
    ("", "Overview"),
    ("atoms", "Atoms"),
    ("atoms?atom=1", "Atom #1"),
    ("cross-modal", "Cross-modal"),
    ("traces", "Traces"),
    ("atlas", "Atlas"),
    ("edits", "Edits"),
]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(),
        reason=f"{CHROMIUM} is absent; `make browser` installs Debian's chromium",
    ),
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(url: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"streamlit exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"streamlit did not answer at {url} in {timeout} s")


@pytest.fixture(scope="module")
def app_url(tiny_cache):
    """A running ``streamlit run streamlit_app.py`` on a free local port."""
    port = _free_port()
    env = dict(os.environ, ATLAS_CACHE_ROOT=str(Path(tiny_cache).parent))
    env.setdefault("OMP_NUM_THREADS", "1")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    log = open(SCREENSHOTS.parent / "streamlit-browser-test.log", "w")  # noqa: SIM115
    command = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        "streamlit_app.py",
        "--server.address",
        "127.0.0.1",
        "--server.port",
        str(port),
        "--server.headless",
        "true",
        "--browser.gatherUsageStats",
        "false",
    ]
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, process, timeout=60)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=20)
        log.close()


def _settle(page, title: str) -> None:
    """Wait until the page shows ``title``, its run ended and no spinner is left."""
    page.wait_for_function(
        """(title) => {
            const app = document.querySelector('[data-testid="stApp"]');
            const main = document.querySelector('[data-testid="stMain"]');
            const spinner = document.querySelector('[data-testid="stSpinner"]');
            return app && main && !spinner
                && app.getAttribute('data-test-script-state') === 'notRunning'
                && main.innerText.includes(title);
        }""",
        arg=title,
        timeout=90_000,
    )
    page.wait_for_timeout(1000)


@pytest.fixture(scope="module")
def browser_page(app_url):
    """One headless Chromium page for the module's tests."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as driver:
        browser = driver.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        page = browser.new_page(viewport={"width": 1400, "height": 1400})
        try:
            yield page
        finally:
            browser.close()


def _wait_for_charts(page, at_least: int = 0) -> int:
    """Wait until the page holds ``at_least`` plotly charts and every one has
    drawn a trace; their count.

    Streamlit reports the run as finished before plotly has mounted and drawn
    its charts, so a screenshot taken at once shows empty frames, or none; a
    chart that never draws fails the test.
    """
    page.wait_for_function(
        """(least) => {
            const charts = [
                ...document.querySelectorAll('[data-testid="stPlotlyChart"]')];
            return charts.length >= least && charts.every(chart =>
                chart.querySelector('.main-svg')
                && chart.querySelectorAll('g.trace, .hm, .imagelayer image').length);
        }""",
        arg=at_least,
        timeout=30_000,
    )
    return page.locator('[data-testid="stPlotlyChart"]').count()


def _assert_no_exception(page, where: str) -> None:
    exceptions = page.locator('[data-testid="stException"]')
    assert exceptions.count() == 0, f"{where}: {exceptions.first.inner_text()}"


def test_every_page_renders_without_exception(app_url, browser_page):
    page = browser_page
    for path, title in PAGES:
        page.goto(f"{app_url}/{path}", wait_until="domcontentloaded")
        _settle(page, title)
        charts = _wait_for_charts(page, at_least=1 if path == "" else 0)
        if path == "":
            assert charts > 0, "the Overview page shows no plotly chart"
        name = path.replace("?", "_").replace("=", "") or "overview"
        page.screenshot(path=SCREENSHOTS / f"{name}.png")
        _assert_no_exception(page, path)
        errors = page.locator('[data-testid="stAlertContentError"]')
        assert errors.count() == 0, f"{path}: {errors.first.inner_text()}"
        main = page.locator('[data-testid="stMain"]')
        assert title in main.inner_text(), f"{path}: no {title!r}"


def test_atlas_hover_shows_a_thumbnail_and_click_opens_the_atom(app_url, browser_page):
    page = browser_page
    page.goto(f"{app_url}/atlas", wait_until="domcontentloaded")
    _settle(page, "Atlas")
    points = page.locator('[data-testid="stVegaLiteChart"] svg .mark-symbol path')
    tooltip = page.locator("#vg-tooltip-element")
    assert points.count() > 0
    for index in range(points.count()):
        points.nth(index).hover(force=True)
        page.wait_for_timeout(50)
        if "<img" in (tooltip.inner_html() if tooltip.count() else ""):
            break
    else:
        pytest.fail("no atlas point showed a thumbnail on hover")
    atom = tooltip.locator("td.value").first.inner_text()
    page.screenshot(path=SCREENSHOTS / "atlas_hover.png")
    points.nth(index).click(force=True)
    page.wait_for_url(f"**/atoms?atom={atom}", timeout=30_000)
    _settle(page, f"Atom #{atom}")
    _assert_no_exception(page, "atlas click")


def test_atom_links_carry_the_atom_in_the_url(app_url, browser_page):
    page = browser_page
    page.goto(f"{app_url}/atoms?atom=1", wait_until="domcontentloaded")
    _settle(page, "Atom #1")
    link = page.locator('[data-testid="stPageLink"] a').first
    target = link.inner_text().split()[0].lstrip("#")
    link.click()
    page.wait_for_url(f"**/atoms?atom={target}", timeout=30_000)
    _settle(page, f"Atom #{target}")
    _assert_no_exception(page, "atom link")


def _upload(page, name: str, data: bytes) -> None:
    page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files(
        files=[{"name": name, "mimeType": "image/png", "buffer": data}]
    )


def _open_upload_tab(page, url: str, title: str, ready: str) -> None:
    """Open a page, switch its image source to upload and wait for ``ready``."""
    page.goto(url, wait_until="domcontentloaded")
    _settle(page, title)
    page.get_by_text("Upload an image").click()
    _settle(page, ready)


def _corpus_png() -> bytes:
    """The first shipped corpus image as PNG bytes: a real upload."""
    import io

    from backend.corpus import load_corpus

    corpus = load_corpus(None)
    buffer = io.BytesIO()
    corpus.open_image(corpus.table["id"].iloc[0]).save(buffer, format="PNG")
    return buffer.getvalue()


def test_traces_upload_real_image_and_reject_a_broken_one(
    app_url, browser_page, tiny_cache
):
    page = browser_page
    _open_upload_tab(page, f"{app_url}/traces", "Traces", "Traces")
    _upload(page, "real.png", _corpus_png())
    _settle(page, "MP-SAE, step by step")
    _assert_no_exception(page, "upload")
    page.screenshot(path=SCREENSHOTS / "traces_upload.png")
    _upload(page, "broken.png", b"this is not a picture")
    _settle(page, "cannot be used")
    _assert_no_exception(page, "broken upload")
    error = page.locator('[data-testid="stAlertContentError"]').first.inner_text()
    assert "broken.png cannot be used: not an image" in error


def test_edits_upload_real_image_edits_it_and_rejects_a_broken_one(
    app_url, browser_page, tiny_cache
):
    page = browser_page
    ready = "Choose a corpus image or upload one"
    _open_upload_tab(page, f"{app_url}/edits", "Edits", ready)
    _upload(page, "mine.png", _corpus_png())
    _settle(page, "Type a source and a target text")
    page.get_by_label("Source text").fill("grinning face")
    page.get_by_label("Source text").press("Enter")
    page.get_by_label("Target text").fill("cat face")
    page.get_by_label("Target text").press("Enter")
    _settle(page, "Nearest corpus images")
    _assert_no_exception(page, "edit of an upload")
    assert page.get_by_text("Code changes").count() == 1
    page.screenshot(path=SCREENSHOTS / "edits_upload.png", full_page=True)
    _upload(page, "broken.png", b"\x89PNG\r\n\x1a\n truncated")
    _settle(page, "cannot be used")
    error = page.locator('[data-testid="stAlertContentError"]').first.inner_text()
    assert "broken.png cannot be used" in error
    assert page.get_by_text("Nearest corpus images").count() == 0
