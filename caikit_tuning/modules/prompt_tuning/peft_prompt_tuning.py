"""PeftPromptTuning: learn a soft prompt for a frozen causal-LM or seq2seq base model."""

from pathlib import Path
from typing import Optional

import alog
import torch
from caikit.core import ModuleBase, module
from caikit.core.data_model import ProducerId
from caikit.core.modules import ModuleLoader, ModuleSaver
from caikit.interfaces.nlp.tasks import TextGenerationTask, TokenizationTask

from ...base_models import (
    BaseModel,
    BaseModelSource,
    LocatedModel,
    hidden_size,
    load_model_config,
    load_shared,
    locate_base_model,
    served_model_info,
)
from ...config import library_settings
from ...data import Verbalizer, read_records, task_names, trained_on_chat
from ...data_model import PromptOutputModelType, PromptTuningInitMethod, TuningConfig, TuningType
from ...data_model.values import member
from ...generation import TextGenerator, generation_api
from ...storage import atomic_folder, read_jsonl
from ...training import seed_everything
from ...training.api import TrainRequest, train_api
from ...training.fit import (
    TRAINING_LOGS,
    TrainingPlan,
    after_save,
    fit,
    placement,
    plan_training,
    training_summary,
    write_training_artifacts,
)
from ..caikit_nlp import (
    PEFT_PROMPT_TUNING_ID,
    forget_caikit_nlp_config,
    named_file,
    named_folder,
    read_prompt_vectors,
)
from ..evaluation import exact_match_accuracy
from .multitask import (
    MultitaskSoftPrompt,
    check_source_prompt,
    check_tasks,
    initial_multitask,
    load_source,
    source_prefix,
    source_prompt_base,
)
from .settings import PromptTuningSettings
from .soft_prompt import SoftPrompt, export_tgis, initial_weight, load_adapter, save_adapter

log = alog.use_channel("PROMPT")

# save(save_base_model=True) puts the base model's weights and tokenizer here.
BUNDLED_BASE = "base_model"


@module(
    id="7c1b8a70-6a4e-4b8e-9c39-3f1c6f0b2a11",
    name="Prompt tuning",
    version="0.1.0",
    tasks=[TextGenerationTask, TokenizationTask],
)
@generation_api
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
        chat: bool = False,
        source: Optional[MultitaskSoftPrompt] = None,
        tasks: Optional[list] = None,
    ):
        super().__init__()
        self.base = base
        self.prompt = prompt
        # Multitask models keep their source prompt (shared prompt + task factors).
        self.source = source
        self.tasks = tasks or []
        self.verbalizer = verbalizer
        self.settings = settings
        self.training_config = training_config
        self.training_logs = training_logs
        self.generator = TextGenerator(
            base.model,
            base.tokenizer,
            ProducerId(self.MODULE_NAME, self.MODULE_VERSION),
            prompt.prefix(),
            chat=chat,
        )
        self.chat = chat

    @property
    def public_model_info(self) -> dict:
        kind = "multitask_prompt" if self.source is not None else "prompt"
        return served_model_info(kind, self.base)

    # ---------------------------------------------------------------- training

    @classmethod
    @train_api("prompt_tuning", after_device=("tuning_type",))
    def train(
        cls,
        request: TrainRequest,
        tuning_config: TuningConfig,
        tuning_type: Optional[str] = "PROMPT_TUNING",
    ) -> "PeftPromptTuning":
        """Learn a soft prompt for `base_model` from input/output records.

        Args:
            tuning_config: num_virtual_tokens, init method (RANDOM, TEXT, LABELS: the
                outputs' token embeddings, or, for multitask
                prompt tuning, ONLY_SOURCE_SHARED / AVERAGE_SOURCE), init text, source model,
                output_model_types (DECODER; for seq2seq ENCODER, DECODER or both) and
                num_ranks (multitask).
            tuning_type: PROMPT_TUNING or MULTITASK_PROMPT_TUNING (records with a `task`
                field). Default PROMPT_TUNING.
        Returns:
            the tuned PeftPromptTuning model.
        """
        plan, settings = _plan(request, tuning_config, tuning_type)
        records, val_records = read_records(
            request.train_stream,
            request.val_stream,
            plan.records((cls.MODULE_ID, PEFT_PROMPT_TUNING_ID)),
        )
        seed_everything(plan.training.seed)
        base = plan.load_base()
        generator = torch.Generator().manual_seed(plan.training.seed)
        outputs = [str(record.get("output", "")) for record in records]
        start = initial_weight(
            base.model, base.tokenizer, settings, generator, outputs
        )  # (rows, hidden)
        tasks = task_names(records)
        check_tasks(tasks, settings)
        if settings.multitask:
            source = initial_multitask(start, settings, len(tasks), generator, source_prompt_base())
            source.to(plan.device)
            params, prefix = list(source.parameters()), source_prefix(source)
        else:
            source, prompt = None, SoftPrompt(start, settings.placements).to(plan.device)
            params, prefix = list(prompt.parameters()), lambda batch: prompt.prefix()
        base.model.requires_grad_(False)
        accuracy = exact_match_accuracy(base, plan, prefix, val_records)
        result = fit(base, plan, params, prefix, records, val_records, accuracy=accuracy)
        if source is not None:
            prompt = source.export().to(plan.device)
        log.info(
            "trained %d steps in %.1fs, final loss %s",
            result.steps,
            result.seconds,
            result.final_loss,
        )
        return cls(
            base,
            prompt,
            plan.verbalizer,
            settings,
            training_summary(plan, result, len(records), settings.notes),
            result.logs,
            chat=trained_on_chat(records),
            source=source,
            tasks=tasks if source is not None else None,
        )

    @classmethod
    def validate_training(cls, arguments: dict) -> None:
        """Check a train() call's arguments without training: the runtime calls this
        at submission so a bad request fails at once, before a job starts."""
        request, own = cls.train.request_from(arguments)
        plan, settings = _plan(request, **own)
        records, _ = read_records(
            request.train_stream,
            request.val_stream,
            plan.records((cls.MODULE_ID, PEFT_PROMPT_TUNING_ID)),
        )
        check_tasks(task_names(records), settings)

    def model_input(self, text: str) -> str:
        """The model sees `text` through the verbalizer it was trained with."""
        if not isinstance(text, str):
            raise TypeError(f"`text` must be a string, got {type(text).__name__}.")
        return text if self.chat else self.verbalizer.render_request(text)

    # ------------------------------------------------------------ save / load

    def save(self, model_path: str, save_base_model: bool = False) -> None:
        """Write config.yml, the PEFT adapter, training_logs.jsonl and training_curve.png
        to `model_path`.

        The base model is not copied unless `save_base_model` is True (then its weights
        and tokenizer go into `base_model/`, so the folder loads anywhere on its own);
        config.yml records its name (or folder) either way. The folder appears complete
        or not at all.
        """
        forget_caikit_nlp_config(self)
        with atomic_folder(model_path) as staging:
            save_adapter(staging, self.prompt, self.base.is_encoder_decoder, str(self.base.source))
            bundled = {}
            if save_base_model:
                self.base.model.save_pretrained(staging / BUNDLED_BASE, safe_serialization=True)
                self.base.tokenizer.save_pretrained(staging / BUNDLED_BASE)
                bundled = {"base_model_folder": BUNDLED_BASE}
            if self.source is not None:
                self.source.save_source(staging)
            if library_settings().export_tgis_prompts:
                export_tgis(staging, self.prompt)
            write_training_artifacts(staging, self.training_logs, self.base.source.name or "model")
            saver = ModuleSaver(self, model_path=str(staging))
            with saver:
                saver.update_config(
                    {
                        "base_model": self.base.source.to_config(),
                        "is_encoder_decoder": self.base.is_encoder_decoder,
                        "verbalizer": self.verbalizer.template,
                        "chat": self.chat,
                        "tuning_type": self.settings.tuning_type.name,
                        "num_virtual_tokens": self.settings.num_virtual_tokens,
                        "prompt_tuning_init_method": self.settings.init_method.name,
                        "output_model_types": [p.name for p in self.settings.placements],
                        "num_ranks": self.settings.num_ranks,
                        "tasks": self.tasks,
                        "adapter": "adapter_model.safetensors",
                        "training": self.training_config,
                        **bundled,
                    }
                )
        after_save(self.training_config, model_path)

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
            if config.get("base_model_folder"):  # saved with save_base_model=True
                weights = named_folder(folder, config.base_model_folder, "base_model_folder")
                located = LocatedModel(BaseModelSource(path=str(weights)), str(weights), local=True)
            else:
                located = locate_base_model(source, field="base_model")
        except ValueError as err:
            raise ValueError(f"cannot load the prompt model {folder.name}: {err}") from err
        device_, dtype = placement(device, torch_dtype)
        placements = tuple(
            member(p, PromptOutputModelType, "output_model_types")
            for p in config.output_model_types
        )
        settings = PromptTuningSettings(
            tuning_type=member(config.tuning_type, TuningType, "tuning_type"),
            num_virtual_tokens=int(config.num_virtual_tokens),
            init_method=member(config.prompt_tuning_init_method, PromptTuningInitMethod, "init"),
            init_text=None,
            init_source_model=None,
            placements=placements,
            num_ranks=int(config.get("num_ranks") or 1),
        )
        prompt = load_adapter(folder, placements)
        if prompt.num_virtual_tokens != settings.num_virtual_tokens:
            raise ValueError(
                f"the prompt model {folder.name} is inconsistent: config.yml says "
                f"{settings.num_virtual_tokens} virtual tokens, its adapter holds "
                f"{prompt.num_virtual_tokens}."
            )
        rope = dict(dict(config.get("training") or {}).get("rope_scaling") or {}) or None
        base = load_shared(located, dtype, device_, rope)
        _check_width(prompt, base, folder, source)
        return cls(
            base,
            prompt.to(base.device),
            Verbalizer.parse(config.verbalizer),
            settings,
            dict(config.get("training") or {}),
            read_jsonl(folder / TRAINING_LOGS),
            chat=bool(config.get("chat", False)),
            source=load_source(folder, placements),
            tasks=list(config.get("tasks") or []),
        )

    @classmethod
    def from_caikit_nlp(
        cls, folder: Path, config, device: Optional[str], torch_dtype: Optional[str]
    ) -> "PeftPromptTuning":
        """A prompt model saved by caikit-nlp 0.5.x (see modules/caikit_nlp.py)."""
        name = config.get("base_model_name")
        if not name:
            raise ValueError("the caikit-nlp prompt model's config.yml has no `base_model_name`.")
        try:
            located = locate_base_model(BaseModelSource(name=str(name)), field="base_model_name")
        except ValueError as err:
            raise ValueError(
                f"this caikit-nlp prompt model was trained on {name!r}, which caikit-nlp "
                f"recorded by name only: put that model under base_models_dir ({err})"
            ) from err
        seq2seq = str(config.get("task_type", "CAUSAL_LM")).upper() == "SEQ_2_SEQ_LM"
        placements = tuple(
            placement
            for placement in (PromptOutputModelType.ENCODER, PromptOutputModelType.DECODER)
            if config.get(placement.name)
        )
        if not placements:
            raise ValueError("the caikit-nlp prompt model names no ENCODER or DECODER prompt file.")
        vectors = [
            read_prompt_vectors(named_file(folder, config.get(p.name), p.name)) for p in placements
        ]
        prompt = SoftPrompt(torch.cat(vectors), placements)
        device_, dtype = placement(device, torch_dtype)
        base = load_shared(located, dtype, device_)
        if base.is_encoder_decoder != seq2seq:
            raise ValueError(
                f"the caikit-nlp prompt model is for a {config.get('task_type')} model but "
                f"{name!r} is {'an encoder-decoder' if base.is_encoder_decoder else 'a causal'} model."
            )
        _check_width(prompt, base, folder, name)
        tuning = member(config.get("tuning_type") or "PROMPT_TUNING", TuningType, "tuning_type")
        settings = PromptTuningSettings(
            tuning_type=tuning,
            num_virtual_tokens=prompt.num_virtual_tokens,
            init_method=PromptTuningInitMethod.RANDOM,
            init_text=None,
            init_source_model=None,
            placements=placements,
        )
        saved_by = {
            "saved_by": f"caikit-nlp {config.get('caikit_nlp_version', '0.5')}",
            "trained_torch_dtype": config.get("trained_torch_dtype"),
        }
        logs = folder / str(config.get("training_logs") or TRAINING_LOGS)
        return cls(
            base,
            prompt.to(base.device),
            Verbalizer.parse(config.get("verbalizer") or "{{input}}"),
            settings,
            saved_by,
            read_jsonl(logs) if logs.resolve().is_relative_to(folder.resolve()) else [],
        )


def _check_width(prompt: SoftPrompt, base: BaseModel, folder: Path, source) -> None:
    hidden = base.model.get_input_embeddings().weight.shape[1]
    if prompt.weight.shape[1] != hidden:
        raise ValueError(
            f"the prompt in {folder.name} has width {prompt.weight.shape[1]} but base model "
            f"{source} has hidden size {hidden}."
        )


def _plan(
    request: TrainRequest, tuning_config, tuning_type
) -> tuple[TrainingPlan, PromptTuningSettings]:
    """Check a train() call: the shared plan and the prompt's settings."""
    plan = plan_training(request, "prompt_tuning")
    settings = PromptTuningSettings.from_request(
        tuning_type, tuning_config, plan.is_encoder_decoder
    )
    if settings.init_source_model:
        check_source_prompt(
            settings, source_prompt_base(), hidden_size(load_model_config(plan.located))
        )
    return plan, settings
