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
    # a known race (issue 13's note, open): two searches of one page can finish out of order on Gradio's
    # queue and the older results stay; fresh-clone CI runs hit it about once a run. A test that fails
    # three times in a row still fails.
    pytest.mark.flaky(reruns=2),
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


def open_filters(page) -> None:
    if not page.locator("#k").is_visible():
        page.locator("#filters button").first.click()
        page.locator("#k").wait_for(state="visible")


def set_results(page, k: int) -> None:
    open_filters(page)
    box = page.locator("#k input[type=number]")
    box.fill(str(k))
    box.press("Enter")
    # the slider takes the number on Enter, asynchronously: a search sent before that would use the old k
    page.wait_for_function(f"() => document.querySelector('#k input[type=range]')?.value === '{k}'")


def tiles(page):
    return page.locator("#results .thumbnail-item")


def shown_indices(page) -> list[int]:
    sources = page.locator("#results .thumbnail-item img").evaluate_all("imgs => imgs.map(i => i.src)")
    return [int(re.search(r"/api/items/(\d+)/thumbnail", s).group(1)) for s in sources]


def captions(page) -> list[float]:
    """The similarity at the end of each tile's caption (`NAME · 0.283`)."""
    return [float(t.rsplit(" ", 1)[-1]) for t in page.locator("#results .caption-label").all_inner_texts()]


def wait_for_images(page, first: int = 1000) -> None:
    """Until the first thumbnails have loaded (the others may be lazy, below the window)."""
    page.wait_for_function(
        f"() => {{ const imgs = [...document.querySelectorAll('#results .thumbnail-item img')].slice(0, {first});"
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
    page.wait_for_function("() => /text [0-9.]+ ms/.test(document.querySelector('#stats')?.innerText)")
    page.screenshot(path=ARTIFACTS / "web-text-search-dark.png", full_page=True)


def test_uploading_an_indexed_photo_shows_it_first(page, site):
    db, _, photos = site
    photo = photos[11]
    page.locator("#image-query input[type=file]").set_input_files(str(photo))
    page.wait_for_function("() => document.querySelector('#status')?.innerText.includes('the uploaded image')")
    wait_for_images(page)
    assert shown_indices(page)[0] == db.index_of(photo)
    assert captions(page)[0] >= 0.99
    page.screenshot(path=ARTIFACTS / "web-image-search.png", full_page=True)


def search_text(page, text: str, images: int = 1000) -> None:
    page.locator("#query textarea").fill(text)
    page.locator("#query textarea").press("Enter")
    page.wait_for_function(f"() => document.querySelector('#status')?.innerText.includes({text!r})")
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


def test_the_first_page_invites_a_search(page):
    assert "Type what you are looking for" in page.locator("#status").inner_text()
    assert re.search(r"24 photos indexed", page.locator("#stats").inner_text())
    assert "text encode -" not in page.locator("#stats").inner_text()


def test_tiles_carry_the_file_name_as_alt_text(page, site):
    db, _, _ = site
    set_results(page, 6)
    search_text(page, "a cat")
    first = shown_indices(page)[0]
    alt = page.locator("#results .thumbnail-item img").first.get_attribute("alt")
    assert alt.startswith(Path(db.path_of(first)).name)


def test_the_lightbox_shows_a_result_large_and_steps_through_the_results(page, site):
    db, url, _ = site
    set_results(page, 12)
    search_text(page, "people in a kitchen")
    order = shown_indices(page)
    click_tile(page, 3)
    view = page.locator("#lightbox-view")
    page.wait_for_function("() => document.querySelector('#lightbox-view img')?.naturalWidth > 300")
    assert f"/api/items/{order[3]}/original" in view.locator("img").get_attribute("src")
    text = view.inner_text()
    path = Path(db.path_of(order[3]))
    assert path.name in text and str(path.parent) in text and "4 of 12" in text
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d \((taken|file time)\)", text) and "KB" in text
    page.screenshot(path=ARTIFACTS / "web-lightbox-desktop.png")
    page.locator("#lightbox-next").click()
    page.wait_for_function("() => document.querySelector('#lightbox-view')?.innerText.includes('5 of 12')")
    assert Path(db.path_of(order[4])).name in view.inner_text()
    page.keyboard.press("ArrowLeft")
    page.wait_for_function("() => document.querySelector('#lightbox-view')?.innerText.includes('4 of 12')")
    original = view.locator("#lightbox-original").get_attribute("href")
    assert httpx.get(original).content == path.read_bytes()
    page.keyboard.press("Escape")
    page.locator("#lightbox").wait_for(state="hidden")
    assert shown_indices(page) == order  # looking at a result does not replace the results


def test_similar_to_this_shows_its_neighbours_and_says_so(page, site):
    db, _, _ = site
    set_results(page, 12)
    search_text(page, "a bus in the street")
    clicked = shown_indices(page)[2]
    click_tile(page, 2)
    page.locator("#lightbox-similar").click()
    page.locator("#lightbox").wait_for(state="hidden")
    page.wait_for_function(
        "() => document.querySelector('#results .thumbnail-item img')?.src.includes("
        f"'/api/items/{clicked}/thumbnail')"
    )
    wait_for_images(page)
    assert shown_indices(page) == [r.index for r in db.search(clicked, k=12, collapse_duplicates=True)]
    name = Path(db.path_of(clicked)).name
    assert f"similar to {name}" in page.locator("#query").inner_text()
    assert f"similar to {name}" in page.locator("#status").inner_text()
    assert page.locator("#results .thumbnail-item.selected").count() == 0  # no stale highlight
    page.screenshot(path=ARTIFACTS / "web-similar.png", full_page=True)


def test_filters_restrict_the_results_exactly(page, site):
    db, _, photos = site
    set_results(page, 5)
    search_text(page, "a person")
    page.locator("#folder textarea").fill("no-such-folder")
    page.locator("#folder textarea").press("Enter")
    page.wait_for_function("() => document.querySelector('#status')?.innerText.includes('nothing matches')")
    assert tiles(page).count() == 0
    page.locator("#folder textarea").fill(str(photos[0].parent))
    page.locator("#folder textarea").press("Enter")
    page.wait_for_function("() => document.querySelector('#status')?.innerText.includes('5 results')")
    page.locator("#since textarea").fill("2000-01-01")
    page.locator("#since textarea").press("Enter")
    page.wait_for_function("() => document.querySelector('#status')?.innerText.includes('5 results')")
    wait_for_images(page)
    want = db.search(text="a person", k=5, folder=str(photos[0].parent), since="2000-01-01",
                     collapse_duplicates=True)
    assert shown_indices(page) == [r.index for r in want]
    page.locator("#types label", has_text="png").click()
    page.wait_for_function("() => document.querySelector('#status')?.innerText.includes('nothing matches')")
    page.screenshot(path=ARTIFACTS / "web-filters.png", full_page=True)


def test_a_phone_sees_a_few_columns_stacked_inputs_and_no_sideways_scroll(browser, site):
    _, url, _ = site
    phone = browser.new_page(viewport={"width": 400, "height": 800}, device_scale_factor=2, is_mobile=True,
                             has_touch=True)
    phone.set_default_timeout(TIMEOUT_MS)
    try:
        phone.goto(url + "?__theme=dark")
        phone.wait_for_selector("#query textarea")
        search_text(phone, "a dog", images=3)
        # the gallery lays its tiles out after the images arrive: measure once four tiles sit in rows
        phone.wait_for_function("""() => {
            const t = [...document.querySelectorAll('#results .thumbnail-item')].slice(0, 4)
                .map(e => e.getBoundingClientRect());
            return t.length === 4 && t[0].width >= 90 && Math.abs(t[1].top - t[0].top) < 2;
        }""")
        phone.screenshot(path=ARTIFACTS / "web-phone.png")
        assert phone.evaluate("document.documentElement.scrollWidth") <= 400
        boxes = [tiles(phone).nth(i).bounding_box() for i in range(4)]
        per_row = sum(1 for b in boxes if abs(b["y"] - boxes[0]["y"]) < 2)
        assert 2 <= per_row <= 4 and boxes[0]["width"] >= 90, boxes
        text_box = phone.locator("#query").bounding_box()
        drop = phone.locator("#image-query").bounding_box()
        assert drop["y"] >= text_box["y"] + text_box["height"] - 1  # stacked, not side by side
        assert drop["x"] + drop["width"] <= 400  # the drop area is not cut off
        assert boxes[0]["y"] < 800  # results start on the first screen
        click_tile(phone, 0)
        phone.wait_for_function("() => document.querySelector('#lightbox-view img')?.naturalWidth > 0")
        image_box = phone.locator("#lightbox-view img").bounding_box()
        assert image_box["width"] <= 400
        phone.screenshot(path=ARTIFACTS / "web-phone-lightbox.png")
    finally:
        phone.close()


def test_a_bad_query_shows_a_message_and_the_page_keeps_working(page, site):
    page.locator("#query textarea").fill("dog + dog - 2:dog")
    page.locator("#query textarea").press("Enter")
    page.wait_for_function("() => document.querySelector('#status')?.innerText.includes('cancel out')")
    page.locator("#query textarea").fill("a red car")
    page.locator("#query textarea").press("Enter")
    page.wait_for_function("() => document.querySelector('#status')?.innerText.includes('a red car')")
    assert "photos indexed" in page.locator("#stats").inner_text()
    page.screenshot(path=ARTIFACTS / "web-error-then-search.png", full_page=True)
