"""The Runs tab's evaluation views in a real headless Chromium (Playwright), over a work directory
holding a run written to the data contract (training and eval loss rows, samples at several steps
with a held-out row and its reference, a stored benchmark result): the eval curve beside the
training curve, the x-axis and log-scale options, the checkpoint comparison grid, the results
table, and the Evaluate panel running the real lm-eval on the run's base model."""

from __future__ import annotations

import os
import re
from pathlib import Path

from test_evaluate import fabricated_run
from test_studio_browser import open_studio

from backend.core.rundir import RunDir
from studio_utils import running_studio


def test_runs_tab_shows_eval_curve_grid_and_benchmarks(tmp_path, tiny_model, monkeypatch):
    from playwright.sync_api import expect, sync_playwright

    shots = Path(os.environ.get("FTSTUDIO_SCREENSHOTS", tmp_path / "screenshots"))
    shots.mkdir(parents=True, exist_ok=True)
    work = tmp_path / "work"
    work.mkdir()
    run = fabricated_run(work, report_to=["tensorboard"])
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the studio's evaluation of a tiny model on 2 shared cores
    with running_studio(work) as (url, _), sync_playwright() as p:
        browser, page = open_studio(p, url, tmp_path, height=1400)
        page.get_by_role("tab", name="Runs").click()
        expect(page.locator("#runs-summary")).to_contain_text("fab-run · finished · step 50/50")

        # the loss plot: the training curve and the eval curve, told apart in the legend
        loss = page.locator("#runs-loss")
        expect(loss.locator("svg g.mark-line path")).to_have_count(2)
        expect(loss).to_contain_text("fab-run · eval")
        expect(loss).to_contain_text("fab-run · train")
        # tokens on the x axis, then a log scale
        page.locator("#runs-x").get_by_label("tokens").check()
        expect(loss).to_contain_text("tokens seen")
        page.locator("#runs-logy input").check()
        expect(loss).to_contain_text("log10 loss")

        # the stored benchmark result, next to the curves; the trackers' line
        evals = page.locator("#runs-evals")
        expect(evals).to_contain_text("ftstudio_qa exact_match")
        expect(evals).to_contain_text("step 50")
        expect(evals).to_contain_text("0.7500")
        expect(page.locator("#runs-trackers")).to_contain_text("tensorboard --logdir")

        # the comparison grid: prompts x (base, step 25, step 50), with the held-out row's reference
        grid = page.locator("#runs-grid")
        for text in ("base", "step 25", "step 50", "Run make test.", "heldout", "studio answer at 25",
                     "tests answer at 50"):
            expect(grid).to_contain_text(text)

        # Evaluate: the run's base model on the local task, through the real lm-eval; the table grows
        page.locator("#runs-evaluate").get_by_text("Evaluate a checkpoint").click()
        expect(page.locator("#runs-eval-ckpt input")).to_have_value("base")
        page.locator("#runs-eval-limit input").fill("1")
        page.locator("#runs-eval-run").click()
        expect(page.locator("#runs-eval-msg")).to_contain_text("base: ftstudio_qa exact_match", timeout=180_000)
        expect(page.locator("#runs-eval-msg")).to_contain_text("evals/base-ftstudio_qa.json")
        expect(evals).to_contain_text(re.compile(r"base\s*0\.0000"))
        assert {r["name"] for r in RunDir(run.path).evals()} == {"iter_50-ftstudio_qa", "base-ftstudio_qa"}
        page.screenshot(path=shots / "runs_eval.png", full_page=True)
        browser.close()
