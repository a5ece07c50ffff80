"""Training inside one rank: data, model, ``transformers.Trainer`` and the
callbacks that fill the run directory.

What is ours rather than the libraries': the packed-batch collator (exact
sample isolation), the loss that runs the LM head only where a label is
trained (peers compute logits for every prompt token and throw them away),
rank-0 metrics.jsonl / samples.jsonl, ``iter_<N>.pth`` files that carry their
config, template and base model, a completion mark on Trainer checkpoints,
and a graceful abort that stops every rank at the same step.
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
from .collate import IGNORE_INDEX, PackedCollator, PaddedCollator


# --- environment -----------------------------------------------------------------------


def dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def all_reduce(value: float, op="sum") -> float:
    if not dist_ready():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    backend = torch.distributed.get_backend()
    if backend == "nccl":
        t = t.cuda()
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX if op == "max" else torch.distributed.ReduceOp.SUM)
    return float(t.item())


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str) -> torch.dtype:
    cuda = torch.cuda.is_available()
    if name == "auto":
        if cuda:
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    if name == "fp16" and not cuda:
        raise ConfigError("model.dtype is fp16, which needs a GPU; use bf16 or fp32 on a CPU")
    from ..models import TORCH_DTYPES

    return getattr(torch, TORCH_DTYPES[name])


def resolve_attention(name: str) -> str:
    if name != "auto":
        return name
    if torch.cuda.is_available():
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


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
    return get_peft_model(model, lora)


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
    """Trainer with the labeled-only loss and a count of real (non-padding) tokens."""

    def __init__(self, *args, labeled_only: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.labeled_only = labeled_only
        self.tokens_since_log = 0
        self._select = None
        if labeled_only:
            head = self.accelerator.unwrap_model(self.model).get_output_embeddings()
            head.register_forward_pre_hook(self._keep_labeled_positions)

    def _keep_labeled_positions(self, module, args):
        if self._select is None:
            return None
        hidden = args[0]
        return (hidden[self._select],) + tuple(args[1:])

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.tokens_since_log += int(inputs.pop("num_tokens"))
        if not self.labeled_only or return_outputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs.pop("labels")
        # position t predicts label t+1: keep the positions whose next label is trained
        select = torch.zeros_like(labels, dtype=torch.bool)
        select[:, :-1] = labels[:, 1:] != IGNORE_INDEX
        targets = labels[:, 1:][select[:, :-1]]
        self._select = select
        try:
            logits = model(**inputs, use_cache=False).logits
        finally:
            self._select = None
        loss = F.cross_entropy(logits.float(), targets, reduction="sum")
        if num_items_in_batch is not None:
            loss = loss / num_items_in_batch
            if self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes
        else:
            loss = loss / max(targets.numel(), 1)
        return loss


# --- callbacks -------------------------------------------------------------------------


class RunDirCallback(TrainerCallback):
    """metrics.jsonl, samples.jsonl, iter_<N>.pth, checkpoint marks and abort."""

    def __init__(self, run: RunDir, cfg: Config, meta: dict, tokenizer, abort_flag, trainer_ref):
        self.run = run
        self.cfg = cfg
        self.meta = meta
        self.tokenizer = tokenizer
        self.abort_flag = abort_flag
        self.trainer_ref = trainer_ref
        self.start = time.time()
        self.last_log = time.time()
        self.aborted = False
        self.rank0 = int(os.environ.get("RANK", "0")) == 0

    # metrics
    def on_log(self, args, state, control, logs=None, **kw):
        trainer = self.trainer_ref()
        tokens = all_reduce(trainer.tokens_since_log)
        trainer.tokens_since_log = 0
        now = time.time()
        span, self.last_log = now - self.last_log, now
        if not logs or "loss" not in logs or not state.is_world_process_zero:
            return
        row = {
            "step": state.global_step,
            "max_steps": state.max_steps,
            "epoch": round(state.epoch or 0.0, 4),
            "loss": logs.get("loss"),
            "lr": logs.get("learning_rate"),
            "grad_norm": logs.get("grad_norm"),
            "tokens_per_s": round(tokens / span, 1) if span > 0 else None,
            "elapsed_s": round(now - self.start, 3),
        }
        self.run.append_metric(row)
        print(f"step {row['step']}/{state.max_steps}  loss {row['loss']:.4f}  lr {row['lr']:.3g}  "
              f"grad_norm {row['grad_norm'] if row['grad_norm'] is None else round(row['grad_norm'], 4)}  "
              f"{row['tokens_per_s']} tok/s", flush=True)

    # evaluation samples
    def on_train_begin(self, args, state, control, model=None, **kw):
        if state.global_step == 0 and self.cfg.evaluation.inputs:
            self._answer(model, state.global_step)

    def on_step_end(self, args, state, control, model=None, **kw):
        if self.cfg.evaluation.inputs and state.global_step % self.cfg.evaluation.every == 0:
            self._answer(model, state.global_step)
        if all_reduce(1.0 if self.abort_flag.requested else 0.0, op="max") > 0:
            # abort = save + stop: every rank took this decision at this same step
            print(f"[rank {os.environ.get('RANK', '0')}] abort: saving at step {state.global_step}, then stopping",
                  flush=True)
            self.aborted = True
            control.should_training_stop = True
            control.should_save = True
        return control

    def _answer(self, model, step: int):
        """Answer the evaluation inputs; a failure here is logged, never fatal
        (the samples are a window on training, not part of it)."""
        try:
            self._generate_samples(model, step)
        except Exception as exc:  # noqa: BLE001
            print(f"[rank {os.environ.get('RANK', '0')}] evaluation samples at step {step} failed: "
                  f"{type(exc).__name__}: {exc}", flush=True)
            trainer = self.trainer_ref()
            (trainer.accelerator.unwrap_model(trainer.model) if model is None else model).train()

    def _generate_samples(self, model, step: int):
        from transformers.integrations import is_deepspeed_zero3_enabled

        from ..data import generation_prompt, stop_words

        zero3 = is_deepspeed_zero3_enabled()
        if not (self.rank0 or zero3):
            return
        trainer = self.trainer_ref()
        net = trainer.accelerator.unwrap_model(trainer.model) if model is None else model
        was_training = net.training
        net.eval()
        template = self.meta["template"]["name"]
        stops = stop_words(self.tokenizer, template)
        rows = []
        for text in self.cfg.evaluation.inputs:
            turn = {"input": text, **({"system": self.cfg.evaluation.system} if self.cfg.evaluation.system else {})}
            ids = torch.tensor([generation_prompt([turn], self.tokenizer, template)], device=trainer.args.device)
            with torch.no_grad():
                out = net.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=self.cfg.evaluation.max_new_tokens,
                    do_sample=False, pad_token_id=self.tokenizer.pad_token_id, synced_gpus=zero3,
                    eos_token_id=self.tokenizer.eos_token_id, use_cache=True,
                )
            answer = self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=False)
            for word in stops:
                answer = answer.split(word)[0]
            rows.append({"step": step, "input": text, "output": answer, "time": time.time()})
        if was_training:
            net.train()
        if self.rank0:
            self.run.append_samples(rows)
            print(f"samples at step {step}: " + " | ".join(repr(r["output"][:60]) for r in rows), flush=True)

    # checkpoints
    def on_save(self, args, state, control, model=None, **kw):
        trainer = self.trainer_ref()
        net = trainer.accelerator.unwrap_model(trainer.model)
        state_dict = trainable_state_dict(net)  # collective under ZeRO-3
        if dist_ready():
            torch.distributed.barrier()
        if not state.is_world_process_zero:
            return
        save_iter(self.run.path, state.global_step, state_dict, {**self.meta, "epoch": state.epoch})
        self.run.mark_complete(state.global_step)  # both halves of the checkpoint are whole now
        limit = self.cfg.saving.save_total_limit
        if limit and limit > 0:
            self.run.prune_iters(limit, up_to=state.global_step)


# --- the whole run ---------------------------------------------------------------------


def train(run_dir: Path, deepspeed: str | None = None, resume: str | None = None, abort_flag=None) -> str:
    """Train as configured in ``run_dir/config.yaml``; returns 'finished' or 'aborted'."""
    import weakref

    import yaml

    from ..demo import resolve_model
    from .data import training_data, training_tokenizer

    import datasets

    datasets.disable_progress_bars()  # train.log is a file, not a terminal
    run = RunDir(run_dir)
    cfg = from_dict(yaml.safe_load(run.config_file.read_text(encoding="utf-8")), str(run.config_file))
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    print(f"[rank {rank}/{world}] {cfg.name}: {cfg.training.method} on {cfg.model.name_or_path}, "
          f"deepspeed={Path(deepspeed).name if deepspeed else 'off'}, resume={resume}", flush=True)
    dtype = resolve_dtype(cfg.model.dtype)
    attn = resolve_attention(cfg.model.attn_implementation)
    model_path = resolve_model(cfg.model.name_or_path)
    tokenizer = training_tokenizer(cfg)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token

    use_cpu = not torch.cuda.is_available()
    args = TrainingArguments(
        output_dir=str(run.checkpoints_dir),
        per_device_train_batch_size=cfg.training.micro_batch_size,
        gradient_accumulation_steps=cfg.training.accumulative_counts,
        learning_rate=cfg.training.lr,
        adam_beta1=cfg.training.betas[0], adam_beta2=cfg.training.betas[1],
        weight_decay=cfg.training.weight_decay,
        num_train_epochs=cfg.training.epochs,
        max_steps=cfg.training.max_steps,
        lr_scheduler_type=cfg.training.lr_scheduler,
        warmup_steps=cfg.training.warmup_ratio,
        max_grad_norm=cfg.training.max_norm if cfg.training.max_norm > 0 else 0.0,
        logging_steps=cfg.training.logging_steps,
        save_strategy="steps", save_steps=cfg.saving.save_steps,
        save_total_limit=cfg.saving.save_total_limit if cfg.saving.save_total_limit > 0 else None,
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        activation_checkpointing=cfg.training.gradient_checkpointing and cfg.training.method != "qlora",
        activation_checkpointing_kwargs={"use_reentrant": False},
        train_sampling_strategy="group_by_length" if (cfg.training.group_by_length and not cfg.data.pack) else "random",
        length_column_name="length",
        dataloader_num_workers=cfg.training.dataloader_workers,
        seed=cfg.training.seed, data_seed=cfg.training.seed,
        report_to=[], disable_tqdm=True, remove_unused_columns=False,
        deepspeed=deepspeed, ddp_find_unused_parameters=False, use_cpu=use_cpu,
        ddp_backend="gloo" if use_cpu and world > 1 else None,
        logging_first_step=False,
    )
    with args.main_process_first(desc="data"):
        samples, report = training_data(cfg, tokenizer, pack=cfg.data.pack)
    if rank == 0:
        print(f"data: {report.rows} rows -> {report.kept} samples ({report.dropped} dropped, "
              f"{report.truncated} truncated), {report.tokens} tokens"
              + (f", {report.packed_blocks} packed blocks" if report.packed_blocks else ""), flush=True)

    if deepspeed and use_cpu:
        # With use_cpu, accelerate starts gloo itself and DeepSpeed's comm layer
        # is not set up yet; ZeRO-3's zero.Init would then see world size 1.
        import deepspeed as ds

        ds.init_distributed(dist_backend="gloo")
    from transformers import set_seed

    set_seed(cfg.training.seed)  # LoRA's initial weights come from this too: same seed, same run
    model = load_model(cfg, model_path, dtype, attn, tokenizer)
    if rank == 0 and hasattr(model, "print_trainable_parameters"):
        model.print_trainable_parameters()
    if cfg.data.pack:
        mask = {"flash_attention_2": None, "sdpa": "bool"}.get(attn, "float")
        collator = PackedCollator(tokenizer.pad_token_id, mask=mask)
    else:
        collator = PaddedCollator(tokenizer.pad_token_id)
    from ..data.templates import get_template

    meta = {
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
    trainer = StudioTrainer(
        model=model, args=args, train_dataset=samples, data_collator=collator,
        labeled_only=cfg.training.loss_on_labeled_only,
    )
    callback = RunDirCallback(run, cfg, meta, tokenizer, abort_flag, weakref.ref(trainer))
    trainer.add_callback(callback)
    trainer.remove_callback(PrinterCallback)  # our own one-line-per-step log replaces its dicts
    if resume and rank == 0:
        run.truncate_after(checkpoint_step(resume) or 0)
    trainer.train(resume_from_checkpoint=resume)
    if callback.aborted and trainer.state.global_step < trainer.state.max_steps:
        print(f"run aborted; saved at step {trainer.state.global_step}", flush=True)
        return "aborted"
    # the final weights, unless the last step was just saved
    if not (run.path / iter_name(trainer.state.global_step)).exists():
        trainer._save_checkpoint(trainer.model, trial=None)
        callback.on_save(trainer.args, trainer.state, trainer.control)
    print(f"finished at step {trainer.state.global_step}", flush=True)
    return "finished"
