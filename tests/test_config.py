"""The typed config, recipes and overrides."""

import pytest
import yaml

from backend.config import ConfigError, RECIPES_DIR, list_recipes, load_config, schema


@pytest.mark.parametrize("name", list_recipes())
def test_every_shipped_recipe_validates(name):
    cfg = load_config(name)
    assert cfg.name == name
    # the YAML a run writes loads back to the same config
    again = load_config.__globals__["from_dict"](yaml.safe_load(cfg.to_yaml()))
    assert again.to_dict() == cfg.to_dict()


def test_seed_recipe_has_xtuner_values():
    cfg = load_config("internlm2_chat_7b_qlora_oasst1_e3")
    assert cfg.model.name_or_path == "internlm/internlm2-chat-7b"
    assert (cfg.data.path, cfg.data.map_fn, cfg.data.template) == ("timdettmers/openassistant-guanaco", "oasst1", "internlm2_chat")
    assert cfg.data.max_length == 2048 and cfg.data.pack
    t = cfg.training
    assert (t.method, t.lr, t.betas, t.weight_decay, t.accumulative_counts, t.epochs) == ("qlora", 2e-4, [0.9, 0.999], 0.0, 16, 3)
    assert (t.warmup_ratio, t.lr_scheduler, t.max_norm, t.micro_batch_size) == (0.03, "cosine", 1.0, 1)
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules) == (64, 16, 0.1, "all-linear")
    assert (cfg.quantization.bits, cfg.quantization.quant_type, cfg.quantization.double_quant) == (4, "nf4", True)
    assert (cfg.saving.save_steps, cfg.saving.save_total_limit, cfg.evaluation.every) == (500, 2, 500)
    assert cfg.evaluation.inputs == ["请给我介绍五个上海的景点", "Please tell me five scenic spots in Shanghai"]


def test_overrides_are_typed():
    cfg = load_config("tiny_demo", ["training.lr=1e-4", "data.pack=false", "lora.target_modules=[q_proj, v_proj]",
                                    "training.betas=[0.9, 0.95]", "data.max_rows=10"])
    assert cfg.training.lr == 1e-4 and cfg.data.pack is False and cfg.data.max_rows == 10
    assert cfg.lora.target_modules == ["q_proj", "v_proj"] and cfg.training.betas == [0.9, 0.95]


@pytest.mark.parametrize("override,message", [
    ("training.method=qlorra", "training.method is 'qlorra'; allowed: full, lora, qlora"),
    ("training.lrr=1", "unknown field training.lrr (did you mean training.lr?)"),
    ("trainin.lr=1", "section one of"),
    ("training.lr=fast", "training.lr should be float"),
    ("data.max_length=2", "data.max_length is 2; it must be at least 8"),
    ("data.template=qwen", "data.template is 'qwen'"),
    ("training.lr", "should read section.field=value"),
    ("training.betas=[0.9]", "training.betas should be two numbers"),
])
def test_bad_overrides_name_the_field(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("tiny_demo", [override])
    assert message in str(err.value)


def test_unknown_recipe_suggests_close_names():
    with pytest.raises(ConfigError, match="Did you mean tiny_demo"):
        load_config("tiny_dem")


def test_bad_yaml_file(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("training:\n  methd: lora\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown field training\.methd \(did you mean training\.method\?\)"):
        load_config(bad)
    bad.write_text("training: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_schema_covers_every_field_with_help():
    rows = schema()
    keys = {r["key"] for r in rows}
    assert {"training.method", "data.template", "lora.r", "saving.save_steps", "evaluation.inputs"} <= keys
    assert all(r["help"] for r in rows)
    method = next(r for r in rows if r["key"] == "training.method")
    assert method["choices"] == ["full", "lora", "qlora"]
    assert {p.stem for p in RECIPES_DIR.glob("*.yaml")} == set(list_recipes())
