"""The whole pipeline on new tiles: catalog → Stage 1 → Stage 2 → Stage 3, from registry aliases or model folders.

Models come from the MLflow registry (``models:/gac-stage2@champion``; loaded as code + safetensors, see
:mod:`gac.mlops.registry_model`) or from local model folders (``artifacts/stage2/model``). Every stage writes its usual
cache under the output folder, so a run can be inspected, evaluated or exported tile by tile.

Every model source is checked before any stage runs (:func:`check_sources`): a missing alias, version, registered
model or folder is one line that says what exists instead — not a traceback after minutes of Stage 1.

Stage 2 and Stage 3 are a pair: a Stage 3 model only works on the opt_v2 of the Stage 2 version it was trained on.
Without an explicit Stage 2 source, :func:`paired_stage2` takes the Stage 2 version the Stage 3 registry version names
(tag ``gac.stage2_version``) — so the default, ``gac-stage3@champion``, runs with its own Stage 2, whatever
``gac-stage2@champion`` says (``gac promote`` keeps the two aliases together anyway).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from gac import config
from gac.config import Params
from gac.data import catalog as catalog_mod
from gac.data import layout
from gac.errors import GacError
from gac.inference import generate as stage1
from gac.inference.refine import write_cache
from gac.io import tracking
from gac.io.atomic import atomic_path, read_json
from gac.io.cog import write_scenes
from gac.io.geotiff import export_geotiffs
from gac.io.lock import exclusive_first_rank
from gac.io.store import SIGMA, ShardStore
from gac.mlops.registry import CHAMPION, MODEL_NAMES, TRAINED_ON, trained_on
from gac.pipeline import GENERATING, output
from gac.pipeline import StageName as S
from gac.stages import catalog as catalog_stage
from gac.stages import stage1 as stage1_stage
from gac.training.export import PARAMS, WEIGHTS, load_model


def load_stage(source: str) -> tuple[str, Any, torch.nn.Module]:
    """``(stage, params section, model)`` from a ``models:/…`` URI or a local model folder."""
    if source.startswith("models:/") or source.startswith("runs:/"):
        import mlflow

        pyfunc = mlflow.pyfunc.load_model(source)
        wrapped = pyfunc.unwrap_python_model()
        return wrapped.stage, wrapped.section, wrapped.model

    return load_model(source)


def paired_stage2(stage3: str) -> tuple[str, str]:
    """``(Stage 2 source, why)`` to run with the Stage 3 source ``stage3`` when no Stage 2 source is given.

    A ``models:/gac-stage3@…`` or ``models:/gac-stage3/…`` version names the Stage 2 it was trained on: that
    registered version (``models:/gac-stage2/<v>``), or the model folder of an unregistered Stage 2 if it is still
    there. A Stage 3 that names none (a model folder, a ``runs:/`` URI, a version registered before lineage was
    recorded) falls back to ``models:/gac-stage2@champion``, and ``why`` says so. Call after :func:`check_sources` of
    ``stage3``, which makes a missing alias one clear line.
    """

    name, fallback = MODEL_NAMES[S.STAGE3], f"models:/{MODEL_NAMES[S.STAGE2]}@{CHAMPION}"
    if not stage3.startswith(f"models:/{name}@") and not stage3.startswith(f"models:/{name}/"):
        return fallback, f"{stage3} names no Stage 2 version"
    import mlflow

    client = mlflow.MlflowClient()
    ref = stage3.removeprefix(f"models:/{name}")
    mv = client.get_model_version_by_alias(name, ref[1:]) if ref[0] == "@" else client.get_model_version(name, ref[1:])
    version, why = trained_on(name, mv.tags)
    if version is not None:
        return f"models:/{TRAINED_ON[name][0]}/{version}", f"{name} version {mv.version} was {why}"
    folder = mv.tags.get(TRAINED_ON[name][1])  # an unregistered Stage 2: the tag holds its model folder
    if folder and Path(folder).is_dir():
        return folder, f"{name} version {mv.version} was trained on the Stage 2 model folder {folder}"
    return fallback, f"{name} version {mv.version} {why}"


def check_sources(sources: dict[str, str]) -> None:
    """Fail fast, in one line, if a model source (``{stage: models:/… URI or folder}``) cannot be loaded as that stage.

    ``models:/<name>@<alias>`` needs the alias (the error names the aliases that exist), ``models:/<name>/<version>``
    the version; a folder must be a GAC model folder of the right stage.
    """
    for stage, source in sources.items():
        option = f"--{stage}-checkpoint"
        if source.startswith("models:/"):
            _check_registry_uri(option, source)
        elif not source.startswith("runs:/"):
            _check_folder(option, stage, Path(source))


def _check_registry_uri(option: str, uri: str) -> None:
    import mlflow
    from mlflow.exceptions import MlflowException

    ref = uri.removeprefix("models:/")
    name, alias, version = ref, None, None
    if "@" in ref:
        name, alias = ref.split("@", 1)
    elif "/" in ref:
        name, version = ref.rsplit("/", 1)
    client = mlflow.MlflowClient()
    try:
        model = client.get_registered_model(name)
    except MlflowException:
        names = sorted(m.name for m in client.search_registered_models())
        raise GacError(
            f"{option}: {uri}: no registered model {name!r} in {mlflow.get_tracking_uri()} (registered: "
            f"{', '.join(names) or 'none'}; run dvc repro or pass a model folder)"
        ) from None
    aliases = {a: str(v) for a, v in (model.aliases or {}).items()}
    if alias is not None and alias not in aliases:
        have = ", ".join(f"{name}@{a} (v{v})" for a, v in sorted(aliases.items())) or "none"
        hint = "; gac promote moves @champion when a challenger meets the targets" if alias == "champion" else ""
        raise GacError(f"{option}: {uri}: {name} has no @{alias} (aliases that exist: {have}{hint})")
    if version is not None:
        try:
            client.get_model_version(name, version)
        except MlflowException:
            raise GacError(f"{option}: {uri}: {name} has no version {version!r}") from None


def _check_folder(option: str, stage: str, folder: Path) -> None:
    if not (folder / WEIGHTS).is_file() or not (folder / PARAMS).is_file():
        raise GacError(f"{option}: {folder}: not a models:/ URI or a GAC model folder (expected {WEIGHTS}, {PARAMS})")
    made_by = read_json(folder / PARAMS, "the model's stage and parameters").get("stage")
    if made_by != stage:
        raise GacError(f"{option}: {folder}: a {made_by} model, expected a {stage} model")


def run(
    cfg: Params,
    data: str,
    out: str | Path,
    stage2: str | None,
    stage3: str,
    visualize: int = 0,
    geotiff: bool = True,
    scenes: bool = False,
) -> dict:
    """Run every stage on ``data`` (a BigEarthNet v2 root or a catalog folder) into ``out``; return the caches.

    ``stage2`` ``None``: the Stage 2 that ``stage3`` was trained on (:func:`paired_stage2`). A root is catalogued
    first, its notes and rejected tiles printed (:func:`gac.stages.catalog.build`); the last line counts every tile of
    the root, rejected ones included. ``geotiff``: every opt_v3 tile as a GeoTIFF with its input tile's CRS and
    transform in ``<out>/geotiff`` (replaced as a whole); ``scenes``: one Cloud-Optimized GeoTIFF per scene (the
    opt_v3 tiles of one Sentinel-2 product on their common grid, :mod:`gac.io.cog`) in ``<out>/scenes``; both carry
    the σ bands when the cache has them; ``visualize``: PNG comparisons (SAR, opt_v1, opt_v2, opt_v3, the real S2) of
    the first ``visualize`` tiles in ``<out>/figures``.
    """

    if stage2 is None:
        check_sources({S.STAGE3: stage3})
        stage2, why = paired_stage2(stage3)
        print(f"stage2: {stage2} ({why})")
    check_sources({S.STAGE2: stage2, S.STAGE3: stage3})
    with exclusive_first_rank(out):  # after the model checks: bad input leaves no lock file behind
        out = Path(out)
        if (Path(data) / "metadata.parquet").is_file():  # a raw BigEarthNet v2 root: build its catalog first
            section = config.override(cfg.catalog, out=str(out / "catalog"))
            catalog_stage.build(section, data)  # prints its notes and every rejected tile
            catalog_root = section.out
        else:
            catalog_root = data
            ShardStore(catalog_root).index  # noqa: B018 - fails early with a clear line if it is not a store
        caches = {S.CATALOG.value: catalog_root, output(S.STAGE1): str(out / output(S.STAGE1))}
        p1, why = stage1_stage.choose_precision(config.override(cfg.stage1, out=caches[output(S.STAGE1)]))
        report = stage1.run(p1, catalog_root)
        print(f"{output(S.STAGE1)}: {report.summary_line()}")
        stage1_stage.record(cfg, p1, report, why)  # what `gac stage1` records beside opt_v1, for gac evaluate
        source = caches[output(S.STAGE1)]
        for name, uri in ((output(S.STAGE2), stage2), (output(S.STAGE3), stage3)):
            stage, section, model = load_stage(uri)
            caches[name] = str(out / name)
            cache = getattr(cfg, stage).cache  # this machine's device, batch and shard sizes for that stage
            origin = tracking.weights_origin(section.pretrained, section.ckpt_path)  # the base's, as training records
            write_cache(stage, model, catalog_root, source, caches[name], cache,
                        provenance={"model": uri, "weights_origin": origin})  # fmt: skip
            source = caches[name]
        export(source, out, geotiff, scenes)
        if visualize:
            shown = visualise(caches, catalog_root, out / "figures", visualize)
            print(f"Figures: {len(shown)} comparisons (PNG) in {out / 'figures'}")
        catalog = ShardStore(catalog_root)
        catalogued, done = len(catalog.index), len(ShardStore(source).index)
        rejected = len(catalog.rejected())
        said = "".join(f" ({note})" for note in [catalog_mod.rejected_note(rejected, catalog_root)] if note)
        print(f"Processed {done} of {catalogued + rejected} tiles{said}, Errors {catalogued - done}, Output dir {out}")
        return caches


def export(cache: str, out: Path, geotiff: bool, scenes: bool) -> None:
    """The final cache's tiles for a GIS: GeoTIFFs in ``<out>/geotiff``, scene COGs in ``<out>/scenes`` (each folder
    replaced as a whole, σ bands included when the cache has them). A folder not asked for this time is removed if an
    earlier run left one: it may hold other tiles or another model's output, never to be taken for these caches'."""
    label, sigma = output(S.STAGE3), " with σ bands" if ShardStore(cache).has(SIGMA) else ""

    def tiles(folder: Path) -> str:
        return f"{export_geotiffs(cache, folder, f'_{label}')} {label} tiles{sigma} (CRS and transform of their input)"

    def cogs(folder: Path) -> str:
        written = write_scenes(cache, folder, lambda pid: layout.s2_tile_dir(pid) or pid)
        return f"{len(written)} Cloud-Optimized GeoTIFFs{sigma} of {sum(written.values())} {label} tiles, one a scene"

    for what, folder, wanted, write in (("GeoTIFFs", out / "geotiff", geotiff, tiles),
                                        ("Scenes", out / "scenes", scenes, cogs)):  # fmt: skip
        if wanted:
            print(f"{what}: {write(folder)} in {folder}")
        elif folder.is_dir():
            shutil.rmtree(folder)
            print(f"{what}: none written; {folder} of an earlier run removed")


def visualise(caches: dict[str, str], catalog_root: str, folder: Path, n: int) -> list[str]:
    """``<folder>/<patch_id>_compare.png`` of the first ``n`` opt_v3 tiles: σ⁰ VV and VH, opt_v1, opt_v2, opt_v3,
    the root's real S2 and opt_v3's σ when its cache has it (:func:`gac.evaluation.figures.save_comparison`, without
    scores), titled with the tiles' split and each cache's weights origin; returns their patch ids."""
    from gac.evaluation.figures import save_comparison, weights_caption
    from gac.io.provenance import read_provenance

    ids = list(ShardStore(caches[output(S.STAGE3)]).index["patch_id"].head(n))
    catalog = ShardStore(catalog_root)
    rows = catalog.rows_for(ids)
    s1, truth = catalog.read("s1", rows), catalog.read("s2", rows)
    labels = [output(s) for s in GENERATING]
    opts = {label: ShardStore(caches[label]).read("opt", ShardStore(caches[label]).rows_for(ids)) for label in labels}
    sigma = ShardStore(caches[output(S.STAGE3)]).read_optional(SIGMA, ids)
    origins = {output(s): read_provenance(caches[output(s)], s).get("weights_origin") for s in GENERATING}
    origin = weights_caption(origins, rows.get("split", ["unknown"]))
    with atomic_path(folder) as tmp:  # replaced as a whole: no figure of an earlier run's tiles stays
        tmp.mkdir()
        for i, pid in enumerate(ids):
            title = " · ".join([pid, *(str(rows[g].iloc[i]) for g in ("country", "season") if g in rows)])
            save_comparison(tmp / f"{pid}_compare.png", s1[i], {k: v[i] for k, v in opts.items()}, truth[i], title,
                            sigma=None if sigma is None else sigma[i], origin=origin)  # fmt: skip
    return ids
