"""The console (/ui) and the API docs (/docs, /redoc) in a real headless Chromium, against a real server with an API
key, with every host but the server unresolvable (so a CDN reference would fail here as it would offline).

Swagger UI renders the operations; /ui asks for the key once and loads with no console errors; a job started from
the console gains points on its live chart while it trains; a query answers with predictions; once stopped, a label
is added to its model and retired from the job page's labels panel. Screenshots go to
test-artifacts/screenshots/ (README: Tests).

Needs Debian's `chromium` and `chromium-driver` (`apt-get install chromium chromium-driver`; `.ci/run` installs
them). Without them these tests fail saying so: they are part of `make test`, not optional.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.app.helpers import wait_for
from tests.e2e.server import ROOT, Server

pytestmark = pytest.mark.browser

API_KEY = "console-key"
SCREENSHOTS = Path(os.environ.get("SLIDE_SCREENSHOTS_DIR", ROOT / "test-artifacts" / "screenshots"))
INSTALL = "apt-get install -y chromium chromium-driver"


def _binary(env: str, *names: str) -> str:
    for name in (os.environ.get(env), *names):
        if name and (path := shutil.which(name)):
            return path
    pytest.fail(
        f"the browser tests need {' or '.join(names)} (or ${env}); on Debian/Ubuntu: `{INSTALL}` "
        "(.ci/run installs them)",
        pytrace=False,
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, warm_engine: None, xmc_files) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("browser")
    s = Server(tmp / "data", tmp / "server.log", SLIDE_API_KEY=API_KEY).start()
    try:
        with httpx.Client(base_url=s.url, headers={"X-API-Key": API_KEY}, timeout=30) as c:
            for name in ("tiny-train", "tiny-test"):
                path = xmc_files["train" if name.endswith("train") else "test"]
                r = c.post(
                    "/v1/datasets",
                    params={"name": name},
                    content=path.read_bytes(),
                    headers={"Content-Type": "text/plain"},
                )
                assert r.status_code == 201, r.text
        yield s
    finally:
        s.cleanup()


@pytest.fixture(scope="module")
def browser(server: Server) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium = _binary("CHROMIUM", "chromium", "chromium-browser", "google-chrome")
    driver_path = _binary("CHROMEDRIVER", "chromedriver")
    profile = tempfile.mkdtemp(prefix="slide-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--window-size=1360,1000",
        f"--user-data-dir={profile}",
        # No host resolves but the server's: a page that needs a CDN breaks here as it would offline.
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    driver.set_page_load_timeout(30)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


STATE = "return document.querySelector('#job-state .badge').textContent"


def _shot(driver: Any, name: str) -> None:
    """A screenshot of the whole page (the window grown to its height for the moment)."""
    width, height = driver.get_window_size()["width"], driver.get_window_size()["height"]
    full = _js(driver, "return Math.max(document.body.scrollHeight, document.documentElement.scrollHeight)")
    driver.set_window_size(width, max(height, min(int(full) + 120, 6000)))
    try:
        driver.save_screenshot(str(SCREENSHOTS / name))
    finally:
        driver.set_window_size(width, height)


def _errors(driver: Any) -> list[str]:
    return [f"{e['level']}: {e['message']}" for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def _js(driver: Any, script: str, *args: Any) -> Any:
    return driver.execute_script(script, *args)


def _foreign_requests(driver: Any, origin: str) -> list[str]:
    names = _js(driver, "return performance.getEntriesByType('resource').map(e => e.name)")
    return [n for n in names if not n.startswith(origin) and not n.startswith("data:")]


def test_docs_render_the_operations_offline(browser: Any, server: Server) -> None:
    spec = httpx.get(server.url + "/openapi.json").json()
    operations = sum(1 for item in spec["paths"].values() for m in item if m in ("get", "post", "put", "delete"))
    browser.get(server.url + "/docs")
    wait_for(
        lambda: _js(browser, "return document.querySelectorAll('.opblock').length") >= operations,
        timeout=20,
        what="Swagger UI to render every operation",
        diagnose=lambda: _js(browser, "return document.body.innerText")[:2000],
    )
    text = _js(browser, "return document.body.innerText")
    assert "Unable to render" not in text and "SLIDE service" in text
    assert _js(browser, "return document.querySelectorAll('.btn.authorize').length") == 1  # a key is configured
    assert not _foreign_requests(browser, server.url)
    _shot(browser, "docs.png")
    assert not _errors(browser)

    browser.get(server.url + "/redoc")
    wait_for(
        lambda: _js(browser, "return document.querySelectorAll('[data-section-id^=\"tag/\"]').length") >= 4,
        timeout=20,
        what="ReDoc to render its sections",
    )
    # ReDoc's badge image sits on its vendor's CDN: the page's Content-Security-Policy stops it in the browser.
    blocked = " ".join(e["message"] for e in browser.get_log("browser") if "Content Security Policy" in e["message"])
    assert all(url in blocked for url in _foreign_requests(browser, server.url)), blocked
    _shot(browser, "redoc.png")


def test_console_trains_a_job_with_live_curves_and_answers_a_query(browser: Any, server: Server) -> None:
    from selenium.webdriver.common.by import By

    browser.get(server.url + "/ui")
    # The service has a key: the console asks for it once, before any call that would be refused.
    wait_for(
        lambda: _js(browser, "return document.getElementById('key-dialog').open"), timeout=15, what="the API key dialog"
    )
    browser.find_element(By.ID, "key-input").send_keys(API_KEY)
    browser.find_element(By.ID, "key-save").click()
    wait_for(
        lambda: len(browser.find_elements(By.CSS_SELECTOR, "#datasets tr[data-id]")) == 2,
        timeout=15,
        what="the datasets table",
    )
    assert "tiny-train" in browser.find_element(By.ID, "datasets").text

    # Start a job from the console: long enough to watch (it is stopped at the end).
    browser.find_element(By.CSS_SELECTOR, "#new-job summary").click()
    for select, name in (("nj-train", "tiny-train"), ("nj-eval", "tiny-test")):  # repainted as data arrive
        _js(
            browser,
            "const s = document.getElementById(arguments[0]);"
            "s.value = [...s.options].find(o => o.text.startsWith(arguments[1])).value",
            select,
            name,
        )
    epochs = browser.find_element(By.ID, "nj-epochs")
    epochs.clear()
    epochs.send_keys("400")
    browser.find_element(By.ID, "nj-config").send_keys(
        '{"model": {"hidden": [32]}, "optimizer": {"batch_size": 64}, "schedule": {"early_stop_patience": "never"}, '
        '"seed": 3}'
    )
    browser.find_element(By.ID, "nj-start").click()
    # The jobs table is repainted every 2 s: read it with queries, not element handles.
    job_id = wait_for(
        lambda: _js(browser, "const r = document.querySelector('#jobs tr[data-id]'); return r && r.dataset.id"),
        timeout=15,
        what="the job in the jobs table",
    )
    row = f"document.querySelector('#jobs tr[data-id=\"{job_id}\"]')"
    wait_for(
        lambda: (
            _js(browser, f"return {row}.dataset.state") == "running" and "v" in _js(browser, f"return {row}.innerText")
        ),
        timeout=30,
        what="the job to run and publish a model version",
        diagnose=lambda: _js(browser, "return document.getElementById('jobs').innerText"),
    )
    # The overview's query box, once the model has a snapshot.
    wait_for(
        lambda: _js(browser, "return document.getElementById('q-model').value") == job_id,
        timeout=30,
        what="the model in the query box",
    )
    browser.find_element(By.ID, "q-run").click()
    wait_for(
        lambda: _js(browser, "return document.querySelectorAll('#q-results tr[data-label]').length") == 5,
        timeout=20,
        what="predictions on the overview",
        diagnose=lambda: _js(browser, "return document.getElementById('q-out').innerText"),
    )
    _shot(browser, "ui-overview.png")
    assert not _errors(browser)

    # The job page: its curves grow over the live event stream while it trains.
    browser.get(f"{server.url}/ui/jobs/{job_id}")
    points = "return (document.getElementById('chart-loss').data || [{x: []}])[0].x.length"
    first = wait_for(lambda: _js(browser, points) >= 2, timeout=30, what="the first points") and _js(browser, points)
    wait_for(lambda: _js(browser, points) > first, timeout=30, what="the loss chart to gain points")
    p1 = "return (document.getElementById('chart-precision').data || [{x: []}])[0].x.length"
    assert _js(browser, p1) >= 1  # P@1 on the held-out set
    assert _js(browser, STATE) == "running"
    # The job's settings, one row per path: the form's epochs and the pasted groups arrived.
    shown = dict(
        _js(
            browser,
            "return [...document.querySelectorAll('#config div')]"
            ".map(d => [d.querySelector('dt').innerText, d.querySelector('dd').innerText])",
        )
    )
    assert shown["schedule.epochs"] == "400" and shown["model.hidden"] == "[32]" and shown["seed"] == "3", shown

    # A query against the live model: labels, scores, overlap with exact, latency.
    browser.find_element(By.ID, "q-run").click()
    wait_for(
        lambda: browser.find_elements(By.CSS_SELECTOR, "#q-results tbody tr[data-label]"),
        timeout=20,
        what="predictions",
        diagnose=lambda: browser.find_element(By.ID, "q-out").text,
    )
    rows = browser.find_elements(By.CSS_SELECTOR, "#q-results tbody tr[data-label]")
    assert len(rows) == 5
    assert "/ 5" in browser.find_element(By.ID, "q-overlap").text
    assert browser.find_element(By.ID, "q-latency").text.endswith("ms")
    assert _js(browser, points) > first
    _shot(browser, "job.png")
    assert not _foreign_requests(browser, server.url)
    assert not _errors(browser)

    # Stop from the job page.
    browser.find_element(By.ID, "btn-stop").click()
    wait_for(
        lambda: _js(browser, STATE) in ("stopping", "stopped"),
        timeout=15,
        what="the job to stop",
    )
    assert not _errors(browser)

    # The labels panel: the model's labels a page at a time; add one from examples, then retire it.
    wait_for(lambda: _js(browser, STATE) == "stopped", timeout=60, what="the job to be stopped")
    rows = "return [...document.querySelectorAll('#labels tr[data-label-id]')]"
    wait_for(lambda: len(_js(browser, rows)) == 20, timeout=15, what="the first page of labels")
    assert _js(browser, rows + ".map(r => Number(r.dataset.labelId))") == list(range(20))
    browser.find_element(By.ID, "labels-next").click()
    wait_for(lambda: _js(browser, rows + "[0].dataset.labelId") == "20", timeout=15, what="the second page")
    with httpx.Client(base_url=server.url, headers={"X-API-Key": API_KEY}, timeout=30) as c:
        num_labels = c.get(f"/v1/models/{job_id}").json()["num_labels"]
    browser.find_element(By.CSS_SELECTOR, "#label-add summary").click()
    browser.find_element(By.ID, "la-name").send_keys("fresh-label")
    browser.find_element(By.ID, "la-examples").send_keys("0:1.0 2:0.5 5:0.25\n1:1.0 3:0.5")
    browser.find_element(By.ID, "la-add").click()
    new_row = f"document.querySelector('#labels tr[data-label-id=\"{num_labels}\"]')"
    wait_for(
        lambda: _js(browser, f"return {new_row} && {new_row}.dataset.status") == "live",
        timeout=30,
        what="the new label in the list",
        diagnose=lambda: _js(browser, "return document.getElementById('labels-card').innerText"),
    )
    assert "fresh-label" in _js(browser, f"return {new_row}.innerText")
    assert f"is id {num_labels}" in browser.find_element(By.ID, "labels-out").text
    with httpx.Client(base_url=server.url, headers={"X-API-Key": API_KEY}, timeout=30) as c:
        # the whole ranking: the new label is scored from the next request, and once retired it is nowhere in it
        # (where it ranks is engine.labels' concern: an imprinted row never outscores the labels it mixes)
        query = {
            "instances": [{"indices": [0, 2, 5], "values": [1.0, 0.5, 0.25]}],
            "k": num_labels + 1,
            "mode": "exact",
        }
        assert num_labels in c.post(f"/v1/models/{job_id}/predict", json=query).json()["predictions"][0]["labels"]
        browser.find_element(By.CSS_SELECTOR, f"#labels button[data-retire='{num_labels}']").click()
        wait_for(
            lambda: _js(browser, f"return {new_row} && {new_row}.dataset.status") == "retired",
            timeout=30,
            what="the label to show as retired",
            diagnose=lambda: _js(browser, "return document.getElementById('labels-card').innerText"),
        )
        assert "is retired" in browser.find_element(By.ID, "labels-out").text
        listed = c.get(f"/v1/models/{job_id}/labels", params={"limit": 1000}).json()["data"]
        assert listed[-1] == {"id": num_labels, "name": "fresh-label", "status": "retired"}
        assert num_labels not in c.post(f"/v1/models/{job_id}/predict", json=query).json()["predictions"][0]["labels"]
    _shot(browser, "job-labels.png")
    assert not _errors(browser)
