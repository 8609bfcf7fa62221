"""What a registered model says about itself: the version's model card, its ``eval.*`` tags, the model's description.

A registered version's description is its model card (:func:`model_card`): what the stage does, the units of its
input and output (those of the pyfunc signature), data, weights origin, parameters, training metrics, git commit, and
an ``## Evaluation`` section that :func:`tag_evaluation` replaces on every evaluation, beside tags ``eval.<metric>``
that ``gac promote`` compares. Each registered model (``gac-stage2``, ``gac-stage3``) gets a description too
(:func:`registered_model_description`): what it is, its input and output, and what its aliases mean.

Why a module of its own: registration (:mod:`gac.mlops.registry`), evaluation (:mod:`gac.evaluation.ablation`), the
sweep and
promotion (:mod:`gac.mlops.promote`) all write or read these texts and tags; none of them needs the others for it, so
keeping them here leaves no import cycle between registry and promotion.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from gac.pipeline import TRAINED, output, previous, trained_model
from gac.sensors import S1_BANDS, S2_BANDS

#: Prefix of the model-version tags holding evaluation results.
EVAL_TAG = "eval."
#: Heading of the model-card section that evaluation rewrites.
EVAL_SECTION = "## Evaluation"
#: What each registered stage does, for the model card (units: those of the pyfunc signature, see :data:`SIGNATURE`).
STAGE_PURPOSE: dict[str, str] = {s: trained_model(s).purpose for s in TRAINED}
#: The pyfunc's input and output in words (they are what :func:`gac.mlops.registry.example_input` and the signature
#: hold).
SIGNATURE: dict[str, str] = {
    "s1": "float32 (N, 2, 120, 120): Sentinel-1 GRD backscatter σ⁰ in dB, bands VV, VH",
    "opt": "float32 (N, 12, 120, 120): Sentinel-2 L2A surface reflectance in [0, 1] (uint16 DN / 10000, as GAC's "
    "caches hold it)",
    "output": "float32 (N, 12, 120, 120): the refined optical, same bands, reflectance clipped to [0, 1]",
    "sigma": "float32 (N, 12, 120, 120): the calibrated per-pixel, per-band standard deviation of that reflectance "
    "(a Gaussian's σ; GAC's caches hold it as key `sigma`, × 10000 like `opt`)",
}
#: What each stage's ``opt`` input and output are in the pipeline.
STAGE_IO: dict[str, tuple[str, str]] = {s: (output(previous(s)), output(s)) for s in TRAINED}


def _cell(text: str) -> str:
    """``text`` safe inside a Markdown table cell: a ``|`` (as in the regex ``(qkv|proj)``) would end the cell."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _table(values: Mapping[str, Any]) -> list[str]:
    rows = ["| key | value |", "|---|---|"]
    rows += [f"| {_cell(str(k))} | {_cell(_value(v))} |" for k, v in sorted(values.items())]
    return rows


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}" if math.isfinite(v) else str(v)
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, default=str)
    return str(v)


def io_section(stage: str | None, sigma: bool = False) -> list[str]:
    """The ``## Input and output`` lines: the signature's arrays with their units and band order; ``sigma``: the model
    has a σ head and returns ``{"opt", "sigma"}`` (:func:`gac.training.export.pyfunc_output`)."""

    opt_in, opt_out = STAGE_IO.get(stage or "", ("optical", "refined optical"))
    sees_sar = stage in TRAINED and trained_model(stage).sees_sar
    ignored = "" if sees_sar or stage not in TRAINED else " (this stage ignores it; pass any array of that shape)"
    out = "a dict of two arrays out" if sigma else "one array out"
    outputs = (
        [f"- output `opt`: {SIGNATURE['output']}; here {opt_out}", f"- output `sigma`: {SIGNATURE['sigma']}"]
        if sigma
        else [f"- output: {SIGNATURE['output']}; here {opt_out}"]
    )
    return [
        "## Input and output",
        f"A dict of two arrays in, {out} (the MLflow signature holds the shapes; the units are these):",
        "",
        f"- `s1`: {SIGNATURE['s1']}{ignored}",
        f"- `opt`: {SIGNATURE['opt']}; here {opt_in}",
        *outputs,
        f"- band order: S1 {', '.join(S1_BANDS)}; S2 {', '.join(S2_BANDS)}",
        "",
    ]


#: Keys of ``version_info`` that :func:`model_card` lays out itself; any other key is listed under "Details".
CARD_KEYS = ("name", "version", "stage", "data", "weights_origin", "params", "metrics", "git_commit", "run_id",
             "evaluation")  # fmt: skip


def model_card(version_info: Mapping[str, Any]) -> str:
    """The Markdown description of a registered model version.

    Args:
        version_info: What is known at registration; every key is optional:
            ``name``, ``version``, ``stage`` (``stage2``/``stage3``), ``data`` (the data source, or a mapping such
            as ``{source, catalog, train_tiles}``), ``weights_origin`` (:func:`gac.io.tracking.weights_origin` of the
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
        sigma = (info.get("params") or {}).get("nll_weight", 0) > 0
        lines += [STAGE_PURPOSE[info["stage"]], "", *io_section(info["stage"], sigma)]
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


def registered_model_description(name: str, stage: str) -> str:
    """The description of registered model ``name`` (all its versions): what it is, its input/output, its aliases.

    Why: the registry's model page is where a newcomer lands; it must say what the model does, in which units, and
    which version to use, without a look at the code.
    """
    lines = [f"# {name}", "", STAGE_PURPOSE.get(stage, stage), "", *io_section(stage)]
    lines += [
        "## Aliases",
        "- `@challenger`: the newest version registered by training (`gac stage2`/`gac stage3`, `dvc repro`) or by "
        "a sweep (`gac sweep`); not yet judged.",
        "- `@champion`: the version `gac promote` accepted: it met every target of `promote.targets` in its "
        "`eval.*` tags and beat the previous champion on `promote.objective`.",
        "- `gac-stage3@champion` and `gac-stage2@champion` form a pair: a Stage 3 version records the Stage 2 "
        "version whose opt_v2 it was trained on (tags `gac.stage2_model`, `gac.stage2_version`); promoting it sets "
        "`gac-stage2@champion` to that version in the same step, and `gac infer` runs `gac-stage3@champion` with "
        "the Stage 2 version it names. While a Stage 3 champion exists, a Stage 2 version is not promoted alone.",
        "",
        "## Versions",
        "- Each version's description is its model card (data, weights, parameters, evaluation); tag "
        "`content_sha256` is the digest of its code, pinned requirements and files (a rerun that leaves the model "
        "as it was reuses its version).",
        "- A version carries its own code (`code/gac`) and pinned requirements: "
        f'`mlflow.pyfunc.load_model("models:/{name}@champion")` needs no GAC install.',
        "",
    ]
    return "\n".join(lines)


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
