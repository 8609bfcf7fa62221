"""Gated promotion in the MLflow model registry, and the model cards and evaluation tags it relies on.

Each trained stage registers its model (``gac-stage2``, ``gac-stage3``) and points the alias ``challenger`` at the new
version. ``gac evaluate`` scores it on the held-out split and writes the scores onto the version as tags
``eval.<metric>`` (:func:`tag_evaluation`), so that a promotion compares numbers measured the same way, on the same
split, without re-running anything. :func:`promote` then moves the alias ``champion`` to the challenger only if

1. it meets **every** target of :class:`~gac.config.TargetParams` (``psnr`` ≥, ``ssim`` ≥, ``sam_deg`` ≤,
   ``sar_edge`` ≤), and
2. it is strictly better than the current champion on the objective (direction-aware: higher PSNR/SSIM, lower SAM or
   SAR-edge disagreement); with no champion yet, meeting the targets is enough.

Otherwise nothing in the registry changes. Either way the :class:`Decision` lists one line per check with the numbers
(``psnr 14.21 < target 30.00``), which ``gac promote`` prints, logs to MLflow and writes to ``metrics/promote.json``.

The model card (:func:`model_card`) is the version's description: data, weights origin, parameters, training metrics
and git commit at registration, and an ``## Evaluation`` section that :func:`tag_evaluation` replaces on every
evaluation.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from gac.config import Params, TargetParams
from gac.registry import CHALLENGER, CHAMPION, MODEL_NAMES

#: Prefix of the model-version tags holding evaluation results.
EVAL_TAG = "eval."
#: Metrics where a larger value is better; every other metric (errors, angles, distances) is better when smaller.
HIGHER_IS_BETTER = frozenset({"psnr", "ssim", "ms_ssim"})
#: Heading of the model-card section that evaluation rewrites.
EVAL_SECTION = "## Evaluation"
#: What each registered stage does, for the model card.
STAGE_PURPOSE: dict[str, str] = {
    "stage2": "Stage 2: Prithvi-EO + LoRA refinement of TerraMind's opt_v1 into opt_v2 (Sentinel-2 L2A DN, 12 bands).",
    "stage3": "Stage 3: TerraMind + LoRA on decoder cross-attention, grounding opt_v2 in the SAR into opt_v3.",
}


def higher_is_better(metric: str) -> bool:
    """Direction of a metric of :mod:`gac.metrics` (see its table)."""
    return metric in HIGHER_IS_BETTER


def is_better(metric: str, value: float, reference: float) -> bool:
    """Whether ``value`` is strictly better than ``reference`` for ``metric``."""
    return value > reference if higher_is_better(metric) else value < reference


def _relation(a: float, b: float) -> str:
    return ">" if a > b else "<" if a < b else "="


def _pair(a: float, b: float) -> tuple[str, str]:
    """Format two numbers with the same decimals, at least 2, more until unequal numbers look unequal."""
    for decimals in range(2, 7):
        sa, sb = f"{a:.{decimals}f}", f"{b:.{decimals}f}"
        if sa != sb or a == b:
            break
    return sa, sb


# ------------------------------------------------------------------------------------------------ model card


def _table(values: Mapping[str, Any]) -> list[str]:
    rows = ["| key | value |", "|---|---|"]
    rows += [f"| {k} | {_value(v)} |" for k, v in sorted(values.items())]
    return rows


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}" if math.isfinite(v) else str(v)
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, default=str)
    return str(v)


#: Keys of ``version_info`` that :func:`model_card` lays out itself; any other key is listed under "Details".
CARD_KEYS = ("name", "version", "stage", "data", "weights_origin", "params", "metrics", "git_commit", "run_id",
             "evaluation")  # fmt: skip


def model_card(version_info: Mapping[str, Any]) -> str:
    """The Markdown description of a registered model version.

    Args:
        version_info: What is known at registration; every key is optional:
            ``name``, ``version``, ``stage`` (``stage2``/``stage3``), ``data`` (the data source, or a mapping such
            as ``{source, catalog, train_tiles}``), ``weights_origin`` (:func:`gac.tracking.weights_origin` of the
            base model), ``params`` (the stage's parameters; nested mappings are flattened), ``metrics``
            (validation metrics at training time), ``git_commit``, ``run_id``, ``evaluation`` (as for
            :func:`evaluation_section`); other keys (e.g. ``trainable``) are listed under "Details".

    Returns:
        Markdown text for :func:`describe_version`.
    """
    info = dict(version_info)
    title = str(info.get("name", "GAC model"))
    if info.get("version") is not None:
        title += f" version {info['version']}"
    lines = [f"# {title}", ""]
    if info.get("stage") in STAGE_PURPOSE:
        lines += [STAGE_PURPOSE[info["stage"]], ""]
    data = info.get("data")
    data = data if isinstance(data, Mapping) else ({"source": data} if data is not None else {})
    lines += ["## Data", *([f"- {k}: {_value(v)}" for k, v in sorted(data.items())] or ["- (not recorded)"]), ""]
    lines += ["## Weights", f"- base weights: {info.get('weights_origin', 'not recorded')}", ""]
    if info.get("params"):
        lines += ["## Parameters", *_table(_flatten(info["params"])), ""]
    if info.get("metrics"):
        lines += ["## Training metrics", *_table(_flatten(info["metrics"])), ""]
    details = {k: v for k, v in info.items() if k not in CARD_KEYS}
    if details:
        lines += ["## Details", *[f"- {k}: {_value(v)}" for k, v in sorted(details.items())], ""]
    lines += ["## Code", f"- git commit: {info.get('git_commit', 'not recorded')}"]
    if info.get("run_id"):
        lines.append(f"- MLflow run: {info['run_id']}")
    card = "\n".join(lines) + "\n"
    if info.get("evaluation"):
        card = with_evaluation(card, info["evaluation"])
    return card


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in values.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def evaluation_section(evaluation: Mapping[str, Any]) -> str:
    """The ``## Evaluation`` section: ``metrics`` as a table, every other key of ``evaluation`` as a bullet."""
    context = {k: v for k, v in evaluation.items() if k != "metrics"}
    lines = [EVAL_SECTION, *[f"- {k}: {_value(v)}" for k, v in sorted(context.items())]]
    lines += ["", *_table(evaluation.get("metrics") or {})]
    return "\n".join(lines) + "\n"


def with_evaluation(card: str, evaluation: Mapping[str, Any]) -> str:
    """``card`` with its ``## Evaluation`` section (always the last one) replaced by a new one."""
    head = card.split(f"\n{EVAL_SECTION}", 1)[0] if not card.startswith(EVAL_SECTION) else ""
    return f"{head.rstrip()}\n\n{evaluation_section(evaluation)}" if head.strip() else evaluation_section(evaluation)


def describe_version(client, name: str, version: str, card: str | Mapping[str, Any]) -> None:
    """Set a model version's description to ``card``: Markdown, or a ``version_info`` mapping for :func:`model_card`."""
    text = card if isinstance(card, str) else model_card(card)
    client.update_model_version(name, str(version), description=text)


def tag_evaluation(client, name: str, version: str, metrics: Mapping[str, float], context: Mapping[str, Any]) -> None:
    """Record an evaluation on a model version: tags ``eval.<metric>`` (and ``eval.<context key>``), card section.

    Args:
        client: An ``mlflow.MlflowClient`` on the project store.
        name: Registered model name.
        version: Its version.
        metrics: ``{metric: value}`` of the version's ablation row (non-finite values are skipped).
        context: What the numbers are about: ``split``, ``data_source``, ``tiles``, ``run_id``…
    """
    version = str(version)
    tags = {f"{EVAL_TAG}{k}": repr(float(v)) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
    tags |= {f"{EVAL_TAG}{k}": str(v) for k, v in context.items()}
    current = client.get_model_version(name, version)
    for key in current.tags:  # an earlier evaluation's metric that this one lacks must not outlive it
        if key.startswith(EVAL_TAG) and key not in tags:
            client.delete_model_version_tag(name, version, key)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    card = with_evaluation(current.description or "", {**context, "metrics": dict(metrics)})
    describe_version(client, name, version, card)


def eval_metrics(tags: Mapping[str, str]) -> dict[str, float]:
    """The numeric ``eval.*`` tags of a model version, as ``{metric: value}``."""
    out = {}
    for key, value in tags.items():
        if key.startswith(EVAL_TAG):
            try:
                out[key.removeprefix(EVAL_TAG)] = float(value)
            except ValueError:
                continue
    return out


# ------------------------------------------------------------------------------------------------- promotion


@dataclass(frozen=True)
class Decision:
    """The outcome of :func:`promote` for one registered model."""

    model: str
    objective: str
    promoted: bool
    candidate: str | None = None
    champion_before: str | None = None
    reasons: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def champion_after(self) -> str | None:
        return self.candidate if self.promoted else self.champion_before

    def summary(self) -> str:
        """One line: what happened."""
        if self.candidate is None:
            return f"{self.model}: nothing to promote"
        before = f"was version {self.champion_before}" if self.champion_before else "first champion"
        if self.promoted:
            return f"{self.model}: version {self.candidate} promoted to {CHAMPION} ({before})"
        stays = f"champion stays version {self.champion_before}" if self.champion_before else "no champion"
        return f"{self.model}: version {self.candidate} not promoted ({stays})"

    def lines(self) -> list[str]:
        """The summary and one indented line per check."""
        return [self.summary(), *[f"  {r}" for r in self.reasons]]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "champion_after": self.champion_after, "summary": self.summary()}


def _version_by_alias(client, name: str, alias: str):
    """The version ``alias`` points at, or ``None`` (no such alias or model)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _check_targets(metrics: Mapping[str, float], targets: TargetParams, version: str) -> tuple[bool, list[str]]:
    ok, lines = True, []
    for metric, target in targets.model_dump().items():
        value = metrics.get(metric)
        if value is None or not math.isfinite(value):
            ok = False
            lines.append(f"{metric} missing on version {version} (no {EVAL_TAG}{metric} tag: run gac evaluate)")
            continue
        meets = value >= target if higher_is_better(metric) else value <= target
        ok &= meets
        sv, st = _pair(value, target)
        lines.append(f"{metric} {sv} {_relation(value, target)} target {st}: {'met' if meets else 'NOT met'}")
    return ok, lines


def _check_champion(candidate, champion, objective: str) -> tuple[bool, list[str]]:
    cand = str(candidate.version)
    if champion is None:
        return True, [f"no {CHAMPION} yet: version {cand} would be the first"]
    if str(champion.version) == cand:
        return False, [f"version {cand} is already the {CHAMPION}"]
    value = eval_metrics(candidate.tags).get(objective)
    reference = eval_metrics(champion.tags).get(objective)
    if reference is None or value is None:
        who = f"{CHAMPION} version {champion.version}" if reference is None else f"version {cand}"
        return False, [f"{objective} missing on {who}: cannot compare (run gac evaluate)"]
    better = is_better(objective, value, reference)
    sv, sr = _pair(value, reference)
    direction = "higher" if higher_is_better(objective) else "lower"
    verdict = "beats" if better else "does NOT beat"
    lines = [f"{objective} {sv} {_relation(value, reference)} {CHAMPION} version {champion.version} {sr}: "
             f"{verdict} the {CHAMPION} ({direction} is better)"]  # fmt: skip
    for key in ("data_source", "split"):  # numbers from other data are still compared, but the reader is told
        mine, theirs = candidate.tags.get(f"{EVAL_TAG}{key}"), champion.tags.get(f"{EVAL_TAG}{key}")
        if mine is not None and theirs is not None and mine != theirs:
            lines.append(f"note: {CHAMPION} was evaluated with {key}={theirs}, the candidate with {key}={mine}")
    return better, lines


def promote(client, name: str, objective: str, targets: TargetParams, version: str | None = None) -> Decision:
    """Move alias ``champion`` of ``name`` to the candidate if it meets all targets and beats the champion.

    Args:
        client: An ``mlflow.MlflowClient`` on the project store.
        name: Registered model name (e.g. ``gac-stage2``).
        objective: Metric the candidate must beat the champion on (``psnr``, ``ssim``, ``sam_deg``, ``sar_edge``…).
        targets: Thresholds every promoted version meets.
        version: Candidate version; ``None`` = the version with alias ``challenger``.

    Returns:
        The :class:`Decision`; the registry changed only if ``decision.promoted``.
    """
    from mlflow.exceptions import MlflowException

    if version is not None:
        try:
            candidate = client.get_model_version(name, str(version))
        except MlflowException as e:
            return Decision(name, objective, False, reasons=[f"no version {version} of {name}: {_first_line(e)}"])
    else:
        candidate = _version_by_alias(client, name, CHALLENGER)
        if candidate is None:
            why = f"no version of {name} has the alias '{CHALLENGER}' (train and register the stage first)"
            return Decision(name, objective, False, reasons=[why])
    cand = str(candidate.version)
    metrics = eval_metrics(candidate.tags)
    champion = _version_by_alias(client, name, CHAMPION)
    meets, target_lines = _check_targets(metrics, targets, cand)
    beats, champion_lines = _check_champion(candidate, champion, objective)
    promoted = meets and beats
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, cand)
    before = str(champion.version) if champion is not None else None
    return Decision(name, objective, promoted, cand, before, target_lines + champion_lines, metrics)


def _first_line(error: Exception) -> str:
    return (str(error).splitlines() or [type(error).__name__])[0]


def promote_models(cfg: Params, models: Iterable[str] | None = None, version: str | None = None) -> list[Decision]:
    """Run :func:`promote` for each model (default: every stage's) and log the decisions to one MLflow run."""
    import mlflow

    from gac import tracking

    models = list(models or MODEL_NAMES.values())
    tracking.setup(cfg.mlflow)
    client = mlflow.MlflowClient()
    decisions = [promote(client, m, cfg.promote.objective, cfg.promote.targets, version) for m in models]
    tags = {"gac.objective": cfg.promote.objective, "gac.promoted": ",".join(d.model for d in decisions if d.promoted)}
    with tracking.start_run(cfg.mlflow, "promote", tags=tags):
        mlflow.log_params({"objective": cfg.promote.objective, "models": ",".join(models), "version": version})
        mlflow.log_params({f"target.{k}": v for k, v in cfg.promote.targets.model_dump().items()})
        mlflow.log_metrics({f"{d.model}.promoted": float(d.promoted) for d in decisions})
        mlflow.log_text("\n".join(line for d in decisions for line in d.lines()) + "\n", "promote.txt")
        mlflow.log_dict({d.model: d.to_dict() for d in decisions}, "promote.json")
    return decisions
