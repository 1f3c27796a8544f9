"""The dashboard page in a real headless Chromium: it loads, draws, and follows the broker.

Chromium is Debian's (``make browser-deps``); without it these tests skip,
and under CI=true they fail.  See tests/browser.py for how it is driven.
"""
import contextlib

import pytest
from browser import Browser, find_chromium
from conftest import Wire, publish_line

from ciphermq import access

pytestmark = pytest.mark.timeout(120)

#: The text of one cell of the queue table, or null while the row is missing.
CELL = """(queue, column) => {
    const cell = document.querySelector('tr[data-queue="' + queue + '"] td.' + column);
    return cell ? cell.textContent : null;
}"""


@pytest.fixture
def browser(tmp_path):
    executable = find_chromium()
    chromium = Browser(executable, tmp_path / "profile")
    yield chromium
    chromium.close()


@pytest.fixture
def dashboard_server(start_server):
    return start_server(http_port=0)


def url(server, path="/"):
    return "http://%s:%d%s" % (*server.dashboard.address, path)


def test_page_shows_queues_and_chart_and_follows_the_broker(dashboard_server, browser):
    """The page, left open, renders queues and a five-series chart and updates itself as
    messages are published and acked, without a reload."""
    with contextlib.ExitStack() as stack:
        client = Wire(dashboard_server.address)
        stack.callback(client.close)
        assert client.call("declare_queue lesson") == "Queue declared"
        page = browser.open(url(dashboard_server))

        first = browser.wait_until(page, """() => {
            const cell = %s;
            return cell("default_queue", "ready") === "0" && cell("lesson", "ready") === "0"
                && {series: [...document.querySelectorAll("#chart polyline")]
                               .map(line => line.dataset.series),
                    updates: Number(document.body.dataset.updates),
                    connections: document.getElementById("connections").textContent};
        }""" % CELL)
        assert first["series"] == ["published", "delivered", "acked", "redelivered",
                                   "dead_lettered"]
        assert first["connections"] == "1"

        for _ in range(3):
            client.send(publish_line())
        for _ in range(3):
            assert client.text().startswith("ACK ")
        seen = browser.wait_until(page, """() => {
            const cell = %s;
            return cell("default_queue", "ready") === "3"
                && {updates: Number(document.body.dataset.updates),
                    published: document.getElementById("total-published").textContent};
        }""" % CELL)
        assert seen["published"] == "3"
        assert seen["updates"] > first["updates"], "the same page re-rendered by itself"

        # The chart follows: the publish line rises above its baseline.
        browser.wait_until(page, """() => {
            const line = document.querySelector('#chart polyline[data-series="published"]');
            const ys = line.getAttribute("points").split(" ").filter(Boolean)
                           .map(point => Number(point.split(",")[1]));
            return ys.length > 0 && Math.min(...ys) < Math.max(...ys);
        }""")

        consumer = Wire(dashboard_server.address)
        stack.callback(consumer.close)
        assert consumer.call("consume default_queue") == "Subscribed to queue"
        consumer.receive_and_ack(3)
        done = browser.wait_until(page, """() => {
            const cell = %s;
            return cell("default_queue", "ready") === "0"
                && cell("default_queue", "unacked") === "0"
                && document.getElementById("total-acked").textContent === "3"
                && {consumers: cell("default_queue", "consumers"),
                    connections: document.getElementById("connections").textContent};
        }""" % CELL)
        assert done == {"consumers": "1", "connections": "2"}



def test_page_works_with_users_when_the_browser_has_the_token(start_server, browser, tmp_path):
    """With --users the page, opened with a user's token, fetches its numbers with the same
    credentials (without them every request is a 401: tests/test_dashboard.py)."""
    users = str(tmp_path / "users.json")
    token = access.add_user(users, "root", ["*"], ["*"], True)
    server = start_server(http_port=0, users_file=users)
    host, port = server.dashboard.address
    page = browser.open("http://root:%s@%s:%d/" % (token, host, port))
    shown = browser.wait_until(page, """() => {
        const cell = %s;
        return cell("default_queue", "ready") === "0"
            && document.getElementById("status").textContent;
    }""" % CELL)
    assert shown.startswith("live")
