"""Gated promotion in the MLflow model registry, of a consistent Stage 2 + Stage 3 pair.

Each trained stage registers its model (``gac-stage2``, ``gac-stage3``) and points the alias ``challenger`` at the new
version. ``gac evaluate`` scores it on the held-out split and writes the scores onto the version as tags
``eval.<metric>`` (:func:`gac.mlops.model_card.tag_evaluation`), so that a promotion compares numbers measured the same
way,
on the same split, without re-running anything. :func:`promote` then moves the alias ``champion`` to the challenger
only if

1. it meets **every** target of :class:`~gac.config.TargetParams` (``psnr`` ≥, ``ssim`` ≥, ``sam_deg`` ≤,
   ``sar_edge`` ≤), and
2. it is strictly better than the current champion on the objective (direction-aware: higher PSNR/SSIM, lower SAM or
   SAR-edge disagreement); with no champion yet, meeting the targets is enough.

Otherwise nothing in the registry changes. Either way the :class:`Decision` lists one line per check with the numbers
(``psnr 14.21 < target 30.00``), which ``gac promote`` prints, logs to MLflow and writes to ``metrics/promote.json``.

**The pair.** A Stage 3 model is trained on the opt_v2 one Stage 2 version wrote, and only works on that Stage 2's
output; its version records that Stage 2 version (tags ``gac.stage2_model``, ``gac.stage2_version``; see
:data:`gac.mlops.registry.TRAINED_ON`). So the pipeline's unit of promotion is the pair, judged by the Stage 3 version's
evaluation (the full pipeline's output):

3. a Stage 3 version is promoted only if it names a registered Stage 2 version that exists (otherwise: refused, one
   line saying why), and then ``gac-stage2@champion`` moves to that version in the same step (set first, so a reader
   of ``gac-stage3@champion`` never sees a half-moved pair);
4. while ``gac-stage3@champion`` names a Stage 2 version, a Stage 2 version is not promoted on its own (that would
   pair the Stage 3 champion with a Stage 2 it never saw); before any Stage 3 champion, Stage 2 is gated alone.

``gac infer`` runs ``gac-stage3@champion`` with the Stage 2 version it names (:func:`gac.stages.infer.paired_stage2`).

**Kills.** ``gac promote`` records a promotion on the registered model before moving the alias, so the next ``gac
promote`` finishes and records what a killed one started (:func:`promote_models`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from gac.config import Params, TargetParams
from gac.evaluation.direction import higher_is_better
from gac.io import tracking
from gac.mlops.model_card import EVAL_TAG, eval_metrics
from gac.mlops.registry import CHALLENGER, CHAMPION, MODEL_NAMES, TRAINED_ON, registry_lock, trained_on

#: Registered-model tag: a promotion ``gac promote`` has decided and is moving, until it is recorded (JSON: the run's
#: id and the :class:`Decision`); see :func:`promote_models`.
PENDING_TAG = "gac.promotion_pending"
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
    #: The other half of the pair, ``"<model>/<version>"``, when this decision moved (or kept) both champions.
    paired_with: str | None = None
    #: Made by an earlier ``gac promote`` that was interrupted before recording it, and finished by this one.
    resumed: bool = False

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
        if self.candidate == self.champion_before:
            return f"{self.model}: version {self.candidate} stays {CHAMPION}"
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


def _check_pairing(client, name: str, candidate) -> tuple[str | None, list[str]]:
    """For a model trained on another's output (Stage 3): ``(the other's version to pair with, [])``, or ``(None,
    [the one line why the candidate cannot be promoted])``."""
    from mlflow.exceptions import MlflowException

    upstream = TRAINED_ON[name][0]
    version, why = trained_on(name, candidate.tags)
    cand = str(candidate.version)
    if version is None:
        return None, [f"pair: version {cand} {why}: cannot set {upstream}@{CHAMPION} with it, not promoted"]
    try:
        client.get_model_version(upstream, version)
    except MlflowException:
        return None, [f"pair: version {cand} was trained on {upstream} version {version}, which is not in the "
                      f"registry: not promoted"]  # fmt: skip
    return version, []


def _held_by(client, name: str) -> tuple[str, str, str] | None:
    """``(downstream model, its champion, the version of name it names)`` when a champion trained on ``name``'s output
    pins ``name``'s champion, else ``None``."""
    for downstream, (upstream, *_) in TRAINED_ON.items():
        champion = _version_by_alias(client, downstream, CHAMPION) if upstream == name else None
        version = trained_on(downstream, champion.tags)[0] if champion is not None else None
        if version is not None:
            return downstream, str(champion.version), version
    return None


def promote(client, name: str, objective: str, targets: TargetParams, version: str | None = None) -> Decision:
    """Move alias ``champion`` of ``name`` to the candidate if it meets all targets and beats the champion, keeping
    the Stage 2 + Stage 3 champions a pair (see the module's rules 3 and 4): :func:`decide`, then move the aliases.

    This leaves no record of the move but the returned decision; ``gac promote`` (:func:`promote_models`) records it
    with the move, as one unit a rerun completes.
    """
    decision = decide(client, name, objective, targets, version)
    if decision.promoted:
        _move_aliases(client, decision)
    return decision


def decide(client, name: str, objective: str, targets: TargetParams, version: str | None = None) -> Decision:
    """Whether ``name``'s candidate would be promoted (see :func:`promote`); changes nothing.

    Args:
        client: An ``mlflow.MlflowClient`` on the project store.
        name: Registered model name (e.g. ``gac-stage2``).
        objective: Metric the candidate must beat the champion on (``psnr``, ``ssim``, ``sam_deg``, ``sar_edge``…).
        targets: Thresholds every promoted version meets.
        version: Candidate version; ``None`` = the version with alias ``challenger``.

    Returns:
        The :class:`Decision`; the aliases to move only if ``decision.promoted`` (for Stage 3, then both champions:
        ``decision.paired_with`` names the Stage 2 version).
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
    paired, pair_lines, partner = True, [], None
    if name in TRAINED_ON:
        partner, pair_lines = _check_pairing(client, name, candidate)
        paired = partner is not None
        if paired:
            other = TRAINED_ON[name][0]
            was = _version_by_alias(client, other, CHAMPION)
            was = f"was version {was.version}" if was is not None else "no champion yet"
            moves = "moves with it" if meets and beats else "would move with it"
            pair_lines = [f"pair: trained on {other} version {partner}: {other}@{CHAMPION} {moves} ({was})"]
    elif (held := _held_by(client, name)) is not None and held[2] != cand:
        downstream, their, mine = held
        paired = False
        pair_lines = [f"pair: {downstream}@{CHAMPION} version {their} was trained on {name} version {mine}: "
                      f"{name} is promoted with a {downstream} version trained on its output, not alone"]  # fmt: skip
    promoted = meets and beats and paired
    before = str(champion.version) if champion is not None else None
    pair = f"{TRAINED_ON[name][0]}/{partner}" if partner is not None else None
    return Decision(name, objective, promoted, cand, before, target_lines + champion_lines + pair_lines, metrics, pair)


def _move_aliases(client, decision: Decision) -> None:
    """Point ``champion`` at a promoted decision's candidate; for Stage 3, Stage 2's first (its ``paired_with``), so
    ``gac-stage3@champion`` never names a Stage 2 not yet in place."""
    if decision.model in TRAINED_ON and decision.paired_with:
        upstream, version = decision.paired_with.split("/", 1)
        client.set_registered_model_alias(upstream, CHAMPION, version)
    client.set_registered_model_alias(decision.model, CHAMPION, decision.candidate)


def _first_line(error: Exception) -> str:
    return (str(error).splitlines() or [type(error).__name__])[0]


def promote_models(
    cfg: Params,
    models: Iterable[str] | None = None,
    version: str | None = None,
    record: Callable[[list[Decision]], None] | None = None,
) -> list[Decision]:
    """Run :func:`decide` for each model (default: every stage's), move the aliases and record the decisions in one
    MLflow run and with ``record`` (``gac promote`` writes ``metrics/promote.json``), as one unit a rerun completes.

    Models trained on another's output (Stage 3) go first: when one is promoted, the Stage 2 version it names became
    ``gac-stage2@champion`` with it, and that is Stage 2's decision (its own gate would now refuse any other version).

    **A kill loses nothing.** Under :func:`gac.mlops.registry.registry_lock`, inside the promote run: each promoted
    decision
    is written on its registered model (tag :data:`PENDING_TAG`, with the run's id) *before* its alias moves, and
    removed only once the run and ``record`` are done. A later ``gac promote`` that finds such a tag finishes that
    promotion (moves what is not moved yet, see :func:`_resume`) and records it as its own decision; the killed run,
    left RUNNING, is marked KILLED by :func:`gac.io.tracking.start_run`.
    """
    import mlflow

    models = list(models or MODEL_NAMES.values())
    tracking.setup(cfg.mlflow)
    client = mlflow.MlflowClient()
    objective = cfg.promote.objective
    with registry_lock({*models, *MODEL_NAMES.values()}, "gac promote"):
        with tracking.start_run(cfg.mlflow, "promote", tags={"gac.objective": objective}) as run:
            decided = _resume(client, MODEL_NAMES.values())
            before = {m: _version_by_alias(client, m, CHAMPION) for m in models}  # before anything moves
            for m in sorted(set(models) - set(decided), key=lambda m: m not in TRAINED_ON):
                pair = next((d for d in decided.values() if d.promoted and (d.paired_with or "").startswith(f"{m}/")),
                            None)  # fmt: skip
                decided[m] = (
                    _moved_with(client, m, pair, before[m], objective)
                    if pair is not None
                    else decide(client, m, objective, cfg.promote.targets, version)
                )
            decisions = [decided[m] for m in [*models, *sorted(set(decided) - set(models))]]
            moving = [d for d in decisions if d.promoted and not d.resumed]
            intent = {"run_id": run.info.run_id}
            for d in moving:  # the intent first: from here on, a kill leaves a promotion the next run finishes
                client.set_registered_model_tag(d.model, PENDING_TAG, json.dumps(intent | {"decision": d.to_dict()}))
            for d in sorted(moving, key=lambda d: d.model in TRAINED_ON):
                _move_aliases(client, d)
            mlflow.set_tag("gac.promoted", ",".join(d.model for d in decisions if d.promoted))
            mlflow.log_params({"objective": objective, "models": ",".join(models), "version": version})
            mlflow.log_params({f"target.{k}": v for k, v in cfg.promote.targets.model_dump().items()})
            mlflow.log_metrics({f"{d.model}.promoted": float(d.promoted) for d in decisions})
            mlflow.log_text("\n".join(line for d in decisions for line in d.lines()) + "\n", "promote.txt")
            mlflow.log_dict({d.model: d.to_dict() for d in decisions}, "promote.json")
            if record is not None:
                record(decisions)
        for d in decisions:  # recorded: nothing left to finish
            if d.promoted:
                client.delete_registered_model_tag(d.model, PENDING_TAG)
    return decisions


def _resume(client, names: Iterable[str]) -> dict[str, Decision]:
    """The promotions an interrupted ``gac promote`` decided but did not record (:data:`PENDING_TAG`), finished:
    ``{model: its decision, marked resumed}``.

    The aliases are set again where the kill left them between the intent and the move (Stage 2 first, as always); an
    intent whose run finished was recorded already and is only removed; an alias that someone has since moved
    elsewhere (neither the version it moved from nor the one it moved to) is left alone and the intent dropped, said in
    one line.
    """
    from mlflow.exceptions import MlflowException

    found = {}
    for name in names:
        try:
            raw = client.get_registered_model(name).tags.get(PENDING_TAG)
        except MlflowException:  # no such model yet
            continue
        if raw is not None:
            found[name] = json.loads(raw)
    resumed = {}
    for name, intent in sorted(found.items(), key=lambda item: item[0] in TRAINED_ON):
        run_id = intent["run_id"]
        decision = Decision(**{k: v for k, v in intent["decision"].items() if k in Decision.__dataclass_fields__})
        champion = _version_by_alias(client, name, CHAMPION)
        now = str(champion.version) if champion is not None else None
        if _run_status(client, run_id) == "FINISHED":
            client.delete_registered_model_tag(name, PENDING_TAG)
        elif now not in (decision.champion_before, decision.candidate):
            print(f"{name}: gac promote run {run_id} was interrupted moving {CHAMPION} to version "
                  f"{decision.candidate}, but it is now version {now}: left as it is")  # fmt: skip
            client.delete_registered_model_tag(name, PENDING_TAG)
        else:
            done = "moved now" if now != decision.candidate else "it had moved"
            why = f"resumed: gac promote run {run_id} decided this and was interrupted before recording it ({done})"
            _move_aliases(client, decision)
            resumed[name] = replace(decision, reasons=[*decision.reasons, why], resumed=True)
    return resumed


def _run_status(client, run_id: str) -> str | None:
    """``FINISHED``, ``RUNNING``, ``KILLED``… of a run, ``None`` if it is gone."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id).info.status
    except MlflowException:
        return None


def _moved_with(client, name: str, pair: Decision, champion_before, objective: str) -> Decision:
    """``name``'s decision when ``pair`` (a promoted Stage 3) moved its champion as the other half of the pair."""
    version = pair.paired_with.split("/", 1)[1]
    before = str(champion_before.version) if champion_before is not None else None
    why = f"pair: set with {pair.model} version {pair.candidate}, which was trained on version {version}'s output"
    metrics = eval_metrics(client.get_model_version(name, version).tags)
    return Decision(
        name, objective, before != version, version, before, [why], metrics, f"{pair.model}/{pair.candidate}"
    )
