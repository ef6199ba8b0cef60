"""What the browser tests share: headless Chromium (Debian's `chromium`, driven by playwright), a server of
real photos, and reading the page (the tiles, their captions, the status line)."""

from __future__ import annotations

import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest

from helpers import PHOTOS, REPO

COCO = PHOTOS
ARTIFACTS = REPO / "test-artifacts"  # screenshots, for a person to look at
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 60_000

MARKS = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt-get install -y chromium)"),
]


@contextmanager
def served_photos(root: Path, folders: tuple[str, ...] = ("photos",), per_folder: int = 24):
    """(db, url, photos): real photos, `per_folder` in each folder under `root`, served on 127.0.0.1."""
    from nanodb.database import NanoDB
    from nanodb.interfaces.server import start_server

    originals = sorted(COCO.glob("*.jpg"))
    photos = []
    for n, folder in enumerate(folders):
        (root / folder).mkdir()
        photos += [Path(shutil.copy2(p, root / folder / p.name))
                   for p in originals[n * per_folder:(n + 1) * per_folder]]
    db = NanoDB(root / "db", config="test")
    db.add([str(p) for p in photos])
    server = start_server(db, "127.0.0.1", 0)
    try:
        yield db, server.url, photos
    finally:
        server.stop()
        db.close()


@contextmanager
def chromium():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def open_page(browser, url: str, theme: str = "dark", init_script: str | None = None, **context):
    """A new page of the web UI in `theme`, loaded (context: viewport, device_scale_factor, is_mobile...);
    `init_script` runs in it before the page's own scripts."""
    page = browser.new_page(**({"viewport": {"width": 1280, "height": 1000}} | context))
    page.set_default_timeout(TIMEOUT_MS)
    if init_script:
        page.add_init_script(init_script)
    page.goto(f"{url}?__theme={theme}")
    page.wait_for_selector("#query textarea")
    return page


def open_filters(page) -> None:
    if not page.locator("#k").is_visible():
        page.locator("#filters button").first.click()
        page.locator("#k").wait_for(state="visible")


def set_results(page, k: int) -> None:
    """Type k in the number box of "Results", until the slider has taken it (a number typed while the
    just opened accordion still renders its sliders can be lost)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

    open_filters(page)
    box = page.locator("#k input[type=number]")
    for attempt in range(3):
        box.fill(str(k))
        box.press("Enter")
        # the slider takes the number on Enter, asynchronously: a search sent before that would use the old k
        try:
            page.wait_for_function(f"() => document.querySelector('#k input[type=range]')?.value === '{k}'",
                                   timeout=10_000)
            return
        except PlaywrightTimeoutError:
            if attempt == 2:
                raise


def tiles(page):
    return page.locator("#results .thumbnail-item")


def shown_indices(page) -> list[int]:
    sources = page.locator("#results .thumbnail-item img").evaluate_all("imgs => imgs.map(i => i.src)")
    return [int(re.search(r"/api/items/(\d+)/thumbnail", s).group(1)) for s in sources]


def captions(page) -> list[float]:
    """The similarity at the end of each tile's caption (`NAME · 0.283`)."""
    return [float(t.rsplit(" ", 1)[-1]) for t in page.locator("#results .caption-label").all_inner_texts()]


def status(page) -> str:
    return page.locator("#status").inner_text()


def wait_for_status(page, text: str) -> None:
    page.wait_for_function(f"() => document.querySelector('#status')?.innerText.includes({text!r})")


def wait_for_images(page, first: int = 1000) -> None:
    """Until the first thumbnails have loaded (the others may be lazy, below the window)."""
    page.wait_for_function(
        f"() => {{ const imgs = [...document.querySelectorAll('#results .thumbnail-item img')].slice(0, {first});"
        " return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0); }"
    )


def search_text(page, text: str, images: int = 1000) -> None:
    page.locator("#query textarea").fill(text)
    page.locator("#query textarea").press("Enter")
    wait_for_status(page, text)
    wait_for_images(page, images)


def click_tile(page, n: int) -> None:
    """Click tile n until the lightbox opens (a click landing while the gallery re-renders selects nothing)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

    for attempt in range(3):
        tiles(page).nth(n).click()
        try:
            page.locator("#lightbox").wait_for(state="visible", timeout=10_000)
            return
        except PlaywrightTimeoutError:
            if attempt == 2:
                raise
