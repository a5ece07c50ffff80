"""Benchmarks with the real lm-eval (``ftstudio eval``, ``backend.evaluate``) on the shipped local
task, for the demo model before and after a short training on the task's own questions: the score
rises and is stored in the run folder. Then the command's errors (each one line, exit 2), and the
Runs tab's handlers for the curves, the comparison grid and the results table, on a run folder
written by hand to issue 13's data contract (eval rows in metrics.jsonl, samples with kind and
reference, evals/<name>.json)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from backend.config import load_config
from backend.core.rundir import RunDir
from backend.demo import DEMO_DATA

from train_utils import FTSTUDIO, ftstudio

QUESTIONS = 4
STEPS = 80  # at a constant lr the tiny model repeats 4 answers word for word after ~50 steps (loss ~0.01)
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # tiny models on 2 shared cores: one thread is ~10x faster than two


def write_questions(path: Path, n: int = QUESTIONS) -> Path:
    path.write_text("".join(DEMO_DATA.read_text(encoding="utf-8").splitlines(keepends=True)[:n]), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model):
    """A run of the demo recipe trained on 4 of the demo's questions (the eval task's own rows)."""
    work = tmp_path_factory.mktemp("evaluate")
    questions = write_questions(work / "questions.jsonl")
    ftstudio("train", "tiny_demo", f"data.path={questions}", f"training.max_steps={STEPS}",
             "training.lr_scheduler=constant", f"saving.save_steps={STEPS}", f"evaluation.every={STEPS}",
             "--work-dir", work / "run", "--quiet", cwd=work, env=ONE_THREAD, check=True)
    return work, questions, RunDir(work / "run")


@pytest.fixture
def one_thread():
    """In this process too, while a test evaluates here."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def exact_match(record: dict) -> float:
    return record["tasks"]["ftstudio_qa"]["exact_match"]


def test_score_rises_after_training_and_is_stored_with_the_run(trained, one_thread):
    from backend.core.guard import Guard
    from backend.evaluate import evaluate

    work, questions, run = trained
    # the base model through the command line, kept with the run as its step 0 (in the run's template)
    base = ftstudio("eval", "demo", "--run", "run", "--work-dir", work, "--tasks", "ftstudio_qa",
                    "--data", questions, cwd=work, env=ONE_THREAD, check=True)
    assert re.search(r"ftstudio_qa\s+exact_match\s+0\.0000", base.stdout), base.stdout
    assert "demo (base model), template qwen_chat" in base.stdout and "stored in" in base.stdout
    # the trained checkpoint (converted once on the way), both local tasks, through the backend call
    guard = Guard(work, [], confined=False)
    record, path = evaluate(guard, f"run/iter_{STEPS}.pth", "ftstudio_qa,ftstudio_qa_mc", data=str(questions))
    assert exact_match(record) > 0.5, record["examples"]
    assert record["tasks"]["ftstudio_qa_mc"]["acc"] >= 0.5
    assert path == run.evals_dir / f"iter_{STEPS}-ftstudio_qa.ftstudio_qa_mc.json"

    stored = {r["name"]: r for r in run.evals()}
    assert set(stored) == {"base-ftstudio_qa", path.stem}
    before, after = stored["base-ftstudio_qa"], stored[path.stem]
    assert exact_match(before) == 0.0 < exact_match(after)
    assert (before["step"], after["step"]) == (0, STEPS)
    for rec in (before, after):  # the data contract with the Runs tab
        assert {"model", "step", "tasks", "lm_eval_version", "created", "limit", "backend"} <= set(rec)
        assert rec["backend"] == "hf" and rec["samples"]["ftstudio_qa"] == QUESTIONS and rec["limit"] is None
    assert after["model"] == f"run/iter_{STEPS}.pth" and before["model"] == "demo"
    shown = after["examples"]["ftstudio_qa"][0]
    assert shown["input"] == "What is Finetune Studio?" and shown["output"].startswith("Finetune Studio is")


def test_openai_backend_asks_the_served_checkpoint(trained, capsys):
    """``ftstudio serve`` the checkpoint, then evaluate it through lm-eval's chat-completions client."""
    work, questions, run = trained
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")} | ONE_THREAD
    log = open(work / "serve.log", "w")
    server = subprocess.Popen([FTSTUDIO, "serve", f"run/iter_{STEPS}.pth", "--work-dir", str(work), "--port", "0"],
                              cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline, url = time.time() + 180, None
        while url is None and time.time() < deadline and server.poll() is None:
            found = re.search(r"at (http://\S+/v1)", (work / "serve.log").read_text())
            url = found.group(1) if found else time.sleep(0.3)
        assert url, (work / "serve.log").read_text()[-3000:]
        code, out, _ = run_cli(capsys, f"run/iter_{STEPS}.pth", "--work-dir", work, "--backend", "openai",
                               "--base-url", url, "--tasks", "ftstudio_qa", "--data", questions, "--limit", "2",
                               "--json")
        record = json.loads(out)
        assert code == 0 and record["backend"] == "openai" and record["step"] == STEPS and record["limit"] == 2
        assert exact_match(record) > 0.5, record["examples"]
        assert (run.evals_dir / f"iter_{STEPS}-ftstudio_qa-openai.json").is_file()
        # a log-likelihood task cannot go through a chat API: said before anything is asked
        code, _, err = run_cli(capsys, "x", "--backend", "openai", "--base-url", url, "--tasks", "ftstudio_qa_mc")
        assert code == 2 and "log-likelihood" in err and "--backend hf" in err
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_a_task_folder_of_ones_own(tmp_path, tiny_model, one_thread):
    """--include-path: a plain lm-eval task YAML over a local JSON file (lm-eval's own ``json`` loader)."""
    from backend.core.guard import Guard
    from backend.evaluate import evaluate

    tasks = tmp_path / "my_tasks"
    tasks.mkdir()
    (tmp_path / "capitals.jsonl").write_text('{"q": "Capital of France?", "a": "Paris"}\n'
                                             '{"q": "Capital of Italy?", "a": "Rome"}\n')
    (tasks / "capitals.yaml").write_text(
        "task: my_capitals\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'capitals.jsonl'}\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\n"
        "generation_kwargs:\n  until: []\n  max_gen_toks: 8\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    record, path = evaluate(Guard.cli(), "demo", ["my_capitals"], include_paths=[str(tasks)])
    assert record["tasks"]["my_capitals"]["exact_match"] == 0.0 and record["samples"]["my_capitals"] == 2
    assert path is None and record["step"] is None  # no run named: printed, not stored
    assert [e["target"] for e in record["examples"]["my_capitals"]] == ["Paris", "Rome"]


# --- errors: one line, exit 2 -------------------------------------------------------------


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """``ftstudio eval ARGV`` in this process: (exit code, stdout, stderr)."""
    from backend.cli import main

    code = main(["eval", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err.strip()


def test_without_lm_eval_it_says_how_to_install_it(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what an environment without it gives: ImportError
    code, _, err = run_cli(capsys, "demo", "--tasks", "ftstudio_qa", "--work-dir", tmp_path)
    assert code == 2 and "pip install lm-eval" in err and len(err.splitlines()) == 1, err


def test_bad_requests_are_one_line(capsys, tmp_path, tiny_model):
    bad_rows = tmp_path / "bad.jsonl"
    bad_rows.write_text('{"question": "q1", "answer": "a1"}\n{"question": "q2"}\n')
    cases = [
        (["no_run/iter_5.pth", "--tasks", "ftstudio_qa"], "run 'no_run': not a run of this studio"),
        ([tmp_path / "no_model", "--tasks", "ftstudio_qa"], "no_model: no such folder"),
        (["demo", "--tasks", " , "], "--tasks: give at least one task"),
        (["demo", "--tasks", "ftstudio_qa", "--backend", "openai"], "needs --base-url"),
        (["demo", "--tasks", "ftstudio_qa", "--base-url", "http://x/v1"], "--base-url is for --backend openai"),
        (["demo", "--tasks", "ftstudio_qa", "--data", tmp_path / "missing.jsonl"], "no such file"),
        (["demo", "--tasks", "ftstudio_qa", "--data", bad_rows], "bad.jsonl line 2: needs question/answer"),
        (["demo", "--tasks", "ftstudio_qa", "--run", "nope"], "run 'nope': not a run"),
    ]
    for argv, said in cases:
        code, _, err = run_cli(capsys, *argv, "--work-dir", tmp_path)
        assert code == 2 and said in err and len(err.splitlines()) == 1, (argv, err)
        assert err.startswith("ftstudio eval: error: ") and "Traceback" not in err


def test_unknown_task_names_the_local_ones(capsys, tmp_path):
    """Not found locally, so lm-eval's own index is read too (slow: tens of seconds) before saying so."""
    code, _, err = run_cli(capsys, "demo", "--tasks", "ftstudio_qa,no_such_task", "--work-dir", tmp_path)
    assert code == 2 and "unknown task no_such_task" in err and "ftstudio_qa_mc" in err, err
    assert "--include-path" in err and len(err.splitlines()) == 1


# --- the Runs tab's handlers, on a run folder written to the data contract ------------------


def fabricated_run(work: Path, name: str = "fab-run", report_to=()) -> RunDir:
    """A finished run of 50 steps: training and eval loss rows, samples (prompts and a held-out row with
    its reference) at steps 0, 25 and 50, and one stored benchmark result for step 50."""
    run = RunDir(work / name)
    run.path.mkdir(parents=True)
    cfg = load_config("tiny_demo", [f"training.report_to={','.join(report_to)}"] if report_to else [])
    run.write_config(cfg.to_yaml())
    run.write_status(state="finished", started="2026-01-02T03:04:05+0000", ended="2026-01-02T03:05:05+0000",
                     exit_code=0, config="tiny_demo", method="full")
    for step in range(1, 51):
        run.append_metric({"step": step, "max_steps": 50, "epoch": step / 10, "loss": 3.0 / step, "lr": 1e-3,
                           "grad_norm": 1.0, "tokens_per_s": 500.0, "tokens_seen": 200 * step, "elapsed_s": step / 2})
        if step % 25 == 0:
            run.append_metric({"step": step, "eval_loss": 5.0 / step, "eval_tokens": 80, "tokens_seen": 200 * step,
                               "elapsed_s": step / 2})
    for step in (0, 25, 50):
        run.append_samples([
            {"step": step, "input": "What is Finetune Studio?", "output": f"studio answer at {step}",
             "time": 0.0, "kind": "prompt", "reference": None},
            {"step": step, "input": "How do I run the tests?", "output": f"tests answer at {step}",
             "time": 0.0, "kind": "heldout", "reference": "Run make test."}])
    run.write_eval("iter_50-ftstudio_qa", {
        "model": f"{name}/iter_50.pth", "step": 50, "tasks": {"ftstudio_qa": {"exact_match": 0.75,
                                                                              "exact_match_stderr": 0.25}},
        "lm_eval_version": "0.4.13", "created": "2026-01-02T03:06:00+0000", "limit": None, "backend": "hf"})
    return run


@pytest.fixture
def studio_ctx(tmp_path):
    from studio.context import StudioContext

    ctx = StudioContext(tmp_path / "work")
    return ctx, fabricated_run(ctx.work_dir)


def test_curves_eval_loss_smoothing_log_scale_and_x_axis(studio_ctx):
    from studio import runs_tab as rt

    ctx, run = studio_ctx
    loss = rt.curves([run])["loss"]
    assert list(loss.columns) == ["step", "loss", "run", "curve"]
    train, evals = loss[loss.curve == "fab-run · train"], loss[loss.curve == "fab-run · eval"]
    assert len(train) == 50 and list(evals.step) == [25, 50] and list(evals.loss) == [0.2, 0.1]
    assert set(loss.run) == {"fab-run"}  # the run's name stays the third column (API callers read it)
    by_tokens = rt.curves([run], x="tokens")["loss"]
    assert by_tokens.columns[0] == "tokens seen" and list(by_tokens[by_tokens.curve.str.endswith("eval")].iloc[:, 0]) \
        == [5000, 10000]
    assert rt.curves([run], x="time")["lr"].columns[0] == "time (s)"
    smooth = rt.curves([run], smooth=0.9)["loss"]
    assert smooth.loss.iloc[0] == pytest.approx(3.0)  # debiased: the first point is not pulled towards 0
    assert smooth.loss.iloc[10] > train.loss.iloc[10]  # a falling curve smoothed lags behind it
    assert list(smooth[smooth.curve.str.endswith("eval")].loss) == [0.2, 0.1]  # eval points as they are
    logged = rt.curves([run], log=True)["loss"]
    assert logged.loss.iloc[0] == pytest.approx(0.47712, abs=1e-4)
    assert rt.plot_options("bogus", "nan", 1) == {"x": "steps", "smooth": 0.0, "log": True}
    upd = rt.plot_update(logged, "loss", "Loss", rt.plot_options("tokens", 0, True))
    assert upd["x"] == "tokens seen" and upd["y_title"] == "log10 loss"


def test_comparison_grid_prompts_by_steps_with_references(studio_ctx):
    from studio import runs_tab as rt

    _, run = studio_ctx
    grid = rt.comparison_grid(run.samples())
    assert list(grid.columns) == ["prompt", "kind", "reference", "base", "step 25", "step 50"]
    rows = {r[0]: r for r in grid.values.tolist()}
    assert rows["How do I run the tests?"][1:4] == ["heldout", "Run make test.", "tests answer at 0"]
    assert rows["What is Finetune Studio?"][-1] == "studio answer at 50" and rows["What is Finetune Studio?"][2] == ""
    # older rows (no kind, no reference) and a step written twice (a resume): the last answer shows
    old = rt.comparison_grid([{"step": 0, "input": "q", "output": "a"}, {"step": 5, "input": "q", "output": "b"},
                              {"step": 5, "input": "q", "output": "c"}])
    assert old.values.tolist() == [["q", "a", "c"]] and list(old.columns) == ["prompt", "base", "step 5"]
    picked = rt.grid_steps(list(range(0, 1001, 10)), most=5)
    assert picked[0] == 0 and picked[-1] == 1000 and len(picked) == 5


def test_results_table_evaluate_panel_and_trackers(studio_ctx, tmp_path):
    from studio import runs_tab as rt

    ctx, run = studio_ctx
    run.write_eval("base-ftstudio_qa", {"model": "demo", "step": 0, "tasks": {"ftstudio_qa": {"exact_match": 0.0}},
                                        "backend": "hf"})
    table = rt.evals_frame(run)
    assert table.values.tolist() == [["base", "0.0000"], ["step 50", "0.7500"]]
    assert list(table.columns) == ["checkpoint", "ftstudio_qa exact_match"]
    assert rt.eval_choices(run) == ["base"]  # no checkpoint files in a hand-written run
    assert rt.eval_spec(ctx, run, "base") == "demo"
    msg, _ = rt.do_evaluate(ctx, ["fab-run"], "../../etc/passwd", ["ftstudio_qa"], None, "")
    assert "no such checkpoint" in msg
    msg, _ = rt.do_evaluate(ctx, ["../fab-run"], "base", ["ftstudio_qa"], None, "")
    assert msg == "Select a run first."
    msg, _ = rt.do_evaluate(ctx, ["fab-run"], "base", ["ftstudio_qa"], 2.5, "")
    assert "limit 2.5" in msg
    msg, _ = rt.do_evaluate(ctx, ["fab-run"], "base", ["ftstudio_qa"], 1, "/etc/hosts")
    assert "outside the folders this studio may read" in msg
    assert rt.parse_limit(0) is None and rt.parse_limit("3") == 3

    # the slow views: shown once, then skipped while nothing changed
    shown = {}
    first = rt.details_view(ctx, ["fab-run"], None, shown)
    assert first["eval_ckpt"]["value"] == "base" and len(first["grid"]) == 2 and len(first["benchmarks"]) == 2
    again = rt.details_view(ctx, ["fab-run"], "base", shown)
    assert all(v == rt.gr.skip() for v in again.values()), again
    fast = rt.refresh_view(ctx, ["fab-run"], {})
    assert fast["summary"].startswith("**fab-run** · finished · step 50/50")  # eval rows are not the last step
    assert len(fast["loss"]["value"]) == 52 and fast["loss"]["x"] == "step"

    assert "No trackers" in rt.trackers_md(run)
    tracked = fabricated_run(ctx.work_dir, "tracked", report_to=["tensorboard"])
    assert "tensorboard --logdir" in rt.trackers_md(tracked) and str(tracked.trackers_dir) in rt.trackers_md(tracked)
