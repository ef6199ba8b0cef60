"""The web UI end to end in headless Chromium (Debian's `chromium`, driven by playwright).

Screenshots of each step go to test-artifacts/ for a person to look at.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import httpx
import pytest
from helpers import DATA, REPO

from nanodb.database import NanoDB
from nanodb.interfaces.server import start_server

COCO = DATA / "coco-val2017" / "images"
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 60_000

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt-get install -y chromium)"),
    pytest.mark.skipif(not COCO.is_dir(), reason=f"the shared photos are missing: {COCO}"),
]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """(db, url, photos): 24 real photos served on 127.0.0.1."""
    root = tmp_path_factory.mktemp("browser")
    (root / "photos").mkdir()
    photos = [Path(shutil.copy2(p, root / "photos" / p.name)) for p in sorted(COCO.glob("*.jpg"))[:24]]
    db = NanoDB(root / "db", config="test")
    db.add([str(p) for p in photos])
    server = start_server(db, "127.0.0.1", 0)
    yield db, server.url, photos
    server.stop()
    db.close()


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, site):
    _, url, _ = site
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url + "?__theme=dark")
    page.wait_for_selector("#query textarea")
    yield page
    page.close()


def db_searches(site) -> int:
    """Searches the server has run so far."""
    _, url, _ = site
    return httpx.get(url + "api/stats").json()["searches"]


def set_results(page, k: int) -> None:
    box = page.locator("#k input[type=number]")
    box.fill(str(k))
    box.press("Enter")


def tiles(page):
    return page.locator("#results .thumbnail-item")


def shown_indices(page) -> list[int]:
    sources = page.locator("#results .thumbnail-item img").evaluate_all("imgs => imgs.map(i => i.src)")
    return [int(re.search(r"/api/items/(\d+)/thumbnail", s).group(1)) for s in sources]


def captions(page) -> list[float]:
    return [float(t) for t in page.locator("#results .caption-label").all_inner_texts()]


def wait_for_images(page) -> None:
    """Until every thumbnail has loaded (from the server's thumbnail cache)."""
    page.wait_for_function(
        "() => { const imgs = [...document.querySelectorAll('#results .thumbnail-item img')];"
        " return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0); }"
    )


def test_typing_a_query_shows_k_images_with_similarities(page, site):
    db, _, _ = site
    set_results(page, 8)
    searches = db_searches(site)
    text = "a dog on the beach"
    page.locator("#query textarea").press_sequentially(text, delay=30)  # searched as typed, debounced
    page.wait_for_function("() => document.querySelector('#status')?.innerText.includes('on the beach')")
    assert 1 <= db_searches(site) - searches < len(text)
    assert tiles(page).count() == 8
    wait_for_images(page)
    sims = captions(page)
    assert len(sims) == 8 and sims == sorted(sims, reverse=True)
    expected = db.search("a dog on the beach", k=8)
    assert shown_indices(page) == [r.index for r in expected]
    background = page.evaluate("getComputedStyle(document.querySelector('gradio-app')).backgroundColor")
    assert sum(map(int, re.findall(r"\d+", background)[:3])) < 150, f"not a dark page: {background}"
    page.wait_for_function("() => /text encode [0-9.]+ ms/.test(document.querySelector('#stats')?.innerText)")
    page.screenshot(path=ARTIFACTS / "web-text-search-dark.png", full_page=True)


def test_uploading_an_indexed_photo_shows_it_first(page, site):
    db, _, photos = site
    photo = photos[11]
    page.locator("#image-query input[type=file]").set_input_files(str(photo))
    page.wait_for_function("() => document.querySelector('#status')?.innerText.includes('the image')")
    wait_for_images(page)
    assert shown_indices(page)[0] == db.index_of(photo)
    assert captions(page)[0] >= 0.99
    page.screenshot(path=ARTIFACTS / "web-image-search.png", full_page=True)


def test_clicking_a_result_shows_its_neighbours(page, site):
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

    db, _, _ = site
    set_results(page, 12)
    page.locator("#query textarea").fill("people in a kitchen")
    page.locator("#query textarea").press("Enter")
    page.wait_for_function("() => document.querySelector('#status')?.innerText.includes('kitchen')")
    wait_for_images(page)
    clicked = shown_indices(page)[3]
    shows_item = f"() => document.querySelector('#status')?.innerText.includes('item {clicked}')"
    tiles(page).nth(3).click()
    try:
        page.wait_for_function(shows_item, timeout=15_000)
    except PlaywrightTimeoutError:
        # Seen once in a full CI run (not reproduced alone): the click landed while the gallery was
        # still re-rendering and selected nothing. A second click must work.
        tiles(page).nth(3).click()
        page.wait_for_function(shows_item)
    # The status line can update a moment before the gallery does: wait for the new gallery.
    page.wait_for_function(
        "() => document.querySelector('#results .thumbnail-item img')?.src.includes("
        f"'/api/items/{clicked}/thumbnail')"
    )
    wait_for_images(page)
    neighbours = shown_indices(page)
    assert neighbours[0] == clicked
    assert neighbours == [r.index for r in db.search(clicked, k=12)]
    assert db.path_of(clicked) in page.locator("#selected").inner_text()
    page.screenshot(path=ARTIFACTS / "web-click-neighbours.png", full_page=True)


def test_a_bad_query_shows_a_message_and_the_page_keeps_working(page, site):
    page.locator("#query textarea").fill("dog + dog - 2:dog")
    page.locator("#query textarea").press("Enter")
    page.wait_for_function("() => document.querySelector('#status')?.innerText.includes('cancel out')")
    page.locator("#query textarea").fill("a red car")
    page.locator("#query textarea").press("Enter")
    page.wait_for_function("() => document.querySelector('#status')?.innerText.includes('a red car')")
    assert "items indexed" in page.locator("#stats").inner_text()
    page.screenshot(path=ARTIFACTS / "web-error-then-search.png", full_page=True)
