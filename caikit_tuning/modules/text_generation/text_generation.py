"""TextGeneration: serve a base model as it is, or fine-tune all of its weights."""

from pathlib import Path
from typing import Optional

import alog
from caikit.core import ModuleBase, module
from caikit.core.data_model import DataStream, ProducerId
from caikit.core.modules import ModuleLoader, ModuleSaver
from caikit.interfaces.nlp.tasks import TextGenerationTask, TokenizationTask

from ...base_models import BaseModel, BaseModelSource, LocatedModel, load_shared, locate_base_model
from ...data import Verbalizer
from ...data_model import (
    DataConfig,
    OptimizationConfig,
    RopeScalingConfig,
    TrainGenerationRecord,
    ValidationConfig,
)
from ...generation import TextGenerator, generation_api
from ...inputs import NO_PREFIX
from ...storage import atomic_folder, read_jsonl
from ...training import seed_everything
from ..caikit_nlp import TEXT_GENERATION_ID, forget_caikit_nlp_config, named_folder
from ..recipe import (
    TRAINING_LOGS,
    after_save,
    bind_arguments,
    fit,
    placement,
    plan_training,
    read_records,
    trained_on_chat,
    training_summary,
    training_values,
    write_training_artifacts,
)

log = alog.use_channel("TEXTGEN")

# Fine-tuned weights live in this sub-folder, as a standard Hugging Face model folder.
WEIGHTS_FOLDER = "model"


@module(
    id="3f9d2c1e-8b7a-4e55-a0c4-61d2b5e8f901",
    name="Text generation",
    version="0.1.0",
    tasks=[TextGenerationTask, TokenizationTask],
)
@generation_api
class TextGeneration(ModuleBase):
    """A causal-LM or seq2seq model served as is (bootstrap) or fully fine-tuned (train)."""

    def __init__(
        self,
        base: BaseModel,
        verbalizer: Optional[Verbalizer] = None,
        training_config: Optional[dict] = None,
        training_logs: Optional[list] = None,
        chat: bool = False,
        source: Optional[BaseModelSource] = None,
    ):
        super().__init__()
        self.base = base
        # Where the weights came from (a fine-tuned copy reports its origin).
        self.source = source or base.source
        self.verbalizer = verbalizer
        self.training_config = training_config or {}
        self.training_logs = training_logs or []
        self.chat = chat
        self.generator = TextGenerator(
            base.model, base.tokenizer, ProducerId(self.MODULE_NAME, self.MODULE_VERSION), chat=chat
        )

    @property
    def fine_tuned(self) -> bool:
        return bool(self.training_config)

    @classmethod
    def bootstrap(
        cls,
        base_model_path: str,
        torch_dtype: Optional[str] = None,
        device: Optional[str] = None,
    ) -> "TextGeneration":
        """Wrap a saved Hugging Face causal-LM or seq2seq model (a folder, or a name
        under base_models_dir) for serving. Saving it records where it is; no copy."""
        located = locate_base_model(base_model_path, field="base_model_path")
        device_, dtype = placement(device, torch_dtype)
        return cls(load_shared(located, dtype, device_))

    @classmethod
    def train(
        cls,
        base_model: str,
        train_stream: DataStream[TrainGenerationRecord],
        val_stream: Optional[DataStream[TrainGenerationRecord]] = None,
        device: Optional[str] = None,
        num_epochs: Optional[int] = None,
        learning_rate: Optional[float] = None,
        verbalizer: Optional[str] = "{{input}}",
        batch_size: Optional[int] = None,
        max_source_length: Optional[int] = 256,
        max_target_length: Optional[int] = 128,
        accumulate_steps: Optional[int] = None,
        torch_dtype: Optional[str] = None,
        silence_progress_bars: Optional[bool] = True,
        seed: Optional[int] = 42,
        gradient_checkpointing: Optional[bool] = False,
        validation: Optional[ValidationConfig] = None,
        optimization: Optional[OptimizationConfig] = None,
        data: Optional[DataConfig] = None,
        checkpoint_steps: Optional[int] = None,
        preset: Optional[str] = None,
        neftune_noise_alpha: Optional[float] = None,
        rope_scaling: Optional[RopeScalingConfig] = None,
        determinism: Optional[str] = None,
    ) -> "TextGeneration":
        """Fine-tune every weight of `base_model` on input/output records.

        Args:
            base_model: a name under `base_models_dir` or, in-process, a model folder.
            train_stream: TrainGenerationRecord records (`input`, `output`).
            val_stream: records whose loss is logged after every epoch.
            device: "cpu", "cuda", ...; default: a GPU when there is one.
            num_epochs: passes over the training records. Default 5 (or the preset's).
            learning_rate: AdamW learning rate, decayed linearly to 0. Default 2e-5 (or the preset's).
            verbalizer: template that turns a record into the model's input; applied at
                inference too. Default "{{input}}".
            batch_size: records per micro-batch. Default 8 (or the preset's).
            max_source_length: longest input in tokens; longer ones lose their start. Default 256.
            max_target_length: longest output in tokens, EOS included. Default 128.
            accumulate_steps: micro-batches per optimizer step. Default 1 (or the preset's).
            torch_dtype: weight dtype (float32, bfloat16, float16). Unset: float32 weights
                computed under bf16 autocast where the hardware runs bf16 natively, else
                float32; bf16/fp16 weights on GPUs. "float32" given explicitly computes in
                float32 throughout.
            silence_progress_bars: hide the progress bar. Default True.
            seed: seeds the data order. Default 42.
            gradient_checkpointing: recompute activations to save memory. Default False.
            validation: split_ratio / split_seed (a validation set cut from the training
                records), eval_steps (default: every epoch), accuracy_examples (greedy
                exact-match on that many records), early_stopping_patience / _min_delta.
            optimization: total_train_batch_size / max_per_device_train_batch_size (derive
                batch and accumulation), lr_scaling (none, sqrt, linear), lr_scheduler
                (linear, cosine, constant), warmup_steps / warmup_ratio, weight_decay,
                max_grad_norm.
            data: chat_loss for chat records: last_assistant (default), assistant, all.
            checkpoint_steps: save resumable state every N steps into the job's folder.
            preset: classification, generation or summarization: the defaults it sets for
                num_epochs, learning_rate, batch_size and accumulate_steps apply where the
                request leaves them unset (see caikit_tuning/modules/presets.py).
            neftune_noise_alpha: NEFTune noise on the input embeddings while training
                (e.g. 5); unset: none.
            rope_scaling: type (linear, dynamic) and factor (> 1) stretching a rotary
                model's context; recorded and applied at inference too.
            determinism: no, half (default: seeded, cuDNN deterministic) or full
                (deterministic implementations only; an op without one raises).
        Returns:
            the fine-tuned TextGeneration model.
        """
        plan = _plan(locals())
        records, val_records = read_records(
            train_stream, val_stream, plan, (cls.MODULE_ID, TEXT_GENERATION_ID)
        )
        seed_everything(plan.training.seed)
        base = plan.load_base()
        base.model.requires_grad_(True)
        params = [p for p in base.model.parameters() if p.requires_grad]
        result = fit(base, plan, params, lambda batch: NO_PREFIX, records, val_records)
        base.model.requires_grad_(False)
        return cls(
            base,
            plan.verbalizer,
            training_summary(plan, result, len(records)),
            result.logs,
            chat=trained_on_chat(records),
        )

    @classmethod
    def validate_training(cls, arguments: dict) -> None:
        """Check a train() call's arguments without training (the runtime's submission check)."""
        values = bind_arguments(cls.train, arguments)
        plan = _plan(values)
        read_records(
            values["train_stream"], values["val_stream"], plan, (cls.MODULE_ID, TEXT_GENERATION_ID)
        )

    def model_input(self, text: str) -> str:
        if not isinstance(text, str):
            raise TypeError(f"`text` must be a string, got {type(text).__name__}.")
        if self.chat or self.verbalizer is None:
            return text
        return self.verbalizer.render_request(text)

    # ------------------------------------------------------------ save / load

    def save(self, model_path: str) -> None:
        """Write config.yml (and, for a fine-tuned model, its weights as safetensors with
        the tokenizer in `model/`, and training_logs.jsonl). Atomic."""
        forget_caikit_nlp_config(self)
        with atomic_folder(model_path) as staging:
            config = {"is_encoder_decoder": self.base.is_encoder_decoder, "chat": self.chat}
            if self.fine_tuned:
                weights = staging / WEIGHTS_FOLDER
                self.base.model.save_pretrained(weights, safe_serialization=True)
                self.base.tokenizer.save_pretrained(weights)
                write_training_artifacts(
                    staging, self.training_logs, self.base.source.name or "model"
                )
                config.update(
                    weights=WEIGHTS_FOLDER,
                    trained_from=self.source.to_config(),
                    training=self.training_config,
                )
            else:
                config["base_model"] = self.source.to_config()
            if self.verbalizer is not None:
                config["verbalizer"] = self.verbalizer.template
            saver = ModuleSaver(self, model_path=str(staging))
            with saver:
                saver.update_config(config)
        after_save(self.training_config, model_path)

    @classmethod
    def load(
        cls,
        model_path,
        device: Optional[str] = None,
        torch_dtype: Optional[str] = None,
    ) -> "TextGeneration":
        loader = ModuleLoader(model_path)
        config = loader.config
        folder = Path(loader.model_path)
        if config.get("weights"):
            weights = (folder / config.weights).resolve()
            if not weights.is_relative_to(folder.resolve()):
                raise ValueError(f"the model {folder.name} names weights outside its folder.")
            located = LocatedModel(BaseModelSource(path=str(weights)), str(weights), local=True)
        else:
            try:
                located = locate_base_model(BaseModelSource.from_config(dict(config.base_model)))
            except ValueError as err:
                raise ValueError(
                    f"cannot load the text generation model {folder.name}: {err}"
                ) from err
        device_, dtype = placement(device, torch_dtype)
        base = load_shared(located, dtype, device_)
        trained_from = config.get("trained_from")
        verbalizer = Verbalizer.parse(config.verbalizer) if config.get("verbalizer") else None
        return cls(
            base,
            verbalizer,
            dict(config.get("training") or {}),
            read_jsonl(folder / TRAINING_LOGS),
            chat=bool(config.get("chat", False)),
            source=BaseModelSource.from_config(dict(trained_from)) if trained_from else None,
        )

    @classmethod
    def from_caikit_nlp(
        cls, folder: Path, config, device: Optional[str], torch_dtype: Optional[str]
    ) -> "TextGeneration":
        """A model saved by caikit-nlp 0.5.x's TextGeneration: a whole Hugging Face model
        in its `artifacts/` folder (see modules/caikit_nlp.py)."""
        weights = named_folder(folder, config.get("artifact_path") or "artifacts", "artifact_path")
        located = LocatedModel(BaseModelSource(path=str(weights)), str(weights), local=True)
        device_, dtype = placement(device, torch_dtype)
        logs = folder / str(config.get("training_logs") or TRAINING_LOGS)
        return cls(
            load_shared(located, dtype, device_),
            # Saving it again writes its weights in this library's layout.
            training_config={"saved_by": f"caikit-nlp {config.get('caikit_nlp_version', '0.5')}"},
            training_logs=read_jsonl(logs)
            if logs.resolve().is_relative_to(folder.resolve())
            else [],
        )


def _plan(arguments: dict):
    return plan_training(
        arguments["base_model"],
        arguments["device"],
        arguments["verbalizer"],
        arguments["torch_dtype"],
        arguments["rope_scaling"],
        **training_values(arguments, "full"),
    )
