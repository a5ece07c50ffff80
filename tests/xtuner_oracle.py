"""XTuner 0.2's own code as a test oracle, loaded without mmengine.

The real ``xtuner==0.2.0`` wheel is installed with ``--no-deps``, so ``import
xtuner`` fails (it needs mmengine, torch, ...). Here the few files we compare
against (the dataset map_fns, ``template_map_fn``, ``encode_fn`` and the
template tables) are executed by file path, with tiny stand-ins for the
modules they import placed in ``sys.modules`` only while they load.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import sys
import types
from pathlib import Path

import pytest

INSTALL_HINT = "pip install --no-deps xtuner==0.2.0"


class ConfigDict(dict):
    """mmengine's ConfigDict, as far as XTuner's data code uses it: a dict
    (nested dicts converted too) whose keys read as attributes."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for key, value in self.items():
            if isinstance(value, dict) and not isinstance(value, ConfigDict):
                self[key] = ConfigDict(value)

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _get_object_from_string(path: str):
    module, _, attr = path.rpartition(".")
    return getattr(importlib.import_module(module), attr)


@functools.lru_cache(maxsize=None)
def xtuner_dir() -> Path:
    spec = importlib.util.find_spec("xtuner")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(
            f"the XTuner 0.2 oracle is not installed; run `{INSTALL_HINT}` in the venv "
            "(its dependencies are not needed)",
            pytrace=False,
        )
    return Path(spec.submodule_search_locations[0])


def _module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__path__ = []  # importable as a package, so submodule imports resolve
    mod.__dict__.update(attrs)
    return mod


def _load(path: Path, name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _fake_modules(fakes: dict[str, types.ModuleType]):
    """Put ``fakes`` into sys.modules for the duration, then restore exactly."""
    saved = {name: sys.modules.get(name) for name in fakes}
    sys.modules.update(fakes)
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old


@functools.lru_cache(maxsize=None)
def _oracle() -> types.SimpleNamespace:
    root = xtuner_dir()
    fakes = {
        "mmengine": _module("mmengine"),
        "mmengine.config": _module("mmengine.config", ConfigDict=ConfigDict),
        "mmengine.utils": _module("mmengine.utils"),
        "mmengine.utils.misc": _module("mmengine.utils.misc", get_object_from_string=_get_object_from_string),
    }
    for optional in ("requests", "PIL"):  # imported by dataset/utils.py, unused by encode_fn
        if importlib.util.find_spec(optional) is None:
            fakes[optional] = _module(optional)
    if "PIL" in fakes:
        fakes["PIL.Image"] = fakes["PIL"].Image = _module("PIL.Image")

    with _fake_modules(fakes):
        templates = _load(root / "utils" / "templates.py", "_xtuner_oracle_templates")
        constants = _load(root / "utils" / "constants.py", "_xtuner_oracle_constants")
        fakes.update(
            xtuner=_module("xtuner"),
            **{
                "xtuner.utils": _module(
                    "xtuner.utils",
                    PROMPT_TEMPLATE=templates.PROMPT_TEMPLATE,
                    SYSTEM_TEMPLATE=templates.SYSTEM_TEMPLATE,
                    IGNORE_INDEX=constants.IGNORE_INDEX,
                    DEFAULT_IMAGE_TOKEN=constants.DEFAULT_IMAGE_TOKEN,
                    IMAGE_TOKEN_INDEX=constants.IMAGE_TOKEN_INDEX,
                )
            },
        )
    with _fake_modules(fakes):
        map_fns = {}
        for path in sorted((root / "dataset" / "map_fns" / "dataset_map_fns").glob("*_map_fn.py")):
            module = _load(path, f"_xtuner_oracle_{path.stem}")
            for attr, fn in vars(module).items():
                if attr.endswith("_map_fn") and callable(fn) and fn.__module__ == module.__name__:
                    map_fns[attr[: -len("_map_fn")]] = fn
        template_map_fn = _load(root / "dataset" / "map_fns" / "template_map_fn.py",
                                "_xtuner_oracle_template_map_fn").template_map_fn
        encode_fn = _load(root / "dataset" / "utils.py", "_xtuner_oracle_dataset_utils").encode_fn
    return types.SimpleNamespace(
        prompt_templates=templates.PROMPT_TEMPLATE,
        system_templates=templates.SYSTEM_TEMPLATE,
        map_fns=map_fns,
        template_map_fn=template_map_fn,
        encode_fn=encode_fn,
    )


def xtuner_map_fns() -> dict:
    """XTuner's dataset map_fns by short name (``alpaca``, ``crime_kg_assitant``, ...)."""
    return dict(_oracle().map_fns)


def xtuner_prompt_templates() -> dict:
    """XTuner's PROMPT_TEMPLATE: name -> ConfigDict of fields."""
    return _oracle().prompt_templates


def xtuner_system_templates() -> dict:
    """XTuner's SYSTEM_TEMPLATE: name -> text."""
    return _oracle().system_templates


def xtuner_template_map_fn(example: dict, template_dict) -> dict:
    """XTuner's template_map_fn (on a copy: the original edits turns in place)."""
    template = template_dict if isinstance(template_dict, ConfigDict) else ConfigDict(template_dict)
    return _oracle().template_map_fn(copy.deepcopy(example), template)


def xtuner_encode_fn(example: dict, tokenizer, max_length: int) -> dict:
    """XTuner's encode_fn: ``{"input_ids", "labels"}`` for a templated example."""
    return _oracle().encode_fn(copy.deepcopy(example), tokenizer, max_length)
