"""The web UI end to end in headless Chromium (Debian's `chromium`, driven by playwright).

Screenshots of each step go to test-artifacts/ for a person to look at.
"""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
from helpers.browser import (
    ARTIFACTS,
    MARKS,
    captions,
    click_tile,
    open_page,
    search_text,
    set_results,
    shown_indices,
    tiles,
    wait_for_images,
)

pytestmark = MARKS


@pytest.fixture
def site(photo_site):
    """(db, url, photos): 24 real photos (12 in folder a, 12 in b) served on 127.0.0.1."""
    return photo_site


@pytest.fixture
def browser(chromium_browser):
    return chromium_browser


@pytest.fixture
def page(browser, site):
    page = open_page(browser, site[1])
    yield page
    page.close()


PHONE = {"device_scale_factor": 2, "is_mobile": True, "has_touch": True}


def db_searches(site) -> int:
    """Searches the server has run so far."""
    _, url, _ = site
    return httpx.get(url + "api/stats").json()["searches"]


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


def test_the_first_page_invites_a_search(page):
    assert "Type what you are looking for" in page.locator("#status").inner_text()
    assert re.search(r"24 items indexed", page.locator("#stats").inner_text())
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
    phone = open_page(browser, url, viewport={"width": 400, "height": 800}, **PHONE)
    try:
        search_text(phone, "a dog", images=3)
        # the gallery lays its tiles out after the images arrive: measure once four tiles sit in rows
        phone.wait_for_function("""() => {
            const t = [...document.querySelectorAll('#results .thumbnail-item')].slice(0, 4)
                .map(e => e.getBoundingClientRect());
            return t.length === 4 && t[0].width >= 90 && Math.abs(t[1].top - t[0].top) < 2;
        }""")
        phone.screenshot(path=ARTIFACTS / "web-phone.png")
        assert phone.evaluate("document.documentElement.scrollWidth") <= 400
        # all four at once: the stats line above can gain a line (its timings) between two separate reads
        boxes = phone.locator("#results .thumbnail-item").evaluate_all("""items => items.slice(0, 4).map(e => {
            const r = e.getBoundingClientRect(); return {x: r.x, y: r.y, width: r.width, height: r.height}; })""")
        per_row = sum(1 for b in boxes if abs(b["y"] - boxes[0]["y"]) < 2)
        assert 2 <= per_row <= 4 and boxes[0]["width"] >= 90, boxes
        text_box = phone.locator("#query").bounding_box()
        drop = phone.locator("#image-query").bounding_box()
        assert drop["y"] >= text_box["y"] + text_box["height"] - 1  # stacked, not side by side
        assert drop["x"] + drop["width"] <= 400  # the drop area is not cut off
        assert boxes[0]["y"] < 800  # results start on the first screen
    finally:
        phone.close()


def test_a_bad_query_shows_a_message_and_the_page_keeps_working(page, site):
    page.locator("#query textarea").fill("dog + dog - 2:dog")
    page.locator("#query textarea").press("Enter")
    page.wait_for_function("() => document.querySelector('#status')?.innerText.includes('cancel out')")
    page.locator("#query textarea").fill("a red car")
    page.locator("#query textarea").press("Enter")
    page.wait_for_function("() => document.querySelector('#status')?.innerText.includes('a red car')")
    assert "items indexed" in page.locator("#stats").inner_text()
    page.screenshot(path=ARTIFACTS / "web-error-then-search.png", full_page=True)


def contrast(foreground: str, background: str) -> float:
    """The WCAG contrast ratio of two CSS colours `rgb(r, g, b)` (4.5 and more: readable text)."""
    def luminance(colour: str) -> float:
        channels = [int(c) / 255 for c in re.findall(r"\d+", colour)[:3]]
        r, g, b = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
        return 0.2126 * r + 0.7152 * g + 0.0722 * b
    light, dark = sorted((luminance(foreground), luminance(background)), reverse=True)
    return (light + 0.05) / (dark + 0.05)


# What the page shows under the open lightbox: each sampled point must hit the lightbox, not the page.
UNDER_THE_LIGHTBOX = """() => {
  const box = document.getElementById("lightbox");
  const points = [];
  for (const id of ["status", "results", "query", "stats"]) {
    const r = document.getElementById(id).getBoundingClientRect();
    for (const [fx, fy] of [[0.1, 0.5], [0.5, 0.5], [0.9, 0.5]]) {
      const x = r.left + fx * r.width, y = r.top + fy * r.height;
      if (x >= 0 && y >= 0 && x < innerWidth && y < innerHeight) points.push([id, x, y]);
    }
  }
  return points.filter(([, x, y]) => !box.contains(document.elementFromPoint(x, y))).map(([id]) => id);
}"""


@pytest.mark.parametrize("theme", ["light", "dark"])
@pytest.mark.parametrize("device, viewport, context", [("desktop", {"width": 1440, "height": 900}, {}),
                                                        ("phone", {"width": 390, "height": 844}, PHONE)])
def test_the_lightbox_covers_the_page_with_the_photo_as_large_as_fits_and_its_name_readable(
        browser, site, theme, device, viewport, context):
    _, url, _ = site
    page = open_page(browser, url, theme, viewport=viewport, **context)
    try:
        search_text(page, "people in a kitchen", images=4)
        click_tile(page, 1)
        page.wait_for_function("() => { const i = document.querySelector('#lightbox-view img');"
                               " return i?.complete && i.naturalWidth > 300; }")
        page.screenshot(path=ARTIFACTS / f"web-lightbox-{device}-{theme}.png")
        style = page.evaluate("""() => { const s = getComputedStyle(document.getElementById("lightbox"));
            return {background: s.backgroundColor, opacity: s.opacity}; }""")
        alpha = re.fullmatch(r"rgba?\((\d+), (\d+), (\d+)(?:, ([\d.]+))?\)", style["background"])
        assert alpha and float(alpha.group(4) or 1) == 1 and float(style["opacity"]) == 1, style
        assert page.evaluate(UNDER_THE_LIGHTBOX) == []  # no part of the page shows through or over it
        name = page.locator("#lightbox-view .details .name")
        assert contrast(name.evaluate("e => getComputedStyle(e).color"), style["background"]) >= 7
        # the photo as large as the window allows: it fills the width, or the height the details leave
        picture = page.evaluate("""() => { const i = document.querySelector('#lightbox-view img');
            const r = i.getBoundingClientRect(), scale = Math.min(r.width / i.naturalWidth, r.height / i.naturalHeight);
            return {width: i.naturalWidth * scale, height: i.naturalHeight * scale, top: r.top, bottom: r.bottom}; }""")
        details = page.locator("#lightbox-view .details").bounding_box()
        close = page.locator("#lightbox-close").bounding_box()
        assert picture["width"] >= 0.9 * viewport["width"] or \
            picture["height"] >= 0.95 * (details["y"] - picture["top"]), (picture, details)
        assert picture["top"] >= 0 and close["y"] + close["height"] <= viewport["height"]  # all of it on screen
    finally:
        page.close()


@pytest.mark.parametrize("width", [1280, 400])
def test_the_duplicates_view_shows_a_resized_copy_beside_its_original(browser, tmp_path, width):
    from helpers.browser import served_photos
    from PIL import Image

    with served_photos(tmp_path, ("p",), per_folder=4) as (db, url, photos):
        copy = tmp_path / "p" / "copy_small.png"
        with Image.open(photos[2]) as im:
            im.resize((im.width // 2, im.height // 2), Image.LANCZOS).save(copy)
        db.add([str(copy)])
        want = db.near_duplicates(0.95)
        pair = {db.index_of(photos[2]), db.index_of(copy)}
        page = open_page(browser, url, viewport={"width": width, "height": 900}, **(PHONE if width < 600 else {}))
        try:
            page.locator("#duplicates button").first.click()  # opens the view
            page.locator("#dup-find").click()
            page.wait_for_function("() => /groups? of near-duplicates/.test(document.querySelector('#dup-status')"
                                   "?.innerText)")
            assert re.match(rf"{len(want)} groups? ", page.locator("#dup-status").inner_text())
            rows = page.locator("#dup-groups .dup-row").evaluate_all(
                "rows => rows.map(r => [...r.querySelectorAll('.dup-tile')].map(a => +a.dataset.index))")
            assert rows == [g.indices for g in want]
            assert any(pair <= set(row) for row in rows)
            page.wait_for_function("() => [...document.querySelectorAll('#dup-groups img')].every(i => "
                                   "i.complete && i.naturalWidth > 0)")
            assert page.evaluate("document.documentElement.scrollWidth") <= width
            page.screenshot(path=ARTIFACTS / f"web-duplicates-{width}.png", full_page=True)
        finally:
            page.close()
