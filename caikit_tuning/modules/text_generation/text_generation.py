"""TextGeneration: serve a base model as it is, or fine-tune all of its weights."""

from pathlib import Path
from typing import Optional

import alog
from caikit.core import ModuleBase, module
from caikit.core.data_model import ProducerId
from caikit.core.modules import ModuleLoader, ModuleSaver
from caikit.interfaces.nlp.tasks import TextGenerationTask, TokenizationTask

from ...base_models import (
    BaseModel,
    BaseModelSource,
    LocatedModel,
    load_shared,
    locate_base_model,
    served_model_info,
)
from ...data import Verbalizer, read_records, trained_on_chat
from ...generation import TextGenerator, generation_api
from ...inputs import NO_PREFIX
from ...storage import atomic_folder, read_jsonl
from ...training import seed_everything
from ...training.api import TrainRequest, train_api
from ...training.fit import (
    TRAINING_LOGS,
    after_save,
    fit,
    placement,
    plan_training,
    training_summary,
    write_training_artifacts,
)
from ..caikit_nlp import TEXT_GENERATION_ID, forget_caikit_nlp_config, named_folder
from ..evaluation import exact_match_accuracy

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

    @property
    def public_model_info(self) -> dict:
        return served_model_info(
            "fine_tuned" if self.fine_tuned else "base", self.base, self.source
        )

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
    @train_api("full")
    def train(cls, request: TrainRequest) -> "TextGeneration":
        """Fine-tune every weight of `base_model` on input/output records.

        Returns:
            the fine-tuned TextGeneration model.
        """
        plan = plan_training(request, "full")
        records, val_records = read_records(
            request.train_stream, request.val_stream, plan.records(_limit_ids(cls))
        )
        seed_everything(plan.training.seed)
        base = plan.load_base()
        base.model.requires_grad_(True)
        params = [p for p in base.model.parameters() if p.requires_grad]
        prefix = lambda batch: NO_PREFIX  # noqa: E731
        accuracy = exact_match_accuracy(base, plan, prefix, val_records)
        result = fit(base, plan, params, prefix, records, val_records, accuracy=accuracy)
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
        request, _ = cls.train.request_from(arguments)
        plan = plan_training(request, "full")
        read_records(request.train_stream, request.val_stream, plan.records(_limit_ids(cls)))

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


def _limit_ids(cls) -> tuple[str, ...]:
    """training_data_limit entries apply by this module's id or caikit-nlp's."""
    return (cls.MODULE_ID, TEXT_GENERATION_ID)
