"""The gateway's dashboard in a real browser (Chromium through Playwright), against a real two-node fabric.

Node ``node-a`` is started with ``fabric up -d`` (embedded nats-server, auth on, the gateway);
node ``node-b`` joins its NATS with the join token as a services-only node (gpu-monitor,
allocator, spawner).  The page is opened as a user opens it: with the operator's link
``/?token=…`` (the gateway keeps the token in an HttpOnly cookie and redirects to ``/``),
and anonymously from loopback.  Checked in the browser: no console error and no failed
request (the page's strict CSP would report inline scripts or styles as console errors);
both nodes' cards; a CPU graph that moves with the heartbeats; a task submitted from the
page's form whose row goes through ``running`` to ``succeeded`` live (the row's
``data-state`` changes, recorded by a MutationObserver) and whose output is shown; the
anonymous view's nodes and its note that tasks need a token.  Screenshots go to
``tests/artifacts/`` (and the signed-in one to ``docs/images/dashboard.png``).

The browser is Debian's chromium (``scripts/install-browser.sh``), never a downloaded one;
without it the test fails and says so.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests._cli import cleanup, fabric, read_state, status_json

try:
    from playwright.sync_api import Browser, ConsoleMessage, Page, Request, Response, sync_playwright
except ImportError:  # each test fails, saying so (need())
    sync_playwright = None  # type: ignore[assignment]

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "tests" / "artifacts"
DOCS_IMAGE = REPO / "docs" / "images" / "dashboard.png"
VIEWPORT = {"width": 1366, "height": 768}
#: what the page's own task reads answer an anonymous caller: expected, not a failure
TASK_ROUTES = re.compile(r"/api/(tasks|submit)\b")
#: how far along a task state is (this test's task is never retried: its row's states only go forward)
RANK = {"submitted": 0, "queued": 1, "waiting": 1, "running": 2, "succeeded": 3}

# records every value of each task row's data-state, in order: an attribute record's oldValue is the value
# before that change, so two changes in one task (one event batch) are both seen
RECORD_STATES = """() => {
  const seen = window.__taskStates = {};
  const body = document.querySelector('[data-testid="task-rows"]');
  const add = (id, state) => {
    const list = seen[id] || (seen[id] = []);
    if (state && list[list.length - 1] !== state) list.push(state);
  };
  for (const row of body.children) add(row.dataset.taskId, row.dataset.state);
  new MutationObserver((records) => {
    const touched = new Set();
    for (const r of records) {
      if (r.type === 'attributes') { add(r.target.dataset.taskId, r.oldValue); touched.add(r.target); }
      else r.addedNodes.forEach((n) => { if (n.dataset && n.dataset.taskId) touched.add(n); });
    }
    for (const row of touched) add(row.dataset.taskId, row.dataset.state);
  }).observe(body, {childList: true, subtree: true, attributes: true, attributeOldValue: true,
                    attributeFilter: ['data-state']});
}"""


@dataclass
class TwoNodes:
    gateway: str
    operator_token: str


@dataclass
class Problems:
    """What went wrong in a page: console errors, uncaught exceptions, failed requests, HTTP errors."""

    anonymous: bool = False
    found: list[str] = field(default_factory=list)

    def watch(self, page: Page) -> None:
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.found.append(f"uncaught: {exc}"))
        page.on("requestfailed", self._failed)
        page.on("response", self._response)

    def _allowed(self, url: str, status: int) -> bool:
        return self.anonymous and status in (401, 403) and TASK_ROUTES.search(url) is not None

    def _console(self, msg: ConsoleMessage) -> None:
        if msg.type != "error":
            return
        url = (msg.location or {}).get("url", "")
        if self.anonymous and "status of 40" in msg.text and TASK_ROUTES.search(url):
            return
        self.found.append(f"console error: {msg.text} ({url})")

    def _failed(self, request: Request) -> None:
        self.found.append(f"request failed: {request.method} {request.url}: {request.failure}")

    def _response(self, response: Response) -> None:
        if response.status >= 400 and not self._allowed(response.url, response.status):
            self.found.append(f"HTTP {response.status}: {response.request.method} {response.url}")


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoNodes]:
    pytest.importorskip("fabric.services.allocator", reason="the allocator (and its Cython arena) is not built")
    a = tmp_path_factory.mktemp("dash-node-a")
    b = tmp_path_factory.mktemp("dash-node-b")
    try:
        res = fabric("up", a, "-d", "--nats-port", "0", "--node", "node-a", "--timeout", "30")
        assert res.returncode == 0, res.stdout + res.stderr
        join = fabric("join-token", a)
        assert join.returncode == 0, join.stderr
        res = fabric("up", b, "-d", "--node", "node-b", "--nats-url", read_state(a)["nats_url"],
                     "--token", join.stdout.strip(), "--services", "gpu-monitor,allocator,spawner", "--timeout", "30")
        assert res.returncode == 0, res.stdout + res.stderr
        code, doc = status_json(a)
        assert code == 0 and doc["gateway"], doc
        yield TwoNodes(gateway=doc["gateway"], operator_token=(a / "auth" / "operator.token").read_text().strip())
    finally:
        cleanup(b)
        cleanup(a)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser | None]:
    """Debian's chromium under Playwright; None where either is missing (each test then fails, saying why)."""
    if sync_playwright is None or not CHROMIUM.exists():
        yield None
        return
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"], headless=True)
        try:
            yield b
        finally:
            b.close()


def need(browser: Browser | None) -> Browser:
    """The browser, or a failure (never a skip) that says what to install."""
    if sync_playwright is None:
        pytest.fail("the playwright package is missing: pip install playwright (never `playwright install`: "
                    "the browser is Debian's chromium, scripts/install-browser.sh)", pytrace=False)
    if browser is None:
        pytest.fail(f"{CHROMIUM} is missing: run scripts/install-browser.sh as root (apt-get install chromium)",
                    pytrace=False)
    return browser


def sel(name: str, **data: str) -> str:
    return f'[data-testid="{name}"]' + "".join(f'[data-{k.replace("_", "-")}="{v}"]' for k, v in data.items())


def wait_for_nodes(page: Page, names: set[str]) -> None:
    page.wait_for_function("n => document.querySelectorAll('[data-testid=\"node-card\"]').length >= n",
                           arg=len(names), timeout=15_000)
    cards = page.locator(sel("node-card"))
    assert {cards.nth(i).get_attribute("data-node") for i in range(cards.count())} == names


def cpu_points(page: Page, node: str) -> str:
    return page.locator(f'{sel("node-card", node=node)} {sel("cpu-graph")}').get_attribute("points") or ""


def test_dashboard_signed_in_shows_the_fabric_live_and_runs_a_task(browser: Browser | None,
                                                                   two_nodes: TwoNodes) -> None:
    started = time.monotonic()
    context = need(browser).new_context(viewport=VIEWPORT)
    page = context.new_page()
    problems = Problems()
    problems.watch(page)
    try:
        # the operator's link: the token goes into an HttpOnly cookie and leaves the address bar
        page.goto(f"{two_nodes.gateway}/?token={two_nodes.operator_token}")
        assert page.url == f"{two_nodes.gateway}/"
        [cookie] = [c for c in context.cookies() if c["name"] == "fabric_token"]
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        page.wait_for_selector(f'{sel("live-status")}[data-live="live"]', timeout=15_000)
        assert page.inner_text(sel("live-status")) == "live"
        assert "operator-node-a" in page.inner_text(sel("whoami"))
        wait_for_nodes(page, {"node-a", "node-b"})
        assert float(page.evaluate("document.body.dataset.firstData")) > 0
        for node in ("node-a", "node-b"):
            card = page.locator(sel("node-card", node=node))
            assert card.get_attribute("data-stale") == "false"
            assert card.locator(sel("cpu-graph")).count() == 1 and card.locator(sel("mem-graph")).count() == 1
            for gauge in ("cpu-gauge", "mem-gauge"):
                assert re.search(r"\d+%", card.locator(sel(gauge)).inner_text()), card.inner_text()

        # the graphs move with the heartbeats (about one a second per node)
        page.wait_for_function("() => document.querySelector('[data-testid=\"cpu-graph\"]')"
                               ".getAttribute('points').split(' ').length >= 3", timeout=10_000)
        before = {n: cpu_points(page, n) for n in ("node-a", "node-b")}
        page.wait_for_timeout(2_500)
        after = {n: cpu_points(page, n) for n in ("node-a", "node-b")}
        assert all(before[n] != after[n] for n in before), (before, after)

        # a task submitted from the form: its row goes through running to succeeded, live, and shows its output
        page.wait_for_selector(f'{sel("submit-form")} {sel("submit-button")}:enabled')
        page.evaluate(RECORD_STATES)
        page.fill(sel("submit-argv"), 'sh -c "sleep 1; echo dashboard-ok"')
        with page.expect_response(lambda r: r.url.endswith("/api/submit")) as submitted:
            page.click(sel("submit-button"))
        assert submitted.value.status == 201
        task_id = submitted.value.json()["id"]
        row = sel("task-row", task_id=task_id)
        page.wait_for_selector(f'{row}[data-state="succeeded"]', timeout=30_000)
        states: list[str] = page.evaluate("id => window.__taskStates[id] || []", task_id)
        assert states[-1] == "succeeded" and "running" in states, states
        # never a step back (a late event or the submit reply must not undo a newer state)
        progress = [RANK[s] for s in states]
        assert progress == sorted(progress), states
        page.wait_for_function("() => document.querySelector('[data-testid=\"task-output\"]')"
                               ".textContent.includes('dashboard-ok')", timeout=10_000)
        assert task_id in page.inner_text(sel("task-output-title"))
        assert page.locator(sel("task-count", state="succeeded")).inner_text().split()[-1] != "0"
        # the row's node is one of the fabric's
        assert page.locator(row).locator("td").nth(4).inner_text() in ("node-a", "node-b")

        # services, remote memory, topology: every node in each
        page.wait_for_selector(sel("service-row", service="spawner", node="node-b"), timeout=10_000)
        page.wait_for_selector(sel("memory-node", node="node-b"), timeout=10_000)
        page.wait_for_selector(sel("topology-node", node="node-b"), timeout=10_000)
        for name in ("allocator", "gpu-monitor", "spawner"):
            for node in ("node-a", "node-b"):
                assert page.locator(sel("service-row", service=name, node=node)).count() == 1
        assert page.locator(sel("memory-node")).count() == 2
        assert page.locator(sel("topology-node")).count() == 2
        assert "scheduler" in (page.locator(sel("topology-node", node="node-a")).text_content() or "")

        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / "dashboard.png"
        page.screenshot(path=str(shot), full_page=True)
        DOCS_IMAGE.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, DOCS_IMAGE)
        assert problems.found == [], problems.found
        print(f"signed-in dashboard checked in {time.monotonic() - started:.1f} s; task states {states}")
    finally:
        context.close()


def test_dashboard_anonymous_shows_nodes_and_asks_for_a_token(browser: Browser | None, two_nodes: TwoNodes) -> None:
    context = need(browser).new_context(viewport=VIEWPORT)
    page = context.new_page()
    problems = Problems(anonymous=True)
    problems.watch(page)
    try:
        page.goto(f"{two_nodes.gateway}/")
        assert not [c for c in context.cookies() if c["name"] == "fabric_token"]
        page.wait_for_selector(f'{sel("live-status")}[data-live="live"]', timeout=15_000)
        wait_for_nodes(page, {"node-a", "node-b"})
        assert "anonymous" in page.inner_text(sel("whoami"))
        note = page.locator(sel("tasks-note"))
        note.wait_for(state="visible", timeout=10_000)
        assert "token" in note.inner_text().lower()
        assert page.locator(sel("tasks-body")).is_hidden()
        assert page.locator(sel("task-row")).count() == 0
        assert page.locator(sel("token-form")).is_visible()
        page.wait_for_selector(sel("topology-node", node="node-b"), timeout=10_000)
        page.wait_for_selector(sel("service-row", service="spawner", node="node-b"), timeout=10_000)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "dashboard-anonymous.png"), full_page=True)
        assert problems.found == [], problems.found

        # a token that does not work is refused in the page, with the gateway's reason
        page.fill(sel("token-input"), "fbt_not-a-real-token")
        page.press(sel("token-input"), "Enter")
        banner = page.locator(sel("banner"))
        banner.wait_for(state="visible", timeout=5_000)
        assert "unknown or removed token" in banner.inner_text()
        assert page.url == f"{two_nodes.gateway}/"
    finally:
        context.close()


def test_the_api_docs_page_works_offline(browser: Browser | None, two_nodes: TwoNodes) -> None:
    """/schema/swagger renders from the gateway's own files: every request elsewhere is refused, and it still does."""
    context = need(browser).new_context(viewport=VIEWPORT)
    page = context.new_page()
    elsewhere: list[str] = []

    def only_the_gateway(route: Any) -> None:
        if route.request.url.startswith(two_nodes.gateway):
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort()

    page.route("**/*", only_the_gateway)
    try:
        page.goto(f"{two_nodes.gateway}/schema/swagger")
        title = page.locator(".swagger-ui .info .title")
        title.wait_for(state="visible", timeout=15_000)
        assert "fabric gateway" in title.inner_text()
        page.wait_for_selector(".opblock-summary-path[data-path='/api/submit']", timeout=10_000)
        assert elsewhere == [], elsewhere
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "api-docs.png"))
    finally:
        context.close()
