"""Memory estimates: the rules of thumb hold, and the ordering users rely on;
MoE parameter and LoRA counts equal the real model's (built on the meta device)."""

from pathlib import Path

import pytest
from transformers import AutoConfig, LlamaConfig

from backend.config import load_config
from backend.memory import count_params, estimate_memory, lora_params
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
    z1 = estimate_memory(cfg, LLAMA_7B, world_size=8, zero_stage=1)
    z2 = estimate_memory(cfg, LLAMA_7B, world_size=8, zero_stage=2)
    z3 = estimate_memory(cfg, LLAMA_7B, world_size=8, zero_stage=3)
    z3off = estimate_memory(cfg, LLAMA_7B, world_size=8, zero_stage=3, offload=True)
    assert one.total_gib > z1.total_gib > z2.total_gib > z3.total_gib > z3off.total_gib
    # under ZeRO the 16-bit weights stay whole on each GPU, the fp32 master is sharded with AdamW's m and v
    assert z1.weights_gib == z2.weights_gib == pytest.approx(one.weights_gib / 3)
    assert z3.weights_gib == z2.weights_gib / 8
    assert z1.optimizer_gib * 2**30 == pytest.approx(12 * z1.params / 8)
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
    assert out.returncode != 0 and f"model.name_or_path {tmp_path}/nothing" in out.stderr


# --- mixture of experts ----------------------------------------------------------------

MIXTRAL_DIR = Path(__file__).resolve().parent / "model_configs" / "mistralai__Mixtral-8x7B-Instruct-v0.1"


def _mixtral():
    return AutoConfig.from_pretrained(MIXTRAL_DIR)  # Mixtral-8x7B-Instruct-v0.1's config.json


def _qwen3_moe():
    """Qwen3-MoE-shaped, small, with a dense layer (mlp_only_layers) and every other layer sparse."""
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(hidden_size=256, intermediate_size=768, moe_intermediate_size=128, num_experts=16,
                          num_experts_per_tok=4, num_hidden_layers=6, decoder_sparse_step=2, mlp_only_layers=[3],
                          num_attention_heads=8, num_key_value_heads=2, head_dim=32, vocab_size=1000)


def _qwen2_moe():
    """Qwen2-MoE-shaped (Qwen1.5-MoE): routed experts plus a gated shared expert, qkv biases."""
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(hidden_size=256, intermediate_size=704, moe_intermediate_size=176,
                          shared_expert_intermediate_size=704, num_experts=8, num_experts_per_tok=2,
                          num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8, vocab_size=1000)


def _on_meta(mc, targets=None, r=8):
    """(parameters, trainable LoRA parameters) of the real model built on the meta device."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(mc)
        total = sum(p.numel() for p in model.parameters())
        if targets is None:
            return total, 0
        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=16, target_modules=targets))
    return total, sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_moe_parameter_count_is_the_real_model():
    mixtral = _mixtral()
    total, linear, embed = count_params(mixtral)
    assert abs(total - 46.7e9) / 46.7e9 < 0.005  # Mixtral 8x7B: 46.7B, every expert counted
    assert total == _on_meta(mixtral)[0]
    assert linear == 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024)  # only attention is nn.Linear: the experts are fused
    for mc in (_qwen3_moe(), _qwen2_moe()):
        assert abs(count_params(mc)[0] / _on_meta(mc)[0] - 1) < 2e-3  # Qwen3's q/k norms are left out


@pytest.mark.parametrize("targets", [
    "all-linear",
    ["q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"],  # XTuner's Mixtral QLoRA list
    ["q_proj", "w2", "gate"],  # the experts' down projection and the router
])
def test_moe_lora_count_is_what_peft_builds_mixtral(targets):
    mixtral = _mixtral()
    assert lora_params(mixtral, 8, targets) == _on_meta(mixtral, targets)[1]


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "gate_proj", "up_proj", "down_proj"], ["o_proj", "gate"]])
def test_moe_lora_count_is_what_peft_builds_qwen3_moe(targets):
    mc = _qwen3_moe()
    assert lora_params(mc, 8, targets) == _on_meta(mc, targets)[1]


def test_moe_lora_on_all_linear_trains_the_experts():
    mixtral = _mixtral()
    attention = lora_params(mixtral, 64, ["q_proj", "k_proj", "v_proj", "o_proj"])
    every = lora_params(mixtral, 64, "all-linear")
    assert attention == 32 * 64 * (2 * (4096 + 4096) + 2 * (4096 + 1024))
    assert every > 20 * attention  # the 8 experts' fused gate/up (rank 2r) and down, and the router
    # peft refuses w1 without w3 (they are one fused parameter): nothing of the experts is counted
    assert lora_params(mixtral, 64, ["q_proj", "w1"]) == lora_params(mixtral, 64, ["q_proj"])


def test_moe_qlora_keeps_the_experts_16_bit():
    mixtral = _mixtral()
    qlora = estimate_memory(load_config("internlm2_chat_7b_qlora_oasst1_e3"), mixtral, dtype="fp16")
    lora = estimate_memory(load_config("internlm2_chat_7b_qlora_oasst1_e3", ["training.method=lora"]), mixtral,
                           dtype="fp16")
    experts = 32 * 8 * 3 * 4096 * 14336
    assert qlora.weights_gib * 2**30 > experts * 2  # bitsandbytes quantizes nn.Linear only
    assert 0 < lora.weights_gib - qlora.weights_gib < 2  # 4-bit attention: ~1.5 bytes less on each of 1.3B


def test_moe_activations_grow_with_the_experts_a_token_runs():
    from transformers import MistralConfig

    mixtral = _mixtral()
    dense = MistralConfig(**{k: getattr(mixtral, k) for k in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "vocab_size", "max_position_embeddings")})
    top1 = AutoConfig.from_pretrained(MIXTRAL_DIR, num_experts_per_tok=1)
    cfg = load_config("qwen2_5_7b_instruct_lora_alpaca_e3")
    acts = {name: estimate_memory(cfg, mc).activations_gib for name, mc in
            (("dense", dense), ("top1", top1), ("top2", mixtral))}
    assert acts["top1"] == acts["dense"]  # one expert of the same width: a dense MLP's activations
    assert acts["dense"] < acts["top2"] < 2 * acts["dense"]  # two experts: the MLP's share doubles
