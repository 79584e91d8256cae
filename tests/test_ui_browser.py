"""Model promotion as a reviewer sees it: the MLflow UI in a real (headless) Chromium.

A real ``mlflow server`` (temporary sqlite store, proxied artifacts, random loopback port), the
digits demo run twice against it (``digits-target`` v1 promoted to ``champion`` in between, the
second run registers v2 as ``challenger``), then Chromium opens the registered model page and
both version pages and checks that the aliases, the metrics table from the description and the
``validation_status`` tag are on screen. Screenshots go to ``$TLOPS_UI_ARTIFACTS`` (default
``.tlops/ui-screenshots``).

Needs Debian's ``chromium`` (installed with apt-get when missing and running as root) and the
``playwright`` Python package (dev extra); it drives the system Chromium, no browser download.
Run with ``make ui-test``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
]
MODEL = os.environ.get("TLOPS_UI_MODEL", "digits-target")


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path:
        return path
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip(
            "chromium is not installed and cannot be installed here (needs root and apt-get): "
            "install Debian's 'chromium' package"
        )
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    r = subprocess.run(
        "apt-get update -qq && apt-get install -y -qq chromium",
        shell=True,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    path = shutil.which("chromium")
    if r.returncode != 0 or not path:
        pytest.skip(f"apt-get install chromium failed (exit {r.returncode}): {(r.stderr or r.stdout)[-500:]}")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"mlflow server at {url} not healthy after {timeout}s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real MLflow tracking server on loopback, sqlite store + proxied artifacts in a temp dir.

    ``TLOPS_UI_SERVER=<url>`` points the checks at a running server that already has a model with
    ``champion`` and ``challenger`` (name in ``TLOPS_UI_MODEL``) instead: no server, no demo runs.
    """
    if os.environ.get("TLOPS_UI_SERVER"):
        yield os.environ["TLOPS_UI_SERVER"].rstrip("/")
        return
    tmp = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp / "server.log"
    env = os.environ | {"MLFLOW_SERVER_ALLOWED_HOSTS": f"127.0.0.1:{port},127.0.0.1,localhost:{port},localhost"}
    env.pop("MLFLOW_TRACKING_URI", None)
    with log.open("w") as fh:
        proc = subprocess.Popen(
            [
                str(BIN / "mlflow"),
                "server",
                "--backend-store-uri",
                f"sqlite:///{tmp / 'mlflow.db'}",
                "--artifacts-destination",
                str(tmp / "artifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
            ],
            cwd=tmp,
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_healthy(url, proc, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _tlops(url: str, log: Path, *args: str) -> str:
    env = os.environ | {"MLFLOW_TRACKING_URI": url, "TLOPS_USER": "ui-test"}
    env.pop("MLFLOW_RUN_ID", None)
    r = subprocess.run([str(BIN / "tlops"), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    with log.open("a") as fh:
        fh.write(f"$ tlops {' '.join(args)}\n{r.stdout}\n{r.stderr}\n")
    assert r.returncode == 0, (
        f"tlops {' '.join(args)} failed (exit {r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    )
    return r.stdout


@pytest.fixture(scope="module")
def registry_with_champion_and_challenger(server, tmp_path_factory):
    """The digits demo twice: v1 promoted to champion, then a second demo registers v2 (challenger)."""
    import mlflow

    c = mlflow.MlflowClient(tracking_uri=server, registry_uri=server)
    if os.environ.get("TLOPS_UI_SERVER"):
        return {a: c.get_model_version_by_alias(MODEL, a) for a in ("champion", "challenger")}
    work = tmp_path_factory.mktemp("ui-demo") / "work"
    log = work.parent / "tlops.log"
    t0 = time.time()
    _tlops(server, log, "demo", "--set", f"workdir={work}")
    _tlops(server, log, "promote", MODEL, "1", "--reason", "first reviewed model")
    # a second demo with other training settings: every strategy's model changes, so v2 is new
    _tlops(server, log, "demo", "--set", f"workdir={work}", "--set", "train.epochs=3", "--set", "train.probe_c=[0.5]")
    print(f"\ndemo twice + promote against {server}: {time.time() - t0:.0f}s (log: {log})")
    champion = c.get_model_version_by_alias(MODEL, "champion")
    challenger = c.get_model_version_by_alias(MODEL, "challenger")
    assert (str(champion.version), str(challenger.version)) == ("1", "2"), log.read_text()[-3000:]
    return {"champion": champion, "challenger": challenger}


@pytest.fixture(scope="module")
def shots() -> Path:
    out = Path(os.environ.get("TLOPS_UI_ARTIFACTS") or REPO / ".tlops" / "ui-screenshots")
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    playwright = pytest.importorskip("playwright.sync_api", reason="install the dev extra: pip install -e .[dev]")
    executable = _chromium()
    profile = tmp_path_factory.mktemp("chromium-profile")
    with playwright.sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            str(profile),
            executable_path=executable,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1800},
        )
        try:
            yield ctx
        finally:
            ctx.close()


def _load(browser, url: str, wait_for: list[str], timeout_ms: int = 90_000):
    """Open ``url`` and wait until every text in ``wait_for`` is on screen; close the assistant side panel."""
    page = browser.new_page()
    page.set_default_timeout(timeout_ms)
    page.goto(url, wait_until="domcontentloaded")
    for text in wait_for:
        page.get_by_text(text, exact=False).first.wait_for(state="visible")
    close = page.get_by_role("button", name="Close", exact=True)
    if close.count() == 1 and close.is_visible():  # MLflow 3's assistant panel takes a third of the width
        close.click()
    try:  # let the remaining requests (source run, logged model, images) finish before any screenshot
        page.wait_for_load_state("networkidle", timeout=15_000)
    except Exception:  # noqa: BLE001 - a page that keeps polling is still worth checking
        pass
    page.wait_for_timeout(500)
    return page


def _text(page) -> str:
    """The page's visible text with whitespace (incl. non-breaking spaces, line breaks) collapsed."""
    return " ".join(page.inner_text("body").split())


def _shot(page, path: Path, full_page: bool = True) -> Path:
    page.screenshot(path=str(path), full_page=full_page)
    print(f"\nscreenshot: {path}")
    return path


def test_model_page_shows_champion_and_challenger(server, registry_with_champion_and_challenger, browser, shots):
    page = _load(browser, f"{server}/#/models/{MODEL}", [MODEL, "Version 2", "challenger"])
    try:
        text = _text(page)
        for expected in ("Version 1", "Version 2", "@ champion", "@ challenger", "Aliases", "tlops.history"):
            assert expected in text, f"{expected!r} not on the model page"
        for alias in ("champion", "challenger"):
            assert page.get_by_text(alias, exact=False).first.is_visible()
    finally:
        _shot(page, shots / "model-page.png")
        page.close()


@pytest.mark.parametrize("alias", ["champion", "challenger"])
def test_version_page_shows_metrics_table_aliases_and_validation(
    server, registry_with_champion_and_challenger, browser, shots, alias
):
    mv = registry_with_champion_and_challenger[alias]
    status = mv.tags["validation_status"]
    page = _load(
        browser, f"{server}/#/models/{MODEL}/versions/{mv.version}", [f"Version {mv.version}", "target accuracy"]
    )
    try:
        text = _text(page)
        for expected in (
            f"@ {alias}",
            "target accuracy",
            "macro-F1",
            "ECE (lower is better)",
            "gain over from-scratch",
            "Champion comparison",
            f"Validation: {status.split(':')[0]}",
            "Source model:",
            "Data:",
            "confusion matrix",
            "evaluation report",
        ):
            assert expected in text, f"{expected!r} not visible on the version page"
        if alias == "challenger":
            assert "champion v1" in text  # the comparison column: champion scored on the same test split
        # the confusion matrix linked from the description is served by the tracking server and renders
        img = page.locator(
            f'img[src*="get-artifact?path=evaluation%2Fconfusion_matrix.png&run_uuid={mv.run_id}"]'
        )  # alt is sanitized away
        img.scroll_into_view_if_needed()
        img.wait_for(state="visible")
        page.wait_for_function("i => i.complete && i.naturalWidth > 0", arg=img.element_handle())  # fails if it 404s
        _shot(page, shots / f"version-{mv.version}-{alias}.png")
        # the validation_status tag (the tags table scrolls on its own)
        tag = page.get_by_text("validation_status", exact=True).first
        tag.scroll_into_view_if_needed()
        assert tag.is_visible() and page.get_by_text(status, exact=True).first.is_visible()
        _shot(page, shots / f"version-{mv.version}-{alias}-tags.png", full_page=False)
        if alias == "challenger":  # the description's artifact links open the run's artifact view (new tab)
            with browser.expect_page() as opened:
                page.get_by_role("link", name="evaluation report", exact=True).click()
            report = opened.value
            report.get_by_text("Per-class (selected model)").first.wait_for(state="visible")
            assert f"/runs/{mv.run_id}/artifacts/evaluation/report.md" in report.url
            _shot(report, shots / f"version-{mv.version}-{alias}-report-link.png", full_page=False)
            report.close()
    except Exception:
        _shot(page, shots / f"version-{mv.version}-{alias}-failed.png")
        raise
    finally:
        page.close()
