"""Roles are enforced in the backend handlers, not by hiding buttons: a studio
with an --auth-file of an admin, two trainers and a viewer, called as each of
them straight through its API (gradio_client, and raw HTTP with Gradio's login
cookie). A viewer may read but not launch, save, upload, export, evaluate,
share, abort, resume or unload the chat models; a trainer may launch and control only their own runs;
an admin may control anyone's. Runs record who started them."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
from gradio_client import Client

from backend.config import load_config
from backend.core.guard import Guard, GuardError, User
from backend.core.rundir import RunDir, effective_status
from studio.context import StudioContext, parse_role_line
from studio.train_tab import config_values

from studio_utils import running_studio, wait_for

LOGINS = {"ada": ("ada-pass", "admin"), "tim": ("tim-pass", "trainer"), "tess": ("tess-pass", "trainer"),
          "vic": ("vic-pass", "viewer")}
REFUSED = "may not"
# the Train tab's placement inputs after the config's (raw HTTP gets no defaults): devices, where, Slurm's fields
HERE = [[], "this machine", "", 1, 0, 0, "", "", ""]


# --- units: the guard and the auth file --------------------------------------------------


def test_role_lines_parse_and_default_to_admin():
    assert parse_role_line("ada:secret") == ("ada", "secret", "admin")
    assert parse_role_line("vic:se:cret:viewer") == ("vic", "se:cret", "viewer")
    assert parse_role_line("tim:pass:trainer") == ("tim", "pass", "trainer")
    assert parse_role_line("odd:pass:wizard") == ("odd", "pass:wizard", "admin")  # not a role: part of the password
    for bad in ("nopassword", ":pass", "user:"):
        with pytest.raises(ValueError, match="USER:PASSWORD"):
            parse_role_line(bad)


def test_guard_requires_the_role_and_ownership(tmp_path):
    guard = Guard(tmp_path)
    run = RunDir(tmp_path / "r1")
    run.path.mkdir()
    run.write_status(state="finished", user="tim")
    guard.require(User("tim", "trainer"), "control", run)
    guard.require(User("ada", "admin"), "control", run)
    with pytest.raises(GuardError, match="started by tim"):
        guard.require(User("tess", "trainer"), "control", run)
    for action in ("launch", "write", "control", "share"):
        with pytest.raises(GuardError, match="a viewer may not"):
            guard.require(User("vic", "viewer"), action, run)
    guard.require(User("vic", "viewer"), "read")
    with pytest.raises(GuardError, match="role 'root'"):
        User("x", "root")


def test_a_studio_with_logins_refuses_calls_without_one(tmp_path):
    ctx = StudioContext(tmp_path, roles={"vic": "viewer"})
    with pytest.raises(GuardError, match="not logged in"):
        ctx.user_of(None)
    assert StudioContext(tmp_path / "open").user_of(None).role == "admin"  # no logins: the operator's own studio


# --- through the API -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def studio(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("roles")
    work = root / "work"
    work.mkdir()
    auth = root / "logins.txt"
    auth.write_text("# user:password:role\n" + "".join(f"{u}:{p}:{r}\n" for u, (p, r) in LOGINS.items()))
    with running_studio(work, "--auth-file", str(auth)) as (url, _):
        yield {"url": url, "work": work, "clients": {}}


def client(studio, user: str) -> Client:
    if user not in studio["clients"]:
        studio["clients"][user] = Client(studio["url"], auth=(user, LOGINS[user][0]), verbose=False)
    return studio["clients"][user]


def launch_args(name: str, steps: int = 20) -> list:
    cfg = load_config("tiny_demo", [f"training.max_steps={steps}", "saving.save_steps=10", "evaluation.inputs=[]"])
    return [name, "none", 1, 1, "", 29500, *config_values(cfg)]


def raw_call(studio, user: str, api_name: str, data: list) -> list:
    """One endpoint over plain HTTP with Gradio's login cookie: what a script of a logged-in user sends."""
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
    form = f"username={user}&password={LOGINS[user][0]}".encode()
    opener.open(urllib.request.Request(studio["url"] + "login", data=form), timeout=30)
    body = json.dumps({"data": data}).encode()
    started = opener.open(urllib.request.Request(studio["url"] + f"gradio_api/call/{api_name}", data=body,
                                                 headers={"Content-Type": "application/json"}), timeout=60)
    event = json.load(started)["event_id"]
    with opener.open(studio["url"] + f"gradio_api/call/{api_name}/{event}", timeout=600) as stream:
        kind = None
        for line in stream:
            line = line.decode().strip()
            if line.startswith("event:"):
                kind = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and kind in ("complete", "error"):
                return json.loads(line[5:]) if kind == "complete" else ["error", line[5:]]
    raise AssertionError(f"{api_name}: no answer")


def runs_in(work: Path) -> set[str]:
    return {p.name for p in work.iterdir() if (p / "status.json").exists()}


def test_a_viewer_cannot_launch_or_write_even_by_raw_http(studio):
    before = runs_in(studio["work"])
    said, name = raw_call(studio, "vic", "train_launch", launch_args("by-viewer") + HERE)
    assert REFUSED in said and "viewer" in said and not name, said
    said, *_ = raw_call(studio, "vic", "train_save", [launch_args("by-viewer")[0], *launch_args("x")[6:]])
    assert REFUSED in said, said
    assert not (studio["work"] / "configs" / "by-viewer.yaml").exists()
    status, *_ = client(studio, "vic").predict("demo", "never", "", None, "", api_name="/share_create")
    assert REFUSED in status, status
    assert runs_in(studio["work"]) == before
    # unloading the chat models frees them for everyone: a viewer may not, a trainer may
    (said,) = raw_call(studio, "vic", "chat_unload", [])
    assert REFUSED in said and "viewer" in said, said
    said = client(studio, "tess").predict(api_name="/chat_unload")
    assert said.startswith(("No chat model is loaded", "Unloaded ")), said


def test_trainers_control_only_their_own_runs_admins_any(studio):
    said, name = client(studio, "tim").predict(*launch_args("tims-run"), api_name="/train_launch")
    assert name, said
    run = RunDir(studio["work"] / name)
    assert wait_for(lambda: effective_status(run).get("state") == "finished", timeout=600), \
        (run.path / "launcher.log").read_text()[-2000:]
    assert run.status()["user"] == "tim"
    for user in ("vic", "tess"):  # a viewer; another trainer
        for api in ("runs_abort", "runs_resume"):
            said = raw_call(studio, user, api, [[name]])[0]
            assert "**Error:**" in said and (REFUSED in said or "started by tim" in said), (user, api, said)
    said, _ = raw_call(studio, "vic", "runs_evaluate", [[name], None, ["ftstudio_qa"], 1, ""])
    assert REFUSED in said, said
    assert client(studio, "tim").predict([name], api_name="/runs_resume").endswith("has finished; nothing to resume.")
    assert client(studio, "ada").predict([name], api_name="/runs_abort").endswith("is not running (finished)")
    table = client(studio, "vic").predict([name], {}, api_name="/runs_refresh")[0]  # reading is for everyone
    row = next(r for r in table["data"] if r[0] == name)
    assert "tim" in row, table
