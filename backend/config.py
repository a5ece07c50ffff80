"""The training config: small typed sections, YAML in, ``key=value`` overrides.

Each field carries its help text and allowed values in ``metadata``, so the
studio builds its form from this schema (``schema()``) instead of mapping
widgets by hand, and every error names the field and what it accepts.

    cfg = load_config("tiny_demo", ["training.lr=1e-3", "data.max_length=256"])
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import get_args, get_origin, get_type_hints

import yaml

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
TRACKERS = ("tensorboard", "mlflow", "wandb", "trackio")  # training.report_to: Trainer's own integrations
EVAL_SOURCES = ("data.eval_path", "data.eval_split", "data.eval_fraction")


class ConfigError(ValueError):
    """A bad config: the message names the field and what it accepts."""


def _f(default, help: str, choices=None, minimum=None, **kw):
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if minimum is not None:
        meta["min"] = minimum
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass
class ModelConfig:
    name_or_path: str = _f("demo", "base model: Hub id, local folder, or 'demo' (the bundled tiny model)")
    tokenizer: str | None = _f(None, "tokenizer if not the model's own (Hub id or folder)")
    dtype: str = _f("auto", "weights and compute precision; auto = bf16 on a GPU that has it (else fp16), and on "
                            "a CPU whose bf16 matmuls are measured 1.5x as fast as fp32's (else fp32)",
                    choices=["auto", "bf16", "fp16", "fp32"])
    attn_implementation: str = _f("auto", "attention kernel; auto = flash_attention_2 on CUDA if installed (varlen "
                                          "for packed rows), per-sample sdpa for packed blocks of 1024+ tokens on a "
                                          "CPU, else sdpa",
                                  choices=["auto", "eager", "sdpa", "flash_attention_2"])
    trust_remote_code: bool = _f(False, "allow the model repository's own code (needed by some models)")
    add_template_tokens: bool = _f(False, "add the template's markers the tokenizer lacks (e.g. <|eot_id|> on a "
                                          "base model) as new special tokens; the embeddings grow, new rows are trained")


@dataclass
class DataConfig:
    path: str = _f("demo", "dataset: Hub id, local file or folder, or 'demo' (the bundled Q&A)")
    name: str | None = _f(None, "dataset configuration name (Hub datasets)")
    split: str = _f("train", "split to train on")
    data_files: list | None = _f(None, "data_files passed to load_dataset")
    map_fn: str = _f("auto", "map_fn name, file.py:function or module:function; auto = detect from columns")
    template: str = _f("qwen_chat", "prompt template (ftstudio list-template)")
    max_length: int = _f(2048, "longest sample in tokens; longer ones are cut", minimum=8)
    pack: bool = _f(True, "pack samples into max_length blocks (padding-free, samples isolated)")
    num_proc: int | None = _f(None, "processes for the data map", minimum=1)
    max_rows: int | None = _f(None, "use only the first N rows (quick trials)", minimum=1)
    # evaluation data: at most one of eval_path, eval_split, eval_fraction (EVAL_SOURCES)
    eval_path: str | None = _f(None, "evaluation data: another dataset (Hub id, local file or folder), with the same "
                                     "template and, unless data.eval_map_fn says otherwise, the same map_fn")
    eval_path_name: str | None = _f(None, "dataset configuration name of data.eval_path (Hub datasets)")
    eval_path_split: str = _f("train", "split of data.eval_path ('train' is the one split of a single file)")
    eval_map_fn: str | None = _f(None, "map_fn of data.eval_path; empty = data.map_fn")
    eval_split: str | None = _f(None, "evaluation data: a named split of data.path (e.g. test or validation)")
    eval_fraction: float = _f(0.0, "evaluation data: hold out this fraction of data.path's rows (chosen with "
                                   "training.seed), never trained on; 0 = none", minimum=0.0)
    eval_max_rows: int | None = _f(None, "evaluate on the first N evaluation rows only", minimum=1)


@dataclass
class LoraConfig:
    r: int = _f(64, "LoRA rank", minimum=1)
    alpha: int = _f(16, "LoRA alpha (scale = alpha / r)", minimum=1)
    # 0.1 stays (XTuner's and the QLoRA paper's value up to 13B; every recipe sets it): on the rank-r activation
    # (backend/train/lora_dropout.py) it costs <1% of a step, where peft's full-size input masks cost 40-50% (bf16,
    # 4.2M Llama). Its price in quality when nothing overfits: eval loss 2.705 vs 2.686 at p=0 (stories260K,
    # alpaca demo, 1.3 epochs, one seed); small data over several epochs is where it is meant to help.
    dropout: float = _f(0.1, "dropout on the adapters' rank-r activation, B·dropout(A·x) (peft drops the input x: "
                             "the same mean, r instead of hidden-size random numbers per token); 0 turns it off",
                        minimum=0.0)
    target_modules: list | str = _f("all-linear", "modules to adapt: 'all-linear' (every linear layer but the head) or a list of names")
    bias: str = _f("none", "train biases too", choices=["none", "all", "lora_only"])


@dataclass
class QuantizationConfig:
    bits: int = _f(4, "bits of the frozen base weights under QLoRA", choices=[4, 8])
    quant_type: str = _f("nf4", "4-bit data type", choices=["nf4", "fp4"])
    double_quant: bool = _f(True, "quantize the quantization constants too (saves ~0.4 bit/param)")
    compute_dtype: str = _f("auto", "dtype of the dequantized matmuls; auto = the model dtype",
                            choices=["auto", "bf16", "fp16", "fp32"])


@dataclass
class TrainingConfig:
    method: str = _f("lora", "what to train", choices=["full", "lora", "qlora"])
    lr: float = _f(2e-4, "peak learning rate", minimum=0.0)
    betas: list = _f([0.9, 0.999], "AdamW betas")
    weight_decay: float = _f(0.0, "AdamW weight decay", minimum=0.0)
    epochs: float = _f(3, "passes over the data", minimum=0)
    max_steps: int = _f(-1, "stop after this many optimizer steps (-1: run all epochs)")
    micro_batch_size: int = _f(1, "samples (or packed blocks) per device per step", minimum=1)
    accumulative_counts: int = _f(16, "gradient accumulation steps", minimum=1)
    warmup_ratio: float = _f(0.03, "fraction of steps with linear warm-up", minimum=0.0)
    lr_scheduler: str = _f("cosine", "learning-rate schedule",
                           choices=["cosine", "linear", "constant", "constant_with_warmup"])
    max_norm: float = _f(1.0, "gradient clipping norm (0: off)", minimum=0.0)
    gradient_checkpointing: bool = _f(False, "recompute activations in backward to save memory")
    group_by_length: bool = _f(True, "unpacked data: batch samples of similar length (less padding)")
    loss_on_labeled_only: bool = _f(True, "run the LM head only where a label is trained (saves compute)")
    seed: int = _f(0, "seed for data order, init of LoRA weights and dropout")
    logging_steps: int = _f(1, "write a metrics line every N steps", minimum=1)
    dataloader_workers: int = _f(0, "dataloader worker processes", minimum=0)
    report_to: list | str = _f([], "experiment trackers that log the run too, into the run folder's trackers/ "
                                   f"(offline): a list of any of {', '.join(TRACKERS)}")


@dataclass
class SavingConfig:
    save_steps: int = _f(500, "write iter_<N>.pth and a resumable checkpoint every N steps", minimum=1)
    save_total_limit: int = _f(2, "keep only the newest N checkpoints (-1: keep all)")


@dataclass
class EvaluationConfig:
    inputs: list = _f([], "prompts answered at step 0, at every save and every `every` steps into samples.jsonl")
    every: int = _f(500, "also answer the evaluation inputs every N steps", minimum=1)
    system: str = _f("", "system text for the evaluation prompts")
    max_new_tokens: int = _f(64, "longest evaluation answer", minimum=1)
    # 0 follows the saves: an eval loss for every checkpoint there is to compare, at no extra schedule to tune
    eval_steps: int = _f(0, "eval loss every N steps (with eval data); 0 = at every save; also at step 0 and at "
                            "the end", minimum=0)
    batch_size: int | None = _f(None, "samples (or packed blocks) per device in an eval-loss batch; "
                                      "empty = training.micro_batch_size", minimum=1)
    heldout_samples: int = _f(0, "also answer the first N rows of the eval data with the prompts, next to their "
                                 "reference answers", minimum=0)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    saving: SavingConfig = field(default_factory=SavingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    name: str = "run"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


SECTIONS = {f.name: f.default_factory for f in fields(Config) if f.name != "name"}


def _check_type(where: str, value, hint, meta):
    """Coerce/validate one value; raise ConfigError naming ``where``."""
    origin, args = get_origin(hint), get_args(hint)
    allowed_types = args if origin is not None and type(None) in args or origin is type(None) else (hint,)
    if origin is not None and str(origin) in ("typing.Union", "<class 'types.UnionType'>"):
        allowed_types = args
    if value is None:
        if type(None) in allowed_types:
            return None
        raise ConfigError(f"{where} may not be empty")
    for t in allowed_types:
        base = get_origin(t) or t
        if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = float(value)
            if not math.isfinite(value):
                raise ConfigError(f"{where} is {value}; give a finite number")
            break
        if base is int and isinstance(value, int) and not isinstance(value, bool):
            break
        if base is bool and isinstance(value, bool):
            break
        if base is str and isinstance(value, str):
            break
        if base is list and isinstance(value, (list, tuple)):
            value = list(value)
            break
    else:
        names = " or ".join(getattr(get_origin(t) or t, "__name__", str(t)) for t in allowed_types if t is not type(None))
        raise ConfigError(f"{where} should be {names}, got {value!r}")
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{where} is {value!r}; allowed: {', '.join(map(str, choices))}")
    if "min" in meta and isinstance(value, (int, float)) and value < meta["min"]:
        raise ConfigError(f"{where} is {value!r}; it must be at least {meta['min']}")
    return value


def from_dict(data: dict, source: str = "config") -> Config:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level should be a mapping of sections")
    cfg = Config()
    for key, value in data.items():
        if key == "name":
            cfg.name = str(value)
            continue
        if key not in SECTIONS:
            close = difflib.get_close_matches(key, list(SECTIONS), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"{source}: unknown section {key!r}{hint}; sections: {', '.join(SECTIONS)}")
        section = getattr(cfg, key)
        if value is None:
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: section {key!r} should be a mapping")
        for fname, fvalue in value.items():
            set_field(section, key, fname, fvalue, source)
    validate(cfg)
    return cfg


def set_field(section, section_name: str, fname: str, value, source: str = "config"):
    known = {f.name: f for f in fields(section)}
    if fname not in known:
        close = difflib.get_close_matches(fname, list(known), n=1)
        hint = f" (did you mean {section_name}.{close[0]}?)" if close else ""
        raise ConfigError(
            f"{source}: unknown field {section_name}.{fname}{hint}; {section_name} has: {', '.join(known)}"
        )
    hints = get_type_hints(type(section))
    value = _check_type(f"{source}: {section_name}.{fname}", value, hints[fname], known[fname].metadata)
    setattr(section, fname, value)


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """``section.field=value`` strings; values are read as YAML (1e-4, true, [a, b])."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} should read section.field=value")
        key, _, raw = item.partition("=")
        key = key.strip()
        if key == "name":
            cfg.name = raw
            continue
        section_name, _, fname = key.partition(".")
        if section_name not in SECTIONS or not fname:
            raise ConfigError(
                f"override {item!r}: {key!r} should be section.field, with section one of {', '.join(SECTIONS)}"
            )
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        # scientific notation without a dot (2e-4) is a string to YAML 1.1
        if isinstance(value, str):
            try:
                value = float(value) if any(c in value for c in "eE.") else int(value)
            except ValueError:
                pass
        set_field(getattr(cfg, section_name), section_name, fname, value, "override")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks."""
    from .data.templates import TEMPLATES

    if cfg.data.template not in TEMPLATES:
        close = difflib.get_close_matches(cfg.data.template, list(TEMPLATES), n=3)
        raise ConfigError(
            f"data.template is {cfg.data.template!r}"
            f"{' (did you mean ' + ', '.join(close) + '?)' if close else ''}; allowed: {', '.join(sorted(TEMPLATES))}"
        )
    betas = cfg.training.betas
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b)
                                  and 0 <= b < 1 for b in betas):
        raise ConfigError(f"training.betas should be two numbers in [0, 1), got {betas!r}")
    if not 0 <= cfg.training.warmup_ratio < 1:
        raise ConfigError(f"training.warmup_ratio is {cfg.training.warmup_ratio}; it is a fraction of the steps, "
                          "at least 0 and below 1 (e.g. 0.03)")
    if not 0 <= cfg.lora.dropout < 1:
        raise ConfigError(f"lora.dropout is {cfg.lora.dropout}; it must be at least 0 and below 1")
    if cfg.training.epochs <= 0 and cfg.training.max_steps <= 0:
        raise ConfigError("training.epochs is 0 and training.max_steps is not set: nothing to train")
    if isinstance(cfg.lora.target_modules, str) and cfg.lora.target_modules != "all-linear":
        cfg.lora.target_modules = [m.strip() for m in cfg.lora.target_modules.split(",") if m.strip()]
    validate_evaluation(cfg)
    if isinstance(cfg.training.report_to, str):  # report_to=tensorboard,mlflow on the command line
        cfg.training.report_to = [n.strip() for n in cfg.training.report_to.split(",") if n.strip()]
    validate_report_to(cfg.training.report_to)


def eval_source(cfg: Config) -> str | None:
    """Which evaluation data the config asks for (one of EVAL_SOURCES), or None."""
    d = cfg.data
    given = [key for key, on in zip(EVAL_SOURCES, (d.eval_path, d.eval_split, d.eval_fraction)) if on]
    if len(given) > 1:
        both = f"{', '.join(given[:-1])} and {given[-1]} are {'both' if len(given) == 2 else 'all'} set"
        raise ConfigError(f"{both}; the evaluation data comes from one of them only")
    return given[0] if given else None


def validate_evaluation(cfg: Config) -> None:
    d, ev = cfg.data, cfg.evaluation
    source = eval_source(cfg)
    if not d.eval_fraction < 1:
        raise ConfigError(f"data.eval_fraction is {d.eval_fraction}; it is the fraction of the rows held out, "
                          "at least 0 and below 1 (e.g. 0.1)")
    if d.eval_map_fn and source != "data.eval_path":
        raise ConfigError("data.eval_map_fn is the map_fn of data.eval_path, which is not set")
    if source == "data.eval_split" and d.eval_split == d.split:
        raise ConfigError(f"data.eval_split is {d.eval_split!r}, the split trained on (data.split); give another "
                          "split, or hold out rows of it with data.eval_fraction")
    if source == "data.eval_path" and (d.eval_path, d.eval_path_name, d.eval_path_split) == (d.path, d.name, d.split):
        raise ConfigError(f"data.eval_path is data.path with the same split ({d.split!r}): the rows trained on; "
                          "give another split (data.eval_path_split) or hold out rows with data.eval_fraction")
    if source is None:
        for key, value in (("evaluation.eval_steps", ev.eval_steps),
                           ("evaluation.heldout_samples", ev.heldout_samples)):
            if value:
                raise ConfigError(f"{key} is {value}, but there is no evaluation data: "
                                  f"set one of {', '.join(EVAL_SOURCES)}")


def validate_report_to(names: list) -> None:
    for name in names:
        if name not in TRACKERS:
            close = difflib.get_close_matches(str(name), TRACKERS, n=1)
            raise ConfigError(f"training.report_to: unknown tracker {name!r}"
                              f"{' (did you mean ' + close[0] + '?)' if close else ''}; allowed: {', '.join(TRACKERS)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"training.report_to lists a tracker twice: {names!r}")


# --- recipes ---------------------------------------------------------------------------


def list_recipes(pattern: str | None = None) -> list[str]:
    names = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
    if pattern:
        pat = pattern.lower()
        names = [n for n in names if pat in n.lower()]
    return names


def recipe_path(name: str) -> Path:
    path = RECIPES_DIR / f"{name}.yaml"
    if not path.exists():
        close = difflib.get_close_matches(name, list_recipes(), n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(
            f"no recipe or config file {name!r}.{hint} See `ftstudio list-cfg`, or give a path to a .yaml config."
        )
    return path


def load_config(name_or_path: str | os.PathLike, overrides: list[str] | None = None) -> Config:
    """A recipe name or a YAML path, with overrides applied."""
    text_path = Path(name_or_path)
    if text_path.suffix in (".yaml", ".yml") or text_path.exists():
        if not text_path.exists():
            raise ConfigError(f"config file {str(name_or_path)!r} does not exist")
        path = text_path
    else:
        path = recipe_path(str(name_or_path))
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    cfg = from_dict(data, source=str(path))
    if "name" not in data:
        cfg.name = path.stem
    return apply_overrides(cfg, overrides or [])


def schema() -> list[dict]:
    """Every field with its section, type, default, help and choices (for the UI form)."""
    out = []
    for section_name, factory in SECTIONS.items():
        section = factory()
        hints = get_type_hints(type(section))
        for f in fields(section):
            out.append({
                "key": f"{section_name}.{f.name}",
                "section": section_name,
                "name": f.name,
                "type": hints[f.name].__name__ if isinstance(hints[f.name], type)
                else str(hints[f.name]).replace("typing.", ""),
                "default": getattr(section, f.name),
                "help": f.metadata.get("help", ""),
                "choices": list(f.metadata["choices"]) if "choices" in f.metadata else None,
                "min": f.metadata.get("min"),
            })
    return out


# --- the guard's view of a config --------------------------------------------------------

# the fields that name something on disk / on the Hub, or permit code, and how the guard checks each
GUARDED_FIELDS = {
    "model.name_or_path": lambda g, v: g.model(v, "model.name_or_path"),
    "model.tokenizer": lambda g, v: g.model(v, "model.tokenizer"),
    "model.trust_remote_code": lambda g, v: g.trust_remote_code(v, "model.trust_remote_code"),
    "data.path": lambda g, v: g.readable(v, "data.path"),
    "data.data_files": lambda g, v: g.data_files(v),
    "data.map_fn": lambda g, v: g.map_fn(v),
    "data.eval_path": lambda g, v: g.readable(v, "data.eval_path"),
    "data.eval_map_fn": lambda g, v: g.map_fn(v),
}


def guard_field(guard, key: str, value):
    """``value`` of field ``key`` as the guard lets it through (paths resolved);
    raises GuardError. Fields that name nothing pass unchanged."""
    check = GUARDED_FIELDS.get(key)
    return check(guard, value) if check and value not in (None, "") else value


def guard_config(guard, cfg: Config) -> Config:
    """Every guarded field of ``cfg`` through ``guard`` (for configs read back from a run folder)."""
    for key in GUARDED_FIELDS:
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, guard_field(guard, key, getattr(getattr(cfg, section), name)))
    return cfg
