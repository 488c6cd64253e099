"""LoraTuning: train a weight adapter (LoRA, AdaLoRA, IA3) on a frozen base model."""

import contextlib
import dataclasses
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import alog
import torch
from caikit.core import ModuleBase, module
from caikit.core.data_model import ProducerId
from caikit.core.modules import ModuleLoader, ModuleSaver
from caikit.interfaces.nlp.tasks import TextGenerationTask, TokenizationTask
from peft import PeftModel, get_peft_model

from ...base_models import (
    BaseModel,
    BaseModelSource,
    LocatedModel,
    load_base,
    load_shared,
    locate_base_model,
    served_model_info,
)
from ...config import library_settings
from ...data import Verbalizer, read_records, trained_on_chat
from ...data_model.adapters import AdapterConfig, AdapterType, QuantizationConfig
from ...generation import TextGenerator, generation_api
from ...generation.adapters import AdapterLimits, AdapterUse, host_for, new_key, routed
from ...storage import atomic_folder, read_jsonl
from ...training import TrainingSettings, seed_everything, total_steps
from ...training.api import TrainRequest, train_api
from ...training.distributed import world
from ...training.fit import (
    TRAINING_LOGS,
    TrainingPlan,
    after_save,
    placement,
    plan_training,
    training_summary,
    write_training_artifacts,
)
from .adapter_files import (
    ADAPTER_FOLDER,
    adapter_reader,
    inside,
    load_adapter,
    locate_adapter,
    read_adapter_config,
    save_adapter,
    shareable,
)
from .quantization import QuantizationSettings, check_quantization_possible, load_quantized_base
from .settings import AdapterSettings, peft_config, requested_fields
from .step_hooks import NO_HOOKS, StepHooks, adalora_hooks, fit_adapter
from .targets import check_targets, model_skeleton, resolve_targets

log = alog.use_channel("LORA")

# A merged model is a standard Hugging Face model folder inside the model folder.
WEIGHTS_FOLDER = "model"
PRETRAINED = "pretrained_adapter_weights"


@dataclass(frozen=True)
class AdapterPlan:
    """What a train() call decides about the adapter before loading anything."""

    # Targets resolved against the model; AdaLoRA's total_step may wait for the records.
    settings: AdapterSettings
    pretrained: Path | None
    quantization: QuantizationSettings | None
    merge: bool


@module(
    id="b8e4f0d2-5c61-4a9e-8f3b-2d7a90c1e6f4",
    name="LoRA tuning",
    version="0.1.0",
    tasks=[TextGenerationTask, TokenizationTask],
)
@generation_api
class LoraTuning(ModuleBase):
    """A frozen base model with a trained weight adapter, or with the adapter merged in."""

    def __init__(
        self,
        base: BaseModel,
        adapter: Optional[PeftModel],
        verbalizer: Verbalizer,
        settings: AdapterSettings,
        training_config: dict,
        training_logs: list[dict],
        chat: bool = False,
        shared: Optional[AdapterUse] = None,
        adapter_folder: Optional[Path] = None,
    ):
        super().__init__()
        # base.model generates: a shared base model with this model's adapter attached
        # on use (`shared`, a loaded model), the base model with the adapter's layers
        # wrapped in place (adapter.get_base_model(), after training), or with the
        # adapter merged in (neither).
        self.base = base
        self.adapter = adapter
        self.shared = shared
        self.adapter_folder = adapter_folder
        self.verbalizer = verbalizer
        self.settings = settings
        self.training_config = training_config
        self.training_logs = training_logs
        self.chat = chat
        self.generator = TextGenerator(
            base.model,
            base.tokenizer,
            ProducerId(self.MODULE_NAME, self.MODULE_VERSION),
            chat=chat,
            adapter=shared,
        )

    @property
    def merged(self) -> bool:
        return self.adapter is None and self.shared is None

    @property
    def public_model_info(self) -> dict:
        kind = self.settings.adapter_type.name.lower()
        if self.settings.use_dora:
            kind = "dora"
        elif self.settings.use_rslora:
            kind = "rslora"
        return served_model_info(f"{kind}_merged" if self.merged else kind, self.base)

    @contextlib.contextmanager
    def adapted(self) -> Iterator[torch.nn.Module]:
        """The model to call for this model's outputs outside run(): the base model
        with this model's adapter (attached and routed to for the block's length)."""
        if self.shared is None:
            yield self.base.model
            return
        slot = self.shared.acquire()
        try:
            with routed(slot):
                yield self.base.model
        finally:
            self.shared.release(slot)

    def __del__(self):
        # A model that is unloaded (or replaced by its retrained self) frees its slot.
        shared = getattr(self, "shared", None)
        if shared is not None:
            shared.host.detach(shared.key)

    # ---------------------------------------------------------------- training

    @classmethod
    @train_api("lora")
    def train(
        cls,
        request: TrainRequest,
        adapter_config: Optional[AdapterConfig] = None,
        merge_adapter_into_base_model: Optional[bool] = False,
        pretrained_adapter_weights: Optional[str] = None,
        quantization: Optional[QuantizationConfig] = None,
    ) -> "LoraTuning":
        """Train a weight adapter for `base_model` on input/output records.

        Args:
            adapter_config: adapter_type (LORA, ADALORA, IA3) and that type's fields; default
                LoRA of rank 8 on the attention query/value projections found in the model.
            merge_adapter_into_base_model: save the base model with the adapter merged in
                (a standard model folder) instead of the adapter alone. Default False.
            pretrained_adapter_weights: continue training a saved adapter (a name under
                `base_models_dir` or, in-process, a folder); it keeps its own settings, so
                leave adapter_config unset. An AdaLoRA adapter keeps its allocated ranks.
            quantization: load the frozen base model in 4 or 8 bits (QLoRA; needs a CUDA
                GPU and bitsandbytes): bits, quant_type (NF4, FP4), double_quant,
                compute_dtype. Default: no quantization.
        Returns:
            the trained LoraTuning model.
        """
        plan, adapter = _plan(
            request,
            adapter_config,
            merge_adapter_into_base_model,
            pretrained_adapter_weights,
            quantization,
        )
        records, val_records = read_records(
            request.train_stream, request.val_stream, plan.records((cls.MODULE_ID,))
        )
        seed_everything(plan.training.seed)
        base = _load_base(plan, adapter.quantization)
        peft_model, settings = _attach(base, adapter, _total_steps(plan.training, len(records)))
        # Train (and generate) through the inner model: its layers carry the adapter, and
        # its forward takes logits_to_keep, which PeftModel's **kwargs forward hides.
        tuned = dataclasses.replace(base, model=peft_model.get_base_model())
        params = [p for p in peft_model.parameters() if p.requires_grad]
        hooks = _step_hooks(peft_model, adapter)
        # DoRA reads its base weight outside the matmul (for the weight norm): keep it float32.
        result = fit_adapter(
            tuned, plan, params, records, val_records, hooks, not settings.use_dora
        )
        log.info(
            "trained %d steps in %.1fs, final loss %s",
            result.steps,
            result.seconds,
            result.final_loss,
        )
        for param in params:
            param.requires_grad_(False)
        if adapter.merge:
            tuned.model, peft_model = peft_model.merge_and_unload(), None
        summary = {
            **training_summary(plan, result, len(records)),
            PRETRAINED: str(adapter.pretrained) if adapter.pretrained else None,
            "quantization": adapter.quantization.to_config() if adapter.quantization else None,
        }
        return cls(
            tuned,
            peft_model,
            plan.verbalizer,
            settings,
            summary,
            result.logs,
            chat=trained_on_chat(records),
        )

    @classmethod
    def validate_training(cls, arguments: dict) -> None:
        """Check a train() call's arguments without training: the runtime calls this
        at submission so a bad request fails at once, before a job starts."""
        request, own = cls.train.request_from(arguments)
        plan, _ = _plan(request, **own)
        read_records(request.train_stream, request.val_stream, plan.records((cls.MODULE_ID,)))

    def model_input(self, text: str) -> str:
        """The model sees `text` through the verbalizer it was trained with."""
        if not isinstance(text, str):
            raise TypeError(f"`text` must be a string, got {type(text).__name__}.")
        return text if self.chat else self.verbalizer.render_request(text)

    # ------------------------------------------------------------ save / load

    def save(self, model_path: str) -> None:
        """Write config.yml, training_logs.jsonl and training_curve.png, and either the
        PEFT adapter in `adapter/` (the base model is recorded by name, not copied) or
        the merged model with its tokenizer in `model/`. Atomic."""
        source = self.base.source
        with atomic_folder(model_path) as staging:
            config = {
                "is_encoder_decoder": self.base.is_encoder_decoder,
                "verbalizer": self.verbalizer.template,
                "chat": self.chat,
                "adapter_config": self.settings.to_config(),
                "training": self.training_config,
            }
            if self.merged:
                self.base.model.save_pretrained(staging / WEIGHTS_FOLDER, safe_serialization=True)
                self.base.tokenizer.save_pretrained(staging / WEIGHTS_FOLDER)
                config.update(weights=WEIGHTS_FOLDER, trained_from=source.to_config())
            elif self.shared is not None:  # a loaded model: its adapter files as they are
                shutil.copytree(self.adapter_folder, staging / ADAPTER_FOLDER)
                config.update(adapter=ADAPTER_FOLDER, base_model=source.to_config())
            else:
                save_adapter(self.adapter, staging / ADAPTER_FOLDER, str(source))
                config.update(adapter=ADAPTER_FOLDER, base_model=source.to_config())
            write_training_artifacts(staging, self.training_logs, source.name or "model")
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
    ) -> "LoraTuning":
        """Load a saved model: the merged weights, or its base model (found by name or
        folder) with the saved adapter attached."""
        loader = ModuleLoader(model_path)
        config = loader.config
        folder = Path(loader.model_path)
        device_, dtype = placement(device, torch_dtype)
        adapter = shared = adapter_folder = None
        if config.get("weights"):
            weights = str(inside(folder, config.weights, "weights"))
            base = load_base(
                LocatedModel(BaseModelSource(path=weights), weights, local=True), dtype, device_
            )
            # Report where the weights came from, not the copy inside this folder.
            base.source = BaseModelSource.from_config(dict(config.trained_from))
        else:
            try:
                located = locate_base_model(BaseModelSource.from_config(dict(config.base_model)))
            except ValueError as err:
                raise ValueError(f"cannot load the LoRA model {folder.name}: {err}") from err
            rope = dict((config.get("training") or {}).get("rope_scaling") or {}) or None
            adapter_folder = inside(folder, config.adapter, "its adapter")
            peft_config = read_adapter_config(adapter_folder, "the saved adapter")
            if shareable(peft_config):
                # One base model for every model built on it; the adapter attaches on use.
                base = load_shared(located, dtype, device_, rope)
                shared = AdapterUse(
                    host_for(base.model, _adapter_limits()),
                    new_key(folder.name),
                    adapter_reader(adapter_folder, base.model, peft_config),
                )
            else:  # AdaLoRA: its own copy of the base model, with PEFT's layers
                base = load_base(located, dtype, device_, rope_scaling=rope)
                adapter, _ = load_adapter(base.model, adapter_folder, False, "the saved adapter")
                base.model = adapter.get_base_model()
        return cls(
            base,
            adapter,
            Verbalizer.parse(config.verbalizer),
            AdapterSettings.from_config(dict(config.adapter_config)),
            dict(config.get("training") or {}),
            read_jsonl(folder / TRAINING_LOGS),
            chat=bool(config.get("chat", False)),
            shared=shared,
            adapter_folder=adapter_folder,
        )


def _adapter_limits() -> AdapterLimits:
    serving = library_settings().generation
    return AdapterLimits(serving.max_adapters, serving.max_adapter_bytes)


def _plan(
    request: TrainRequest,
    adapter_config,
    merge_adapter_into_base_model,
    pretrained_adapter_weights,
    quantization,
) -> tuple[TrainingPlan, AdapterPlan]:
    """Check a train() call: the shared plan and the adapter's, checked against the
    model's architecture (built on the meta device, without weights)."""
    plan = plan_training(request, "lora")
    merge = merge_adapter_into_base_model or False
    if not isinstance(merge, bool):
        raise TypeError(f"`merge_adapter_into_base_model` must be true or false, got {merge!r}.")
    quantization = _quantization(quantization, merge, plan)
    skeleton = model_skeleton(plan.located)
    if not pretrained_adapter_weights:
        settings = AdapterSettings.from_request(adapter_config)
        return plan, AdapterPlan(resolve_targets(settings, skeleton), None, quantization, merge)
    if requested_fields(adapter_config):
        raise ValueError(
            f"give `adapter_config` or `{PRETRAINED}`, not both: a pretrained adapter keeps "
            "the settings it was trained with."
        )
    folder = locate_adapter(pretrained_adapter_weights, PRETRAINED)
    settings = AdapterSettings.from_peft_config(read_adapter_config(folder, PRETRAINED), PRETRAINED)
    check_targets(skeleton, settings.target_modules, "target_modules")
    return plan, AdapterPlan(settings, folder, quantization, merge)


def _quantization(request, merge: bool, plan: TrainingPlan) -> Optional[QuantizationSettings]:
    quantization = QuantizationSettings.from_request(request)
    if quantization is None:
        return None
    if merge:
        raise ValueError(
            "`merge_adapter_into_base_model` cannot merge into a quantized base model (the "
            "merged weights would be rounded to 4/8 bits); save the adapter, then merge it "
            "into the full-precision base model."
        )
    check_quantization_possible(plan.device)
    return quantization


def _load_base(plan: TrainingPlan, quantization: Optional[QuantizationSettings]) -> BaseModel:
    if quantization is None:
        return plan.load_base()
    return load_quantized_base(plan.located, quantization, plan.device)


def _total_steps(training: TrainingSettings, num_records: int) -> int:
    """The loop's optimizer steps (AdaLoRA schedules its rank budget over them)."""
    return total_steps(training, num_records, world().size)


def _attach(
    base: BaseModel, adapter: AdapterPlan, total_steps: int
) -> tuple[PeftModel, AdapterSettings]:
    """Wrap the base model's target layers with a new (or the pretrained) adapter; only
    the adapter's weights require gradients."""
    if adapter.pretrained is not None:
        peft_model, _ = load_adapter(base.model, adapter.pretrained, True, f"`{PRETRAINED}`")
        return peft_model, adapter.settings
    settings = adapter.settings.with_total_step(total_steps)
    return get_peft_model(base.model, peft_config(settings, base.is_encoder_decoder)), settings


def _step_hooks(peft_model: PeftModel, adapter: AdapterPlan) -> StepHooks:
    if adapter.settings.adapter_type != AdapterType.ADALORA:
        return NO_HOOKS
    # A continued AdaLoRA adapter keeps the ranks it was given: its saved schedule
    # belongs to the run that trained it.
    return adalora_hooks(peft_model, reallocate=adapter.pretrained is None)
