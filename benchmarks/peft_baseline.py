"""The baseline the training benchmarks compare with: the prompt-tuning job a user would
write without this project. `transformers.Trainer` with its default settings,
`peft.get_peft_model` with a `PromptTuningConfig`, and `DataCollatorForSeq2Seq` per-batch
padding in random order. It never imports caikit_tuning (its OpenMP defaults would leak
into the baseline's speed).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class BaselineRun:
    model: Any  # the trained peft model
    tokenizer: Any
    trainer: Any
    loaded: float  # perf_counter after the model load (its whole call is timed from here)
    begin: float  # perf_counter at on_train_begin
    first_step: float
    finished: float
    tokens: dict = field(default_factory=lambda: {"real": 0, "padded": 0})


def train_baseline(config: dict) -> BaselineRun:
    """Train on config["train_rows"] for config["steps"] optimizer steps. Keys: model_folder,
    num_virtual_tokens, init ("TEXT" with init_text, or "RANDOM"), verbalizer,
    max_source_length, max_target_length, batch_size, learning_rate, steps, seed, device."""
    import torch
    from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    tokenizer = AutoTokenizer.from_pretrained(config["model_folder"])
    model = AutoModelForCausalLM.from_pretrained(config["model_folder"], dtype=torch.float32)
    init = config.get("init", "TEXT")
    peft_config = PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=config["num_virtual_tokens"],
        prompt_tuning_init=PromptTuningInit[init],
        prompt_tuning_init_text=config.get("init_text") if init == "TEXT" else None,
        tokenizer_name_or_path=config["model_folder"],
    )
    loaded = time.perf_counter()
    torch.manual_seed(config["seed"])  # peft draws a RANDOM prompt from torch's generator
    model = get_peft_model(model, peft_config)

    def encode(row: dict) -> dict:
        source = tokenizer(config["verbalizer"].replace("{{input}}", row["input"]))["input_ids"]
        source = source[-config["max_source_length"] :]
        target = tokenizer(row["output"], add_special_tokens=False)["input_ids"]
        target = target[: config["max_target_length"] - 1] + [tokenizer.eos_token_id]
        return {
            "input_ids": source + target,
            "attention_mask": [1] * (len(source) + len(target)),
            "labels": [-100] * len(source) + target,
        }

    dataset = [encode(row) for row in config["train_rows"]]
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True)
    tokens = {"real": 0, "padded": 0}

    def counting_collator(features):
        batch = collator(features)
        real = int(batch["attention_mask"].sum())
        tokens["real"] += real
        tokens["padded"] += batch["attention_mask"].numel() - real
        return batch

    timing: dict = {}

    class Timer(TrainerCallback):
        def on_train_begin(self, *args, **kwargs):
            timing["begin"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            timing.setdefault("first_step", time.perf_counter())

    with tempfile.TemporaryDirectory() as output:
        arguments = TrainingArguments(
            output_dir=output,
            per_device_train_batch_size=config["batch_size"],
            learning_rate=config["learning_rate"],
            max_steps=config["steps"],
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=config["device"] == "cpu",
            # On a GPU, the mixed precision a user would ask Trainer for.
            bf16=config["device"] != "cpu",
            seed=config["seed"],
            disable_tqdm=True,
        )
        trainer = Trainer(
            model=model,
            args=arguments,
            train_dataset=dataset,
            data_collator=counting_collator,
            callbacks=[Timer()],
        )
        trainer.train()
    return BaselineRun(
        model=model,
        tokenizer=tokenizer,
        trainer=trainer,
        loaded=loaded,
        begin=timing["begin"],
        first_step=timing["first_step"],
        finished=time.perf_counter(),
        tokens=tokens,
    )
