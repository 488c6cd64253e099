"""PeftPromptTuning: learn a soft prompt for a frozen causal-LM or seq2seq base model."""

import dataclasses
import inspect
from pathlib import Path
from typing import Iterable, List, Optional

import alog
import caikit
import torch
from caikit.core import ModuleBase, module
from caikit.core.data_model import DataStream, ProducerId
from caikit.core.modules import ModuleLoader, ModuleSaver
from caikit.interfaces.nlp.data_model import GeneratedTextResult, GeneratedTextStreamResult
from caikit.interfaces.nlp.tasks import TextGenerationTask

from ...base_models import (
    BaseModel,
    BaseModelSource,
    LocatedModel,
    atomic_folder,
    is_encoder_decoder,
    load_base,
    load_model_config,
    locate_base_model,
    read_jsonl,
    write_jsonl,
)
from ...data import Verbalizer, build_examples, collator_for, collect_records
from ...data_model import (
    ExponentialDecayLengthPenalty,
    PromptOutputModelType,
    PromptTuningInitMethod,
    TrainGenerationRecord,
    TuningConfig,
    TuningType,
)
from ...generation import GenerationSettings, TextGenerator
from ...training import (
    TrainingSettings,
    autocast_dtype,
    resolve_device,
    resolve_dtype,
    seed_everything,
    summed_token_loss,
)
from ...training import train as run_training
from .settings import PromptTuningSettings, parse_enum
from .soft_prompt import SoftPrompt, initial_weight, load_adapter, save_adapter

log = alog.use_channel("PROMPT")

TRAINING_LOGS = "training_logs.jsonl"


@module(
    id="7c1b8a70-6a4e-4b8e-9c39-3f1c6f0b2a11",
    name="Prompt tuning",
    version="0.1.0",
    task=TextGenerationTask,
)
class PeftPromptTuning(ModuleBase):
    """A frozen base model steered by a learned soft prompt (prompt tuning)."""

    def __init__(
        self,
        base: BaseModel,
        prompt: SoftPrompt,
        verbalizer: Verbalizer,
        settings: PromptTuningSettings,
        training_config: dict,
        training_logs: list[dict],
    ):
        super().__init__()
        self.base = base
        self.prompt = prompt
        self.verbalizer = verbalizer
        self.settings = settings
        self.training_config = training_config
        self.training_logs = training_logs
        self._generator = TextGenerator(
            base.model,
            base.tokenizer,
            ProducerId(self.MODULE_NAME, self.MODULE_VERSION),
            prompt.prefix(),
        )

    # ---------------------------------------------------------------- training

    @classmethod
    def train(
        cls,
        base_model: str,
        train_stream: DataStream[TrainGenerationRecord],
        tuning_config: TuningConfig,
        val_stream: Optional[DataStream[TrainGenerationRecord]] = None,
        device: Optional[str] = None,
        tuning_type: Optional[str] = "PROMPT_TUNING",
        num_epochs: Optional[int] = 20,
        learning_rate: Optional[float] = 0.3,
        verbalizer: Optional[str] = "{{input}}",
        batch_size: Optional[int] = 8,
        max_source_length: Optional[int] = 256,
        max_target_length: Optional[int] = 128,
        accumulate_steps: Optional[int] = 1,
        torch_dtype: Optional[str] = None,
        silence_progress_bars: Optional[bool] = True,
        seed: Optional[int] = 42,
        gradient_checkpointing: Optional[bool] = False,
    ) -> "PeftPromptTuning":
        """Learn a soft prompt for `base_model` from input/output records.

        Args:
            base_model: a name under `base_models_dir` or, in-process, a model folder.
            train_stream: TrainGenerationRecord records (`input`, `output`).
            tuning_config: num_virtual_tokens, init method (RANDOM or TEXT), init text and
                output_model_types (DECODER; for seq2seq ENCODER, DECODER or both).
            val_stream: records whose loss is logged after every epoch.
            device: "cpu", "cuda", ...; default: a GPU when there is one.
            tuning_type: PROMPT_TUNING.
            num_epochs: passes over the training records. Default 20.
            learning_rate: AdamW learning rate, decayed linearly to 0. Default 0.3.
            verbalizer: template that turns a record into the model's input, e.g.
                "Review: {{input}} Sentiment:"; applied at inference too. Default "{{input}}".
            batch_size: records per micro-batch. Default 8.
            max_source_length: longest input in tokens; longer ones lose their start. Default 256.
            max_target_length: longest output in tokens, EOS included. Default 128.
            accumulate_steps: micro-batches per optimizer step. Default 1.
            torch_dtype: weight dtype (float32, bfloat16, float16); default float32 on CPU,
                bf16/fp16 on GPUs. float32 weights train with bf16 autocast where the
                hardware runs bf16 natively.
            silence_progress_bars: hide the progress bar. Default True.
            seed: seeds the prompt initialisation and the data order. Default 42.
            gradient_checkpointing: recompute activations to save memory. Default False.
        Returns:
            the tuned PeftPromptTuning model.
        """
        plan = _plan(
            base_model=base_model,
            tuning_config=tuning_config,
            device=device,
            tuning_type=tuning_type,
            verbalizer=verbalizer,
            torch_dtype=torch_dtype,
            training=TrainingSettings.from_request(
                num_epochs=num_epochs,
                learning_rate=learning_rate,
                batch_size=batch_size,
                accumulate_steps=accumulate_steps,
                max_source_length=max_source_length,
                max_target_length=max_target_length,
                seed=seed,
                silence_progress_bars=silence_progress_bars,
                gradient_checkpointing=gradient_checkpointing,
            ),
        )
        records = collect_records(train_stream, "train_stream", _record_cap())
        val_records = collect_records(val_stream, "val_stream", required=False)
        training = plan.training
        seed_everything(training.seed)
        base = load_base(plan.located, plan.dtype, plan.device)
        examples, val_examples = (
            build_examples(
                base.tokenizer,
                rows,
                plan.verbalizer.render,
                training.max_source_length,
                training.max_target_length,
            )
            for rows in (records, val_records)
        )
        generator = torch.Generator().manual_seed(training.seed)
        prompt = SoftPrompt(
            initial_weight(base.model, base.tokenizer, plan.settings, generator),
            plan.settings.placements,
        ).to(plan.device)
        base.model.requires_grad_(False)
        if training.gradient_checkpointing:
            base.model.gradient_checkpointing_enable({"use_reentrant": False})
        result = run_training(
            model=base.model,
            params=list(prompt.parameters()),
            loss_fn=lambda batch: summed_token_loss(base.model, batch, prompt.prefix()),
            examples=examples,
            collate=collator_for(
                base.is_encoder_decoder,
                base.tokenizer.pad_token_id,
                getattr(base.model.config, "decoder_start_token_id", None),
            ),
            settings=training,
            device=plan.device,
            amp_dtype=autocast_dtype(plan.device, plan.dtype),
            val_examples=val_examples,
        )
        if training.gradient_checkpointing:
            base.model.gradient_checkpointing_disable()
        log.info(
            "trained %d steps in %.1fs, final loss %s",
            result.steps,
            result.seconds,
            result.final_loss,
        )
        training_config = {
            **training.to_config(),
            "torch_dtype": str(plan.dtype).removeprefix("torch."),
            "num_records": len(records),
            "steps": result.steps,
            "seconds": round(result.seconds, 3),
            "final_loss": result.final_loss,
            "real_tokens": result.real_tokens,
            "padded_tokens": result.padded_tokens,
            "seconds_to_first_step": result.seconds_to_first_step,
        }
        return cls(base, prompt, plan.verbalizer, plan.settings, training_config, result.logs)

    @classmethod
    def validate_training(cls, arguments: dict) -> None:
        """Check a train() call's arguments without training: the runtime calls this
        at submission so a bad request fails at once, before a job starts."""
        signature = inspect.signature(cls.train)
        unknown = sorted(set(arguments) - set(signature.parameters))
        if unknown:
            raise ValueError(f"unknown train parameter(s) {unknown}.")
        # Missing required arguments get None, so the checks below name them.
        bound = signature.bind_partial(**arguments)
        bound.apply_defaults()
        values = {name: bound.arguments.get(name) for name in signature.parameters}
        training_names = {f.name for f in dataclasses.fields(TrainingSettings)}
        _plan(
            base_model=values["base_model"],
            tuning_config=values["tuning_config"],
            device=values["device"],
            tuning_type=values["tuning_type"],
            verbalizer=values["verbalizer"],
            torch_dtype=values["torch_dtype"],
            training=TrainingSettings.from_request(
                **{k: v for k, v in values.items() if k in training_names}
            ),
        )
        collect_records(values["train_stream"], "train_stream", _record_cap())
        collect_records(values["val_stream"], "val_stream", required=False)

    # --------------------------------------------------------------- inference

    @TextGenerationTask.taskmethod()
    def run(
        self,
        text: str,
        max_new_tokens: Optional[int] = 20,
        min_new_tokens: Optional[int] = 0,
        truncate_input_tokens: Optional[int] = 0,
        decoding_method: Optional[str] = "GREEDY",
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        typical_p: Optional[float] = None,
        temperature: Optional[float] = None,
        seed: Optional[int] = None,
        repetition_penalty: Optional[float] = None,
        max_time: Optional[float] = None,
        exponential_decay_length_penalty: Optional[ExponentialDecayLengthPenalty] = None,
        stop_sequences: Optional[List[str]] = None,
        preserve_input_text: Optional[bool] = False,
    ) -> GeneratedTextResult:
        """Generate a continuation of `text` rendered through the model's verbalizer.

        Args:
            text: the input; it fills {{input}} in the verbalizer.
            max_new_tokens: most tokens to generate. Default 20.
            min_new_tokens: EOS is suppressed until this many tokens exist. Default 0.
            truncate_input_tokens: keep only the last N input tokens (0: keep all).
            decoding_method: GREEDY or SAMPLING. Default GREEDY.
            top_k, top_p, typical_p, temperature, seed: SAMPLING parameters.
            repetition_penalty: > 1 discourages repeating tokens.
            max_time: seconds after which generation stops (finish reason TIME_LIMIT).
            exponential_decay_length_penalty: push towards EOS after start_index tokens.
            stop_sequences: strings that end generation when generated; cut from the output.
            preserve_input_text: put the (verbalized) input before the generated text.
        Returns:
            GeneratedTextResult with the text, token counts and finish reason.
        """
        settings = GenerationSettings.from_request(**_generation_args(locals()))
        return self._generator.generate(self._render(text), settings)

    @TextGenerationTask.taskmethod(output_streaming=True)
    def run_stream_out(
        self,
        text: str,
        max_new_tokens: Optional[int] = 20,
        min_new_tokens: Optional[int] = 0,
        truncate_input_tokens: Optional[int] = 0,
        decoding_method: Optional[str] = "GREEDY",
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        typical_p: Optional[float] = None,
        temperature: Optional[float] = None,
        seed: Optional[int] = None,
        repetition_penalty: Optional[float] = None,
        max_time: Optional[float] = None,
        exponential_decay_length_penalty: Optional[ExponentialDecayLengthPenalty] = None,
        stop_sequences: Optional[List[str]] = None,
        preserve_input_text: Optional[bool] = False,
    ) -> Iterable[GeneratedTextStreamResult]:
        """Like `run`, but yields one message per generated token as it is produced."""
        settings = GenerationSettings.from_request(**_generation_args(locals()))
        return self._generator.generate_stream(self._render(text), settings)

    def _render(self, text: str) -> str:
        if not isinstance(text, str):
            raise TypeError(f"`text` must be a string, got {type(text).__name__}.")
        return self.verbalizer.render({"input": text})

    # ------------------------------------------------------------ save / load

    def save(self, model_path: str) -> None:
        """Write config.yml, the PEFT adapter and training_logs.jsonl to `model_path`.

        The base model is not copied: config.yml records its name (or folder).
        The folder appears complete or not at all.
        """
        with atomic_folder(model_path) as staging:
            save_adapter(staging, self.prompt, self.base.is_encoder_decoder, str(self.base.source))
            write_jsonl(staging / TRAINING_LOGS, self.training_logs)
            saver = ModuleSaver(self, model_path=str(staging))
            with saver:
                saver.update_config(
                    {
                        "base_model": self.base.source.to_config(),
                        "is_encoder_decoder": self.base.is_encoder_decoder,
                        "verbalizer": self.verbalizer.template,
                        "tuning_type": self.settings.tuning_type.name,
                        "num_virtual_tokens": self.settings.num_virtual_tokens,
                        "prompt_tuning_init_method": self.settings.init_method.name,
                        "output_model_types": [p.name for p in self.settings.placements],
                        "adapter": "adapter_model.safetensors",
                        "training": self.training_config,
                    }
                )

    @classmethod
    def load(
        cls,
        model_path,
        device: Optional[str] = None,
        torch_dtype: Optional[str] = None,
    ) -> "PeftPromptTuning":
        """Load a saved prompt model; its base model is found by name or folder."""
        loader = ModuleLoader(model_path)
        config = loader.config
        folder = Path(loader.model_path)
        source = BaseModelSource.from_config(dict(config.base_model))
        try:
            located = locate_base_model(source, field="base_model")
        except ValueError as err:
            raise ValueError(f"cannot load the prompt model at {folder}: {err}") from err
        device_ = resolve_device(device)
        dtype = resolve_dtype(torch_dtype or caikit.get_config().get("torch_dtype"), device_)
        placements = tuple(
            parse_enum(p, PromptOutputModelType, "output_model_types")
            for p in config.output_model_types
        )
        settings = PromptTuningSettings(
            tuning_type=parse_enum(config.tuning_type, TuningType, "tuning_type"),
            num_virtual_tokens=int(config.num_virtual_tokens),
            init_method=parse_enum(
                config.prompt_tuning_init_method, PromptTuningInitMethod, "init"
            ),
            init_text=None,
            init_source_model=None,
            placements=placements,
        )
        prompt = load_adapter(folder, placements)
        base = load_base(located, dtype, device_)
        if prompt.weight.shape[1] != base.model.get_input_embeddings().weight.shape[1]:
            raise ValueError(
                f"the prompt at {folder} has width {prompt.weight.shape[1]} but base model "
                f"{source} has hidden size {base.model.get_input_embeddings().weight.shape[1]}."
            )
        return cls(
            base,
            prompt.to(base.device),
            Verbalizer.parse(config.verbalizer),
            settings,
            dict(config.get("training") or {}),
            read_jsonl(folder / TRAINING_LOGS),
        )


@dataclasses.dataclass(frozen=True)
class _TrainingPlan:
    """Everything train() decides before touching weights or data."""

    training: TrainingSettings
    verbalizer: Verbalizer
    located: LocatedModel
    settings: PromptTuningSettings
    device: torch.device
    dtype: torch.dtype


def _plan(
    base_model, tuning_config, device, tuning_type, verbalizer, torch_dtype, training
) -> _TrainingPlan:
    template = Verbalizer.parse(verbalizer if verbalizer is not None else "{{input}}")
    located = locate_base_model(base_model)
    encoder_decoder = is_encoder_decoder(load_model_config(located))
    device_ = resolve_device(device)
    return _TrainingPlan(
        training=training,
        verbalizer=template,
        located=located,
        settings=PromptTuningSettings.from_request(tuning_type, tuning_config, encoder_decoder),
        device=device_,
        dtype=resolve_dtype(torch_dtype or caikit.get_config().get("torch_dtype"), device_),
    )


def _record_cap() -> int:
    return int(caikit.get_config().get("max_training_records") or 0)


def _generation_args(call_locals: dict) -> dict:
    """The generation parameters of a run()/run_stream_out() call."""
    return {k: v for k, v in call_locals.items() if k not in ("self", "text")}
