"""Memory per GPU before launch: weights, LoRA parameters, gradients,
optimizer states and activations, for the chosen method and ZeRO stage.

These are estimates from the model's config (no weights are loaded), with the
usual rules of thumb written out below, so the studio and the CLI can say
"this will not fit" before a 20-minute model download:

- parameters: attention, a gated MLP (or the MoE experts and router of Mixtral
  and Qwen-MoE configs, every expert counted), norms and embeddings;
- weights: the frozen base in the compute dtype (LoRA), 4-bit NF4 nn.Linear
  layers at ~4.13 bits/param with double quantization (QLoRA; an MoE's fused
  experts are no nn.Linear under transformers 5 and stay 16-bit), fp32 master
  weights plus a 16-bit copy under mixed precision (full; under ZeRO the
  16-bit weights stay and the fp32 master is sharded with the optimizer);
- gradients and AdamW states (m, v) in fp32 for trainable parameters only;
- ZeRO-1 shards optimizer states, ZeRO-2 also gradients, ZeRO-3 also weights,
  across the data-parallel ranks; offload moves optimizer states (and, for
  ZeRO-3 offload, weights) to CPU memory;
- activations per layer and token ~ (34·h + 5·heads·seq) bytes in 16-bit
  (Korthikanti et al., 2022), scaled by the dtype, the MLP's share by the
  experts a token runs through; with activation checkpointing one 16-bit
  hidden state per layer plus one layer in full.
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


@dataclass(frozen=True)
class Moe:
    """The mixture-of-experts part of a config (Mixtral's or Qwen-MoE's fields)."""

    experts: int  # routed experts in a sparse layer
    top_k: int  # experts each token runs through
    width: int  # intermediate size of one expert
    shared: int  # intermediate size of the always-on shared expert (0: none)
    sparse_layers: int  # layers with experts; the others have a dense MLP


def moe_of(mc) -> Moe | None:
    """Mixtral: ``num_local_experts``; Qwen-MoE: ``num_experts``, ``moe_intermediate_size``,
    ``shared_expert_intermediate_size``, ``decoder_sparse_step``, ``mlp_only_layers``."""
    experts = getattr(mc, "num_local_experts", None) or getattr(mc, "num_experts", None) or 0
    if experts <= 1:
        return None
    step = getattr(mc, "decoder_sparse_step", None) or 1
    dense = set(getattr(mc, "mlp_only_layers", None) or ())
    sparse = sum(1 for i in range(mc.num_hidden_layers) if i not in dense and (i + 1) % step == 0)
    width = getattr(mc, "moe_intermediate_size", None) or mc.intermediate_size
    shared = getattr(mc, "shared_expert_intermediate_size", None) or 0
    return Moe(experts, mc.num_experts_per_tok, width, shared, sparse)


def _attention_linears(mc) -> dict[str, tuple[int, int]]:
    """name -> (in, out) of one layer's attention projections, by the model's own names."""
    h, heads = mc.hidden_size, mc.num_attention_heads
    head_dim = getattr(mc, "head_dim", None) or h // heads
    q, kv = heads * head_dim, (getattr(mc, "num_key_value_heads", None) or heads) * head_dim
    if mc.model_type == "phi3":
        return {"qkv_proj": (h, q + 2 * kv), "o_proj": (q, h)}
    if mc.model_type == "internlm2":
        return {"wqkv": (h, q + 2 * kv), "wo": (q, h)}
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h)}


def _mlp_linears(mc, width: int) -> dict[str, tuple[int, int]]:
    """name -> (in, out) of a gated MLP of ``width``."""
    h = mc.hidden_size
    if mc.model_type == "phi3":
        return {"gate_up_proj": (h, 2 * width), "down_proj": (width, h)}
    if mc.model_type == "internlm2":
        return {"w1": (h, width), "w3": (h, width), "w2": (width, h)}
    return {"gate_proj": (h, width), "up_proj": (h, width), "down_proj": (width, h)}


def _layer_linears(mc, sparse: bool) -> dict[str, tuple[int, int]]:
    """The nn.Linear layers of one decoder layer (what 4-bit quantization and LoRA's
    all-linear reach). Under transformers 5 an MoE layer's experts are fused 3-D
    parameters and its router a module of its own: neither is an nn.Linear."""
    linears = dict(_attention_linears(mc))
    moe = moe_of(mc)
    if not sparse:
        linears.update(_mlp_linears(mc, mc.intermediate_size))
    elif moe.shared:
        linears.update(_mlp_linears(mc, moe.shared), shared_expert_gate=(mc.hidden_size, 1))
    return linears


def _layer_kinds(mc) -> list[tuple[int, bool]]:
    """(how many layers, sparse?) for the dense and the MoE layers."""
    moe, layers = moe_of(mc), mc.num_hidden_layers
    sparse = moe.sparse_layers if moe else 0
    return [(n, kind) for n, kind in ((layers - sparse, False), (sparse, True)) if n]


def _qkv_biases(mc) -> int:
    """Bias parameters of one layer's q, k and v projections (Qwen2 has them)."""
    if not (getattr(mc, "attention_bias", False) or getattr(mc, "qkv_bias", False) or mc.model_type == "qwen2"):
        return 0
    return sum(out for name, (_, out) in _attention_linears(mc).items() if name not in ("o_proj", "wo"))


def count_params(mc) -> tuple[int, int, int]:
    """(all, nn.Linear, embedding) parameters of a decoder-only config: Llama-style
    dense layers, Mixtral / Qwen-MoE experts (all of them: ~46.7B for Mixtral 8x7B)."""
    h, moe = mc.hidden_size, moe_of(mc)
    linear = 0
    other = mc.num_hidden_layers * (_qkv_biases(mc) + 2 * h) + h  # + two norms a layer, one at the end
    for n, sparse in _layer_kinds(mc):
        linear += n * sum(i * o for i, o in _layer_linears(mc, sparse).values())
        if sparse:  # the experts' gate, up and down projections, and the router
            other += n * moe.experts * (3 * h * moe.width + h)
    embed = mc.vocab_size * h * (1 if getattr(mc, "tie_word_embeddings", False) else 2)
    return linear + other + embed, linear, embed


def lora_params(mc, r: int, targets) -> int:
    """LoRA A and B for every targeted layer, r·(in + out) each, as peft builds them.

    In an MoE model peft maps the transformers-4 names (all-linear, Mixtral's
    w1/w3/w2, Qwen's gate_proj/up_proj/down_proj, the router ``gate``) onto the
    fused experts, so those MLP names no longer reach a dense or shared MLP."""
    every = targets == "all-linear"
    want = set() if every else set(targets)
    moe = moe_of(mc)
    expert_names = set(_mlp_linears(mc, 1)) if moe else set()
    total = 0
    for n, sparse in _layer_kinds(mc):
        for name, (i, o) in _layer_linears(mc, sparse).items():
            if (every or name in want) and name not in expert_names:
                total += n * r * (i + o)
    return total + (moe.sparse_layers * _expert_lora(mc, moe, r, every, want) if moe else 0)


def _expert_lora(mc, moe: Moe, r: int, every: bool, want: set) -> int:
    """LoRA on one MoE layer's fused experts (peft's ParamWrapper: r·experts rows)
    and its router; gate and up are fused at rank 2r (peft refuses one without the other)."""
    h, e, w = mc.hidden_size, moe.experts, moe.width
    gate, up, down = ("w1", "w3", "w2") if mc.model_type == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    n = 0
    if every or {gate, up} <= want:
        n += 2 * r * e * (h + 2 * w)  # gate_up_proj: (experts, 2·width, h)
    if every or down in want:
        n += r * e * (w + h)  # down_proj: (experts, h, width)
    if every or "gate" in want:
        n += r * (h + e)  # the router: (experts, h)
    return n


def _activation_bytes(cfg, mc, b: int) -> float:
    """Activations of one micro-batch: per layer and token ~ 34·h + 5·heads·seq bytes
    in 16-bit, of which 19·h is the MLP's; an MoE layer's MLP part grows with the
    width a token runs through (top-k experts + shared) over the dense MLP's."""
    mb, seq, h = cfg.training.micro_batch_size, cfg.data.max_length, mc.hidden_size
    moe = moe_of(mc)

    def layer(sparse: bool) -> float:
        mlp = 19 * h * ((moe.top_k * moe.width + moe.shared) / mc.intermediate_size if sparse else 1)
        return mb * seq * (15 * h + mlp + 5 * mc.num_attention_heads * seq) * b / 2

    kinds = _layer_kinds(mc)
    if cfg.training.gradient_checkpointing:  # one 16-bit hidden state per layer, one layer in full
        acts = mb * seq * h * 2 * mc.num_hidden_layers + max(layer(sparse) for _, sparse in kinds)
    else:
        acts = sum(n * layer(sparse) for n, sparse in kinds)
    return acts + mb * seq * mc.vocab_size * 4  # fp32 logits (an upper bound: the labeled-only head keeps fewer rows)


def estimate_memory(cfg, model_config, *, world_size: int = 1, zero_stage: int = 0, offload: bool = False,
                    dtype: str = "bf16") -> MemoryEstimate:
    """Per-GPU memory for ``cfg`` (a backend.config.Config) on ``model_config``
    (a transformers config), with ``world_size`` data-parallel ranks."""
    total, linear, embed = count_params(model_config)
    method = cfg.training.method
    b = BYTES.get(dtype, 2)
    optim_per_param = 8  # AdamW m and v in fp32
    if method == "full":
        trainable = total
        weights = total * (4 + (b if b < 4 else 0))  # fp32 master (+ 16-bit copy)
        if zero_stage >= 1 and b < 4:  # DeepSpeed: 16-bit weights; the fp32 master is sharded with the optimizer
            weights, optim_per_param = total * b, 12
    elif method == "lora":
        trainable = lora_params(model_config, cfg.lora.r, cfg.lora.target_modules)
        weights = total * b + trainable * 4
    else:  # qlora: the nn.Linear layers in 4 (or 8) bits, the rest (embeddings, MoE experts) in 16
        trainable = lora_params(model_config, cfg.lora.r, cfg.lora.target_modules)
        bits = 4.127 if cfg.quantization.bits == 4 else 8.0
        weights = linear * bits / 8 + (total - linear) * b + trainable * 4
    grads = trainable * 4
    optim = trainable * optim_per_param
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
    acts = _activation_bytes(cfg, model_config, b)
    return MemoryEstimate(total, trainable, weights / GIB, grads / GIB, optim / GIB, acts / GIB, cpu / GIB)


_MODEL_CONFIGS: dict = {}


def estimate_for(cfg, *, deepspeed: str | None = None, world_size: int = 1) -> tuple[MemoryEstimate, str]:
    """The estimate for a Config as it would launch: reads the model's config
    (not its weights; 'demo' is the bundled model), the ZeRO stage and offload
    from the DeepSpeed config name. Returns (estimate, dtype it assumed)."""
    from .core.artifacts import ALLOW_CODE_IN_CONFIG
    from .models import read_model_config

    key = (cfg.model.name_or_path, cfg.model.trust_remote_code)
    if key not in _MODEL_CONFIGS:
        _MODEL_CONFIGS[key] = read_model_config(cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code,
                                                what="model.name_or_path", allow=ALLOW_CODE_IN_CONFIG)
    name = deepspeed or ""
    stage = int(name[len("deepspeed_zero")]) if name.startswith("deepspeed_zero") else 0
    dtype = cfg.model.dtype if cfg.model.dtype != "auto" else "bf16"
    est = estimate_memory(cfg, _MODEL_CONFIGS[key], world_size=world_size, zero_stage=stage,
                          offload=name.endswith("_offload"), dtype=dtype)
    return est, dtype


# --- does it fit the chosen devices ----------------------------------------------------------

CUDA_CONTEXT_GIB = 0.75  # what CUDA and the NCCL buffers take on each card before the first tensor
HEADROOM = 1.1  # the allocator's fragmentation and the peaks between the estimate's parts


def fits(estimate: MemoryEstimate, devices, *, ranks: int | None = None) -> tuple[bool, str]:
    """Whether a run of ``estimate`` (per GPU, as ``estimate_for`` gives it for this many ranks)
    fits the chosen devices (``backend.devices.inventory.Device`` or their ids), and why, in words.

    On GPUs (or fake devices) every card must hold one rank's share: the estimate plus
    a CUDA context, with 10% headroom, against the smallest card. On the CPU device the
    ``ranks`` processes (default 1) share the RAM. CPU offload goes to the RAM as well."""
    from .devices.inventory import by_id, cpu_device

    known = by_id() if any(isinstance(d, str) for d in devices) else {}
    chosen = []
    for d in devices:
        if isinstance(d, str) and d not in known:
            raise ValueError(f"device {d!r}: this machine has no such device; it has {', '.join(known) or 'none'}")
        chosen.append(known[d] if isinstance(d, str) else d)
    if not chosen:
        raise ValueError("devices: choose at least one device")
    cpu = [d for d in chosen if d.kind == "cpu"]
    gpus = [d for d in chosen if d.kind != "cpu"]
    if cpu and gpus:
        raise ValueError("devices: choose GPUs or the CPU, not both")
    need = estimate.total_gib * HEADROOM
    if cpu:
        n = ranks or 1
        ram = cpu[0].memory_total_mb / 1024
        need = need * n + estimate.cpu_offload_gib * n
        ok = need <= ram
        who = f"{n} process{'es' if n > 1 else ''} on the CPU" if n > 1 else "the CPU"
        return ok, _fit_words(ok, need, ram, f"{who} ({_gib(ram)} RAM)")
    n = ranks or len(gpus)
    smallest = min(gpus, key=lambda d: d.memory_total_mb)
    card = smallest.memory_total_mb / 1024
    per_card = need + CUDA_CONTEXT_GIB
    ok = per_card <= card
    names = ", ".join(d.id for d in gpus)
    where = f"each of devices {names}" if len(gpus) > 1 else f"device {names}"
    words = _fit_words(ok, per_card, card, f"{where} ({smallest.name}, {_gib(card)})", per="per GPU ")
    host = estimate.cpu_offload_gib * min(n, len(gpus))
    if host:
        ram = cpu_device().memory_total_mb / 1024
        if host > ram:
            return False, words + f"; but the CPU offload needs {_gib(host)} of RAM and this machine has {_gib(ram)}"
        words += f"; CPU offload {_gib(host)} of {_gib(ram)} RAM"
    return ok, words


def _gib(gib: float) -> str:
    return f"{gib:,.1f} GiB"


def _fit_words(ok: bool, need: float, have: float, where: str, per: str = "") -> str:
    if ok:
        return f"fits: about {_gib(need)} {per}needed on {where}"
    return (f"does not fit: about {_gib(need)} {per}needed on {where}; try qlora or lora, "
            "training.gradient_checkpointing, a smaller micro_batch_size or max_length, more devices with "
            "ZeRO (deepspeed_zero2/zero3) or CPU offload")
