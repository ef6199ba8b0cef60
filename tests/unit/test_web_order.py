"""Two searches of one browser can finish in either order on Gradio's queue: the web UI shows the one
the user asked for last (numbered in the browser), never an older one that finished later."""

from nanodb.interfaces.web import LatestSearch


def test_an_older_search_finishing_after_a_newer_one_arrived_is_dropped():
    latest = LatestSearch()
    latest.asked("browser", 1)  # e.g. the blur of a date box
    latest.asked("browser", 2)  # then a filter click: its search reaches the server (in any order)
    assert latest.superseded("browser", 1)
    assert not latest.superseded("browser", 2)


def test_a_search_finishing_before_the_next_arrives_is_shown_and_browsers_are_apart():
    latest = LatestSearch()
    latest.asked("a", 5)
    assert not latest.superseded("a", 5)  # shown; the next search replaces it when it comes
    latest.asked("a", 3)  # a late arrival of an older search does not lower the newest
    assert latest.superseded("a", 3) and not latest.superseded("a", 5)
    latest.asked("b", 1)
    assert not latest.superseded("b", 1)  # another browser's numbers are its own


def test_it_remembers_a_bounded_number_of_browsers():
    latest = LatestSearch(browsers=2)
    for name in ("a", "b", "c"):
        latest.asked(name, 9)
    assert not latest.superseded("a", 1)  # forgotten: nothing to compare with, so shown
    assert latest.superseded("c", 1)
