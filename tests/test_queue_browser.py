"""The device panel and the run queue in a real headless Chromium: a studio on
a machine of two devices (the inventory seam, FTSTUDIO_FAKE_DEVICES=2; leases,
launchers and runs are real) runs one long run on each device; a third run,
launched from the browser, waits in the queue. The panel shows which run and
user holds each device and who waits; the Runs tab shows the queued run with
its place in line (so does a second studio started on the same work
directory: the queue is files); when one run is aborted the queued one
starts by itself."""

from __future__ import annotations

import getpass
import os
from pathlib import Path

from gradio_client import Client
from test_studio_browser import open_studio

from backend.config import load_config
from backend.core.rundir import RunDir, effective_status
from backend.devices import queue as device_queue
from studio.train_tab import config_values

from studio_utils import running_studio, wait_for

LONG = ["training.max_steps=100000", "saving.save_steps=100000", "evaluation.inputs=[]"]


def launch(client: Client, name: str, devices: list[str]) -> str:
    cfg = load_config("tiny_demo", LONG)
    said, run = client.predict(name, "none", 1, 1, "", 29500, *config_values(cfg), devices, "this machine",
                               api_name="/train_launch")
    assert run, said
    return run


def test_device_panel_and_a_queued_run(tmp_path, tiny_model, monkeypatch):
    from playwright.sync_api import expect, sync_playwright

    shots = Path(os.environ.get("FTSTUDIO_SCREENSHOTS", tmp_path / "screenshots"))
    shots.mkdir(parents=True, exist_ok=True)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("FTSTUDIO_FAKE_DEVICES", "2")
    monkeypatch.setenv("FTSTUDIO_DEVICE_LOCKS", str(tmp_path / "locks"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # three tiny trainings and a browser on 2 shared cores
    me = getpass.getuser()
    with running_studio(work) as (url, _), sync_playwright() as p:
        client = Client(url, verbose=False)
        first, second = launch(client, "alpha", ["0"]), launch(client, "beta", ["1"])
        for run in (first, second):
            assert wait_for(lambda: effective_status(RunDir(work / run)).get("state") == "running", timeout=300), \
                (work / run / "launcher.log").read_text()[-2000:]
        browser, page = open_studio(p, url, tmp_path, height=1300)
        page.get_by_role("tab", name="Train").click()
        panel = page.locator("#devices-table")
        expect(panel).to_contain_text("fake device 0")
        expect(panel).to_contain_text(f"{first} ({me})")
        expect(panel).to_contain_text(f"{second} ({me})")

        # a third run from the browser, on device 0: it waits, first in line
        page.locator("#train-name input, #train-name textarea").first.fill("gamma")
        page.locator("#train-devices").get_by_label("0: fake device 0", exact=False).check()
        page.locator("#train-launch").click()
        expect(page.locator("#train-launch-msg")).to_contain_text("queued (#1), waiting for 0", timeout=180_000)
        third = next(e["run"] for e in device_queue.entries(work))
        page.get_by_role("tab", name="Train").click()  # Launch showed Runs; the panel lists who waits
        expect(panel).to_contain_text(f"{third} ({me}) #1")
        panel.scroll_into_view_if_needed()
        page.screenshot(path=shots / "devices.png", full_page=False)

        page.get_by_role("tab", name="Runs").click()
        table = page.locator("#runs-table")
        expect(table).to_contain_text("queued #1 (waits for device 0)")
        page.screenshot(path=shots / "queue.png", full_page=False)
        # a studio started afresh on the same work directory (nothing in memory) shows the same queue
        with running_studio(work, abort_runs=False) as (url2, _):
            rows = Client(url2, verbose=False).predict([third], api_name="/runs_refresh")[0]["data"]
            assert next(r for r in rows if r[0] == third)[1] == "queued #1 (waits for device 0)", rows

        # device 0 frees up: the queued run starts by itself
        assert "asked" in client.predict([first], api_name="/runs_abort")
        assert wait_for(lambda: effective_status(RunDir(work / third)).get("state") == "running", timeout=300), \
            (work / third / "launcher.log").read_text()[-2000:]
        assert effective_status(RunDir(work / third))["devices"] == ["0"]
        expect(table).not_to_contain_text("queued #1")
        browser.close()
