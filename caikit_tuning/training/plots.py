"""The loss curve saved with a model: training loss per step, validation loss on top."""

from __future__ import annotations

from pathlib import Path


def write_loss_curve(logs: list[dict], path: Path, title: str = "") -> bool:
    """Draw the curve into `path` (PNG); False when there is nothing to draw."""
    train = [(e["step"], e["loss"]) for e in logs if "loss" in e]
    if not train:
        return False
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4), dpi=100)
    axes = figure.add_subplot()
    axes.plot(*zip(*train, strict=True), label="training loss", linewidth=1, alpha=0.8)
    validation = [(e["step"], e["validation_loss"]) for e in logs if "validation_loss" in e]
    if validation:
        axes.plot(*zip(*validation, strict=True), "o-", label="validation loss", linewidth=2)
        best = min(validation, key=lambda point: point[1])
        axes.axvline(
            best[0], color="gray", linestyle=":", label=f"best validation (step {best[0]})"
        )
    axes.set_xlabel("optimizer step")
    # Log scale: the first steps' loss would otherwise flatten everything after them.
    axes.set_yscale("log")
    axes.set_ylabel("loss per target token (log scale)")
    axes.set_title(title or "training")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, format="png")
    return True
