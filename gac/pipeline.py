"""The pipeline as data: every stage of GAC, in order, with the facts about it declared once.

``dvc.yaml`` reads like the method section of the paper: data → catalog → opt_v1 → opt_v2 → opt_v3 → metrics. This
table is the same chain for the code. A stage's name, the cache it reads and writes, its ``params.yaml`` section, its
metrics file, its registered model and how that model is built are written here and nowhere else: provenance,
registry names, model cards, evaluation rows and the Lightning fit look a stage up instead of spelling ``"stage2"``
again (a test greps the package for stage-name literals outside this file).

The table imports nothing of GAC's, so it sits at the bottom of the layers: every layer may read it, and a DVC stage
that does depends on no other stage's code.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path


class StageName(StrEnum):
    """The stages, by the names ``dvc.yaml``, ``params.yaml`` sections and ``gac`` subcommands use."""

    CATALOG = "catalog"
    STAGE1 = "stage1"
    STAGE2 = "stage2"
    STAGE3 = "stage3"
    EVALUATE = "evaluate"
    PROMOTE = "promote"


@dataclass(frozen=True)
class TrainedModel:
    """What a trained stage's model is to the outside: its registered name and purpose. How it is built and trained
    is :data:`gac.training.stages.TRAINED_STAGES` (kept there so that this table names no heavy module, and a DVC
    stage that reads it does not depend on every model's code)."""

    #: The registered model's name in the MLflow registry.
    registry_name: str
    #: What the stage does, for its model card.
    purpose: str
    #: Does the network see the SAR as well as the optical (Stage 3) or the optical alone (Stage 2)?
    sees_sar: bool


@dataclass(frozen=True)
class Stage:
    """One stage: what it reads, what it writes, and where its results go."""

    name: StageName
    #: The label of the cache it writes (``opt_v1``…): what users and figures call its output.
    output: str
    #: The stage whose output it reads (``None``: the raw BigEarthNet v2 root).
    previous: StageName | None
    #: The DVC metrics file it writes: named by the DVC entry point (``pipelines/<stage>.py``) only; a command run
    #: without ``--metrics`` writes :func:`metrics_beside` its output folder instead.
    metrics: str
    #: How the model is trained and registered, for the stages that train one.
    model: TrainedModel | None = None


STAGES: dict[StageName, Stage] = {
    s.name: s
    for s in (
        Stage(StageName.CATALOG, "catalog", None, "metrics/catalog.json"),
        Stage(StageName.STAGE1, "opt_v1", StageName.CATALOG, "metrics/stage1.json"),
        Stage(
            StageName.STAGE2, "opt_v2", StageName.STAGE1, "metrics/stage2.json",
            TrainedModel(
                "gac-stage2",
                "Stage 2: Prithvi-EO + LoRA refinement of TerraMind's opt_v1 into opt_v2 (Sentinel-2 L2A reflectance "
                "in [0, 1], 12 bands).",
                sees_sar=False,
            ),
        ),
        Stage(
            StageName.STAGE3, "opt_v3", StageName.STAGE2, "metrics/stage3.json",
            TrainedModel(
                "gac-stage3",
                "Stage 3: TerraMind + LoRA on decoder cross-attention, grounding opt_v2 in the SAR into opt_v3 "
                "(Sentinel-2 L2A reflectance in [0, 1], 12 bands).",
                sees_sar=True,
            ),
        ),
        Stage(StageName.EVALUATE, "evaluation", StageName.STAGE3, "metrics/evaluate.json"),
        Stage(StageName.PROMOTE, "promotion", StageName.EVALUATE, "metrics/promote.json"),
    )
}  # fmt: skip

#: The stages that train a model, in pipeline order.
TRAINED: tuple[StageName, ...] = tuple(name for name, s in STAGES.items() if s.model is not None)
#: The stages that write an optical cache (opt_v1, opt_v2, opt_v3), in pipeline order.
GENERATING: tuple[StageName, ...] = (StageName.STAGE1, *TRAINED)


def output(name: StageName | str) -> str:
    """The label of what stage ``name`` writes (``opt_v2`` for Stage 2)."""
    return STAGES[StageName(name)].output


def metrics_beside(out: str | Path) -> Path:
    """``<out>.metrics.json``: the metrics file of a command run without ``--metrics``, beside its output folder.

    A metrics file belongs to the run that made it: a command pointed at another root (or another output folder) must
    not write over the project's tracked ``metrics/*.json``, which only the DVC entry points (``pipelines/*.py``)
    name. Beside rather than inside, so that a DVC-tracked output folder (``artifacts/catalog``) keeps its hash.
    """
    out = Path(out)
    if out.name in ("", ".", ".."):
        out = out.resolve()
    return out.with_name(f"{out.name}.metrics.json")


def previous(name: StageName | str) -> StageName:
    """The stage whose output stage ``name`` reads."""
    before = STAGES[StageName(name)].previous
    if before is None:
        raise KeyError(f"{name} reads the raw data root, not another stage's output")
    return before


def trained_model(name: StageName | str) -> TrainedModel:
    """The model facts of trained stage ``name``; a one-line ``KeyError`` for a stage that trains nothing."""
    model = STAGES[StageName(name)].model
    if model is None:
        raise KeyError(f"{name} trains no model (trained stages: {', '.join(TRAINED)})")
    return model


def registry_names() -> dict[StageName, str]:
    """``{trained stage: registered model name}``."""
    return {name: trained_model(name).registry_name for name in TRAINED}


def stage_of_registry_name(registry_name: str) -> StageName:
    """The trained stage a registered model name belongs to."""
    for name, registered in registry_names().items():
        if registered == registry_name:
            return name
    known = sorted(registry_names().values())
    raise KeyError(f"{registry_name!r} is no GAC registered model (expected one of {known})")
