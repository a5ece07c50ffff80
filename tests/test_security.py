"""The studio attacked through its own API, as anyone logged in (or holding a
link) can: gradio_client and raw HTTP straight at the endpoints, with the
arguments the UI would never send. A studio started WITHOUT --allow-custom-code.

Asserted after every attack: nothing outside the studio's roots was read (the
secret's text never comes back), written (the outside folder is unchanged) or
signalled (an unrelated process lives on), and no foreign code ran (the
canary file the payloads would create does not exist).
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
import urllib.request
from pathlib import Path

import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from backend.config import load_config
from backend.core import procs
from backend.core.artifacts import ITER_FORMAT, iter_name
from backend.core.rundir import RunDir, effective_status
from studio.train_tab import config_values

from studio_utils import running_studio, wait_for

SECRET = "TOP-SECRET-" + uuid.uuid4().hex


class Payload:
    """Pickled, it runs code on load: what a malicious .pth carries."""

    def __init__(self, canary: Path):
        self.canary = str(canary)

    def __reduce__(self):
        return (exec, (f"open({self.canary!r}, 'w').write('pwned')",))


def evil_model_folder(folder: Path, canary: Path) -> Path:
    """A model folder whose config asks transformers to import its own code (which drops the canary)."""
    folder.mkdir(parents=True, exist_ok=True)
    code = f"open({str(canary)!r}, 'w').write('pwned')\nfrom transformers import LlamaConfig as EvilConfig\n"
    (folder / "configuration_evil.py").write_text(code)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "evil", "auto_map": {"AutoConfig": "configuration_evil.EvilConfig",
                                            "AutoModelForCausalLM": "configuration_evil.EvilConfig"},
        "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1}))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "auto_map": {"AutoTokenizer": ["configuration_evil.EvilConfig", None]}, "tokenizer_class": "EvilTokenizer"}))
    return folder


def crafted_iter(path: Path, model_path: str, kind: str = "full") -> Path:
    """A well-formed iter file whose metadata asks for remote code and names ``model_path``."""
    cfg = load_config("tiny_demo", [f"model.name_or_path={model_path}", "model.trust_remote_code=true",
                                    f"training.method={kind}"]).to_dict()
    state = {"model.embed_tokens.weight": torch.zeros(64, 16)} if kind == "full" else \
        {"base_model.model.layers.0.q_proj.lora_A.weight": torch.zeros(4, 16),
         "base_model.model.layers.0.q_proj.lora_B.weight": torch.zeros(16, 4)}
    meta = {"kind": kind, "config": cfg, "lora": {"r": 4}, "template": {"name": "qwen_chat"}}
    torch.save({"format": ITER_FORMAT, "meta": meta, "state_dict": state}, path)
    return path


@pytest.fixture(scope="module")
def attack(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("attack")
    outside = root / "outside"
    outside.mkdir()
    (outside / "secret.jsonl").write_text(json.dumps({"instruction": SECRET, "input": "", "output": SECRET}) + "\n")
    (outside / "config.yaml").write_text(f"name: {SECRET}\n")
    canary = root / "canary"
    evil_model_folder(outside / "evil_model", canary)
    work = root / "work"
    work.mkdir()
    (work / "link_out").symlink_to(outside)  # a link some user made inside the work dir
    (work / "secret_link.jsonl").symlink_to(outside / "secret.jsonl")
    evil_model_folder(work / "evil_model", canary)  # inside the roots: readable, but its code must not run
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"], start_new_session=True)
    with running_studio(work) as (url, _):
        client = Client(url, verbose=False)
        run_name = launch_short_run(client, work)
        yield {"client": client, "url": url, "work": work, "outside": outside, "canary": canary, "run": run_name,
               "sleeper": sleeper, "snapshot": snapshot(outside)}
    sleeper.kill()


def launch_short_run(client: Client, work: Path) -> str:
    cfg = load_config("tiny_demo", ["training.max_steps=20", "saving.save_steps=10", "evaluation.inputs=[]"])
    msg, name = client.predict("victim", "none", 1, 1, "", 29500, *config_values(cfg), api_name="/train_launch")
    assert name, msg
    assert wait_for(lambda: effective_status(RunDir(work / name)).get("state") == "finished", timeout=600), \
        (work / name / "launcher.log").read_text()[-2000:]
    return name


def snapshot(folder: Path) -> dict:
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*")}


def assert_unharmed(attack, *responses):
    text = json.dumps(responses, default=str)
    assert SECRET not in text, "a secret from outside the roots came back"
    assert snapshot(attack["outside"]) == attack["snapshot"], "something outside the roots changed"
    assert not attack["canary"].exists(), "foreign code ran in the studio"
    assert attack["sleeper"].poll() is None, "an unrelated process was signalled"


def predict(client: Client, *args, api_name: str):
    """The endpoint's answer, or Gradio's own refusal of an argument (a choice not offered, a bad file) as text."""
    try:
        return client.predict(*args, api_name=api_name)
    except AppError as exc:
        return f"refused by Gradio: {exc}"


def upload(attack, path: Path, api_name="/on_upload") -> str:
    return attack["client"].predict(handle_file(str(path)), api_name=api_name)


def raw_call(url: str, fn_index: int, data: list) -> dict:
    """One event by fn_index over plain HTTP (what a browser, or an attacker, sends)."""
    session = uuid.uuid4().hex
    body = json.dumps({"data": data, "fn_index": fn_index, "session_hash": session, "event_data": None,
                       "trigger_id": None}).encode()
    urllib.request.urlopen(urllib.request.Request(url + "gradio_api/queue/join", data=body,
                                                  headers={"Content-Type": "application/json"}), timeout=30)
    with urllib.request.urlopen(url + f"gradio_api/queue/data?session_hash={session}", timeout=300) as stream:
        for line in stream:
            if line.startswith(b"data:"):
                msg = json.loads(line[5:])
                if msg.get("msg") == "process_completed":
                    return msg
    raise AssertionError("no answer")


# --- paths ------------------------------------------------------------------------------


def outside_paths(attack) -> list[str]:
    work, outside = attack["work"], attack["outside"]
    return [str(outside / "secret.jsonl"), "../outside/secret.jsonl", str(work / ".." / "outside" / "secret.jsonl"),
            "link_out/secret.jsonl", str(work / "link_out" / "secret.jsonl"), "secret_link.jsonl", "/etc/passwd"]


def test_dataset_endpoints_refuse_paths_outside_the_roots(attack):
    client = attack["client"]
    for path in outside_paths(attack):
        *_, status = client.predict(path, "", "train", api_name="/dataset_load")
        assert "outside the folders" in status, (path, status)
        spans, stats, _ = client.predict(path, "", "train", "alpaca", "demo", "qwen_chat", 64, 0,
                                         api_name="/dataset_render")
        assert "outside the folders" in stats, (path, stats)
        for name in ("/fn", "/fn_1", "/fn_2"):  # page buttons: same dataset argument
            out = client.predict(path, "", "train", 1, "alpaca", api_name=name)
            assert_unharmed(attack, out)
        assert_unharmed(attack, status, spans, stats)
    # the tokenizer argument is a path too
    _, stats, _ = client.predict("demo", "", "train", "openai", str(attack["outside"] / "evil_model"), "qwen_chat",
                                 64, 0, api_name="/dataset_render")
    assert "outside the folders" in stats
    _, stats, _ = client.predict("demo", "", "train", "openai", "evil_model", "qwen_chat", 64, 0,
                                 api_name="/dataset_render")
    assert_unharmed(attack, stats)  # readable, but its tokenizer code does not run


def test_train_endpoints_refuse_outside_paths_and_code(attack):
    client = attack["client"]
    base = load_config("tiny_demo", ["training.max_steps=2", "evaluation.inputs=[]"])
    fields = [f"data.path={p}" for p in outside_paths(attack)] + [
        f"model.name_or_path={attack['outside'] / 'evil_model'}", f"model.tokenizer={attack['outside']}",
        f"data.data_files=['{attack['outside'] / 'secret.jsonl'}']", "data.data_files=['../outside/secret.jsonl']",
        "data.map_fn=os:system", f"data.map_fn={attack['outside'] / 'x.py'}:fn", "model.trust_remote_code=true",
    ]
    for override in fields:
        key, _, value = override.partition("=")
        values = config_values(base)
        from studio.train_tab import FIELDS
        values[[f["key"] for f in FIELDS].index(key)] = value if key != "model.trust_remote_code" else True
        msg, name = client.predict("probe", "none", 1, 1, "", 29500, *values, api_name="/train_launch")
        assert name == "" and "not launched" in msg, (override, msg)
        saved = client.predict("probe", *values, api_name="/train_save")
        assert "not saved" in saved[0], (override, saved)
        assert_unharmed(attack, msg, saved)
    for choice in (str(attack["outside"] / "config.yaml"), "../outside/config.yaml", "/etc/passwd"):
        out = predict(client, choice, api_name="/on_recipe")
        refusal = out if isinstance(out, str) else out[0]
        assert "outside the folders" in refusal or "not in the list of choices" in refusal, refusal
        assert_unharmed(attack, out)
    # launch-shape fields: a foreign DeepSpeed file, nonsense numbers
    for shape in (("/etc/passwd", 1, 1, "", 29500), ("none", 1, 2, "x; rm -rf /", 29500), ("none", 1, 2, "h", 99999)):
        out = predict(client, "probe", *shape, *config_values(base), api_name="/train_launch")
        assert isinstance(out, str) and "not in the list of choices" in out or out[1] == "" and "not launched" in out[0], \
            (shape, out)


def test_run_endpoints_only_take_runs_of_this_studio(attack):
    client = attack["client"]
    names = ["..", "../outside", str(attack["outside"]), "/", "link_out", "uploads", ".", "configs"]
    for name in names:
        table, *plots, summary, log, samples = client.predict([name], api_name="/runs_refresh")
        assert summary in ("Select a run.", {"__type__": "update"}), (name, summary)  # update: unchanged, skipped
        assert client.predict([name], api_name="/runs_abort") == "Select a run first."
        assert client.predict([name], api_name="/runs_resume") == "Select a run first."
        waited = client.predict(name, api_name="/wait_start")
        checkpoints = client.predict(name, api_name="/on_run")
        assert not (checkpoints or {}).get("choices") if isinstance(checkpoints, dict) else not checkpoints
        assert_unharmed(attack, table, plots, summary, log, samples, waited, checkpoints)
    assert client.predict([attack["run"]], api_name="/runs_abort").endswith("is not running (finished)")


# --- forged files -----------------------------------------------------------------------


def test_forged_status_file_is_not_a_run_and_signals_nothing(attack, tmp_path):
    client, work, sleeper = attack["client"], attack["work"], attack["sleeper"]
    record = procs.capture(sleeper.pid).to_dict()
    forged = tmp_path / "status.json"
    forged.write_text(json.dumps({"state": "running", "pid": sleeper.pid, "pgid": sleeper.pid, "host": procs.hostname(),
                                  "launcher": record, "workers": record, "started": "2099-01-01"}))
    path = upload(attack, forged)
    assert Path(path).parent == work / "uploads"
    table, *_ = Client(attack["url"], verbose=False).predict(["uploads"], api_name="/runs_refresh")  # a fresh view
    assert "uploads" not in [row[0] for row in table["data"]] and attack["run"] in [row[0] for row in table["data"]]
    said = client.predict(["uploads"], api_name="/runs_abort")
    assert said == "Select a run first."
    # Launch is not blocked by it
    cfg = load_config("tiny_demo", ["training.max_steps=2", "evaluation.inputs=[]"])
    msg, name = client.predict("after-forgery", "none", 1, 1, "", 29500, *config_values(cfg), api_name="/train_launch")
    assert name.startswith("after-forgery-"), msg
    assert wait_for(lambda: effective_status(RunDir(work / name)).get("state") in ("finished", "failed"), timeout=300)
    assert effective_status(RunDir(work / name))["state"] == "finished"
    # the same record in a run-shaped folder (as a shell user could leave one): not ours, so not alive,
    # never signalled, and it blocks no launch
    fake = RunDir(work / "forged-run")
    fake.path.mkdir()
    (fake.path / "status.json").write_text(json.dumps({"state": "queued", "launcher": record, "workers": record,
                                                       "host": procs.hostname(), "started": "2099-01-01"}))
    assert effective_status(fake)["state"] == "failed"
    said = client.predict(["forged-run"], api_name="/runs_abort")
    assert "not running" in said, said
    assert_unharmed(attack, table, said)


def test_crafted_checkpoints_run_no_code(attack, tmp_path):
    client, work, run = attack["client"], attack["work"], attack["run"]
    pickled = tmp_path / "iter_1.pth"
    torch.save({"format": ITER_FORMAT, "meta": {"kind": "full"}, "state_dict": Payload(attack["canary"])}, pickled)
    refused = predict(client, handle_file(str(pickled)), api_name="/on_upload")
    assert "Invalid file type" in refused, refused  # Gradio's own filter; the guard must not rely on it:
    uploaded = work / "uploads" / pickled.name  # as if an upload had kept the name
    uploaded.write_bytes(pickled.read_bytes())
    for run_arg, ckpt in (("uploads", "iter_1.pth"), ("../work/uploads", "iter_1.pth"), (str(work / "uploads"), "iter_1.pth"),
                          (run, "../uploads/iter_1.pth"), (run, str(uploaded))):
        msg, _ = client.predict(run_arg, ckpt, str(work / "out"), False, api_name="/export_convert")
        assert "Error" in msg, (run_arg, ckpt, msg)
        assert_unharmed(attack, msg)
    reply = client.predict("hi", [], [], "uploads/iter_1.pth", "(as trained)", "", False, 0.0, 0.75, 40, 8, 1.0,
                           api_name="/chat_send")
    assert "Error" in reply[-1]
    assert_unharmed(attack, reply)

    # a well-formed checkpoint that names a model with its own code, inside a real run folder
    # (as if copied there by someone at a shell): data, not permission
    victim = RunDir(work / run)
    for model, kind in ((str(work / "evil_model"), "full"), (str(work / "evil_model"), "lora"),
                        (str(attack["outside"] / "evil_model"), "full")):
        crafted_iter(victim.path / iter_name(7), model, kind)
        msg, _ = client.predict(run, iter_name(7), str(work / run / "hf" / f"evil-{kind}"), False,
                                api_name="/export_convert")
        assert "Error" in msg, msg
        assert "--allow-custom-code" in msg or "outside the folders" in msg or "cannot be loaded" in msg, msg
        reply = client.predict("hi", [], [], f"{run}/{iter_name(7)}", "(as trained)", "", False, 0.0, 0.75, 40, 8, 1.0,
                               api_name="/chat_send")
        assert_unharmed(attack, msg, reply)
        (victim.path / iter_name(7)).unlink()
    # the same model named directly in Chat and Export's merge
    reply = client.predict("hi", [], [], "evil_model", "qwen_chat", "", False, 0.0, 0.75, 40, 8, 1.0,
                           api_name="/chat_send")
    assert "Error" in reply[-1] and "--allow-custom-code" in reply[-1], reply[-1]
    msg = client.predict(str(work / "evil_model"), "evil_model", str(work / "m"), False, api_name="/export_merge")
    assert "Error" in msg
    assert_unharmed(attack, reply, msg)


def test_uploads_cannot_name_files_outside_the_upload_cache(attack):
    for index in ("on_upload", "on_upload_1"):
        fn_index = next(d["id"] for d in json.load(urllib.request.urlopen(attack["url"] + "config"))["dependencies"]
                        if d.get("api_name") == index)
        for payload in ({"path": str(attack["outside"] / "secret.jsonl"), "meta": {"_type": "gradio.FileData"}},
                        str(attack["outside"] / "secret.jsonl")):
            msg = raw_call(attack["url"], fn_index, [payload])
            assert not msg.get("success"), msg
    assert not any(SECRET in p.read_text(errors="replace") for p in (attack["work"] / "uploads").glob("*"))
    assert_unharmed(attack)


# --- writes -----------------------------------------------------------------------------


def test_exports_never_replace_what_they_did_not_write(attack):
    client, work, run = attack["client"], attack["work"], attack["run"]
    victim = RunDir(work / run)
    before = snapshot(victim.path)
    pth = victim.iters()[-1][1].name
    targets = [str(work), ".", "", str(victim.path), run, f"{run}/checkpoints", f"{run}/{pth}", "uploads/x",
               "configs", str(attack["outside"] / "x"), "../outside/x", "link_out/x", str(work / "link_out")]
    for target in targets:
        msg, _ = client.predict(run, pth, target, True, api_name="/export_convert")
        assert "Error" in msg, (target, msg)
        msg = client.predict(str(work / run / "hf" / "none"), "demo", target, True, api_name="/export_merge")
        assert "Error" in msg, (target, msg)
    assert snapshot(victim.path) == before, "an export touched the run it was aimed at"
    # our own earlier export: refused without Overwrite, replaced with it
    out = f"{run}/hf/mine"
    assert client.predict(run, pth, out, False, api_name="/export_convert")[0].startswith("OK")
    again, _ = client.predict(run, pth, out, False, api_name="/export_convert")
    assert "already holds" in again and "Overwrite" in again
    assert client.predict(run, pth, out, True, api_name="/export_convert")[0].startswith("OK")
    # a folder of someone else's files is never replaced, Overwrite or not
    theirs = work / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep me")
    msg, _ = client.predict(run, pth, str(theirs), True, api_name="/export_convert")
    assert "not written by Finetune Studio" in msg and (theirs / "notes.txt").read_text() == "keep me"
    assert_unharmed(attack, msg)
