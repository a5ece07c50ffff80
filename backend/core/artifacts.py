"""Artifacts: the files training leaves behind and the folders export makes of
them. This module alone spells their names and knows their rules.

- ``iter_<N>.pth``: a ``torch.save`` zip holding ``{"format", "meta",
  "state_dict"}``: the trainable weights at step N, and in ``meta`` the kind
  (full / lora / qlora), base model, template, system text, the config, the
  LoRA settings, the dtype, the step and every tensor's shape.
- a converted folder (``convert pth_to_hf``): a peft adapter
  (``adapter_config.json`` + weights) or a complete model; a merged folder
  (``convert merge``): a complete model. Both carry ``ftstudio.json``, the
  record that makes them ours: what they are, their base model, template,
  stop words and system text.

Reading is verifying: an ``iter_<N>.pth`` is refused, naming what is wrong,
when a zip member fails its CRC, a tensor's shape differs from the one
recorded, or the LoRA pairs do not fit their rank. Whatever a file says is
data: nothing here loads code or decides to trust it, and callers pass the
operator's ``trust_remote_code`` and path policy (``backend.core.guard``),
never a file's.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .atomic import atomic_dir, check_replaceable, read_json, write_json

ITER_FORMAT = "ftstudio-iter/1"
KINDS = ("full", "lora", "qlora")  # what a run trains
META_FILE = "ftstudio.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SAFETENSORS, ADAPTER_BIN = "adapter_model.safetensors", "adapter_model.bin"  # peft's names
MODEL_CONFIG = "config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
CONVERTED_SUBDIR, MERGED_SUBDIR = "hf", "merged"  # where the studio keeps a run's exports, inside the run
CONVERTED, MERGED = "converted", "merged"  # output kinds: an overwrite may only replace the same kind
_ITER = re.compile(r"^iter_(\d+)\.pth$")


class ArtifactError(ValueError):
    """A checkpoint or model folder that is missing, damaged or not what it should be."""


# --- iter_<N>.pth ------------------------------------------------------------------------


def iter_name(step: int) -> str:
    return f"iter_{int(step)}.pth"


def iter_step(path: str | os.PathLike) -> int | None:
    """N of an ``iter_<N>.pth`` name, else None."""
    m = _ITER.match(Path(path).name)
    return int(m.group(1)) if m else None


def list_iters(folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of the ``iter_<N>.pth`` files in ``folder``, oldest first.
    Only regular files count: a folder or a link with that name is not a checkpoint."""
    out = []
    for p in Path(folder).glob("iter_*.pth"):
        step = iter_step(p)
        if step is not None and p.is_file() and not p.is_symlink():
            out.append((step, p))
    return sorted(out)


def save_iter(folder: str | os.PathLike, step: int, state_dict: dict, meta: dict) -> Path:
    """Write ``iter_<step>.pth`` (temp name, then rename), recording every tensor's shape."""
    import torch

    folder = Path(folder)
    path = folder / iter_name(step)
    tmp = folder / f".{path.name}.tmp"
    meta = {**meta, "step": step, "shapes": {k: list(v.shape) for k, v in state_dict.items()}}
    try:
        torch.save({"format": ITER_FORMAT, "meta": meta, "state_dict": state_dict}, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


@dataclass
class IterCheckpoint:
    path: Path
    meta: dict
    state_dict: dict

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    @property
    def config(self) -> dict:
        return self.meta["config"]

    @property
    def base_model(self) -> str:
        return self.config["model"]["name_or_path"]

    @property
    def template(self) -> str:
        return self.config["data"]["template"]


def _damaged_member(path: Path) -> str | None:
    """The first zip member whose CRC fails (torch.load itself does not check)."""
    try:
        with zipfile.ZipFile(path) as z:
            return z.testzip()
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        return f"(unreadable: {exc})"


def read_iter(path: str | os.PathLike) -> IterCheckpoint:
    """Read and verify an ``iter_<N>.pth`` (``weights_only``: no pickled code runs)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: no such checkpoint file")
    if not zipfile.is_zipfile(path):
        raise ArtifactError(f"{path}: not a readable Finetune Studio checkpoint (not a torch.save zip archive: "
                            "truncated, or another format). Use an iter_<N>.pth written by ftstudio train.")
    damaged = _damaged_member(path)
    if damaged:
        raise ArtifactError(f"{path}: damaged checkpoint: member {damaged} fails its check (CRC); "
                            "use an earlier iter_<N>.pth or train again")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, zipfile.BadZipFile, EOFError, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ArtifactError(f"{path}: not a readable Finetune Studio checkpoint (torch.load with weights_only "
                            f"refused it: {first}). Use an iter_<N>.pth written by ftstudio train.") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != ITER_FORMAT or not isinstance(ckpt.get("state_dict"), dict):
        raise ArtifactError(f"{path}: a PyTorch file, but not a Finetune Studio checkpoint (no '{ITER_FORMAT}' tag)")
    checked = IterCheckpoint(path, _checked_meta(path, ckpt.get("meta")), ckpt["state_dict"])
    _check_shapes(checked)
    return checked


def _checked_meta(path: Path, meta) -> dict:
    if not isinstance(meta, dict) or meta.get("kind") not in KINDS:
        raise ArtifactError(f"{path}: its metadata has no known kind ({', '.join(KINDS)})")
    cfg = meta.get("config")
    try:
        for section, key in (("model", "name_or_path"), ("data", "template")):
            if not isinstance(cfg[section][key], str):
                raise TypeError
    except (KeyError, TypeError):
        raise ArtifactError(f"{path}: its metadata lacks the config's model.name_or_path / data.template") from None
    return meta


def _check_shapes(ckpt: IterCheckpoint) -> None:
    import torch

    shapes = ckpt.meta.get("shapes")
    for name, tensor in ckpt.state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            raise ArtifactError(f"{ckpt.path}: entry {name!r} is not a tensor")
        if isinstance(shapes, dict) and list(tensor.shape) != shapes.get(name):
            raise ArtifactError(f"{ckpt.path}: damaged checkpoint: tensor {name!r} has shape {list(tensor.shape)}, "
                                f"recorded {shapes.get(name)}")
    if isinstance(shapes, dict) and set(shapes) != set(ckpt.state_dict):
        missing = sorted(set(shapes) - set(ckpt.state_dict))[:3]
        raise ArtifactError(f"{ckpt.path}: damaged checkpoint: tensors {missing} are recorded but missing")
    if ckpt.kind != "full":
        _check_lora_pairs(ckpt)


def _check_lora_pairs(ckpt: IterCheckpoint) -> None:
    lora = ckpt.meta.get("lora") or {}
    rank = lora.get("r")
    names = [n for n in ckpt.state_dict if ".lora_A." in n]
    if not names:
        raise ArtifactError(f"{ckpt.path}: a {ckpt.kind} checkpoint without LoRA weights")
    for a_name in names:
        b_name = a_name.replace(".lora_A.", ".lora_B.")
        a, b = ckpt.state_dict[a_name], ckpt.state_dict.get(b_name)
        if b is None or a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or (rank and a.shape[0] != rank):
            raise ArtifactError(f"{ckpt.path}: damaged checkpoint: LoRA pair {a_name} does not fit rank {rank}")


def lora_targets(state_dict) -> list[str]:
    """The module names a LoRA state dict adapts (read off its keys)."""
    return sorted({key.split(".lora_A")[0].rsplit(".", 1)[-1] for key in state_dict if ".lora_A." in key})


# --- exported folders -------------------------------------------------------------------


def read_meta(folder: str | os.PathLike) -> dict:
    """A folder's ``ftstudio.json`` (empty if absent or not ours)."""
    return read_json(Path(folder) / META_FILE)


def output_kind(folder: str | os.PathLike) -> str | None:
    """CONVERTED, MERGED or None: what our own record says a folder is."""
    kind = read_meta(folder).get("kind")
    return MERGED if kind == MERGED else CONVERTED if kind in KINDS else None


@dataclass
class Output:
    """An export being written: a temp folder that replaces ``target`` only at the end."""

    kind: str
    folder: Path

    def finish(self, record: dict) -> None:
        write_json(self.folder / META_FILE, record)


def _what(kind: str) -> str:
    return "a converted checkpoint" if kind == CONVERTED else "a merged model"


def check_output(target: str | os.PathLike, kind: str, overwrite: bool = False) -> Path:
    """Refuse early (before any model is loaded) an output that would destroy something."""
    target = Path(target).absolute()
    check_replaceable(target, lambda p: output_kind(p) == kind, _what(kind), overwrite)
    return target


@contextmanager
def output_dir(target: str | os.PathLike, kind: str, overwrite: bool = False):
    """``with output_dir(target, CONVERTED) as out:`` write into ``out.folder``,
    then ``out.finish(record)``. An existing non-empty ``target`` is replaced only
    if it is our own output of the same kind and ``overwrite`` is set."""
    with atomic_dir(target, is_ours=lambda p: output_kind(p) == kind, what=_what(kind), overwrite=overwrite) as tmp:
        yield Output(kind, tmp)
        if not (tmp / META_FILE).is_file():
            raise ArtifactError(f"{target}: the export wrote no {META_FILE} record; nothing was saved")


def is_adapter(folder: str | os.PathLike) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def is_model(folder: str | os.PathLike) -> bool:
    return (Path(folder) / MODEL_CONFIG).is_file()


def has_tokenizer(folder: str | os.PathLike) -> bool:
    return (Path(folder) / TOKENIZER_CONFIG).is_file()


def adapter_base(folder: str | os.PathLike) -> str | None:
    """The base model an adapter folder belongs to (our record, else peft's)."""
    base = read_meta(folder).get("base_model")
    if not base:
        try:
            base = json.loads((Path(folder) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
        except (OSError, ValueError, AttributeError):
            base = None
    return base if isinstance(base, str) and base else None


def model_source(path: str) -> tuple[str, str | None]:
    """What to load for a folder: ``(llm, adapter)``. An adapter runs on the base
    it recorded; a model folder, 'demo' or a Hub id on itself."""
    if is_adapter(path):
        base = adapter_base(path)
        if not base:
            raise ArtifactError(f"adapter {path}: it does not say which base model it belongs to")
        return base, str(path)
    return path, None


def recorded_base(folder: str | os.PathLike) -> str | None:
    """The base model a fine-tuned folder came from (adapter or merged/full model)."""
    return adapter_base(folder) if is_adapter(folder) else read_meta(folder).get("base_model") or None


def converted_dir(pth: str | os.PathLike) -> Path:
    """Where the studio keeps the converted form of a run's checkpoint: <run>/hf/iter_<N>."""
    pth = Path(pth)
    return pth.parent / CONVERTED_SUBDIR / pth.stem


def merged_dir(pth: str | os.PathLike) -> Path:
    pth = Path(pth)
    return pth.parent / MERGED_SUBDIR / pth.stem


def exported_folders(run_dir: str | os.PathLike) -> list[Path]:
    """A run's converted and merged folders (those our record marks as ours)."""
    out = []
    for sub in (MERGED_SUBDIR, CONVERTED_SUBDIR):
        root = Path(run_dir) / sub
        if root.is_dir():
            out += [p for p in sorted(root.iterdir()) if p.is_dir() and output_kind(p)]
    return out


def check_weights(folder: str | os.PathLike) -> None:
    """Open every safetensors file's header: a broken one is named before a loader trips on it."""
    from safetensors import SafetensorError, safe_open

    for path in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                f.keys()
        except (SafetensorError, OSError, ValueError) as exc:
            raise ArtifactError(f"{path}: not a readable safetensors file ({str(exc).splitlines()[0][:200]}); "
                                "export it again") from None


def check_model_folder(path: str | os.PathLike, what: str = "model") -> None:
    """A local folder that should hold a model (config.json) or an adapter: say plainly if it does not."""
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"{what} {path}: no such folder")
    if not (is_model(path) or is_adapter(path)):
        raise ArtifactError(f"{what} {path}: not a model folder (no {MODEL_CONFIG} or {ADAPTER_CONFIG} in it)")
    check_weights(path)


ALLOW_CODE = "--trust-remote-code (the studio: --allow-custom-code)"
ALLOW_CODE_IN_CONFIG = "model.trust_remote_code: true in your own config (the studio: --allow-custom-code)"


def loading_failure(what: str, path: str, exc: Exception, allow: str = ALLOW_CODE) -> str:
    """One line for a model, tokenizer or adapter that would not load: a folder
    that is not one, an unreachable Hub, or a model that needs its own code
    (``allow``: how the operator allows code where this step is run)."""
    text = " ".join(str(exc).split())
    if "trust_remote_code" in text:
        return f"{what} {path} ships its own code, which is off here; allow it with {allow} if you trust it"
    if not Path(path).exists() and ("connect" in text.lower() or "offline" in text.lower()):
        return (f"{what} {path}: not on this machine and the Hub cannot be reached; download it first "
                "(hf download) or give a local folder")
    return f"{what} {path} cannot be loaded: {text[:300]}"
