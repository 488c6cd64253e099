"""Data-parallel prompt tuning on one machine: one process per GPU, started by torchrun.

    caikit-tuning prepare-model                      # once: SmolLM2 into models/base
    torchrun --nproc-per-node 4 examples/train_distributed.py --output models/served/rt-dp

torchrun starts the processes and gives each RANK, LOCAL_RANK, WORLD_SIZE and the
rendezvous address. Each one joins the process group (NCCL on GPUs, gloo on CPU), takes
the GPU of its LOCAL_RANK, and trains on its share of every global batch, so the global
batch is processes x --batch-size x --accumulate-steps and the steps match one process
accumulating that many micro-batches. Only rank 0 logs progress and saves the model.
Without torchrun the script runs as one ordinary process.
"""

import argparse
import json
import time
from pathlib import Path

import caikit
import torch.distributed as dist
from caikit.core.data_model import DataStream

import caikit_tuning  # noqa: F401  (configures caikit)
from caikit_tuning import PeftPromptTuning, TrainGenerationRecord, TuningConfig
from caikit_tuning.training.distributed import init_from_env

ROOT = Path(__file__).resolve().parent.parent
VERBALIZER = "Review: {{input}}\nIs this review positive or negative? Answer:"


def read_records(path: Path, limit: int) -> list[TrainGenerationRecord]:
    with open(path, encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()][:limit]
    return [TrainGenerationRecord(input=r["input"], output=r["output"]) for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base-model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--base-models-dir", help="default: the configured base_models_dir")
    parser.add_argument("--data", default=str(ROOT / "data" / "rt_sentiment_train.jsonl"))
    parser.add_argument("--records", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8, help="per process")
    parser.add_argument("--accumulate-steps", type=int, default=1)
    parser.add_argument("--learning-rate", type=float, default=0.3)
    parser.add_argument("--virtual-tokens", type=int, default=20)
    parser.add_argument("--output", default=str(ROOT / "models" / "served" / "rt-sentiment-dp"))
    args = parser.parse_args()
    if args.base_models_dir:
        caikit.configure(config_dict={"base_models_dir": args.base_models_dir})

    # Before any model is loaded: it picks this process's GPU (cuda:LOCAL_RANK).
    world = init_from_env()
    started = time.perf_counter()
    model = PeftPromptTuning.train(
        base_model=args.base_model,
        # Every process reads all records; the loop gives each its share of each step.
        train_stream=DataStream.from_iterable(read_records(Path(args.data), args.records)),
        tuning_config=TuningConfig(num_virtual_tokens=args.virtual_tokens),
        verbalizer=VERBALIZER,
        num_epochs=args.epochs,
        batch_size=args.batch_size,
        accumulate_steps=args.accumulate_steps,
        learning_rate=args.learning_rate,
    )
    if world.is_main:
        model.save(args.output)
        config = model.training_config
        print(
            f"{world.size} process(es), global batch {config['global_batch_size']}: "
            f"{config['steps']} steps in {time.perf_counter() - started:.1f}s, "
            f"final loss {config['final_loss']}; saved {args.output}"
        )
    if world.size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
