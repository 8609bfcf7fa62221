"""``gac evaluate --data-dir ROOT``: the trained pipeline scored on another BigEarthNet v2 root (another region, another
year), beside the DVC pipeline's own outputs and never inside them.

It is :func:`gac.stages.infer.run` (catalog → Stage 1 → Stage 2 → Stage 3, models from ``models:/…`` URIs or model
folders)
into ``<out>/caches``, then :func:`gac.evaluation.ablation.evaluate` on a copy of the parameters whose catalog and
caches point
there: every row (stage1, stage1+2, full, baseline and whatever else :mod:`gac.evaluation.ablation` scores), the
per-country and
per-season tables, the figures and GeoTIFFs are made exactly as for the pipeline's own test split. ``out`` (default
``artifacts/evaluate-external/<root folder name>``) holds:

* ``caches/``: ``catalog``, ``opt_v1``, ``opt_v2``, ``opt_v3`` of the scored tiles (a rerun with the same root, split
  and models recomputes nothing; other models rewrite opt_v2/opt_v3 only);
* ``evaluate/``: ``plots/*.csv``, ``figures/``, ``geotiff/``, ``baseline.npz`` (replaced as a whole) and
  ``details.json``: every row × metric, the groups and the provenance, with ``provenance.data_root`` and ``models``;
* ``evaluate.json``: the headline figures, as ``metrics/evaluate.json`` has them for the pipeline (unless
  ``metrics_path`` says otherwise).

Choices:

* **Split**: ``test`` when the root has test tiles, else ``validation``, else ``train`` (a root from another region or
  year was not trained on whatever its split says, but the official test split is the one that cannot overlap a
  training on BigEarthNet's train split). Only that split is catalogued and run through the stages.
* **Models**: by default the DVC pipeline's own model folders (``<stage2.out>/model``, ``<stage3.out>/model``), the
  models ``gac evaluate`` scores on the pipeline's test split; ``models:/gac-stage2@champion`` etc. also work.
* **Baseline**: the ridge regression is fitted on the train split of ``baseline_catalog``, by default the DVC
  pipeline's catalog (``catalog.out``): the tiles the models were trained on, so baseline and models meet ROOT equally
  unseen. Without train tiles there the row is left out with a warning that says why. For an in-domain baseline, pass
  a catalog of ROOT's train split (``gac catalog --data-dir ROOT --splits train --output-dir …``).
* **Registry**: nothing is tagged. The caches record their model as ``model`` (not as a registered version), so
  :func:`gac.evaluation.ablation.evaluate` writes no ``eval.*`` tags: ``gac promote`` compares those, and they must stay
  the
  pipeline's own test-split numbers.
* **Rejected tiles**: the catalog prints each with its reason, and the summary counts them: ``Evaluated 4 of 6 'test'
  tiles (2 rejected: see <out>/caches/catalog/rejected.parquet; …)``. A tile whose name's date cannot be read is
  kept, with season ``unknown`` (:func:`gac.data.metadata.acquisition`).
* **MLflow run**: named after the root and split, ``evaluate · <root folder name> (<split>) · workspace @ <rev>``,
  and tagged with the root (``gac.data_root``) and its catalog's content digest (``gac.catalog_sha256``), so runs on
  several roots in one store can be told apart.
* **Data source**: ``synthetic`` or ``sample`` when the root's ``metadata.parquet`` says it was written by
  :mod:`gac.data.synthetic` or :mod:`gac.data.sample`, else ``bigearthnet``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gac import config
from gac.config import Params
from gac.data.layout import METADATA_FILE
from gac.data.metadata import read_metadata
from gac.data.sample import SKIPPED_KEY
from gac.data.synthetic import BROKEN_KEY
from gac.errors import GacError
from gac.evaluation.ablation import DETAILS
from gac.io import tracking
from gac.io.atomic import write_text
from gac.io.lock import exclusive
from gac.io.store import ShardStore
from gac.pipeline import StageName as S
from gac.stages import infer
from gac.stages.evaluate import attention_hook
from gac.stages.evaluate import run as evaluate
from gac.stages.infer import check_sources

#: Parent of the default output folders, one per root: ``<EXTERNAL_DIR>/<root folder name>``.
EXTERNAL_DIR = "artifacts/evaluate-external"
#: The DVC pipeline's own metrics file of ``gac evaluate`` (never written here).
PIPELINE_METRICS = "metrics/evaluate.json"
#: Split scored by default: the first of these the root has.
SPLIT_PREFERENCE: tuple[str, ...] = ("test", "validation", "train")


#: Tags of the MLflow run of ``gac evaluate --data-dir``: the root (absolute path) and the content digest of its
#: catalog (:meth:`gac.io.store.ShardStore.content_digest`: the same tiles give the same digest in any folder).
DATA_ROOT_TAG = "gac.data_root"
CATALOG_TAG = "gac.catalog_sha256"


def run_detail(root: str | Path, split: str) -> str:
    """What the MLflow run's name says between the stage and the revision: the root's folder name and the split,
    ``evaluate · elsewhere (test) · workspace @ 6f4a854`` (:func:`gac.io.tracking.run_name`)."""
    return f"{Path(root).resolve().name} ({split})"


def default_output_dir(root: str | Path) -> Path:
    """``artifacts/evaluate-external/<root folder name>``."""
    return Path(EXTERNAL_DIR) / Path(root).resolve().name


def default_checkpoints(cfg: Params) -> dict[str, str]:
    """The DVC pipeline's own model folders, ``{stage: <stageN.out>/model}``."""
    return {S.STAGE2: f"{cfg.stage2.out}/model", S.STAGE3: f"{cfg.stage3.out}/model"}


def check_root(data_dir: str | Path) -> Any:
    """The root's ``metadata.parquet`` as a frame, or one line saying why ``data_dir`` is not a BigEarthNet v2 root."""

    root = Path(data_dir)
    if not root.is_dir():
        raise GacError(f"--data-dir {root}: no such folder (expected a BigEarthNet v2 root with {METADATA_FILE})")
    if not (root / METADATA_FILE).is_file():
        raise GacError(f"--data-dir {root}: not a BigEarthNet v2 root (no {METADATA_FILE}; a GAC catalog or cache is "
                       "not accepted: the tiles are catalogued here)")  # fmt: skip
    return read_metadata(root)


def choose_split(meta: Any, root: str | Path, split: str | None) -> str:
    """``split`` if the root has tiles in it, else (``None``) the first of :data:`SPLIT_PREFERENCE` it has."""
    present = [s for s in SPLIT_PREFERENCE if (meta["split"] == s).any()]
    chosen = split or (present[0] if present else None)
    if chosen is None or chosen not in present:
        raise GacError(f"--data-dir {root}: no '{split}' tiles (splits present: {', '.join(present) or 'none'})")
    return chosen


def data_source(root: str | Path) -> str:
    """``synthetic``/``sample`` when the root's parquet schema says GAC wrote it, else ``bigearthnet``."""
    import pyarrow.parquet as pq

    metadata = pq.read_schema(Path(root, METADATA_FILE)).metadata or {}
    if BROKEN_KEY in metadata:
        return "synthetic"
    return "sample" if SKIPPED_KEY in metadata else "bigearthnet"


def check_outputs(cfg: Params, root: str | Path, out: Path, metrics_path: Path) -> None:
    """Refuse an output folder or metrics file that overlaps the data or the DVC pipeline's outputs."""
    protected = {
        "--data-dir": root, "data.root": cfg.data.root, "catalog.out": cfg.catalog.out, "stage1.out": cfg.stage1.out,
        "stage2.out": cfg.stage2.out, "stage3.out": cfg.stage3.out, "evaluate.out": cfg.evaluate.out,
        "sweep.out": cfg.sweep.out,
    }  # fmt: skip
    mine = out.resolve()
    for key, path in protected.items():
        theirs = Path(path).resolve()
        if mine == theirs or theirs in mine.parents or mine in theirs.parents:
            raise GacError(f"--output-dir {out}: overlaps {key} ({path}); this command never writes into the data or "
                           "the DVC pipeline's outputs (pick another folder)")  # fmt: skip
    where = metrics_path.resolve()
    if where == Path(PIPELINE_METRICS).resolve():
        raise GacError(f"--metrics {metrics_path}: that is the DVC pipeline's own metrics file (default with "
                       f"--data-dir: <output-dir>/evaluate.json)")  # fmt: skip
    for key, path in protected.items():
        if Path(path).resolve() in where.parents:
            raise GacError(f"--metrics {metrics_path}: inside {key} ({path}); pick a file outside it")


def check_models(sources: dict[str, str], defaults: dict[str, str]) -> None:
    """:func:`gac.stages.infer.check_sources`, saying where a defaulted source came from when it fails."""

    for stage, source in sources.items():
        try:
            check_sources({stage: source})
        except GacError as e:
            if source != defaults[stage]:
                raise
            raise GacError(f"{e} — the default, the DVC pipeline's model: run dvc repro or pass "
                           f"--{stage}-checkpoint models:/gac-{stage}@champion") from None  # fmt: skip


def external_params(cfg: Params, root: str | Path, caches: Path, report: Path, split: str, max_tiles: int | None):
    """``cfg`` with ``data.root`` = ROOT, the catalog and every stage cache under ``caches`` (the layout of
    :func:`gac.stages.infer.run`, read back by :func:`gac.evaluation.ablation.cache_roots`) and the report in
    ``report``."""

    catalog = config.override(cfg.catalog, out=str(caches / "catalog"), splits=[split])
    return cfg.model_copy(
        update={
            "data": config.override(cfg.data, root=str(root), source=data_source(root)),
            "catalog": catalog.model_copy(update={"max_tiles": max_tiles}),  # None: every tile of the split
            S.STAGE1: cfg.stage1.model_copy(update={"out": str(caches / "opt_v1"), "max_tiles": None}),
            S.STAGE2: config.override(cfg.stage2, out=str(caches)),  # → caches/opt_v2
            S.STAGE3: config.override(cfg.stage3, out=str(caches)),  # → caches/opt_v3
            "evaluate": config.override(cfg.evaluate, split=split, out=str(report)),
        }
    )


def evaluate_root(
    cfg: Params,
    data_dir: str | Path,
    out: str | Path | None = None,
    stage2: str | None = None,
    stage3: str | None = None,
    split: str | None = None,
    max_tiles: int | None = None,
    metrics_path: str | Path | None = None,
    baseline_catalog: str | Path | None = None,
) -> dict[str, Any]:
    """Run the pipeline on ``data_dir`` into ``out`` and evaluate it there (see the module docstring).

    Args:
        cfg: The project's parameters (models, stage settings, ``evaluate``, ``mlflow``); paths are not written.
        data_dir: A BigEarthNet v2 root.
        out: Output folder (default ``artifacts/evaluate-external/<root folder name>``).
        stage2, stage3: ``models:/…`` URIs or model folders (default: the DVC pipeline's ``<stageN.out>/model``).
        split: Split to score (default: test, else validation, else train: the first the root has).
        max_tiles: At most this many tiles of the split, the first in metadata order (default: all).
        metrics_path: Headline metrics JSON (default ``<out>/evaluate.json``).
        baseline_catalog: Catalog whose train split the baseline is fitted on (default ``catalog.out``).

    Returns:
        The content of ``<out>/evaluate/details.json`` (every figure, see :func:`gac.evaluation.ablation.evaluate`).

    Raises:
        GacError: ROOT is not a BigEarthNet v2 root or lacks the split; a model source cannot be loaded; the output
            overlaps the data or the DVC pipeline's outputs. All before any stage runs.
    """
    root = Path(data_dir)
    meta = check_root(root)
    split = choose_split(meta, root, split)
    if max_tiles is not None and max_tiles < 1:
        raise GacError(f"--max-tiles {max_tiles}: expected at least 1")
    out = Path(out) if out is not None else default_output_dir(root)
    metrics_path = Path(metrics_path) if metrics_path is not None else out / "evaluate.json"
    check_outputs(cfg, root, out, metrics_path)
    defaults = default_checkpoints(cfg)
    sources = {S.STAGE2: stage2 or defaults[S.STAGE2], S.STAGE3: stage3 or defaults[S.STAGE3]}
    tracking.setup(cfg.mlflow)  # registry URIs are looked up in the project's store
    check_models(sources, defaults)

    with exclusive(out):  # taken after every check, so bad input leaves no lock file behind either
        ext = external_params(cfg, root, out / "caches", out / "evaluate", split, max_tiles)
        print(f"Evaluating {sources[S.STAGE2]} + {sources[S.STAGE3]} on the '{split}' tiles of {root} into {out}")
        # the scored tiles' GeoTIFFs come with the report (evaluate/geotiff); infer's all-tile export is not needed here
        infer.run(ext, str(root), out / "caches", sources[S.STAGE2], sources[S.STAGE3], geotiff=False)
        attention = attention_hook(sources[S.STAGE3])
        digest = ShardStore(ext.catalog.out).content_digest()
        extra = {"data_root": str(root.resolve()), "output_dir": str(out), "models": sources, "catalog_sha256": digest}
        result = evaluate(ext, ext.evaluate.out, metrics_path=metrics_path, attention_maps=attention,
                          baseline_catalog=baseline_catalog or cfg.catalog.out, run_detail=run_detail(root, split),
                          run_tags={DATA_ROOT_TAG: extra["data_root"], CATALOG_TAG: digest})  # fmt: skip
        result["provenance"] = {**result["provenance"], **extra}
        write_text(Path(ext.evaluate.out) / DETAILS, json.dumps(result, indent=2, sort_keys=True, default=str) + "\n")
        print(f"Metrics: {metrics_path}; every figure ({DETAILS}), plots, figures and GeoTIFFs: {ext.evaluate.out}")
    return result
