"""Training inside one rank: data, model, ``transformers.Trainer`` and the
callbacks that fill the run directory.

What is ours rather than the libraries': the packed-batch collator (exact
sample isolation), the loss that runs the LM head only where a label is
trained (peers compute logits for every prompt token and throw them away),
an eval loss weighted by token (``evaluation.py``), rank-0 metrics.jsonl /
samples.jsonl, trackers pointed at the run folder (``trackers.py``),
``iter_<N>.pth`` files that carry their config, template and base model, a
completion mark on Trainer checkpoints, and a graceful abort that stops every
rank at the same step.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from ..config import Config, ConfigError, from_dict
from ..core.artifacts import iter_name, save_iter
from ..core.rundir import RunDir, checkpoint_step
from .attention import SEGMENT_SDPA, register
from .collate import PackedCollator, PaddedCollator
from .evaluation import answer_prompts, labeled_logits, sample_prompts, token_weighted_loss
from .precision import cpu_precision


# --- environment -----------------------------------------------------------------------


def dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def all_reduce(values: list[float], op="sum") -> list[float]:
    """Each value summed (or maxed) over the ranks, in one collective."""
    if not dist_ready():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    backend = torch.distributed.get_backend()
    if backend == "nccl":
        t = t.cuda()
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX if op == "max" else torch.distributed.ReduceOp.SUM)
    return t.tolist()


def peak_memory_mb() -> float:
    """This rank's peak memory since the last call, in MiB: on a GPU the most
    PyTorch allocated on it (its peak counter is reset here), on the CPU the
    process's peak resident set (ru_maxrss: since the process started)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        return round(peak / 2**20, 1)
    import resource
    import sys

    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(kib / (2**20 if sys.platform == "darwin" else 2**10), 1)


def resolve_dtype(name: str) -> torch.dtype:
    cuda = torch.cuda.is_available()
    if name == "auto":
        if cuda:
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_precision().bf16 else torch.float32
    if name == "fp16" and not cuda:
        raise ConfigError("model.dtype is fp16, which needs a GPU; use bf16 or fp32 on a CPU")
    from ..models import TORCH_DTYPES

    return getattr(torch, TORCH_DTYPES[name])


# Per-sample SDPA pays once blocks are long. bf16 (4.2M model, micro-batch 4, bench_train.py, load ~1): at 2048 it
# ran 1.83x the masked block's tokens/s, at 512 0.67-0.89x; fp32: 1.76x at 2048 and 1.04-1.12x at 512. On the 256-token
# demo (many short samples, a Python call each) it was 1.6x slower. Shorter blocks keep the block-diagonal mask.
def segment_min_length(dtype: torch.dtype | None) -> int:
    """The shortest packed block that ``auto`` gives per-sample SDPA (fp32: 512; bf16, fp16 or unknown: 1024)."""
    return 512 if dtype == torch.float32 else 1024


def resolve_attention(name: str, packed: bool = False, max_length: int | None = None,
                      dtype: torch.dtype | None = None) -> str:
    """The attention kernel for ``model.attn_implementation``. auto: flash-attention
    on CUDA where installed (varlen for packed rows); packed data on a CPU in blocks of
    ``segment_min_length(dtype)`` tokens or more gets per-sample SDPA (``attention.py``:
    Σ nᵢ² instead of a masked T² block); else sdpa."""
    if name == SEGMENT_SDPA:
        return register()
    if name != "auto":
        return name
    if torch.cuda.is_available():
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
        return "sdpa"
    long_blocks = max_length is None or max_length >= segment_min_length(dtype)
    return register() if packed and long_blocks else "sdpa"


# --- model -----------------------------------------------------------------------------


def grow_embeddings(model, tokenizer, template: str) -> list[int]:
    """Rows for the template markers ``model.add_template_tokens`` added to the
    tokenizer: the embeddings (and an untied head) grow to the tokenizer's size;
    returns the new rows' token ids (they must be trained)."""
    from ..data import get_template
    from ..models import fit_embeddings

    rows = model.get_input_embeddings().num_embeddings
    ids = {tokenizer.convert_tokens_to_ids(m) for m in get_template(template).markers()}
    new = sorted(i for i in ids if isinstance(i, int) and i >= rows)
    if new:
        fit_embeddings(model, len(tokenizer))  # new rows start at the mean of the old ones
    return new


def module_name(model, module) -> str:
    return next(name for name, m in model.named_modules() if m is module).rsplit(".", 1)[-1]


def load_model(cfg: Config, model_path: str, dtype: torch.dtype, attn: str, tokenizer=None):
    from transformers import AutoModelForCausalLM

    method = cfg.training.method
    # full fine-tuning keeps fp32 master weights (bf16/fp16 run as mixed precision);
    # LoRA/QLoRA hold the frozen base in the compute dtype and the adapters in fp32
    kwargs = dict(dtype=torch.float32 if method == "full" else dtype,
                  attn_implementation=attn, trust_remote_code=cfg.model.trust_remote_code)
    from transformers.integrations import is_deepspeed_zero3_enabled

    zero3 = is_deepspeed_zero3_enabled()
    if method == "qlora":
        kwargs["quantization_config"] = quantization_config(cfg, dtype, zero3=zero3)
        if not zero3:  # under ZeRO-3 no rank holds the whole model: DeepSpeed places and partitions it
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            kwargs["device_map"] = {"": local_rank} if torch.cuda.is_available() else {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    model.config.use_cache = False
    if method == "qlora" and zero3:
        for m in model.modules():  # bitsandbytes' CPU inference repacks the weight in place, but under
            if hasattr(m, "support_avx512bf16_for_cpu"):  # ZeRO-3 DeepSpeed owns the weight's storage
                m.support_avx512bf16_for_cpu = False
    new_rows = grow_embeddings(model, tokenizer, cfg.data.template) if tokenizer is not None else []
    if method == "full":
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if method == "qlora":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.training.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    lora = LoraConfig(
        r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules, bias=cfg.lora.bias, task_type="CAUSAL_LM",
        trainable_token_indices=new_token_rows(model, new_rows) or None,
    )
    model = get_peft_model(model, lora)
    from .lora_dropout import install  # dropout on the rank-r activation, adapters in the activations' dtype

    install(model, cfg.lora.dropout)
    return model


def new_token_rows(model, ids: list[int]) -> dict[str, list[int]]:
    """peft's trainable_token_indices for added tokens: the embedding's rows, and
    the head's too when it is not tied to the embedding."""
    if not ids:
        return {}
    rows = {module_name(model, model.get_input_embeddings()): ids}
    head = model.get_output_embeddings()
    if head is not None and head.weight is not model.get_input_embeddings().weight:
        rows[module_name(model, head)] = ids
    return rows


def added_template_tokens(tokenizer, cfg: Config) -> list[str]:
    """The template markers this run added to its tokenizer (recorded so export and chat add them too)."""
    if not cfg.model.add_template_tokens:
        return []
    from ..data import get_template

    added = tokenizer.get_added_vocab()
    return [m for m in get_template(cfg.data.template).markers() if m in added]


def quantization_config(cfg: Config, dtype: torch.dtype, zero3: bool = False):
    """bitsandbytes' settings. Under ZeRO-3 the packed 4-bit weights are stored
    as ``dtype`` (the dtype of every other parameter), so DeepSpeed can flatten
    and partition them with the rest; bitsandbytes unpacks them at each forward."""
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as exc:
        raise ConfigError(
            "training.method is qlora, but bitsandbytes is not installed: pip install bitsandbytes "
            "(or use training.method=lora)"
        ) from exc
    q = cfg.quantization
    compute = dtype if q.compute_dtype == "auto" else resolve_dtype(q.compute_dtype)
    return BitsAndBytesConfig(
        load_in_4bit=q.bits == 4, load_in_8bit=q.bits == 8,
        bnb_4bit_quant_type=q.quant_type, bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=compute, **({"bnb_4bit_quant_storage": dtype} if zero3 else {}),
    )


def trainable_state_dict(model) -> dict:
    """The weights that training changes, gathered to full tensors on CPU
    (under ZeRO-3 every rank must call this: the gather is collective)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if is_deepspeed_zero3_enabled():
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
            state = {n: p.detach().to("cpu", copy=True) for n, p in named}
    else:
        state = {n: p.detach().to("cpu", copy=True) for n, p in named}
    if hasattr(model, "peft_config"):
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(model, state_dict=state)
    return state


# --- the Trainer -----------------------------------------------------------------------


class StudioTrainer(Trainer):
    """Trainer with the labeled-only loss, a count of real (non-padding) tokens,
    and a token-weighted eval loss (``evaluation.py`` says why Trainer's is not)."""

    def __init__(self, *args, labeled_only: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.labeled_only = labeled_only
        self.tokens_since_step = 0  # this rank's trained-input tokens since the last optimizer step
        self._select = None
        self._head_hidden = None  # "deferred": the pre-hook parks the head's input here, the loss runs the head
        self.head = None
        self.seconds = {"save": 0.0, "samples": 0.0}  # spent saving checkpoints / answering eval prompts
        if labeled_only:
            self.head = self.accelerator.unwrap_model(self.model).get_output_embeddings()
            self.head.register_forward_pre_hook(self._keep_labeled_positions)

    def _keep_labeled_positions(self, module, args):
        if self._select is None:
            return None
        hidden = args[0][self._select]
        if self._head_hidden == "deferred":  # the model's own head call computes nothing (0 rows)
            self._head_hidden, hidden = hidden, hidden[:0]
        return (hidden,) + tuple(args[1:])

    def labeled_losses(self, model, inputs, reduction: str = "sum") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss over the trained positions: their sum, or one per token with ``reduction="none"``;
        their target ids; the selection). Small batches run the head inside the model; large ones
        (tokens x vocab over linear_ce.CHUNK_ELEMENTS) take the head's input out and run head +
        loss in chunks (linear_ce.py), in training and in the eval loss alike."""
        from transformers.integrations import is_deepspeed_zero3_enabled

        from .linear_ce import choose_kernel, linear_cross_entropy

        tokens = int((inputs["labels"][:, 1:] != -100).sum())
        kernel = "plain" if not self.labeled_only else choose_kernel(
            self.head, tokens, inputs["labels"].device, zero3=is_deepspeed_zero3_enabled())
        self._head_hidden = None if kernel == "plain" else "deferred"
        try:
            logits, targets, select = labeled_logits(self, model, inputs)
            hidden = self._head_hidden
        finally:
            self._head_hidden = None
        if kernel == "plain":
            return F.cross_entropy(logits.float(), targets, reduction=reduction), targets, select
        return linear_cross_entropy(hidden, self.head, targets, kernel=kernel, reduction=reduction), targets, select

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.tokens_since_step += int(inputs.pop("num_tokens"))
        inputs.pop("item_lens", None)
        if not self.labeled_only or return_outputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, targets, _ = self.labeled_losses(model, inputs)
        count = targets.numel()
        if num_items_in_batch is not None:
            loss = loss / num_items_in_batch
            if self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes
        else:
            loss = loss / max(count, 1)
        return loss

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        """Trainer's evaluate() (schedule, speed metrics, logging, callbacks) around our own
        loss: summed over every labeled token of the eval set, divided once by their count."""
        from transformers.trainer_utils import EvalLoopOutput

        loss, tokens, items = token_weighted_loss(self, dataloader)
        metrics = {f"{metric_key_prefix}_loss": loss, f"{metric_key_prefix}_tokens": tokens}
        return EvalLoopOutput(predictions=None, label_ids=None, metrics=metrics, num_samples=items)

    def _save_checkpoint(self, model, trial):
        """Trainer's checkpoint, timed: the run's save phase (``phases.py``)."""
        began = time.perf_counter()
        super()._save_checkpoint(model, trial)
        self.seconds["save"] += time.perf_counter() - began

    def log(self, logs: dict, start_time=None):
        if "loss" in logs:  # a training log: the trackers get the token count too
            logs["tokens_seen"] = self.state.num_input_tokens_seen
        super().log(logs, start_time)


# --- callbacks -------------------------------------------------------------------------


class RunDirCallback(TrainerCallback):
    """metrics.jsonl (training and eval rows), samples.jsonl, iter_<N>.pth,
    checkpoint marks and abort."""

    def __init__(self, run: RunDir, cfg: Config, meta: dict, tokenizer, abort_flag, trainer_ref,
                 heldout: list | None = None):
        self.run = run
        self.cfg = cfg
        self.meta = meta
        self.tokenizer = tokenizer
        self.abort_flag = abort_flag
        self.trainer_ref = trainer_ref
        self.prompts = sample_prompts(cfg, heldout or [])
        self.start = time.time()
        self.last_log = time.time()
        self.paused_s = 0.0  # time since the last log spent evaluating, not training
        self.tokens_since_log = 0.0
        self.aborted = False
        self.rank0 = int(os.environ.get("RANK", "0")) == 0

    # metrics
    def on_log(self, args, state, control, logs=None, **kw):
        if not logs:
            return
        if "eval_loss" in logs:
            self.paused_s += logs.get("eval_runtime") or 0.0
            return self._eval_row(state, logs) if state.is_world_process_zero else None
        if "loss" not in logs:
            return
        now = time.time()
        span, self.last_log = now - self.last_log - self.paused_s, now
        tokens, self.tokens_since_log, self.paused_s = self.tokens_since_log, 0.0, 0.0
        # every rank logs this step (Trainer gathered the loss from all of them): the largest rank's peak
        peak = all_reduce([peak_memory_mb()], op="max")[0]
        if not state.is_world_process_zero:
            return
        row = {
            "step": state.global_step,
            "max_steps": state.max_steps,
            "epoch": round(state.epoch or 0.0, 4),
            "loss": logs.get("loss"),
            "lr": logs.get("learning_rate"),
            "grad_norm": logs.get("grad_norm"),
            "tokens_per_s": round(tokens / span, 1) if span > 0 else None,
            "tokens_seen": state.num_input_tokens_seen,
            "elapsed_s": round(now - self.start, 3),
            "peak_memory_mb": peak,
        }
        self.run.append_metric(row)
        print(f"step {row['step']}/{state.max_steps}  loss {row['loss']:.4f}  lr {row['lr']:.3g}  "
              f"grad_norm {row['grad_norm'] if row['grad_norm'] is None else round(row['grad_norm'], 4)}  "
              f"{row['tokens_per_s']} tok/s", flush=True)

    def _eval_row(self, state, logs):
        row = {"step": state.global_step, "eval_loss": logs["eval_loss"], "eval_tokens": logs.get("eval_tokens"),
               "tokens_seen": state.num_input_tokens_seen, "elapsed_s": round(time.time() - self.start, 3)}
        self.run.append_metric(row)
        print(f"eval at step {row['step']}: eval_loss {row['eval_loss']:.4f} over {row['eval_tokens']} tokens "
              f"({logs.get('eval_runtime')} s)", flush=True)

    # evaluation samples: at step 0, every `evaluation.every` steps and at every save
    def on_train_begin(self, args, state, control, model=None, **kw):
        if state.global_step == 0 and self.prompts:
            self._answer(model, state.global_step)

    def on_step_end(self, args, state, control, model=None, **kw):
        trainer = self.trainer_ref()
        # one collective per step: did any rank ask to abort, and the tokens all ranks trained on
        abort, tokens = all_reduce([1.0 if self.abort_flag.requested else 0.0, trainer.tokens_since_step])
        trainer.tokens_since_step = 0
        state.num_input_tokens_seen += int(tokens)  # kept in the checkpoint's trainer state: a resume goes on counting
        self.tokens_since_log += tokens
        if abort > 0:
            # abort = save + stop: every rank took this decision at this same step
            print(f"[rank {os.environ.get('RANK', '0')}] abort: saving at step {state.global_step}, then stopping",
                  flush=True)
            self.aborted = True
            control.should_training_stop = True
            control.should_save = True
            control.should_evaluate = False  # stop promptly
        elif self.prompts and state.global_step % self.cfg.evaluation.every == 0 and not control.should_save:
            self._answer(model, state.global_step)  # a save step is answered in on_save, after the checkpoint
        return control

    def _answer(self, model, step: int):
        """Answer the evaluation prompts; a failure here is logged, never fatal
        (the samples are a window on training, not part of it)."""
        began = time.time()
        try:
            self._generate_samples(model, step)
        except Exception as exc:  # noqa: BLE001
            print(f"[rank {os.environ.get('RANK', '0')}] evaluation samples at step {step} failed: "
                  f"{type(exc).__name__}: {exc}", flush=True)
            trainer = self.trainer_ref()
            (trainer.accelerator.unwrap_model(trainer.model) if model is None else model).train()
        self.paused_s += time.time() - began
        self.trainer_ref().seconds["samples"] += time.time() - began

    def _generate_samples(self, model, step: int):
        from transformers.integrations import is_deepspeed_zero3_enabled

        zero3 = is_deepspeed_zero3_enabled()
        if not (self.rank0 or zero3):  # under ZeRO-3 every rank takes part in each forward
            return
        trainer = self.trainer_ref()
        net = trainer.accelerator.unwrap_model(trainer.model) if model is None else model
        was_training = net.training
        net.eval()
        rows = answer_prompts(net, self.tokenizer, self.meta["template"]["name"], self.prompts, step,
                              device=trainer.args.device, max_new_tokens=self.cfg.evaluation.max_new_tokens,
                              synced_gpus=zero3)
        if was_training:
            net.train()
        if self.rank0:
            self.run.append_samples(rows)
            print(f"samples at step {step}: " + " | ".join(repr(r["output"][:60]) for r in rows), flush=True)

    # checkpoints
    def on_save(self, args, state, control, model=None, **kw):
        trainer = self.trainer_ref()
        began = time.perf_counter()
        net = trainer.accelerator.unwrap_model(trainer.model)
        state_dict = trainable_state_dict(net)  # collective under ZeRO-3
        if dist_ready():
            torch.distributed.barrier()
        if state.is_world_process_zero:
            save_iter(self.run.path, state.global_step, state_dict, {**self.meta, "epoch": state.epoch})
            self.run.mark_complete(state.global_step)  # both halves of the checkpoint are whole now
            limit = self.cfg.saving.save_total_limit
            if limit and limit > 0:
                self.run.prune_iters(limit, up_to=state.global_step)
        trainer.seconds["save"] += time.perf_counter() - began
        if self.prompts and not self.aborted:
            self._answer(model, state.global_step)  # every checkpoint's answers, for the comparison grid


# --- the whole run ---------------------------------------------------------------------


def data_line(what: str, report) -> str:
    return (f"{what}: {report.rows} rows -> {report.kept} samples ({report.dropped} dropped, "
            f"{report.truncated} truncated), {report.tokens} tokens"
            + (f", {report.packed_blocks} packed blocks" if report.packed_blocks else ""))


def training_arguments(cfg: Config, run: RunDir, *, dtype, deepspeed, resume, rank: int, world: int,
                       has_eval: bool) -> TrainingArguments:
    """Our config in Trainer's terms. With eval data the eval loss runs on Trainer's
    schedule: at step 0 (the base model), every evaluation.eval_steps (0: at every
    save, so each checkpoint has one) and at the end."""
    use_cpu = not torch.cuda.is_available()
    report_to = cfg.training.report_to if rank == 0 else []  # only rank 0 reports to trackers
    if report_to:
        from .trackers import setup

        setup(run, report_to, project=cfg.name)
    t = cfg.training
    return TrainingArguments(
        output_dir=str(run.checkpoints_dir),
        per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.accumulative_counts,
        learning_rate=t.lr, adam_beta1=t.betas[0], adam_beta2=t.betas[1], weight_decay=t.weight_decay,
        num_train_epochs=t.epochs, max_steps=t.max_steps,
        lr_scheduler_type=t.lr_scheduler, warmup_steps=t.warmup_ratio,
        max_grad_norm=t.max_norm if t.max_norm > 0 else 0.0,
        logging_steps=t.logging_steps,
        save_strategy="steps", save_steps=cfg.saving.save_steps,
        save_total_limit=cfg.saving.save_total_limit if cfg.saving.save_total_limit > 0 else None,
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        activation_checkpointing=t.gradient_checkpointing and t.method != "qlora",
        activation_checkpointing_kwargs={"use_reentrant": False},
        train_sampling_strategy="group_by_length" if (t.group_by_length and not cfg.data.pack) else "random",
        length_column_name="length",
        dataloader_num_workers=t.dataloader_workers,
        seed=t.seed, data_seed=t.seed,
        report_to=report_to, run_name=run.name, project=cfg.name,
        disable_tqdm=True, remove_unused_columns=False,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=(cfg.evaluation.eval_steps or cfg.saving.save_steps) if has_eval else None,
        eval_on_start=has_eval and not resume,  # a resumed run has its earlier eval rows
        per_device_eval_batch_size=cfg.evaluation.batch_size or t.micro_batch_size,
        deepspeed=deepspeed, ddp_find_unused_parameters=False, use_cpu=use_cpu,
        ddp_backend="gloo" if use_cpu and world > 1 else None,
        logging_first_step=False,
    )


def run_data(cfg: Config, tokenizer, args: TrainingArguments, rank: int):
    """(training samples, eval samples or None, held-out conversations for the samples)."""
    from ..data.pipeline import conversations
    from .data import eval_data, training_data

    with args.main_process_first(desc="data"):
        samples, report = training_data(cfg, tokenizer, pack=cfg.data.pack)
        evaluation = eval_data(cfg, tokenizer, pack=cfg.data.pack)
    if rank == 0:
        print(data_line("data", report), flush=True)
    if evaluation is None:
        return samples, None, []
    eval_samples, eval_report, eval_rows = evaluation
    if rank == 0:
        print(data_line(f"eval data, {eval_report.source}", eval_report), flush=True)
    return samples, eval_samples, conversations(eval_rows, eval_report.map_fn, cfg.evaluation.heldout_samples)


def run_meta(cfg: Config, model, tokenizer, model_path: str, dtype) -> dict:
    """What every iter_<N>.pth carries besides its weights."""
    from ..data.templates import get_template

    return {
        "kind": cfg.training.method,
        "base_model": cfg.model.name_or_path,
        "base_model_path": model_path,
        "template": get_template(cfg.data.template).to_dict(),
        "system": cfg.evaluation.system,
        "config": cfg.to_dict(),
        "lora": {"r": cfg.lora.r, "alpha": cfg.lora.alpha, "dropout": cfg.lora.dropout,
                 "target_modules": cfg.lora.target_modules, "bias": cfg.lora.bias}
        if cfg.training.method != "full" else None,
        "dtype": str(dtype).replace("torch.", ""),
        "vocab_size": len(tokenizer),
        "added_tokens": added_template_tokens(tokenizer, cfg),
        "trainable_token_indices": getattr(getattr(model, "peft_config", {}).get("default"),
                                           "trainable_token_indices", None),
    }


def train(run_dir: Path, deepspeed: str | None = None, resume: str | None = None, abort_flag=None,
          phases=None) -> str:
    """Train as configured in ``run_dir/config.yaml``; returns 'finished' or 'aborted'.
    ``phases`` (``phases.Phases``) is told where each phase begins: data, model load, steps, save."""
    import weakref

    import datasets
    import yaml
    from transformers import set_seed

    from ..config import eval_source
    from ..demo import resolve_model
    from .data import training_tokenizer
    from .phases import Phases

    datasets.disable_progress_bars()  # train.log is a file, not a terminal
    phases = phases or Phases()
    phases.begin("data")
    run = RunDir(run_dir)
    cfg = from_dict(yaml.safe_load(run.config_file.read_text(encoding="utf-8")), str(run.config_file))
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    print(f"[rank {rank}/{world}] {cfg.name}: {cfg.training.method} on {cfg.model.name_or_path}, "
          f"deepspeed={Path(deepspeed).name if deepspeed else 'off'}, resume={resume}", flush=True)
    dtype = resolve_dtype(cfg.model.dtype)
    if cfg.model.dtype == "auto" and not torch.cuda.is_available() and rank == 0:
        print(f"model.dtype auto: {'bf16' if dtype == torch.bfloat16 else 'fp32'} ({cpu_precision().reason})",
              flush=True)
    attn = resolve_attention(cfg.model.attn_implementation, packed=cfg.data.pack, max_length=cfg.data.max_length,
                             dtype=dtype)
    model_path = resolve_model(cfg.model.name_or_path)
    tokenizer = training_tokenizer(cfg)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    args = training_arguments(cfg, run, dtype=dtype, deepspeed=deepspeed, resume=resume, rank=rank, world=world,
                              has_eval=eval_source(cfg) is not None)
    samples, eval_samples, heldout = run_data(cfg, tokenizer, args, rank)
    phases.begin("model_load")
    if deepspeed and not torch.cuda.is_available():
        # With use_cpu, accelerate starts gloo itself and DeepSpeed's comm layer
        # is not set up yet; ZeRO-3's zero.Init would then see world size 1.
        import deepspeed as ds

        ds.init_distributed(dist_backend="gloo")
    set_seed(cfg.training.seed)  # LoRA's initial weights come from this too: same seed, same run
    model = load_model(cfg, model_path, dtype, attn, tokenizer)
    if rank == 0 and hasattr(model, "print_trainable_parameters"):
        model.print_trainable_parameters()
    if cfg.data.pack:
        # flash-attention and per-sample SDPA take one flattened row and its cu_seq_lens; the rest a 4-D mask
        mask = {"flash_attention_2": None, SEGMENT_SDPA: None, "sdpa": "bool"}.get(attn, "float")
        collator = PackedCollator(tokenizer.pad_token_id, mask=mask)
    else:
        collator = PaddedCollator(tokenizer.pad_token_id)
    trainer = StudioTrainer(
        model=model, args=args, train_dataset=samples, eval_dataset=eval_samples, data_collator=collator,
        labeled_only=cfg.training.loss_on_labeled_only,
    )
    callback = RunDirCallback(run, cfg, run_meta(cfg, model, tokenizer, model_path, dtype), tokenizer, abort_flag,
                              weakref.ref(trainer), heldout=heldout)
    trainer.add_callback(callback)
    trainer.remove_callback(PrinterCallback)  # our own one-line-per-step log replaces its dicts
    if resume and rank == 0:
        run.truncate_after(checkpoint_step(resume) or 0)
    phases.begin("steps")
    trainer.train(resume_from_checkpoint=resume)
    phases.end()
    phases.carve("steps", trainer.seconds)  # checkpoints saved and prompts answered between the steps
    if callback.aborted and trainer.state.global_step < trainer.state.max_steps:
        print(f"run aborted; saved at step {trainer.state.global_step}", flush=True)
        return "aborted"
    # the final weights, unless the last step was just saved
    if not (run.path / iter_name(trainer.state.global_step)).exists():
        phases.begin("save")
        samples = trainer.seconds["samples"]
        trainer._save_checkpoint(trainer.model, trial=None)
        callback.on_save(trainer.args, trainer.state, trainer.control)
        phases.end()
        phases.carve("save", {"samples": trainer.seconds["samples"] - samples})
    print(f"finished at step {trainer.state.global_step}", flush=True)
    return "finished"
