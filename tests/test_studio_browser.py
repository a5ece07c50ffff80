"""A person's walk through the studio on the bundled demo, in a real headless
Debian Chromium driven by Playwright: Dataset -> Train -> Runs -> Export ->
Chat, checking what is on the screen at each step. Screenshots go to
$FTSTUDIO_SCREENSHOTS (default: the test's tmp folder); the README shows the
ones committed under assets/screenshots/."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from backend.core.rundir import RunDir, effective_status

from studio_utils import running_studio, wait_for

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ANSWER = "Finetune Studio is a browser studio"


def open_studio(p, url: str, home, height: int = 1000):
    """(browser, page): headless Chromium (its profile under ``home``) on the studio at ``url``, with the
    minute-long waits a loaded 2-core machine needs."""
    from playwright.sync_api import expect

    browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, env={**os.environ, "HOME": str(home)})
    page = browser.new_page(viewport={"width": 1440, "height": height})
    page.set_default_timeout(60_000)
    expect.set_options(timeout=60_000)
    page.goto(url)
    return browser, page


def pick(page, elem_id: str, option: str):
    """Choose ``option`` in a Gradio dropdown."""
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=option, exact=True).click()


def test_walk_through_the_demo(tmp_path, tiny_model):
    from playwright.sync_api import expect, sync_playwright

    shots = Path(os.environ.get("FTSTUDIO_SCREENSHOTS", tmp_path / "screenshots"))
    shots.mkdir(parents=True, exist_ok=True)
    work = tmp_path / "work"
    with running_studio(work) as (url, _), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS,
                                    env={**os.environ, "HOME": str(tmp_path)})
        page = browser.new_page(viewport={"width": 1440, "height": 1000})
        page.set_default_timeout(60_000)
        expect.set_options(timeout=60_000)
        page.goto(url)

        # Dataset: rows in the table, the detected map_fn, trained tokens highlighted, the histogram
        expect(page.locator("#ds-rows")).to_contain_text("What is Finetune Studio?")
        expect(page.locator("#ds-mapfn input")).to_have_value("openai")
        expect(page.locator("#ds-conversations")).to_contain_text("What can I do with Finetune Studio?")
        trained = page.locator("#ds-sample .token.highlighted")  # the spans HighlightedText colours
        expect(trained.first).to_contain_text(ANSWER)
        expect(page.locator("#ds-sample .token:not(.highlighted)").first).to_contain_text("<|im_start|>")
        expect(page.locator("#ds-stats")).to_contain_text("50 samples kept")
        expect(page.locator("#ds-hist svg g.mark-rect path").first).to_be_attached()  # histogram bars
        page.screenshot(path=shots / "dataset.png", full_page=True)

        # Train: the tiny recipe's form, the YAML, the command and the memory estimate; Launch
        page.get_by_role("tab", name="Train").click()
        expect(page.locator("#train-memory")).to_contain_text("Memory estimate")
        expect(page.locator("#train-command")).to_contain_text("ftstudio train")
        expect(page.locator("#train-yaml")).to_contain_text("name_or_path: demo")  # the top (the editor draws what is in view)
        page.locator("#cfg-training-lr input").fill("-1")  # a bad value: the message sits beside the field
        page.locator("#cfg-training-lr input").press("Tab")
        expect(page.locator("#cfg-training-lr")).to_contain_text("must be at least 0")
        expect(page.locator("#train-problems")).to_contain_text("training.lr")
        page.locator("#cfg-training-lr input").fill("0.005")
        page.locator("#cfg-training-lr input").press("Tab")
        expect(page.locator("#train-problems")).to_contain_text("config is valid")
        page.screenshot(path=shots / "train.png", full_page=True)
        page.locator("#train-launch").click()

        # Runs: the studio switches to the new run; the loss curve fills in; the run finishes
        expect(page.get_by_role("tab", name="Runs")).to_have_attribute("aria-selected", "true")
        expect(page.locator("#runs-table")).to_contain_text("tiny_demo-")
        run_name = re.search(r"tiny_demo-\d{8}-\d{6}", page.locator("#runs-table").inner_text()).group(0)
        expect(page.locator("#runs-summary")).to_contain_text("tokens/s", timeout=120_000)
        loss_line = page.locator("#runs-loss svg g.mark-line path").first  # the drawn curve
        expect(loss_line).to_have_attribute("d", re.compile(r"(L[^L]+){10,}"))  # 10+ points joined
        expect(page.locator("#runs-log textarea")).to_have_value(re.compile(r"step \d+/600"))
        assert wait_for(lambda: effective_status(RunDir(work / run_name)).get("state") in ("finished", "failed"),
                        timeout=600)
        expect(page.locator("#runs-summary")).to_contain_text("finished", timeout=30_000)
        expect(page.locator("#runs-summary")).to_contain_text("step 600/600")
        expect(page.locator("#runs-samples")).to_contain_text("What is Finetune Studio?")
        page.screenshot(path=shots / "runs.png", full_page=True)

        # Export: the newest checkpoint -> a Hugging Face folder, path shown
        page.get_by_role("tab", name="Export").click()
        page.locator("#export-refresh").click()
        pick(page, "export-run", run_name)
        expect(page.locator("#export-ckpt input")).to_have_value("iter_600.pth")
        page.locator("#export-convert").click()
        expect(page.locator("#export-convert-msg")).to_contain_text(f"{run_name}/hf/iter_600", timeout=120_000)
        assert (work / run_name / "hf" / "iter_600" / "config.json").exists()
        page.screenshot(path=shots / "export.png", full_page=True)

        # Chat: the exported model side by side with its base; the reply streams in
        page.get_by_role("tab", name="Chat").click()
        page.locator("#chat-refresh").click()
        pick(page, "chat-model", f"{run_name}/hf/iter_600")
        expect(page.locator("#chat-template input")).to_have_value("(as trained)")
        page.locator("#chat-side input").check()
        page.locator("#chat-message textarea").fill("What is Finetune Studio?")
        page.locator("#chat-send").click()
        expect(page.locator("#chat-tuned")).to_contain_text(ANSWER, timeout=120_000)
        expect(page.locator("#chat-base [data-testid='bot']").first).not_to_be_empty()
        expect(page.locator("#chat-status")).to_contain_text("base demo")
        page.screenshot(path=shots / "chat.png", full_page=True)
        browser.close()
