"""Tiny random-Llama Trainer run: LoRA / full FT, optional DeepSpeed, optional QLoRA (bnb 4-bit).

Examples:
  torchrun --nproc_per_node 2 train.py --mode lora --ds ds_zero2.json
  torchrun --nproc_per_node 2 train.py --mode full --ds ds_zero3.json --bf16
  python train.py --mode qlora --steps 10
  # SLURM-style: set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* by hand, no torchrun
  python train.py --from-slurm ...   (maps SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID)
"""
import argparse
import json
import os
import sys
import time

T0 = time.time()

p = argparse.ArgumentParser()
p.add_argument("--mode", choices=["lora", "full", "qlora"], default="lora")
p.add_argument("--ds", default=None, help="DeepSpeed JSON path")
p.add_argument("--steps", type=int, default=10)
p.add_argument("--bf16", action="store_true")
p.add_argument("--out", default="/tmp/ds_out")
p.add_argument("--save", action="store_true", help="save final model at end")
p.add_argument("--gc", action="store_true", help="gradient checkpointing")
p.add_argument("--no-shm", action="store_true", help="monkeypatch deepspeed to skip the shm comm op build")
p.add_argument("--from-slurm", action="store_true")
p.add_argument("--use-cpu", action="store_true", help="pass use_cpu=True (breaks ZeRO-3 zero.Init with DS)")
p.add_argument("--workers", type=int, default=0)
p.add_argument("--compute-dtype", default="float32")
args = p.parse_args()

if args.from_slurm:
    # what a launcher would do before TrainingArguments is created
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ["SLURM_LOCALID"]
    os.environ.setdefault("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", "1"))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")

import torch
from torch.utils.data import Dataset

if args.no_shm:
    import deepspeed.comm.torch as _dct
    _dct.build_shm_op = lambda: None

from transformers import (AutoModelForCausalLM, LlamaConfig, Trainer, TrainingArguments,
                          TrainerCallback)

RANK = int(os.environ.get("RANK", 0))


def log(*a):
    print(f"[rank{RANK} t={time.time()-T0:.1f}s]", *a, flush=True)


class Toy(Dataset):
    """Learnable sequences: arithmetic progressions mod vocab."""

    def __init__(self, n=256, T=32, V=512):
        g = torch.Generator().manual_seed(0)
        start = torch.randint(0, V, (n, 1), generator=g)
        step = torch.randint(1, 4, (n, 1), generator=g)
        self.x = (start + step * torch.arange(T)) % V

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i].clone(),
                "attention_mask": torch.ones_like(self.x[i])}


class LossLog(TrainerCallback):
    def __init__(self):
        self.losses = []

    def on_log(self, a, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])


ds_cfg = args.ds
targs = TrainingArguments(
    output_dir=args.out,
    max_steps=args.steps,
    per_device_train_batch_size=4,
    gradient_accumulation_steps=1,
    learning_rate=1e-3 if args.mode != "full" else 3e-4,
    logging_steps=1,
    save_strategy="no",
    report_to="none",
    bf16=args.bf16,
    use_cpu=args.use_cpu or ds_cfg is None,
    deepspeed=ds_cfg,
    dataloader_num_workers=args.workers,
    **({"activation_checkpointing": True} if args.gc else {}),
    ddp_find_unused_parameters=False if args.mode != "full" else None,
    disable_tqdm=True,
    seed=0,
)
log("world_size", targs.world_size, "process_index", targs.process_index, "local_process_index",
    targs.local_process_index, "device", targs.device, "parallel_mode", targs.parallel_mode)

cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, max_position_embeddings=128)

if args.mode == "qlora":
    from transformers import BitsAndBytesConfig
    from peft import prepare_model_for_kbit_training
    # bnb quantization needs from_pretrained: save a random tiny model once (per rank dir to avoid races)
    src = f"/tmp/tiny_llama_src_r{RANK}"
    if not os.path.exists(os.path.join(src, "config.json")):
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(src)
    cd = getattr(torch, args.compute_dtype)
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=cd)
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=bnb, device_map={"": "cpu"})
    log("loaded 4bit; q_proj weight type", type(model.model.layers[0].self_attn.q_proj.weight).__name__,
        model.model.layers[0].self_attn.q_proj.__class__.__name__)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gc)
else:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)

if args.mode in ("lora", "qlora"):
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                             "gate_proj", "up_proj", "down_proj"]))
    if RANK == 0:
        model.print_trainable_parameters()

cb = LossLog()
trainer = Trainer(model=model, args=targs, train_dataset=Toy(), callbacks=[cb])
t1 = time.time()
trainer.train()
t2 = time.time()
log(f"train() took {t2-t1:.1f}s; losses first={cb.losses[0]:.4f} last={cb.losses[-1]:.4f}",
    "DECREASED" if cb.losses[-1] < cb.losses[0] else "NOT-DECREASED")
if args.save:
    trainer.save_model(os.path.join(args.out, "final"))
    trainer.accelerator.wait_for_everyone()
    if RANK == 0:
        log("saved files:", sorted(os.listdir(os.path.join(args.out, "final"))))
log("TOTAL wall in-process", f"{time.time()-T0:.1f}s")
