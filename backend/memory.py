"""Memory per GPU before launch: weights, LoRA parameters, gradients,
optimizer states and activations, for the chosen method and ZeRO stage.

These are estimates from the model's config (no weights are loaded), with the
usual rules of thumb written out below, so the studio and the CLI can say
"this will not fit" before a 20-minute model download:

- weights: the frozen base in the compute dtype (LoRA), 4-bit NF4 linear
  layers at ~4.13 bits/param with double quantization (QLoRA), fp32 master
  weights plus a 16-bit copy under mixed precision (full);
- gradients and AdamW states (m, v) in fp32 for trainable parameters only;
- ZeRO-1 shards optimizer states, ZeRO-2 also gradients, ZeRO-3 also weights,
  across the data-parallel ranks; offload moves optimizer states (and, for
  ZeRO-3 offload, weights) to CPU memory;
- activations per layer and token ~ (34·h + 5·heads·seq) bytes in 16-bit
  (Korthikanti et al., 2022), scaled by the dtype; with activation
  checkpointing one 16-bit hidden state per layer plus one layer in full.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

GIB = 1024**3
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass
class MemoryEstimate:
    params: int
    trainable_params: int
    weights_gib: float
    gradients_gib: float
    optimizer_gib: float
    activations_gib: float
    cpu_offload_gib: float

    @property
    def total_gib(self) -> float:
        return self.weights_gib + self.gradients_gib + self.optimizer_gib + self.activations_gib

    def to_dict(self) -> dict:
        return {**asdict(self), "total_gib": self.total_gib}


def count_params(mc) -> tuple[int, int, int]:
    """(all, linear-layer, embedding) parameters of a Llama-style config."""
    h, layers, inter, vocab = mc.hidden_size, mc.num_hidden_layers, mc.intermediate_size, mc.vocab_size
    heads = mc.num_attention_heads
    kv = getattr(mc, "num_key_value_heads", None) or heads
    head_dim = getattr(mc, "head_dim", None) or h // heads
    attn = h * heads * head_dim * 2 + h * kv * head_dim * 2
    mlp = 3 * h * inter
    linear = layers * (attn + mlp)
    embed = vocab * h * (1 if getattr(mc, "tie_word_embeddings", False) else 2)
    return linear + embed + layers * 2 * h + h, linear, embed


def lora_params(mc, r: int, targets) -> int:
    """LoRA A and B for every targeted linear layer: r·(in + out) each."""
    h, inter, heads = mc.hidden_size, mc.intermediate_size, mc.num_attention_heads
    kv = getattr(mc, "num_key_value_heads", None) or heads
    head_dim = getattr(mc, "head_dim", None) or h // heads
    shapes = {
        "q_proj": (h, heads * head_dim), "k_proj": (h, kv * head_dim), "v_proj": (h, kv * head_dim),
        "o_proj": (heads * head_dim, h), "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h),
    }
    names = list(shapes) if targets == "all-linear" else [t for t in targets if t in shapes]
    return mc.num_hidden_layers * sum(r * (shapes[n][0] + shapes[n][1]) for n in names)


def estimate_memory(cfg, model_config, *, world_size: int = 1, zero_stage: int = 0, offload: bool = False,
                    dtype: str = "bf16") -> MemoryEstimate:
    """Per-GPU memory for ``cfg`` (a backend.config.Config) on ``model_config``
    (a transformers config), with ``world_size`` data-parallel ranks."""
    total, linear, embed = count_params(model_config)
    method = cfg.training.method
    b = BYTES.get(dtype, 2)
    if method == "full":
        trainable = total
        weights = total * (4 + (b if b < 4 else 0))  # fp32 master (+ 16-bit copy)
    elif method == "lora":
        trainable = lora_params(model_config, cfg.lora.r, cfg.lora.target_modules)
        weights = total * b + trainable * 4
    else:  # qlora
        trainable = lora_params(model_config, cfg.lora.r, cfg.lora.target_modules)
        bits = 4.127 if cfg.quantization.bits == 4 else 8.0
        weights = linear * bits / 8 + (total - linear) * b + trainable * 4
    grads = trainable * 4
    optim = trainable * 8
    cpu = 0.0
    n = max(1, world_size)
    if zero_stage >= 1:
        optim /= n
    if zero_stage >= 2:
        grads /= n
    if zero_stage >= 3:
        weights /= n
    if offload:
        cpu += optim
        optim = 0
        if zero_stage >= 3:
            cpu += weights
            weights = 0
    mc = model_config
    mb, seq = cfg.training.micro_batch_size, cfg.data.max_length
    scale = b / 2
    per_layer = mb * seq * (34 * mc.hidden_size + 5 * mc.num_attention_heads * seq) * scale
    if cfg.training.gradient_checkpointing:
        acts = mb * seq * mc.hidden_size * 2 * mc.num_hidden_layers + per_layer
    else:
        acts = per_layer * mc.num_hidden_layers
    acts += mb * seq * mc.vocab_size * 4  # fp32 logits (an upper bound: the labeled-only head keeps fewer rows)
    return MemoryEstimate(total, trainable, weights / GIB, grads / GIB, optim / GIB, acts / GIB, cpu / GIB)


_MODEL_CONFIGS: dict = {}


def estimate_for(cfg, *, deepspeed: str | None = None, world_size: int = 1) -> tuple[MemoryEstimate, str]:
    """The estimate for a Config as it would launch: reads the model's config
    (not its weights; 'demo' is the bundled model), the ZeRO stage and offload
    from the DeepSpeed config name. Returns (estimate, dtype it assumed)."""
    from transformers import AutoConfig

    from .demo import resolve_model

    key = (cfg.model.name_or_path, cfg.model.trust_remote_code)
    if key not in _MODEL_CONFIGS:
        try:
            _MODEL_CONFIGS[key] = AutoConfig.from_pretrained(resolve_model(cfg.model.name_or_path),
                                                             trust_remote_code=cfg.model.trust_remote_code)
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read the config of model {cfg.model.name_or_path}: "
                             f"{str(exc).splitlines()[0][:300]}") from None
    name = deepspeed or ""
    stage = int(name[len("deepspeed_zero")]) if name.startswith("deepspeed_zero") else 0
    dtype = cfg.model.dtype if cfg.model.dtype != "auto" else "bf16"
    est = estimate_memory(cfg, _MODEL_CONFIGS[key], world_size=world_size, zero_stage=stage,
                          offload=name.endswith("_offload"), dtype=dtype)
    return est, dtype
