"""LoRA dropout that costs what it should, and adapters that run in the
activations' dtype.

Why this module exists: profiling ``Trainer.train`` on LoRA runs showed the
adapters' overhead dominating the step on small and mid-size models:
``aten::bernoulli_`` + the dropout's ``mul``/``div`` (25-30% of a step) and
``aten::copy_`` (peft casting bf16 activations up to the fp32 adapters, and
autocast casting them straight back down). What peft does not do, and so we
do here:

- peft drops out the adapter's *input*, ``B(A(dropout(x)))``: one full-size
  mask (tokens x in_features) per adapted linear, seven per Llama layer,
  three of them (q/k/v) over the same input, and a full-size dropped copy of
  ``x`` kept for the backward. We drop out the rank-r activation instead,
  ``B(dropout(A x))``: a mask of r values per token (r=8 against a hidden of
  256-4096), and ``x`` is not copied at all. The adapter's output is equal in
  expectation to peft's (``B A x * scale``; inverted dropout rescales by
  1/(1-p)); the noise differs in shape: whole rank components are dropped
  per token rather than input features (tests/test_lora_dropout.py checks the
  mean against peft's over many draws, and that eval mode has none).
- peft casts the activations to the adapter weights' dtype (bf16 -> fp32, a
  full-size copy per linear) and, under autocast, the matmul casts them back.
  We cast the adapter's weights instead (r x in_features, small) to the
  activations' dtype, which is what autocast does anyway: the matmuls run in
  bf16, the gradients still land in the fp32 master weights the optimizer
  steps. Under autocast the matmuls see the operands peft's would; without
  it (e.g. generating samples with a bf16 base) the result is within bf16
  rounding of peft's fp32 adapter (tested).
- peft adds the adapter as ``result + B(A x) * scale``: for each adapted
  linear a full-size (tokens x out_features) product, a full-size scaling
  multiply and a full-size add in the forward, and the multiply again in the
  backward; these memory-bound passes were most of ``aten::mul``/``add``
  (13% and 5% of a bf16 step on a hidden-1024 model). For a plain linear
  base we run the base on the flattened tokens and let B's GEMM add its
  product into that output in place, scaled by the GEMM itself
  (``addmm_(h, Bᵀ, alpha=scale)``): no full-size intermediate at all. One
  rounding instead of three in bf16; fp32 within 1e-6 of peft's (tested).
  B's weight is read inside B's own forward, so ZeRO-3's gather hooks still
  fire.

The parameters are the same ``Parameter`` objects under the same names
(``...lora_A.default.weight``), so saving, merging, ZeRO-3 and peft's own
adapter_config.json are untouched; ``lora_dropout`` in that config keeps the
configured value (peft, loading the adapter to go on training, drops out the
input as it always does).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn


class AdapterLinear(nn.Linear):
    """A LoRA A or B matrix: the matmul in the input's dtype (the weight is
    cast, not the activations), and for B a dropout on its rank-r input."""

    def __init__(self, linear: nn.Linear, dropout: float = 0.0):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        self.weight = linear.weight  # the same Parameter: optimizer, state dict and merge see no change
        self.bias = linear.bias
        self.dropout = float(dropout)

    def forward(self, x, into=None, scale: float = 1.0):
        """``F.linear(dropout(x))``; with ``into`` (a 2-D output of the base layer):
        ``into += scale * dropout(x) @ Wᵀ`` in place, the add and scale inside the GEMM."""
        if self.dropout and self.training:
            x = F.dropout(x, self.dropout, training=True)
        w, b = self.weight, self.bias
        if into is not None:
            return into.addmm_(x.reshape(-1, x.shape[-1]).to(into.dtype), w.to(into.dtype).t(), alpha=scale)
        if w.dtype != x.dtype and x.is_floating_point():
            w = w.to(x.dtype)
            b = None if b is None else b.to(x.dtype)
        return F.linear(x, w, b)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", dropout={self.dropout}"


def _fused_class():
    """peft's LoRA ``Linear`` with the adapters' product added inside B's GEMM (see the module's doc);
    anything it does not cover (adapters disabled or merged, mixed-adapter batches, extra
    arguments, a bias on B, a base that is not ``nn.Linear``) goes to peft's own forward."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    class FusedLoraLinear(LoraLinear):
        def forward(self, x, *args, **kwargs):
            if args or kwargs or self.disable_adapters or self.merged or not self._fusable():
                return super().forward(x, *args, **kwargs)
            flat = x.reshape(-1, x.shape[-1])
            result = self.base_layer(flat)
            for name in self.active_adapters:
                if name in self.lora_A:
                    h = self.lora_A[name](flat)
                    self.lora_B[name](h, into=result, scale=self.scaling[name])
            return result.view(*x.shape[:-1], result.shape[-1])

        def _fusable(self) -> bool:
            return type(self.base_layer) is nn.Linear and all(
                isinstance(self.lora_A[n], AdapterLinear) and self.lora_B[n].bias is None
                and n not in self.lora_variant for n in self.active_adapters if n in self.lora_A)

    return LoraLinear, FusedLoraLinear


def install(model, dropout: float) -> int:
    """Rank-r dropout ``dropout`` and activation-dtype matmuls in every plain
    LoRA linear of a peft model (in place); returns how many were changed.
    Layers peft builds differently (DoRA and other variants, conv, embedding
    adapters) keep peft's own path."""
    from peft.tuners.lora import LoraLayer

    changed = 0
    for layer in model.modules():
        if not isinstance(layer, LoraLayer):
            continue
        before = changed
        for name in list(layer.lora_A.keys()):
            a, b = layer.lora_A[name], layer.lora_B[name]
            plain = type(a) in (nn.Linear, AdapterLinear) and type(b) in (nn.Linear, AdapterLinear)
            if not plain or name in getattr(layer, "lora_variant", {}):
                continue
            layer.lora_A[name] = AdapterLinear(a)
            layer.lora_B[name] = AdapterLinear(b, dropout)
            layer.lora_dropout[name] = nn.Identity()  # peft's input dropout: replaced by B's
            changed += 1
        if changed > before:
            layer.cast_input_dtype_enabled = False  # AdapterLinear casts its weight instead
            peft_linear, fused = _FUSED
            if type(layer) is peft_linear:
                layer.__class__ = fused  # same state and parameters; only the forward differs
    return changed


_FUSED = _fused_class()
