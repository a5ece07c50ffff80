"""LLaMA-Factory 0.9.5's own training run on bench_train's model and batches' settings, for
``bench/bench_train.py --llamafactory PYTHON``.

Runs under LLaMA-Factory's interpreter (its own environment: it pins older transformers, peft and
datasets than ours) through its ``run_exp`` entry point: the same tiny random-init Llama (dimensions
and seed from bench_train, built and saved here), bench_train's tokenizer, alpaca_en_demo through its
``qwen`` (ChatML) template, cutoff 512, micro-batch 4, LoRA r8/alpha16 on all linears, constant lr
1e-4, one process on CPU. ``--packing``: its packing (samples concatenated, attention crosses them);
``--neat-packing``: its samples-isolated packing; neither: padded rows. It checkpoints activations
unless ``--no-gradient-checkpointing`` (its default is to, which ours is not). Tokens/s counts non-padding
tokens of the timed steps (after ``--warmup``), where a step takes its batch. Prints one JSON line
prefixed ``RESULT``.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

from peer_llamafactory_data import stub_media_modules  # this folder is the script's first sys.path entry


def save_model(dims: dict, tokenizer: Path, folder: Path) -> tuple[int, int]:
    """The random-init Llama and the tokenizer, saved for LLaMA-Factory to load; its parameter count
    and the pad token's id."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tokenizer)
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=1024, tie_word_embeddings=False,
                      pad_token_id=tok.pad_token_id, **dims)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters()), tok.pad_token_id


def count_tokens(counter: dict, pad_id: int) -> None:
    """Count each step's non-padding tokens where Trainer hands the step its batch: the 2-D attention
    mask's ones, or, under neat packing (whose collator hands a 4-D mask), the tokens that are not the
    pad token (which this tokenizer spells only as padding)."""
    from transformers import Trainer

    training_step = Trainer.training_step

    def counted(self, model, inputs, *args, **kwargs):
        mask = inputs["attention_mask"]
        counter["real"] += int((mask != 0).sum() if mask.dim() == 2 else (inputs["input_ids"] != pad_id).sum())
        counter["total"] += inputs["input_ids"].numel()
        loss = training_step(self, model, inputs, *args, **kwargs)
        counter["losses"].append(float(loss))
        return loss

    Trainer.training_step = counted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", required=True, help="the Llama's dimensions, JSON")
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--lora-dropout", type=float, default=0.0)
    parser.add_argument("--packing", action="store_true")
    parser.add_argument("--neat-packing", action="store_true")
    parser.add_argument("--no-gradient-checkpointing", action="store_true",
                        help="LLaMA-Factory checkpoints activations by default (less memory, more compute)")
    args = parser.parse_args()
    stub_media_modules()
    from transformers import TrainerCallback

    from llamafactory.train.tuner import run_exp

    work = Path(tempfile.mkdtemp(prefix="lf_train_"))
    params, pad_id = save_model(json.loads(args.dims), Path(args.tokenizer), work / "model")
    (work / "dataset_info.json").write_text(json.dumps({"bench": {"file_name": str(Path(args.data).resolve())}}))
    counter, clock = {"real": 0, "total": 0, "losses": []}, {}
    count_tokens(counter, pad_id)

    class Clock(TrainerCallback):
        def on_step_begin(self, _args, state, control, **kwargs):
            if state.global_step == args.warmup:
                counter.update(real=0, total=0, losses=[])
                clock["t0"] = time.perf_counter()

        def on_step_end(self, _args, state, control, **kwargs):
            clock["t1"] = time.perf_counter()

    run_exp({
        "model_name_or_path": str(work / "model"), "stage": "sft", "do_train": True, "finetuning_type": "lora",
        "lora_rank": 8, "lora_alpha": 16, "lora_dropout": args.lora_dropout, "lora_target": "all",
        "dataset": "bench", "dataset_dir": str(work), "template": "qwen", "cutoff_len": 512,
        "packing": args.packing or args.neat_packing, "neat_packing": args.neat_packing,
        "per_device_train_batch_size": 4, "learning_rate": 1e-4, "lr_scheduler_type": "constant",
        "max_steps": args.steps + args.warmup, "logging_steps": 10**6, "save_strategy": "no", "report_to": "none",
        "output_dir": str(work / "out"), "overwrite_output_dir": True, "use_cpu": True, "seed": 0,
        "dataloader_num_workers": 0, "disable_tqdm": True,
        "disable_gradient_checkpointing": args.no_gradient_checkpointing,
    }, callbacks=[Clock()])
    seconds = clock["t1"] - clock["t0"]
    tail = counter["losses"][-10:]
    print("RESULT " + json.dumps({
        "params": params, "tokens_per_s": counter["real"] / seconds, "ms_per_step": 1000 * seconds / args.steps,
        "padding": 1 - counter["real"] / max(counter["total"], 1),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "loss": sum(tail) / max(len(tail), 1)}))


if __name__ == "__main__":
    main()
