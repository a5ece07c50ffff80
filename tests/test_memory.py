"""Memory estimates: the rules of thumb hold, and the ordering users rely on."""

from transformers import AutoConfig, LlamaConfig

from backend.config import load_config
from backend.memory import count_params, estimate_memory
from conftest import STORIES_MODEL

LLAMA_7B = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000)


def test_parameter_count_matches_the_real_model():
    import torch
    from transformers import AutoModelForCausalLM

    real = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(STORIES_MODEL, dtype=torch.float32).parameters())
    assert count_params(AutoConfig.from_pretrained(STORIES_MODEL))[0] == real
    assert abs(count_params(LLAMA_7B)[0] - 6.74e9) / 6.74e9 < 0.01  # Llama-2-7B


def test_seven_billion_rules_of_thumb():
    cfg = load_config("qwen2_5_7b_instruct_lora_alpaca_e3", ["training.method=full"])
    full = estimate_memory(cfg, LLAMA_7B, dtype="bf16")
    # mixed-precision AdamW: 4 (master) + 2 (copy) + 4 (grad) + 8 (m, v) = 18 bytes per parameter
    assert abs((full.weights_gib + full.gradients_gib + full.optimizer_gib) * 2**30 / full.params - 18) < 0.01
    lora = estimate_memory(load_config("qwen2_5_7b_instruct_lora_alpaca_e3"), LLAMA_7B, dtype="bf16")
    qlora = estimate_memory(load_config("internlm2_chat_7b_qlora_oasst1_e3"), LLAMA_7B, dtype="fp16")
    assert qlora.weights_gib < 5 < lora.weights_gib < 14 < full.weights_gib
    assert lora.trainable_params == qlora.trainable_params < 0.03 * lora.params


def test_zero_stages_and_checkpointing_shrink_what_they_should():
    cfg = load_config("qwen2_5_7b_instruct_lora_alpaca_e3", ["training.method=full"])
    one = estimate_memory(cfg, LLAMA_7B, world_size=8, zero_stage=0)
    z2 = estimate_memory(cfg, LLAMA_7B, world_size=8, zero_stage=2)
    z3 = estimate_memory(cfg, LLAMA_7B, world_size=8, zero_stage=3)
    z3off = estimate_memory(cfg, LLAMA_7B, world_size=8, zero_stage=3, offload=True)
    assert one.total_gib > z2.total_gib > z3.total_gib > z3off.total_gib
    assert z2.weights_gib == one.weights_gib and z3.weights_gib == one.weights_gib / 8
    assert z3off.cpu_offload_gib > 0 and z3off.optimizer_gib == 0
    gc = estimate_memory(load_config("qwen2_5_7b_instruct_lora_alpaca_e3", ["training.gradient_checkpointing=true"]),
                         LLAMA_7B)
    assert gc.activations_gib < estimate_memory(load_config("qwen2_5_7b_instruct_lora_alpaca_e3"), LLAMA_7B).activations_gib / 4


def test_cli_estimate(tmp_path, tiny_model):
    from train_utils import ftstudio

    out = ftstudio("estimate-memory", "tiny_demo", "--world-size", "2", "--deepspeed", "deepspeed_zero3", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "full on demo" in out.stdout and "optimizer" in out.stdout and "GiB" in out.stdout
    out = ftstudio("estimate-memory", "tiny_demo", f"model.name_or_path={tmp_path}/nothing", cwd=tmp_path)
    assert out.returncode != 0 and "cannot read the config" in out.stderr
