"""InContextLearning: a frozen base model steered by a task description and few-shot
examples in the prompt, no weights trained (Ludwig's `trainer: none`).

`train()` only checks and stores the example pool (and, for semantic retrieval, its
embeddings); every request then gets `num_examples` examples from it - drawn at random
per request, or the nearest ones by an embedding model from the local model folder.
"""

from pathlib import Path
from typing import Optional

import alog
import torch
from caikit.core import ModuleBase, module
from caikit.core.data_model import DataStream, ProducerId
from caikit.core.modules import ModuleLoader, ModuleSaver
from caikit.interfaces.nlp.tasks import TextGenerationTask, TokenizationTask
from safetensors.torch import load_file, save_file

from ...base_models import (
    BaseModel,
    BaseModelSource,
    load_shared,
    locate_base_model,
    served_model_info,
)
from ...data import Verbalizer, check_fields, collect_records
from ...data_model import TrainGenerationRecord
from ...generation import TextGenerator, generation_api
from ...storage import atomic_folder, read_jsonl, write_jsonl
from ...training.fit import placement
from .retrieval import RETRIEVALS, Embedder, nearest_examples, random_examples

log = alog.use_channel("ICL")

EXAMPLES_FILE = "examples.jsonl"
EMBEDDINGS_FILE = "example_embeddings.safetensors"


@module(
    id="5d0a7c2e-41b9-4f6e-9a3d-8c1e2f70b4a6",
    name="In-context learning",
    version="0.1.0",
    tasks=[TextGenerationTask, TokenizationTask],
)
@generation_api
class InContextLearning(ModuleBase):
    """Zero- or few-shot prompting of a frozen base model."""

    def __init__(
        self,
        base: BaseModel,
        verbalizer: Verbalizer,
        task_description: str,
        examples: list,
        num_examples: int,
        retrieval: str,
        seed: int,
        embedder_source: Optional[BaseModelSource] = None,
        embeddings: Optional[torch.Tensor] = None,
    ):
        super().__init__()
        self.base = base
        self.verbalizer = verbalizer
        self.task_description = task_description
        self.examples = examples
        self.num_examples = num_examples
        self.retrieval = retrieval
        self.seed = seed
        self.embedder_source = embedder_source
        self.embeddings = embeddings  # (examples, dim), normalised
        self._embedder = Embedder(locate_base_model(embedder_source)) if embedder_source else None
        self.generator = TextGenerator(
            base.model, base.tokenizer, ProducerId(self.MODULE_NAME, self.MODULE_VERSION)
        )

    @property
    def public_model_info(self) -> dict:
        return served_model_info("in_context", self.base)

    @classmethod
    def train(
        cls,
        base_model: str,
        train_stream: Optional[DataStream[TrainGenerationRecord]] = None,
        task_description: Optional[str] = "",
        verbalizer: Optional[str] = "{{input}}",
        num_examples: Optional[int] = 0,
        retrieval: Optional[str] = "random",
        embedding_model: Optional[str] = None,
        seed: Optional[int] = 42,
        device: Optional[str] = None,
        torch_dtype: Optional[str] = None,
    ) -> "InContextLearning":
        """Prepare prompting of `base_model`: nothing is trained.

        Args:
            base_model: a name under `base_models_dir` or, in-process, a model folder.
            train_stream: the pool of example records (input/output, or the fields the
                verbalizer names); needed when num_examples > 0.
            task_description: text put first in every prompt, e.g. "Classify the
                sentiment of each review as positive or negative."
            verbalizer: how a record (and the request) is written, e.g.
                "Review: {{input}}\\nSentiment:"; an example is followed by its output.
            num_examples: examples per request (k). Default 0: zero-shot.
            retrieval: random (drawn per request, the same for the same text) or
                semantic (the k nearest by embedding_model). Default random.
            embedding_model: for semantic retrieval: a sentence-embedding model (a name
                under base_models_dir, e.g. all-MiniLM-L6-v2).
            seed: seeds random retrieval. Default 42.
            device: where the base model runs. torch_dtype: its weight dtype.
        Returns:
            the InContextLearning model.
        """
        settings = _settings(locals())
        records = collect_records(
            train_stream, "train_stream", required=settings["num_examples"] > 0
        )
        check_fields(records, settings["verbalizer"].fields)
        device_, dtype = placement(device, torch_dtype)
        base = load_shared(locate_base_model(base_model), dtype, device_)
        embeddings = None
        if settings["embedder"] is not None:
            texts = [settings["verbalizer"].render(r) for r in records]
            embeddings = Embedder(settings["embedder"]).embed(texts)
        return cls(
            base,
            settings["verbalizer"],
            task_description or "",
            records,
            settings["num_examples"],
            settings["retrieval"],
            settings["seed"],
            settings["embedder"].source if settings["embedder"] else None,
            embeddings,
        )

    def model_input(self, text: str) -> str:
        """Description, then the examples, then the request, each in the verbalizer's form."""
        if not isinstance(text, str):
            raise TypeError(f"`text` must be a string, got {type(text).__name__}.")
        query = self.verbalizer.render_request(text)
        parts = [self.task_description] if self.task_description else []
        for index in self._choose(text, query):
            example = self.examples[index]
            parts.append(f"{self.verbalizer.render(example)} {example['output']}")
        parts.append(query)
        return "\n\n".join(parts)

    def _choose(self, text: str, query: str) -> list[int]:
        if not self.num_examples or not self.examples:
            return []
        if self.retrieval == "semantic":
            return nearest_examples(
                self._embedder.embed([query])[0], self.embeddings, self.num_examples
            )
        return random_examples(text, len(self.examples), self.num_examples, self.seed)

    # ------------------------------------------------------------ save / load

    def save(self, model_path: str) -> None:
        with atomic_folder(model_path) as staging:
            write_jsonl(staging / EXAMPLES_FILE, self.examples)
            if self.embeddings is not None:
                save_file(
                    {"embeddings": self.embeddings.contiguous()}, str(staging / EMBEDDINGS_FILE)
                )
            saver = ModuleSaver(self, model_path=str(staging))
            with saver:
                saver.update_config(
                    {
                        "base_model": self.base.source.to_config(),
                        "verbalizer": self.verbalizer.template,
                        "task_description": self.task_description,
                        "num_examples": self.num_examples,
                        "retrieval": self.retrieval,
                        "seed": self.seed,
                        "embedding_model": self.embedder_source.to_config()
                        if self.embedder_source
                        else None,
                    }
                )

    @classmethod
    def load(
        cls, model_path, device: Optional[str] = None, torch_dtype: Optional[str] = None
    ) -> "InContextLearning":
        loader = ModuleLoader(model_path)
        config = loader.config
        folder = Path(loader.model_path)
        try:
            located = locate_base_model(BaseModelSource.from_config(dict(config.base_model)))
        except ValueError as err:
            raise ValueError(f"cannot load the in-context model at {folder}: {err}") from err
        device_, dtype = placement(device, torch_dtype)
        embedder = config.get("embedding_model")
        embeddings = load_file(str(folder / EMBEDDINGS_FILE))["embeddings"] if embedder else None
        return cls(
            load_shared(located, dtype, device_),
            Verbalizer.parse(config.verbalizer),
            config.get("task_description") or "",
            read_jsonl(folder / EXAMPLES_FILE),
            int(config.num_examples),
            config.retrieval,
            int(config.seed),
            BaseModelSource.from_config(dict(embedder)) if embedder else None,
            embeddings,
        )


def _settings(arguments: dict) -> dict:
    """Check the prompting settings of a train() call."""
    count = arguments["num_examples"] or 0
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= 64:
        raise ValueError(f"`num_examples` must be an integer in 0..64, got {count!r}.")
    retrieval = (arguments["retrieval"] or "random").lower()
    if retrieval not in RETRIEVALS:
        raise ValueError(
            f"`retrieval` must be one of {list(RETRIEVALS)}, got {arguments['retrieval']!r}."
        )
    embedder = None
    if retrieval == "semantic":
        if not arguments["embedding_model"]:
            raise ValueError(
                "`embedding_model` is required for semantic retrieval (e.g. all-MiniLM-L6-v2)."
            )
        embedder = locate_base_model(arguments["embedding_model"], field="embedding_model")
    elif arguments["embedding_model"]:
        raise ValueError("`embedding_model` only applies to retrieval semantic.")
    seed = arguments["seed"] if arguments["seed"] is not None else 42
    return {
        "num_examples": count,
        "retrieval": retrieval,
        "embedder": embedder,
        "seed": seed,
        "verbalizer": Verbalizer.parse(arguments["verbalizer"] or "{{input}}"),
    }
