"""The studio's handlers through its HTTP API (gradio_client) against the real
``python app.py``: dataset preview, launch of the tiny recipe, live metrics,
abort, resume, export, merge-less full export, chat streaming; plus the
serving rules (paths, one run at a time, auth, --share)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from gradio_client import Client

from backend.config import load_config
from backend.devices import queue as device_queue
from backend.core.rundir import RunDir, effective_status, read_jsonl
from studio.train_tab import config_values

from conftest import DATA
from studio_utils import ROOT, running_studio, wait_for


@pytest.fixture(scope="module")
def studio(tmp_path_factory, tiny_model):
    work = tmp_path_factory.mktemp("studio") / "work"
    with running_studio(work) as (url, _):
        yield Client(url, verbose=False), work


def plot_rows(plot) -> list:
    """The points of a plot as the API returns it (a value, or an update carrying one)."""
    return (plot.get("value") or plot)["data"]


def launch_args(cfg, name, deepspeed="none", nproc=1):
    return [name, deepspeed, nproc, 1, "", 29500, *config_values(cfg)]


def test_dataset_preview_on_the_demo(studio):
    client, _ = studio
    table, page, info, map_fn, reason, convs, status = client.predict("demo", "", "train", api_name="/dataset_load")
    assert status == ""
    assert map_fn == "openai" and "messages" in reason
    assert len(table["data"]) == 10 and table["headers"] == ["row", "messages"]
    assert "50 rows" in info
    assert convs["headers"][:2] == ["row", "turn"] and convs["data"][0][3] == "What is Finetune Studio?"
    spans, stats, hist = client.predict("demo", "", "train", "openai", "demo", "qwen_chat", 256, 0,
                                        api_name="/dataset_render")
    trained = "".join(s["token"] for s in spans if s["class_or_confidence"] == "trained")
    assert trained.startswith("Finetune Studio is a browser studio")
    context = "".join(s["token"] for s in spans if s["class_or_confidence"] is None)
    assert "What is Finetune Studio?" in context and "Finetune Studio is" not in context
    assert "**50** samples kept" in stats and "**0** truncated" in stats
    assert sum(row[1] for row in plot_rows(hist)) == 50

    # a max_length shorter than the samples: truncation counted, the cut bins marked
    _, stats, hist = client.predict("demo", "", "train", "openai", "demo", "qwen_chat", 40, 0,
                                    api_name="/dataset_render")
    assert "**0** truncated" not in stats
    assert any(row[2] == "cut at max_length" and row[1] > 0 for row in plot_rows(hist))


def test_dataset_errors_name_the_row_and_stay_in_the_tab(studio, tmp_path):
    client, work = studio
    bad = work / "uploads" / "bad.jsonl"
    bad.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"instruction": "a", "input": "", "output": "b"}] * 3 + [{"instruction": "a", "input": "", "output": 7}]
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    *_, status = client.predict(str(bad), "", "train", api_name="/dataset_load")
    assert "row 3" in status and "'output'" in status and "alpaca" in status

    # outside the work directory: refused, with the way out
    outside = tmp_path / "alpaca_en_demo.json"
    shutil.copyfile(DATA / "alpaca" / "alpaca_en_demo.json", outside)
    *_, status = client.predict(str(outside), "", "train", api_name="/dataset_load")
    assert "outside the folders this studio may read" in status and "--allow-path" in status


def test_launch_follow_abort_resume_export_chat(studio):
    client, work = studio
    cfg = load_config("tiny_demo", ["saving.save_steps=50"])  # the demo as a newcomer runs it
    msg, run_name = client.predict(*launch_args(cfg, "handlers"), api_name="/train_launch")
    assert run_name.startswith("handlers-"), msg
    run_dir = work / run_name
    assert (work / "configs" / "handlers.yaml").exists()

    # once the first run holds the machine's one device (its CPU), a second launch waits in the queue, then is
    # cancelled (launched at once, the two launchers' checks would race for the device)
    assert wait_for(lambda: effective_status(RunDir(run_dir)).get("state") == "running", timeout=300), \
        (run_dir / "launcher.log").read_text()[-3000:]
    msg2, second = client.predict(*launch_args(cfg, "second"), api_name="/train_launch")
    assert second.startswith("second-"), msg2
    assert wait_for(lambda: device_queue.position(work, RunDir(work / second)) == 1, timeout=300), \
        (work / second / "launcher.log").read_text()[-3000:]
    table = client.predict([second], api_name="/runs_refresh")[0]
    assert [second, "queued #1 (waits for device cpu)"] == next(r for r in table["data"] if r[0] == second)[:2]
    assert "before training began" in client.predict([second], api_name="/runs_abort")
    assert wait_for(lambda: effective_status(RunDir(work / second)).get("state") == "aborted", timeout=120)
    assert device_queue.entries(work) == []

    # metrics arrive, and the Runs tab's refresh shows them as curve points
    assert wait_for(lambda: len(read_jsonl(run_dir / "metrics.jsonl")) >= 25, timeout=300), \
        (run_dir / "launcher.log").read_text()[-3000:]
    table, loss, memory, lr, grad, summary, log, samples = client.predict([run_name], api_name="/runs_refresh")
    assert [run_name, "running"] == next(r for r in table["data"] if r[0] == run_name)[:2]
    assert len(plot_rows(loss)) >= 25 and {r[2] for r in plot_rows(loss)} == {run_name}
    assert "running" in summary and "tokens/s" in summary
    assert "step " in log

    assert wait_for(lambda: RunDir(run_dir).latest_checkpoint(), timeout=300)
    said = client.predict([run_name], api_name="/runs_abort")
    assert "asked" in said
    assert wait_for(lambda: effective_status(RunDir(run_dir)).get("state") == "aborted", timeout=120)
    stopped = read_jsonl(run_dir / "metrics.jsonl")[-1]["step"]
    assert stopped < 600

    said = client.predict([run_name], api_name="/runs_resume")
    assert "resuming" in said
    assert wait_for(lambda: effective_status(RunDir(run_dir)).get("state") in ("finished", "failed"), timeout=600)
    st = effective_status(RunDir(run_dir))
    assert st["state"] == "finished", (run_dir / "train.log").read_text()[-3000:]
    steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")]
    assert steps[-1] == 600 and st["resumed_from"]
    table, loss, *_ = client.predict([run_name], api_name="/runs_refresh")
    assert next(r for r in table["data"] if r[0] == run_name)[1] == "finished"

    # export the last checkpoint (a full fine-tune: a complete model)
    out = run_dir / "hf" / "iter_600"
    msg, _ = client.predict(run_name, "iter_600.pth", str(out), api_name="/export_convert")
    assert "full model" in msg and (out / "config.json").exists() and (out / "ftstudio.json").exists()
    msg, _ = client.predict(run_name, "iter_600.pth", "/tmp/not-here", api_name="/export_convert")
    assert "only inside the work directory" in msg
    msg = client.predict(str(out), "", str(run_dir / "merged" / "x"), api_name="/export_merge")
    assert "nothing to merge" in msg and not (run_dir / "merged").exists()

    # chat streams the trained answer from the checkpoint
    job = client.submit("What is Finetune Studio?", [], [], f"{run_name}/iter_600.pth", "(as trained)", "",
                        False, 0.0, 0.75, 40, 64, 1.0, api_name="/chat_send")
    updates = list(job)
    final = job.outputs()[-1][0]
    reply = final[-1]["content"][0]["text"] if isinstance(final[-1]["content"], list) else final[-1]["content"]
    assert reply.startswith("Finetune Studio is a browser studio"), reply
    assert len(updates) > 3  # streamed piece by piece

    # side by side: the base model answers the same prompt, differently
    job = client.submit("What is Finetune Studio?", [], [], f"{run_name}/hf/iter_600", "(as trained)", "",
                        True, 0.0, 0.75, 40, 32, 1.0, api_name="/chat_send")
    tuned, base, _, note = job.result()
    text = lambda h: h[-1]["content"][0]["text"] if isinstance(h[-1]["content"], list) else h[-1]["content"]
    assert text(tuned).startswith("Finetune Studio is") and not text(base).startswith("Finetune Studio is")


def test_failed_preflight_shows_as_a_failed_run(studio):
    client, work = studio
    cfg = load_config("tiny_demo", ["data.map_fn=alpaca"])  # the demo data has no alpaca columns
    msg, run_name = client.predict(*launch_args(cfg, "badmap"), api_name="/train_launch")
    assert run_name
    st = wait_for(lambda: effective_status(RunDir(work / run_name)).get("state") == "failed" and effective_status(RunDir(work / run_name)),
                  timeout=120)
    assert st and "row 0" in st["error"] and "'output'" in st["error"] and "messages" in st["error"], st


def test_share_needs_auth_and_auth_refuses_strangers(tmp_path, tiny_model):
    proc = subprocess.run([sys.executable, "app.py", "--share", "--work-dir", str(tmp_path / "w")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--auth" in proc.stderr
    with running_studio(tmp_path / "w", "--auth", "ada:lovelace") as (url, _):
        import urllib.error
        import urllib.request

        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(url + "config", timeout=10)
        assert err.value.code == 401
        with pytest.raises(Exception):
            Client(url, verbose=False)
        with pytest.raises(Exception):
            Client(url, auth=("ada", "wrong"), verbose=False)
        client = Client(url, auth=("ada", "lovelace"), verbose=False)
        *_, status = client.predict("demo", "", "train", api_name="/dataset_load")
        assert status == ""
