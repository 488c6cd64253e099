"""Multitask prompt tuning (Wang et al. 2023): a shared prompt times a low-rank,
task-specific update, P_k = P_shared * (u_k @ v_k).

Trained on records of several tasks (a `task` field), the shared prompt and the per-task
factors are saved as a *source prompt* (`source_prompt.safetensors`, with PEFT's
tensor names), from which new tunings start (ONLY_SOURCE_SHARED, AVERAGE_SOURCE).
Served models use a plain prompt: the product for task 0.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ...config import library_settings
from ...data_model import PromptOutputModelType, PromptTuningInitMethod
from ...inputs.prefix import PromptPrefix
from ...storage.paths import resolve_under
from .settings import PromptTuningSettings
from .soft_prompt import SoftPrompt

SOURCE_FILE = "source_prompt.safetensors"
_SHARED, _COLS, _ROWS = "prompt_embeddings", "prefix_task_cols", "prefix_task_rows"


class MultitaskSoftPrompt(torch.nn.Module):
    def __init__(
        self,
        shared: torch.Tensor,  # (rows, hidden), rows = virtual tokens x placements
        task_cols: torch.Tensor,  # (tasks, rows, ranks)
        task_rows: torch.Tensor,  # (tasks, ranks, hidden)
        placements: tuple,
    ):
        super().__init__()
        self.shared = torch.nn.Parameter(shared.float())
        self.task_cols = torch.nn.Parameter(task_cols.float())
        self.task_rows = torch.nn.Parameter(task_rows.float())
        self.placements = placements
        self.num_virtual_tokens = shared.shape[0] // len(placements)

    def task_prompt(self, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(rows, hidden) for task 0, or (batch, rows, hidden) for each row's task."""
        if task_ids is None:
            return self.shared * (self.task_cols[0] @ self.task_rows[0])
        update = self.task_cols[task_ids] @ self.task_rows[task_ids]  # (batch, rows, hidden)
        return self.shared.unsqueeze(0) * update

    def prefix(self, task_ids: torch.Tensor | None = None) -> PromptPrefix:
        vectors = self.task_prompt(task_ids)
        parts = dict(
            zip(self.placements, vectors.split(self.num_virtual_tokens, dim=-2), strict=True)
        )
        return PromptPrefix(
            encoder=parts.get(PromptOutputModelType.ENCODER),
            decoder=parts.get(PromptOutputModelType.DECODER),
        )

    def export(self) -> SoftPrompt:
        """The task-0 prompt as a plain soft prompt, for serving."""
        with torch.no_grad():
            return SoftPrompt(self.task_prompt().detach().cpu().clone(), self.placements)

    def save_source(self, folder: Path) -> None:
        save_file(
            {
                _SHARED: self.shared.detach().cpu().contiguous(),
                _COLS: self.task_cols.detach().cpu().contiguous(),
                _ROWS: self.task_rows.detach().cpu().contiguous(),
            },
            str(folder / SOURCE_FILE),
        )


def _fresh_factors(tasks: int, rows: int, ranks: int, hidden: int, generator: torch.Generator):
    """Task factors whose product starts near one, so the shared prompt is used as is
    from the first step (PEFT starts them near zero, which wastes a TEXT or source init)."""
    cols = 1.0 + 0.02 * torch.randn(tasks, rows, ranks, generator=generator)
    rows_ = (1.0 + 0.02 * torch.randn(tasks, ranks, hidden, generator=generator)) / ranks
    return cols, rows_


def source_prompt_path(name: str, root: str | Path) -> Path:
    """`prompt_tuning_init_source_model` resolved under source_prompt_base."""
    folder = resolve_under(root, name, "tuning_config.prompt_tuning_init_source_model")
    path = folder / SOURCE_FILE if folder.is_dir() else folder
    if not path.is_file():
        raise ValueError(
            f"`tuning_config.prompt_tuning_init_source_model` {name!r} has no {SOURCE_FILE} "
            f"under {Path(root).resolve()}; train a MULTITASK_PROMPT_TUNING model on several "
            "tasks and save it there."
        )
    return path


def initial_multitask(
    shared_init: torch.Tensor,  # (rows, hidden): random or TEXT embeddings
    settings: PromptTuningSettings,
    num_tasks: int,
    generator: torch.Generator,
    source_root: str | Path,
) -> MultitaskSoftPrompt:
    rows, hidden = shared_init.shape
    method = settings.init_method
    cols, task_rows = _fresh_factors(num_tasks, rows, settings.num_ranks, hidden, generator)
    shared = shared_init
    if method in (PromptTuningInitMethod.ONLY_SOURCE_SHARED, PromptTuningInitMethod.AVERAGE_SOURCE):
        source = load_file(str(source_prompt_path(settings.init_source_model, source_root)))
        _check_source(source, rows, hidden, settings)
        shared = source[_SHARED]
        if method == PromptTuningInitMethod.AVERAGE_SOURCE:
            # Every new task starts from the average of the source tasks' factors.
            cols = source[_COLS].mean(0, keepdim=True).repeat(num_tasks, 1, 1)
            task_rows = source[_ROWS].mean(0, keepdim=True).repeat(num_tasks, 1, 1)
    return MultitaskSoftPrompt(shared, cols, task_rows, settings.placements)


def _check_source(source: dict, rows: int, hidden: int, settings: PromptTuningSettings) -> None:
    missing = [key for key in (_SHARED, _COLS, _ROWS) if key not in source]
    if missing:
        raise ValueError(f"the source prompt lacks {missing}; it is not a multitask source prompt.")
    source_rows, source_hidden = source[_SHARED].shape
    if source_hidden != hidden:
        raise ValueError(
            f"the source prompt was made for a model of hidden size {source_hidden}, but the base "
            f"model's is {hidden}: use a source prompt trained on this base model."
        )
    if source_rows != rows:
        raise ValueError(
            f"the source prompt has {source_rows} prompt rows but this tuning needs {rows} "
            f"(num_virtual_tokens {settings.num_virtual_tokens} x {len(settings.placements)} "
            "placement(s)): match num_virtual_tokens and output_model_types to the source."
        )
    if source[_COLS].shape[-1] != settings.num_ranks:
        raise ValueError(
            f"the source prompt has {source[_COLS].shape[-1]} ranks but `tuning_config.num_ranks` "
            f"is {settings.num_ranks}."
        )


def source_prompt_base() -> Path:
    """Where source prompt names resolve (config `source_prompt_base`)."""
    return library_settings().source_prompt_base


def source_prefix(source: MultitaskSoftPrompt):
    """The prefix function for training: each batch row gets its own task's prompt."""
    return lambda batch: source.prefix(None if batch is None else batch.task_ids)


def check_source_prompt(settings: PromptTuningSettings, root: str | Path, hidden: int) -> None:
    """At submission: the named source prompt exists and fits the model and the tuning."""
    path = source_prompt_path(settings.init_source_model, root)
    with safe_open(str(path), framework="pt") as handle:
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118 (a safetensors handle, not a dict)
    rows = settings.num_virtual_tokens * len(settings.placements)
    _check_source(
        {key: torch.empty(shape, device="meta") for key, shape in shapes.items()},
        rows,
        hidden,
        settings,
    )


def check_tasks(tasks: list[str], settings: PromptTuningSettings) -> None:
    if len(tasks) > 1 and not settings.multitask:
        raise ValueError(
            f"the records name {len(tasks)} tasks {tasks[:5]}; training on several tasks makes a "
            "multitask source prompt and needs tuning_type MULTITASK_PROMPT_TUNING."
        )


def load_source(folder: Path, placements: tuple) -> MultitaskSoftPrompt | None:
    path = folder / SOURCE_FILE
    if not path.is_file():
        return None
    tensors = load_file(str(path))
    return MultitaskSoftPrompt(tensors[_SHARED], tensors[_COLS], tensors[_ROWS], placements)
