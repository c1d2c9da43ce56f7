"""The dashboard in a real headless Chromium (Debian's ``chromium``, driven by Playwright): the
model table, live charts under load, drawing a digit, admin actions and tokens, and that the page
talks to nobody but its server. Each test saves screenshots of what it looked at."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest
import requests
from playwright import sync_api

from tests.conftest import ServerProcess, launch
from tests.models import digits, digits_classifier, write_onnx_digits, write_python_model

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ADMIN, API = "admin-secret", "api-secret"
CELL = 28  # canvas pixels per cell of the 8x8 digit (the canvas is 224 px wide)


@pytest.fixture(scope="module")
def browser() -> Iterator[sync_api.Browser]:
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The digits classifier twice (versions 1 and 2), label ``stable`` on 2, with an admin token."""
    root = tmp_path_factory.mktemp("dashboard")
    for version in (1, 2):
        write_onnx_digits(root / "repo" / "digits" / str(version))
    (root / "repo" / "digits" / "inferd.toml").write_text(
        "version_policy = { all = true }\n[labels]\nstable = 2\n"
    )
    process = launch(root, str(root / "repo"), f"--admin_token={ADMIN}")
    process.wait_for(lambda: len(process.status("digits")) == 2, "both versions")
    yield process
    process.stop()


@pytest.fixture
def page(browser: sync_api.Browser, server: ServerProcess) -> Iterator[tuple[sync_api.Page, list[str]]]:
    """A fresh page; every request it makes is recorded (as ``host:port``) before it goes out."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    hosts: list[str] = []

    def record(route: sync_api.Route) -> None:
        hosts.append(urlsplit(route.request.url).netloc)
        route.continue_()

    context.route("**/*", record)
    tab = context.new_page()
    yield tab, hosts
    context.close()


def own_host(server: ServerProcess) -> str:
    return urlsplit(server.url).netloc


def open_models(tab: sync_api.Page, server: ServerProcess) -> sync_api.Locator:
    """Open the models tab; the digits row, once it shows label ``stable`` on version 2."""
    tab.goto(server.url + "/#models")
    row = tab.locator('tr[data-model="digits"]')
    sync_api.expect(row.locator('[data-label="stable"]')).to_have_text("stable → 2")
    return row


def test_the_page_lists_models_versions_and_labels(
    server: ServerProcess, page: tuple[sync_api.Page, list[str]], tmp_path: Path
) -> None:
    tab, hosts = page
    row = open_models(tab, server)
    sync_api.expect(row.locator('[data-version="2"]')).to_contain_text("AVAILABLE")
    sync_api.expect(row.locator('[data-version="1"]')).to_contain_text("AVAILABLE")
    tab.screenshot(path=tmp_path / "models.png", full_page=True)
    assert set(hosts) == {own_host(server)}


def test_the_charts_move_while_requests_arrive(
    server: ServerProcess, page: tuple[sync_api.Page, list[str]], tmp_path: Path
) -> None:
    tab, hosts = page
    tab.goto(server.url + "/#charts")
    stop = threading.Event()
    x, _ = digits()

    def load() -> None:
        with requests.Session() as session:
            while not stop.is_set():
                session.post(
                    f"{server.url}/v1/models/digits:predict", json={"instances": x[:4].tolist()}, timeout=5
                )

    sender = threading.Thread(target=load)
    sender.start()
    try:
        # requests/s and the total latency's p50 become non-zero; the stage table fills.
        server.wait_for(lambda: chart(tab, "rps", "max") > 0, "requests/s above 0 in the chart")
        server.wait_for(lambda: chart(tab, "latency", "max") > 0, "a latency in the chart")
        sync_api.expect(tab.locator('#stage-table tr[data-stage="predict"]')).to_be_visible()
        first = chart(tab, "rps", "points")
        server.wait_for(lambda: chart(tab, "rps", "points") > first, "the chart to take a new point")
        server.wait_for(lambda: chart(tab, "rps", "points") >= 10, "ten points, for the screenshot")
        tab.screenshot(path=tmp_path / "charts.png", full_page=True)
    finally:
        stop.set()
        sender.join()
    assert set(hosts) == {own_host(server)}


def chart(tab: sync_api.Page, name: str, what: str) -> float:
    """What chart ``name`` draws now: ``max`` (its largest value) or ``points`` (how many)."""
    return float(tab.locator(f"#chart-{name}").get_attribute(f"data-{what}") or 0)


def _test_digit() -> tuple[np.ndarray, int]:
    """A digit from the held-out part of the data set (the classifier trained on the first 1200)
    that the classifier still recognises when its ink is reduced to on/off cells, as a drawing is."""
    x, y = digits()
    model = digits_classifier()
    for index in range(1500, len(x)):
        cells = (x[index] >= 6).astype(np.float32) * 16
        probabilities = model.predict_proba(cells[None])[0]  # type: ignore[attr-defined]
        if y[index] == probabilities.argmax() and probabilities.max() > 0.95:
            return cells.reshape(8, 8), int(y[index])
    raise AssertionError("no test digit survives thresholding")


def test_drawing_a_digit_on_the_canvas_predicts_its_class(
    server: ServerProcess, page: tuple[sync_api.Page, list[str]], tmp_path: Path
) -> None:
    tab, hosts = page
    tab.goto(server.url + "/#try")
    canvas = tab.locator('canvas.draw[data-input="X"]')
    sync_api.expect(canvas).to_be_visible()
    cells, label = _test_digit()
    box = canvas.bounding_box()
    assert box is not None
    scale = box["width"] / (8 * CELL)
    for row in range(8):  # one stroke per run of inked cells in a row, as a hand would draw
        column = 0
        while column < 8:
            if not cells[row, column]:
                column += 1
                continue
            end = column
            while end + 1 < 8 and cells[row, end + 1]:
                end += 1
            y = box["y"] + (row + 0.5) * CELL * scale
            tab.mouse.move(box["x"] + (column + 0.5) * CELL * scale, y)
            tab.mouse.down()
            tab.mouse.move(box["x"] + (end + 0.5) * CELL * scale, y, steps=max(2, 4 * (end - column)))
            tab.mouse.up()
            column = end + 1
    tab.click("#try-send")
    sync_api.expect(tab.locator("#predicted-class")).to_have_text(str(label), timeout=15_000)
    sync_api.expect(tab.locator("#try-curl")).to_contain_text("/v2/models/digits/infer")
    sync_api.expect(tab.locator("#try-python")).to_contain_text("requests.post(")
    tab.screenshot(path=tmp_path / "try-it.png", full_page=True)
    assert set(hosts) == {own_host(server)}


def stable_version(server: ServerProcess) -> str:
    response = requests.get(f"{server.url}/v1/models/digits/labels/stable/metadata", timeout=5)
    response.raise_for_status()
    return str(response.json()["model_spec"]["version"])


def test_admin_actions_need_the_admin_token_and_a_rollback_changes_what_clients_get(
    server: ServerProcess, page: tuple[sync_api.Page, list[str]], tmp_path: Path
) -> None:
    tab, hosts = page
    row = open_models(tab, server)
    assert stable_version(server) == "2"

    # No admin token: the server refuses, and nothing changes.
    row.locator(".label-version").select_option("1")
    row.locator(".move-label button").click()
    sync_api.expect(tab.locator("#notice")).to_contain_text("move digits/stable refused: 401")
    row.locator("button.unload").click()
    sync_api.expect(tab.locator("#notice")).to_contain_text("unload digits refused: 401")
    tab.screenshot(path=tmp_path / "refused.png", full_page=True)
    tab.fill("#admin-token", "not-the-token")
    tab.press("#admin-token", "Tab")
    row.locator(".move-label button").click()
    sync_api.expect(tab.locator("#notice")).to_contain_text("the bearer token is not valid")
    assert stable_version(server) == "2"
    assert server.status("digits") == {"2": "AVAILABLE", "1": "AVAILABLE"}

    # With it: roll the label back to version 1; clients asking for "stable" now get version 1.
    tab.fill("#admin-token", ADMIN)
    tab.press("#admin-token", "Tab")
    row.locator(".label-version").select_option("1")
    row.locator(".move-label button").click()
    sync_api.expect(row.locator('[data-label="stable"]')).to_have_text("stable → 1")
    assert stable_version(server) == "1"
    tab.screenshot(path=tmp_path / "rollback.png", full_page=True)

    # Unload and load again from the page.
    row.locator("button.unload").click()
    sync_api.expect(row).to_contain_text("unloaded by an admin")
    assert requests.get(f"{server.url}/v1/models/digits", timeout=5).status_code == 404
    row.locator("button.load").click()
    sync_api.expect(row.locator('[data-version="2"]')).to_contain_text("AVAILABLE")
    assert set(hosts) == {own_host(server)}


def rollout_status(server: ServerProcess, model: str = "digits") -> dict[str, Any]:
    """The server's own view of the rollout, through the admin route ``inferd rollout`` uses."""
    response = requests.post(
        f"{server.url}/v2/repository/models/{model}/rollout/status",
        headers={"authorization": f"Bearer {ADMIN}"},
        timeout=5,
    )
    assert response.status_code == 200, response.text
    state: dict[str, Any] = response.json()
    return state


def test_an_operator_starts_pauses_resumes_promotes_and_aborts_a_rollout_from_the_page(
    browser: sync_api.Browser, tmp_path: Path
) -> None:
    for version in (1, 2):
        write_onnx_digits(tmp_path / "repo" / "digits" / str(version))
    (tmp_path / "repo" / "digits" / "inferd.toml").write_text(
        "version_policy = { all = true }\n[labels]\nstable = 1\n"
    )
    server = launch(tmp_path, str(tmp_path / "repo"), f"--admin_token={ADMIN}")
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    hosts: list[str] = []
    context.route("**/*", lambda route: (hosts.append(urlsplit(route.request.url).netloc), route.continue_()))
    try:
        server.wait_for(lambda: len(server.status("digits")) == 2, "both versions")
        tab = context.new_page()
        tab.goto(server.url + "/#models")
        row = tab.locator('tr[data-model="digits"]')
        form = row.locator("form.start-rollout")

        def start(to: str, steps: str) -> None:
            form.locator(".rollout-to").select_option(to)
            form.locator(".rollout-steps").fill(steps)
            form.locator(".rollout-step-s").fill("600")
            form.locator(".rollout-guards").fill("error_rate<=0.01\np99_ms<=2*baseline")
            form.locator("button").click()

        # Without the admin token the server refuses and no rollout exists.
        start("2", "50,100")
        sync_api.expect(tab.locator("#notice")).to_contain_text("start rollout of digits refused: 401")
        assert (
            requests.post(
                f"{server.url}/v2/repository/models/digits/rollout/status",
                headers={"authorization": f"Bearer {ADMIN}"},
                timeout=5,
            ).status_code
            == 404
        )

        tab.fill("#admin-token", ADMIN)
        tab.press("#admin-token", "Tab")
        start("2", "50,100")
        box = row.locator(".rollout")
        sync_api.expect(box.locator(".rollout-state")).to_have_text("running")
        sync_api.expect(row.locator(".weights")).to_have_text("1: 50.0%, 2: 50.0%")
        sync_api.expect(box.locator(".rollout-step")).to_contain_text("step 1 of 2: 50.0% to 2")
        # Requests during the step: the page shows the guards' metrics of both versions so far.
        x, _ = digits()
        answered = set()
        for _ in range(200):  # a 50/50 split: both versions answer long before the end
            if answered == {"1", "2"}:
                break
            response = requests.post(
                f"{server.url}/v1/models/digits:predict", json={"instances": x[:2].tolist()}, timeout=5
            )
            assert response.status_code == 200, response.text
            answered.add(response.headers["x-inferd-model-version"])
        assert answered == {"1", "2"}
        error_rate = box.locator('tr[data-metric="error_rate"] td')
        sync_api.expect(error_rate.nth(1)).to_have_text("0.000")  # canary
        sync_api.expect(error_rate.nth(2)).to_have_text("0.000")  # baseline
        sync_api.expect(box.locator('tr[data-metric="p99_ms"]')).to_be_visible()
        state = rollout_status(server)
        assert (state["state"], state["baseline"], state["canary"], state["steps"]) == (
            "running",
            1,
            2,
            [50, 100],
        )
        assert state["guards"] == ["error_rate<=0.01", "p99_ms<=2*baseline"]
        assert state["weights"] == {"2": 50.0, "1": 50.0}
        tab.screenshot(path=tmp_path / "rollout-running.png", full_page=True)

        box.locator("button.rollout-pause").click()
        sync_api.expect(box.locator(".rollout-state")).to_have_text("paused")
        assert rollout_status(server)["state"] == "paused"
        box.locator("button.rollout-resume").click()
        sync_api.expect(box.locator(".rollout-state")).to_have_text("running")
        assert rollout_status(server)["state"] == "running"

        box.locator("button.rollout-promote").click()
        sync_api.expect(box.locator(".rollout-state")).to_have_text("done")
        assert rollout_status(server)["state"] == "done"
        assert stable_version(server) == "2"  # the label moved: clients of "stable" get version 2
        sync_api.expect(row.locator('[data-label="stable"]')).to_have_text("stable → 2")
        tab.screenshot(path=tmp_path / "rollout-done.png", full_page=True)

        # A rollout back to version 1, aborted: all traffic on the baseline, the label unmoved.
        start("1", "10,100")
        sync_api.expect(box.locator(".rollout-state")).to_have_text("running")
        box.locator("button.rollout-abort").click()
        sync_api.expect(box.locator(".rollout-state")).to_have_text("rolled_back")
        sync_api.expect(box.locator(".rollout-event")).to_contain_text("aborted by an operator")
        state = rollout_status(server)
        assert (state["state"], state["baseline"], state["canary"]) == ("rolled_back", 2, 1)
        assert state["weights"] == {"2": 100.0}
        assert stable_version(server) == "2"
        tab.screenshot(path=tmp_path / "rollout-aborted.png", full_page=True)
        assert set(hosts) == {own_host(server)}
    finally:
        context.close()
        server.stop()


def test_under_a_memory_budget_the_page_shows_what_is_resident(
    browser: sync_api.Browser, tmp_path: Path
) -> None:
    for name in ("first", "second"):
        write_onnx_digits(tmp_path / "repo" / name / "1")
    server = launch(tmp_path, str(tmp_path / "repo"), "--memory_budget=512MiB")
    context = browser.new_context(viewport={"width": 1280, "height": 700})
    try:
        tab = context.new_page()
        tab.goto(server.url + "/#models")
        sync_api.expect(tab.locator("#budgets")).to_contain_text(
            "MiB charged to loaded versions of a 512 MiB budget"
        )
        first, second = (
            tab.locator(f'tr[data-model="{name}"] [data-version="1"]') for name in ("first", "second")
        )
        sync_api.expect(first).to_contain_text("loads on its first request")  # cold: listed, not loaded
        assert first.locator(".resident").count() == 0
        x, _ = digits()
        response = requests.post(
            f"{server.url}/v1/models/first:predict", json={"instances": x[:1].tolist()}, timeout=60
        )
        assert response.status_code == 200, response.text
        sync_api.expect(first.locator(".resident")).to_contain_text("MiB")
        sync_api.expect(first).to_contain_text("AVAILABLE")
        assert second.locator(".resident").count() == 0
        tab.screenshot(path=tmp_path / "residency.png", full_page=True)
    finally:
        context.close()
        server.stop()


def test_with_an_api_token_nothing_leaks_to_anonymous_visitors(
    browser: sync_api.Browser, tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    write_onnx_digits(tmp_path / "repo" / "secretmodel" / "1")
    server = start_server(str(tmp_path / "repo"), f"--api_token={API}")
    for route in ("/dashboard/api/models", "/dashboard/api/metrics"):
        assert requests.get(server.url + route, timeout=5).status_code == 401
    shell = requests.get(server.url + "/", timeout=5)
    assert shell.status_code == 200
    assert "secretmodel" not in shell.text
    context = browser.new_context()
    tab = context.new_page()
    tab.goto(server.url + "/#models")
    sync_api.expect(tab.locator("#notice")).to_contain_text("needs its API token")
    assert "secretmodel" not in tab.content()
    tab.screenshot(path=tmp_path / "token-needed.png", full_page=True)
    tab.fill("#api-token", API)
    tab.press("#api-token", "Tab")
    sync_api.expect(tab.locator('tr[data-model="secretmodel"]')).to_be_visible()
    context.close()


def test_dashboard_false_turns_it_off(tmp_path: Path, start_server: Callable[..., ServerProcess]) -> None:
    write_onnx_digits(tmp_path / "repo" / "digits" / "1")
    server = start_server(str(tmp_path / "repo"), "--dashboard=false")
    assert requests.get(server.url + "/", timeout=5).status_code == 404
    assert requests.get(server.url + "/dashboard/api/models", timeout=5).status_code == 404


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        ("digits/labels/stable", b"not json", 400, "the body must be JSON"),
        ("digits/labels/stable", b'{"version": "1"}', 400, "version: expected a non-negative integer"),
        ("digits/labels/stable", b'{"version": 7}', 400, "expected one of [1, 2]"),
        ("digits/labels/no-dash", b'{"version": 1}', 400, "label: expected letters, digits and _"),
        ("nosuch/labels/stable", b'{"version": 1}', 404, "'nosuch' is not in the model repository"),
    ],
)
def test_a_bad_label_move_is_refused_with_its_reason(
    server: ServerProcess, path: str, body: bytes, status: int, message: str
) -> None:
    response = requests.post(
        f"{server.url}/dashboard/api/models/{path}",
        data=body,
        headers={"authorization": f"Bearer {ADMIN}"},
        timeout=10,
    )
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    assert requests.get(f"{server.url}/dashboard/static/../__init__.py", timeout=5).status_code == 404


def test_an_operator_typing_into_a_form_keeps_focus_across_refreshes(
    server: ServerProcess, page: tuple[sync_api.Page, list[str]]
) -> None:
    """The model table is drawn again every 2 s: the field being typed into lost focus (and its
    caret) at each redraw, so keys typed after it went nowhere."""
    tab, _ = page
    tab.goto(server.url + "/#models")  # not open_models: other tests move label stable
    row = tab.locator('tr[data-model="digits"]')
    guards = row.locator(".rollout-guards")
    guards.click()
    guards.press_sequentially("error_rate<=0.01")
    tab.wait_for_timeout(4500)  # two redraws
    tab.keyboard.type("\np99_ms<=2")
    sync_api.expect(row.locator(".rollout-guards")).to_have_value("error_rate<=0.01\np99_ms<=2")
    assert tab.evaluate("document.activeElement.className") == "rollout-guards"


def test_the_curl_command_shown_for_a_try_runs_as_shown(
    browser: sync_api.Browser, tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    """The curl line quoted its body in single quotes as it was, so a text with an apostrophe cut
    it short, and it sent the token as the literal '$INFERD_API_TOKEN' (single quotes keep the
    shell from expanding it): the command, pasted, answered 401 or was broken."""
    write_python_model(
        tmp_path / "repo" / "length" / "1",
        "def load(self):\n    pass\n\n"
        'def predict(self, inputs):\n    return {"n": np.array([len(t) for t in inputs["text"]], "f4")}',
        '{"inputs": [{"name": "text", "dtype": "string", "shape": [-1]}], '
        '"outputs": [{"name": "n", "dtype": "float32", "shape": [-1]}]}',
    )
    server = start_server(str(tmp_path / "repo"), f"--api_token={API}")
    context = browser.new_context()
    try:
        tab = context.new_page()
        tab.goto(server.url + "/#try")
        tab.fill("#api-token", API)
        tab.press("#api-token", "Tab")
        area = tab.locator('#try-form textarea[name="text"]')
        area.fill('["it\'s", "naïve <b>"]')
        tab.click("#try-send")
        sync_api.expect(tab.locator("#try-result")).to_contain_text("n [2]: [4,9]")
        command = tab.locator("#try-curl").text_content()
    finally:
        context.close()
    assert command is not None
    answer = subprocess.run(
        ["bash", "-c", command + " -s --fail-with-body"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "INFERD_API_TOKEN": API},
        check=False,
    )
    assert answer.returncode == 0, answer.stdout + answer.stderr
    assert json.loads(answer.stdout)["outputs"][0]["data"] == [4, 9]
