"""``ftstudio serve --engine vllm``: the same OpenAI-style API, served by vLLM on a GPU box.

The built-in engine (transformers, one generation per slot) is right for a
laptop or a CPU box. On a GPU, vLLM's continuous batching and paged KV cache
serve many clients at once; we only build its command line and start it:

- the base model, named ``served_name`` (``--served-model-name``);
- each LoRA adapter under its own id (``--enable-lora --lora-modules``, JSON
  entries so a path may hold any character), ``--max-loras`` = their number
  so one batch can mix them, and ``--max-lora-rank`` = the smallest value
  vLLM accepts that covers every adapter's rank (vLLM refuses an adapter
  whose rank is above it; its default is 16);
- the chat template the model was trained with (``--chat-template``, a file
  written from the exported tokenizer), so vLLM prompts it in that format;
- the API key through the ``VLLM_API_KEY`` environment variable, never the
  argument list, so it does not show in ``ps`` or shell history.

Only the argument list is tested here (vLLM needs a GPU); ``run_vllm`` is the
thin part that starts it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from backend.core.artifacts import ADAPTER_CONFIG, TOKENIZER_CONFIG
from backend.core.atomic import write_text
from backend.launch import LaunchError

# the values vLLM's LoRAConfig.max_lora_rank accepts (a closed set), and its default
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_LORA_RANK = 16
CHAT_TEMPLATE_FILE = "chat_template.jinja"
NOT_INSTALLED = "vllm is not installed here: pip install vllm on a GPU box (or use --engine transformers)"


class VllmError(LaunchError):
    """The vLLM command cannot be built or started; the message says why and what to do."""


def lora_rank_of(adapter_dir: str | os.PathLike) -> int:
    """The largest LoRA rank in one peft adapter folder (``r``, and any per-module ``rank_pattern``)."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise VllmError(f"{adapter_dir}: no {ADAPTER_CONFIG}; give an exported LoRA adapter folder") from None
    except (OSError, ValueError) as e:
        raise VllmError(f"{path}: cannot read it ({e})") from None
    ranks = [config.get("r"), *(config.get("rank_pattern") or {}).values()]
    ranks = [r for r in ranks if isinstance(r, int) and not isinstance(r, bool)]
    if not ranks:
        raise VllmError(f"{path}: no LoRA rank 'r' in it; vLLM serves LoRA adapters only")
    return max(ranks)


def max_lora_rank_of(adapters: dict[str, str]) -> int | None:
    """The largest rank over all adapters (None without adapters)."""
    return max((lora_rank_of(path) for path in adapters.values()), default=None)


def vllm_lora_rank(rank: int) -> int:
    """The smallest ``--max-lora-rank`` vLLM accepts that holds ``rank``."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise VllmError(f"LoRA rank {rank} is above the largest vLLM serves ({VLLM_LORA_RANKS[-1]}); "
                    "merge the adapter (ftstudio merge) and serve the merged folder")


def _max_lora_rank_arg(adapters: dict[str, str], wanted: int | None) -> int:
    needed = max_lora_rank_of(adapters)
    if wanted is None:
        return vllm_lora_rank(needed)
    if wanted not in VLLM_LORA_RANKS:
        raise VllmError(f"--max-lora-rank {wanted}: vLLM accepts {', '.join(map(str, VLLM_LORA_RANKS))}")
    if wanted < needed:
        worst = max(adapters, key=lambda name: lora_rank_of(adapters[name]))
        raise VllmError(f"adapter {worst} has LoRA rank {needed}, above --max-lora-rank {wanted}; "
                        f"use {vllm_lora_rank(needed)} or more")
    return wanted


def vllm_serve_command(base: str, adapters: dict[str, str], *, host: str, port: int, served_name: str,
                       chat_template: str | os.PathLike | None = None, max_lora_rank: int | None = None,
                       extra_args: Sequence[str] = ()) -> list[str]:
    """The argument list of ``vllm serve`` for ``base`` (served as ``served_name``) and its
    LoRA ``adapters`` ({id: folder}); the API key is not in it (see ``run_vllm``)."""
    if not str(base or "").strip():
        raise VllmError("give the base model to serve")
    for name in (served_name, *adapters):
        if not str(name or "").strip() or any(c.isspace() for c in str(name)):
            raise VllmError(f"model id {name!r}: give a name without spaces")
    if len({served_name, *adapters}) != len(adapters) + 1:
        raise VllmError(f"model ids must differ: {served_name} and {', '.join(adapters)}")
    cmd = ["vllm", "serve", str(base), "--host", str(host), "--port", str(int(port)),
           "--served-model-name", str(served_name)]
    if chat_template is not None:
        cmd += ["--chat-template", str(chat_template)]
    if adapters:
        modules = [json.dumps({"name": name, "path": str(path), "base_model_name": str(served_name)})
                   for name, path in adapters.items()]
        cmd += ["--enable-lora", "--max-loras", str(len(adapters)),
                "--max-lora-rank", str(_max_lora_rank_arg(adapters, max_lora_rank)), "--lora-modules", *modules]
    return cmd + [str(a) for a in extra_args]


def _tokenizer_chat_template(tokenizer_dir: Path) -> str | None:
    """The chat template a saved tokenizer carries: transformers 5's ``chat_template.jinja``,
    else ``tokenizer_config.json``'s ``chat_template`` (a string, or named templates)."""
    jinja = tokenizer_dir / CHAT_TEMPLATE_FILE
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config_file = tokenizer_dir / TOKENIZER_CONFIG
    try:
        template = json.loads(config_file.read_text(encoding="utf-8")).get("chat_template")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, AttributeError) as e:
        raise VllmError(f"{config_file}: cannot read it ({e})") from None
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template.strip() else None


def chat_template_file(tokenizer_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path | None:
    """Write the exported tokenizer's chat template to ``out_dir/chat_template.jinja`` for
    ``--chat-template``; None when the tokenizer has none (vLLM then uses the base's own)."""
    template = _tokenizer_chat_template(Path(tokenizer_dir))
    if template is None:
        return None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return write_text(out_dir / CHAT_TEMPLATE_FILE, template)


def _executable(name: str) -> str | None:
    """``vllm`` on PATH, or next to this Python (a virtual environment not on PATH)."""
    found = shutil.which(name)
    if found:
        return found
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() and os.access(beside, os.X_OK) else None


def vllm_environment(api_key: str | Sequence[str] | None, base_env: dict | None = None) -> dict:
    """The environment for vLLM: ``VLLM_API_KEY`` is exactly our key (or absent: no key)."""
    keys = [api_key] if isinstance(api_key, str) else list(api_key or [])
    if len(keys) > 1:
        raise VllmError("vLLM takes one API key (through VLLM_API_KEY); give one key")
    env = dict(os.environ if base_env is None else base_env)
    env.pop("VLLM_API_KEY", None)  # an old key from the shell would lock out the clients we tell about
    if keys:
        env["VLLM_API_KEY"] = keys[0]
    return env


def run_vllm(cmd: Sequence[str], api_key: str | Sequence[str] | None = None) -> int:
    """Run ``vllm serve`` in the foreground until it exits; its exit code."""
    exe = _executable(cmd[0])
    if exe is None:
        raise VllmError(NOT_INSTALLED)
    env = vllm_environment(api_key)
    proc = subprocess.Popen([exe, *cmd[1:]], env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt:  # the terminal sent SIGINT to vLLM too; let it shut down cleanly
        try:
            return proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            return proc.wait()
