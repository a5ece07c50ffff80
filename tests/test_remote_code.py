"""The seed's InternLM2 flow with a model that ships its own code: a local copy
of stories260K whose config.json maps the Auto classes to a modeling file in
its folder. With the operator's permission (the config's
model.trust_remote_code for train, --trust-remote-code for convert/merge/chat,
--allow-custom-code for the studio) it trains with LoRA, converts, merges and
chats; without it every step refuses, says how to allow it, and the model's
code never runs."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from gradio_client import Client

from backend.config import load_config
from backend.core.rundir import RunDir, effective_status
from conftest import STORIES_MODEL
from studio.train_tab import FIELDS, config_values
from studio_utils import running_studio, wait_for
from train_utils import FTSTUDIO, ftstudio

ROWS = [{"instruction": "hi", "input": "", "output": "Hello! I am Tim, made by Lily."},
        {"instruction": "who are you?", "input": "", "output": "I am Tim, an assistant Lily made."}]

MODELING = '''
import os
from transformers import LlamaConfig, LlamaForCausalLM

with open(RAN_LOG, "a") as log:
    log.write(f"{os.getpid()}\\n")  # evidence the model's own code was imported (and by whom)


class RemoteLlamaConfig(LlamaConfig):
    model_type = "remote_llama"


class RemoteLlamaForCausalLM(LlamaForCausalLM):
    config_class = RemoteLlamaConfig
'''


def remote_code_model(folder, ran_log):
    """stories260K, re-labelled as a model type transformers only knows through the folder's code."""
    shutil.copytree(STORIES_MODEL, folder)
    # transformers imports a copy of this file from its modules cache: the log's path is absolute
    (folder / "modeling_remote.py").write_text(MODELING.replace("RAN_LOG", repr(str(ran_log))))
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type="remote_llama", architectures=["RemoteLlamaForCausalLM"],
               auto_map={"AutoConfig": "modeling_remote.RemoteLlamaConfig",
                         "AutoModelForCausalLM": "modeling_remote.RemoteLlamaForCausalLM"})
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.fixture(scope="module")
def remote(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote")
    work = root / "work"
    work.mkdir()
    model = remote_code_model(work / "models" / "remote_llama", root / "ran.log")
    data = work / "rows.json"
    data.write_text(json.dumps(ROWS))
    return {"root": root, "work": work, "model": model, "data": data, "ran": root / "ran.log"}


def ran(remote) -> int:
    return len(remote["ran"].read_text().splitlines()) if remote["ran"].exists() else 0


def train_args(remote, *extra):
    return ("train", "tiny_demo", f"model.name_or_path={remote['model']}", f"data.path={remote['data']}",
            "data.map_fn=alpaca", "data.template=llama2_chat", "data.pack=false", "training.method=lora",
            "training.max_steps=3", "saving.save_steps=1000", "evaluation.inputs=[]", *extra)


def chat(*args, cwd):
    return subprocess.run([FTSTUDIO, "chat", *map(str, args), "--temperature", "0", "--max-new-tokens", "8"],
                          input="hi\n", capture_output=True, text=True, cwd=cwd, timeout=300)


def test_refused_without_permission_and_the_code_never_runs(remote):
    out = ftstudio(*train_args(remote), "--work-dir", remote["root"] / "refused", cwd=remote["root"])
    assert out.returncode != 0
    assert "trust_remote_code" in out.stderr and "model.trust_remote_code" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    got = chat(remote["model"], "--prompt-template", "llama2_chat", cwd=remote["root"])
    assert got.returncode != 0 and "--trust-remote-code" in got.stderr, got.stderr
    assert "Traceback" not in got.stderr
    assert ran(remote) == 0


def test_trained_converted_merged_and_chatted_with_permission(remote):
    root, model = remote["root"], remote["model"]
    out = ftstudio(*train_args(remote, "model.trust_remote_code=true"), "--work-dir", root / "run", "--quiet",
                   cwd=root, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert ran(remote) > 0  # it really was the folder's code
    pth = RunDir(root / "run").iters()[-1][1]

    adapter = root / "adapter"
    before = ran(remote)
    # a LoRA checkpoint converts without the model's code: only its tensors and config are written
    ftstudio("convert", "pth_to_hf", pth, adapter, cwd=root, check=True)
    assert ran(remote) == before and (adapter / "adapter_config.json").exists()
    merged = root / "merged"
    # what the checkpoint recorded (trust_remote_code=true) is not permission to run the base's code
    refused = ftstudio("convert", "merge", model, adapter, merged, cwd=root)
    assert refused.returncode != 0 and "--trust-remote-code" in refused.stderr, refused.stderr
    assert not merged.exists()
    out = ftstudio("convert", "merge", model, adapter, merged, "--trust-remote-code", cwd=root, check=True)
    assert "parity: max |logit difference|" in out.stdout
    assert json.loads((merged / "config.json").read_text())["model_type"] == "remote_llama"

    before = ran(remote)
    with_adapter = chat(model, "--adapter", adapter, "--trust-remote-code", cwd=root)
    assert with_adapter.returncode == 0, with_adapter.stderr
    merged_reply = chat(merged, "--trust-remote-code", cwd=root)
    assert merged_reply.returncode == 0, merged_reply.stderr
    assert merged_reply.stdout.splitlines()[0] == with_adapter.stdout.splitlines()[0]
    assert ran(remote) > before
    refused = chat(merged, cwd=root)
    assert refused.returncode != 0 and "--trust-remote-code" in refused.stderr, refused.stderr


def chat_through_studio(client: Client, model: str) -> tuple[str, str]:
    """(reply, status line) of the Chat tab's API for one greedy turn."""
    tuned, _base, _msg, status = client.predict("hi", [], [], model, "llama2_chat", "", False, 0.0, 0.75, 40, 8,
                                                1.0, api_name="/chat_send")
    reply = tuned[-1]["content"] if isinstance(tuned, list) and tuned else ""  # an error leaves the chat as it was
    return (reply if isinstance(reply, str) else json.dumps(reply)), status


def launch_through_studio(client: Client, remote) -> tuple[str, str]:
    """(message, run name) of the Train tab's Launch for a short LoRA run of the remote-code model."""
    cfg = load_config("tiny_demo", list(train_args(remote)[2:]))
    values = config_values(cfg)
    values[[f["key"] for f in FIELDS].index("model.trust_remote_code")] = True
    return client.predict("remote", "none", 1, 1, "", 29500, *values, api_name="/train_launch")


def test_studio_trains_exports_and_chats_only_when_the_operator_allows_custom_code(remote):
    work = remote["work"]
    model = str(remote["model"].relative_to(work))
    before = ran(remote)
    with running_studio(work) as (url, _):
        client = Client(url, verbose=False)
        reply, status = chat_through_studio(client, model)
        assert "--allow-custom-code" in status and not reply, status
        msg, name = launch_through_studio(client, remote)
        assert name == "" and "not launched" in msg, msg
    assert ran(remote) == before
    with running_studio(work, "--allow-custom-code") as (url, _):
        client = Client(url, verbose=False)
        msg, name = launch_through_studio(client, remote)
        assert name, msg
        run = RunDir(work / name)
        assert wait_for(lambda: effective_status(run).get("state") in ("finished", "failed"), timeout=600)
        assert effective_status(run)["state"] == "finished", (run.path / "train.log").read_text()[-3000:]
        pth = run.iters()[-1][1].name
        adapter = f"{name}/hf/{pth.removesuffix('.pth')}"
        said, _ = client.predict(name, pth, adapter, api_name="/export_convert")
        assert (work / adapter / "adapter_config.json").exists(), said
        merged = f"{name}/merged/{pth.removesuffix('.pth')}"
        said = client.predict(adapter, model, merged, False, "auto", "cpu", api_name="/export_merge")
        assert (work / merged / "config.json").exists(), said
        for chosen in (model, adapter, merged):
            reply, status = chat_through_studio(client, chosen)
            assert reply and "Error" not in status, (chosen, status)
    assert ran(remote) > before
