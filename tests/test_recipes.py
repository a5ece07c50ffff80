"""Every shipped recipe (the folder is globbed, so a new one is checked too):
it loads through the config loader, its template and map_fn exist, and it fits
its model. The model is read from ``model_configs/<hub id, / as __>/config.json``,
a copy of the model's published config.json (no weights, nothing from the Hub);
a recipe whose model has no such folder fails here.

"Fits its model": max_length within the model's context, every named LoRA
target reaches a layer of that architecture, remote-code models say
``trust_remote_code``, and the memory estimate runs on it with the model's
known size. The architecture is real: transformers builds the model from the
config on the ``meta`` device (no memory, no weights), and peft wraps it with
the recipe's LoRA settings, so the estimate's parameter and LoRA counts are
checked against the real modules.
"""

from __future__ import annotations

import copy
import functools
import json
import math
from pathlib import Path

import pytest
import yaml

from backend.config import RECIPES_DIR, ConfigError, load_config
from backend.data import TEMPLATES, DataError, get_map_fn
from backend.memory import count_params, estimate_for, estimate_memory, lora_params

RECIPES = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
ADAPTER_RECIPES = [n for n in RECIPES  # LoRA / QLoRA (read as plain YAML: a broken recipe fails its own test)
                   if (yaml.safe_load((RECIPES_DIR / f"{n}.yaml").read_text(encoding="utf-8")) or {})
                   .get("training", {}).get("method", "lora") != "full"]
MODEL_CONFIGS = Path(__file__).resolve().parent / "model_configs"

# total parameters, from each model card (the safetensors total)
KNOWN_PARAMS = {
    "mistralai/Mixtral-8x7B-Instruct-v0.1": 46.7e9,
    "mistralai/Mistral-7B-Instruct-v0.3": 7.25e9,
    "Qwen/Qwen2.5-0.5B-Instruct": 0.494e9,
    "Qwen/Qwen2.5-7B-Instruct": 7.61e9,
    "Qwen/Qwen3-8B": 8.19e9,
    "meta-llama/Meta-Llama-3-8B-Instruct": 8.03e9,
    "meta-llama/Llama-3.1-8B-Instruct": 8.03e9,
    "meta-llama/Llama-3.2-3B-Instruct": 3.21e9,
    "google/gemma-2-9b-it": 9.24e9,
    "google/gemma-3-1b-it": 1.0e9,
    "microsoft/Phi-3-mini-4k-instruct": 3.82e9,
    "deepseek-ai/deepseek-llm-7b-chat": 6.91e9,
    "internlm/internlm2-chat-7b": 7.74e9,
    "internlm/internlm2_5-7b-chat": 7.74e9,
}


def model_dir(name_or_path: str) -> Path:
    if name_or_path == "demo":
        from backend.demo import demo_model_dir

        return demo_model_dir()
    return MODEL_CONFIGS / name_or_path.replace("/", "__")


def is_native(model_type: str) -> bool:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return model_type in CONFIG_MAPPING


@functools.lru_cache(maxsize=None)
def model_config(name_or_path: str):
    """The transformers config; for a remote-code model (InternLM2, whose code is
    on the Hub) a plain PreTrainedConfig of the same fields."""
    from transformers import AutoConfig, PreTrainedConfig

    folder = model_dir(name_or_path)
    raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    return AutoConfig.from_pretrained(folder) if is_native(raw["model_type"]) else PreTrainedConfig.from_dict(raw)


def meta_model(mc):
    """The real architecture, built on the meta device (no weights, no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(mc)


def recipe_problems(cfg, mc) -> list[str]:
    """What is wrong with recipe ``cfg`` for model config ``mc`` (empty: nothing)."""
    problems = []
    template = TEMPLATES.get(cfg.data.template)
    if template is None:
        problems.append(f"template {cfg.data.template!r} does not exist")
    elif cfg.evaluation.system and template.SYSTEM is None and not template.uses_tokenizer_chat_template:
        problems.append(f"evaluation.system is set, but template {cfg.data.template!r} has no system slot")
    if cfg.data.map_fn != "auto":
        try:
            get_map_fn(cfg.data.map_fn)
        except DataError as exc:
            problems.append(f"map_fn: {exc}")
    if cfg.data.max_length > mc.max_position_embeddings:
        problems.append(f"data.max_length {cfg.data.max_length} > the model's context {mc.max_position_embeddings}")
    if not is_native(mc.model_type) and not cfg.model.trust_remote_code:
        problems.append(f"model_type {mc.model_type!r} needs the model's own code: model.trust_remote_code: true")
    targets = cfg.lora.target_modules
    if cfg.training.method != "full" and targets != "all-linear":
        for name in targets:
            if lora_params(mc, cfg.lora.r, [name]) == 0:
                problems.append(f"lora.target_modules: {name!r} is no layer of a {mc.model_type} model")
    return problems


def test_the_recipes_are_found():
    assert {"tiny_demo", "mixtral_8x7b_instruct_full_oasst1_e3", "internlm2_chat_7b_qlora_oasst1_e3"} <= set(RECIPES)
    assert len(RECIPES) >= 15


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_loads_and_fits_its_model(name):
    cfg = load_config(name)
    assert cfg.name == name
    folder = model_dir(cfg.model.name_or_path)
    assert (folder / "config.json").is_file(), (
        f"{name}: add the config.json of {cfg.model.name_or_path} under {folder.relative_to(MODEL_CONFIGS.parent)}")
    assert recipe_problems(cfg, model_config(cfg.model.name_or_path)) == []


@pytest.mark.parametrize("name", RECIPES)
def test_parameter_count_is_the_models(name):
    cfg = load_config(name)
    mc = model_config(cfg.model.name_or_path)
    total, linear, embed = count_params(mc)
    if cfg.model.name_or_path != "demo":
        known = KNOWN_PARAMS[cfg.model.name_or_path]
        assert abs(total - known) / known < 0.02, f"{total / 1e9:.2f}B, the model card says {known / 1e9:.2f}B"
    if is_native(mc.model_type):
        import torch

        model = meta_model(mc)
        real = sum(p.numel() for p in model.parameters())
        real_linear = sum(m.weight.numel() for n, m in model.named_modules()
                          if isinstance(m, torch.nn.Linear) and m is not model.get_output_embeddings())
        assert abs(total - real) / real < 1e-3
        assert linear == real_linear  # what QLoRA quantizes


@pytest.mark.parametrize("name", ADAPTER_RECIPES)
def test_lora_count_is_what_peft_builds(name):
    cfg = load_config(name)
    mc = model_config(cfg.model.name_or_path)
    if not is_native(mc.model_type):
        pytest.skip(f"{mc.model_type} is built by the model's own code (on the Hub)")
    import torch
    from peft import LoraConfig, get_peft_model

    with torch.device("meta"):
        model = get_peft_model(meta_model(mc), LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha,
                                                          target_modules=copy.copy(cfg.lora.target_modules)))
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert lora_params(mc, cfg.lora.r, cfg.lora.target_modules) == trained


@pytest.mark.parametrize("name", RECIPES)
def test_memory_estimate_runs_on_the_model(name):
    cfg = load_config(name)
    mc = model_config(cfg.model.name_or_path)
    if is_native(mc.model_type):
        local = copy.deepcopy(cfg)
        local.model.name_or_path = str(model_dir(cfg.model.name_or_path))
        est, dtype = estimate_for(local)
        assert dtype == (cfg.model.dtype if cfg.model.dtype != "auto" else "bf16")
    else:
        est = estimate_memory(cfg, mc, dtype=cfg.model.dtype)
    assert est.params == count_params(mc)[0]
    if cfg.training.method == "full":
        assert est.trainable_params == est.params
    else:
        assert 0 < est.trainable_params < 0.1 * est.params
    assert math.isfinite(est.total_gib) and 0 < est.activations_gib < est.total_gib


def test_mixtral_seed_example_needs_zero3():
    """The seed runs Mixtral's full fine-tune on 2 nodes x 8 GPUs: with ZeRO-3 it
    fits an 80 GB GPU, with ZeRO-2 every GPU holds all 16-bit weights (~87 GiB)."""
    cfg = load_config("mixtral_8x7b_instruct_full_oasst1_e3")
    cfg.model.name_or_path = str(model_dir("mistralai/Mixtral-8x7B-Instruct-v0.1"))
    z3, _ = estimate_for(cfg, deepspeed="deepspeed_zero3", world_size=16)
    z2, _ = estimate_for(cfg, deepspeed="deepspeed_zero2", world_size=16)
    assert z3.total_gib < 75 < 80 < z2.weights_gib


def test_the_checks_catch_a_bad_recipe():
    phi3 = model_config("microsoft/Phi-3-mini-4k-instruct")
    good = load_config("phi3_mini_4k_instruct_qlora_alpaca_e3")
    assert recipe_problems(good, phi3) == []
    too_long = load_config("phi3_mini_4k_instruct_qlora_alpaca_e3", ["data.max_length=8192"])
    assert "context 4096" in " ".join(recipe_problems(too_long, phi3))
    # Phi-3 fuses q, k and v into qkv_proj: a Llama target list misses
    llama_names = load_config("phi3_mini_4k_instruct_qlora_alpaca_e3", ["lora.target_modules=[q_proj, o_proj]"])
    assert recipe_problems(llama_names, phi3) == ["lora.target_modules: 'q_proj' is no layer of a phi3 model"]
    no_system = load_config("phi3_mini_4k_instruct_qlora_alpaca_e3", ["data.template=minicpm"])
    assert "no system slot" in " ".join(recipe_problems(no_system, phi3))
    bad_map_fn = load_config("phi3_mini_4k_instruct_qlora_alpaca_e3", ["data.map_fn=alpacca"])
    assert "alpacca" in " ".join(recipe_problems(bad_map_fn, phi3))
    internlm = load_config("internlm2_5_chat_7b_qlora_oasst1_e3", ["model.trust_remote_code=false"])
    assert "trust_remote_code" in " ".join(recipe_problems(internlm, model_config("internlm/internlm2_5-7b-chat")))
    with pytest.raises(ConfigError, match="data.template"):
        load_config("phi3_mini_4k_instruct_qlora_alpaca_e3", ["data.template=phi4"])
