"""Typed parameters: ``params.yaml`` is parsed here, once, into one frozen model per stage.

``params.yaml`` is the only switch between the two worlds GAC runs in: *here* (the embedded sample, tiny TerraTorch
variants with random init, CPU) and *real* (a BigEarthNet v2 root, hub weights or local checkpoints, CUDA). Stages read
their own section; CLIs override fields with :func:`override`, they never re-parse YAML. A bad key or value raises
:class:`~gac.errors.GacError` with one line naming the key and what was expected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gac.errors import GacError
from gac.pipeline import TRAINED, StageName

PARAMS_FILE = "params.yaml"

#: BigEarthNet v2 tiles are 120 x 120 px: no model input may be smaller.
TILE_PX = 120

Precision = Literal["32", "16-mixed", "bf16-mixed", "32-true", "bf16-true", "16-true"]


class Section(BaseModel):
    """Base of every section: unknown keys are errors (a typo must not silently fall back to a default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _batches_fit_shards(section: Section) -> None:
    """A batch never spans two shards: a larger batch size would silently be capped at the shard size."""
    if section.batch_size > section.shard_size:
        raise ValueError(f"batch_size {section.batch_size} > shard_size {section.shard_size} (a batch never spans "
                         "shards: it would silently be capped; raise shard_size)")  # fmt: skip


def _fits_the_tile(img_size: int) -> None:
    if img_size < TILE_PX:
        raise ValueError(f"img_size {img_size} < the {TILE_PX} px tile (expected >= {TILE_PX})")


class DataParams(Section):
    """Where the raw BigEarthNet v2 tiles are and what they are."""

    root: str = "data"
    #: ``sample`` (embedded real reBEN tiles), ``synthetic`` (seeded generator) or ``bigearthnet`` (the real dataset).
    source: Literal["sample", "synthetic", "bigearthnet"] = "sample"
    #: reBEN quality flags whose tiles are neither trained on nor scored (``[]`` keeps every tile): a cloudy or snowy
    #: Sentinel-2 target is not the surface the SAR saw, so learning or scoring against it rewards the wrong answer.
    exclude: list[Literal["cloud_or_shadow", "seasonal_snow"]] = ["cloud_or_shadow", "seasonal_snow"]


class MlflowParams(Section):
    """MLflow tracking store: SQLite + an artifact folder under ``mlruns/`` (the file store is legacy in MLflow 3)."""

    tracking_uri: str = "sqlite:///mlruns/mlflow.db"
    #: Relative paths are stored relative (to the working directory, the project root) so the store can be copied.
    artifact_location: str = "mlruns/artifacts"
    experiment: str = "gac"
    #: Where the MLflow UI is served (the README's ``mlflow ui`` command): Optuna trials link to their run's page there.
    ui_url: str = "http://127.0.0.1:5000"


class CatalogParams(Section):
    """The catalog stage: validate, resample and pack raw tiles into shards."""

    out: str = "artifacts/catalog"
    splits: list[Literal["train", "validation", "test"]] = ["train", "validation", "test"]
    max_tiles: int | None = Field(default=None, gt=0)
    shard_size: int = Field(default=256, gt=0)
    workers: int = Field(default=2, ge=0)


class Stage1Params(Section):
    """Stage 1: TerraMind S1GRD → S2L2A generation (no training)."""

    variant: str = "terramind_v1_tiny_generate"
    pretrained: bool = False
    #: The released ``TerraMind_v1_<size>.pt`` (or a state dict of GAC's whole generator).
    ckpt_path: str | None = None
    #: The released ``TerraMind_Tokenizer_S2L2A.pt`` (needed beside a released ``ckpt_path`` without the hub).
    tokenizer_ckpt_path: str | None = None
    timesteps: int = Field(default=2, gt=0)
    #: Diffusion draws per tile. ``K > 1``: opt_v1 is their mean and its ``sigma`` their spread (what the generator
    #: cannot pin down), at ``K×`` the FLOPs; 1 is one draw and no σ.
    samples: int = Field(default=1, ge=1)
    img_size: int = Field(default=128, gt=0, multiple_of=16)
    batch_size: int = Field(default=4, gt=0)
    max_tiles: int | None = Field(default=None, gt=0)
    device: str = "auto"
    #: ``auto``: bf16 where the device multiplies it in hardware (a GPU, a CPU with AMX or AVX512-BF16), else 32.
    precision: Literal["32", "bf16", "16", "auto"] = "32"
    seed: int = 0
    shard_size: int = Field(default=16, gt=0)
    num_workers: int = Field(default=0, ge=0)
    #: Generate over scenes of adjacent tiles with overlapping, blended windows instead of tile by tile
    #: (gac.inference.mosaic).
    mosaic: bool = False
    #: ``torch.compile`` the diffusion decoder (inductor, frozen weights): one compile per process and batch shape,
    #: then faster steps (gac.inference.fastpath).
    compile: bool = False
    out: str = "artifacts/opt_v1"

    @model_validator(mode="after")
    def _model_can_take_it(self) -> Stage1Params:
        _batches_fit_shards(self)
        _fits_the_tile(self.img_size)
        if self.img_size % 32:
            raise ValueError(f"img_size {self.img_size} is not a multiple of 32 (TerraMind's S2L2A tokenizer needs "
                             "it: 128, 160, 192, 224, 256)")  # fmt: skip
        return self


class LoraParams(Section):
    """LoRA adapters (peft): rank, scaling, dropout and which modules (regex or names) get them."""

    rank: int = Field(default=8, gt=0)
    alpha: float = Field(default=16.0, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: str | list[str] = r".*blocks\.\d+\.attn\.(qkv|proj)"


class TrainParams(Section):
    """What both trained stages share: the Lightning trainer's knobs."""

    epochs: int = Field(default=2, gt=0)
    max_steps: int = -1
    batch_size: int = Field(default=4, gt=0)
    grad_accum_steps: int = Field(default=1, gt=0)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_steps: int = Field(default=0, ge=0)
    #: Validate every N training batches (int), or every fraction of an epoch (float in (0, 1]: 0.25 = 4x per epoch).
    val_every_n_steps: int | float = Field(default=10, gt=0)
    #: Write last.ckpt every N optimizer steps (int), or every fraction of an epoch (float in (0, 1]).
    save_every_n_steps: int | float = Field(default=10, gt=0)
    early_stopping: bool = True
    #: Validations without improvement before early stopping (so patience x the validation cadence is its reach).
    patience: int = Field(default=5, gt=0)
    precision: Precision = "32"
    accelerator: str = "auto"
    devices: int | str = 1
    num_nodes: int = Field(default=1, gt=0)
    strategy: str = "auto"
    num_workers: int = Field(default=0, ge=0)
    max_tiles: int | None = Field(default=None, gt=0)
    seed: int = 0

    @model_validator(mode="after")
    def _fractions_of_an_epoch(self) -> TrainParams:
        for key in ("val_every_n_steps", "save_every_n_steps"):
            value = getattr(self, key)
            if isinstance(value, float) and not value <= 1.0:
                raise ValueError(f"{key} {value}: a float is a fraction of an epoch, expected (0, 1] (or an int)")
        return self


class CacheParams(Section):
    """How a trained stage writes its cache (:mod:`gac.inference.refine`, through :mod:`gac.inference.engine`): where
    and in what units of
    work. None of it changes the model, so none of it restarts a training (see :mod:`gac.training.fit`)."""

    device: str = "auto"
    precision: Literal["32", "bf16", "16"] = "32"
    batch_size: int = Field(default=8, gt=0)
    shard_size: int = Field(default=256, gt=0)
    num_workers: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _batches_fit(self) -> CacheParams:
        _batches_fit_shards(self)
        return self


class Stage2Params(Section):
    """Stage 2: Prithvi-EO + LoRA (+ int8 base) refines opt_v1 → opt_v2."""

    backbone: str = "prithvi_eo_v2_tiny_tl"
    pretrained: bool = False
    ckpt_path: str | None = None
    img_size: int = Field(default=128, gt=0, multiple_of=16)
    load_in_8bit: bool = False
    lora: LoraParams = LoraParams()
    l1_weight: float = Field(default=1.0, ge=0)
    ms_ssim_weight: float = Field(default=0.2, ge=0)
    lpips_weight: float = Field(default=0.0, ge=0)
    lpips_weights_path: str | None = None
    #: Weight of the Gaussian NLL of a per-pixel, per-band log-variance head (aleatoric σ, calibrated on the
    #: validation split; :mod:`gac.evaluation.uncertainty`). ``0`` builds no σ head at all: today's model, outputs and
    #: fingerprints. The head sees the mean path's features *detached*, so the term cannot change the mean.
    nll_weight: float = Field(default=0.0, ge=0)
    #: ``k ≥ 2``: also train ``k`` fold models, each without one fold of the train tiles, and write opt_v2 of every
    #: train tile with the model that did not see it, so Stage 3 trains on inputs as good as unseen tiles get
    #: (:mod:`gac.training.crossfit`); ``0`` = off (Stage 3 then trains on in-sample opt_v2; ``gac evaluate`` reports
    #: the gap).
    cross_fit_folds: int = Field(default=0, ge=0)
    #: With ``cross_fit_folds`` k ≥ 2: opt_v2's ``sigma`` also carries the spread of the k fold models' predictions
    #: (what the model has not learnt: k models fitted on different tiles disagree there), at k more forward passes
    #: per tile; added in quadrature to the σ head's σ.
    cross_fit_spread: bool = False
    train: TrainParams = TrainParams()
    cache: CacheParams = CacheParams()
    out: str = "artifacts/stage2"

    @model_validator(mode="after")
    def _model_can_take_it(self) -> Stage2Params:
        _fits_the_tile(self.img_size)
        if self.cross_fit_folds == 1:
            raise ValueError("cross_fit_folds 1 holds nothing out (expected 0 = off, or k >= 2 folds)")
        if self.cross_fit_spread and self.cross_fit_folds < 2:
            raise ValueError("cross_fit_spread needs fold models (expected cross_fit_folds >= 2)")
        return self


class Stage3Params(Section):
    """Stage 3: TerraMind encoder-decoder, LoRA on decoder cross-attention, grounds opt_v2 in the SAR → opt_v3."""

    variant: str = "terramind_v1_tiny"
    pretrained: bool = False
    ckpt_path: str | None = None
    img_size: int = Field(default=128, gt=0, multiple_of=16)
    lora: LoraParams = LoraParams(target_modules=r".*decoder\.\d+\.cross_attn\.(q|kv|proj)")
    recon_weight: float = Field(default=1.0, ge=0)
    sar_edge_weight: float = Field(default=0.5, ge=0)
    cycle_weight: float = Field(default=0.5, ge=0)
    #: As ``stage2.nll_weight``: the σ head of opt_v3 (``0`` = none).
    nll_weight: float = Field(default=0.0, ge=0)
    train: TrainParams = TrainParams()
    cache: CacheParams = CacheParams()
    out: str = "artifacts/stage3"

    @model_validator(mode="after")
    def _model_can_take_it(self) -> Stage3Params:
        _fits_the_tile(self.img_size)
        return self


class TargetParams(Section):
    """Targets a model must meet to be promoted to ``champion`` (the seed's defaults)."""

    psnr: float = 30.0
    ssim: float = 0.85
    sam_deg: float = 5.0
    sar_edge: float = 0.15


class PromoteParams(Section):
    """Gated promotion of registered models."""

    objective: Literal["psnr", "ssim", "sam_deg", "sar_edge"] = "psnr"
    targets: TargetParams = TargetParams()


class EvaluateParams(Section):
    """Evaluation over a split, with the ablation rows."""

    split: Literal["train", "validation", "test"] = "test"
    n_visualize: int = Field(default=4, ge=0)
    batch_size: int = Field(default=16, gt=0)
    #: The ridge baseline (:mod:`gac.evaluation.baseline`) is fitted in closed form on at most this many train tiles.
    baseline_max_tiles: int | None = Field(default=2000, gt=0)
    baseline_ridge: float = Field(default=1e-3, ge=0)
    #: LPIPS is added to the metrics only when local weights are given (nothing is downloaded; see
    #: gac.evaluation.metrics).
    lpips_weights_path: str | None = None
    lpips_backbone_path: str | None = None
    out: str = "artifacts/evaluate"


class SearchSpace(Section):
    """Optuna search space (ranges are inclusive)."""

    lora_rank: list[int] = [4, 8, 16]
    lr: tuple[float, float] = (1e-4, 1e-2)
    l1_weight: tuple[float, float] = (0.5, 2.0)
    ms_ssim_weight: tuple[float, float] = (0.0, 1.0)
    sar_edge_weight: tuple[float, float] = (0.0, 1.0)
    cycle_weight: tuple[float, float] = (0.0, 1.0)


class SweepParams(Section):
    """Multi-objective Optuna sweep."""

    stage: Literal[tuple(str(s) for s in TRAINED)] = str(StageName.STAGE2)  # type: ignore[valid-type]
    study: str = "gac-sweep"
    storage: str = "sqlite:///mlruns/optuna.db"
    n_trials: int = Field(default=3, gt=0)
    seed: int = 0
    space: SearchSpace = SearchSpace()
    out: str = "artifacts/sweep"


class Params(BaseModel):
    """All of ``params.yaml``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data: DataParams = DataParams()
    mlflow: MlflowParams = MlflowParams()
    catalog: CatalogParams = CatalogParams()
    stage1: Stage1Params = Stage1Params()
    stage2: Stage2Params = Stage2Params()
    stage3: Stage3Params = Stage3Params()
    evaluate: EvaluateParams = EvaluateParams()
    promote: PromoteParams = PromoteParams()
    sweep: SweepParams = SweepParams()


def _one_line(error: ValidationError, source: str) -> str:
    """Turn pydantic's first error into ``<file>: <dotted.key>: <what was expected> (got <value>)``."""
    err = error.errors()[0]
    key = ".".join(str(p) for p in err["loc"]) or "<top level>"
    if err["type"] == "value_error":  # a rule across fields of a section: its message names them
        where = f"{source}: {key}: " if err["loc"] else f"{source}: "
        return where + str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        return f"{source}: unknown key '{key}' (expected one of the documented keys; see README)"
    return f"{source}: {key}: {err['msg']} (got {err.get('input')!r})"


def parse(raw: dict[str, Any], source: str = PARAMS_FILE) -> Params:
    """Validate a mapping (the loaded YAML) into :class:`Params`, raising one clear :class:`GacError` line."""
    if not isinstance(raw, dict):
        raise GacError(f"{source}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        raise GacError(_one_line(e, source)) from None


def load(path: str | Path = PARAMS_FILE) -> Params:
    """Read and validate ``params.yaml``.

    A missing, empty, comment-only or binary file is an error, never "all defaults": a file lost or truncated by a
    bad merge must not silently run a different experiment.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise GacError(f"{path}: parameters file not found (expected a YAML file with the GAC sections)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise GacError(f"{path}: not a text file (byte {e.start} is not UTF-8; expected a YAML file)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise GacError(f"{path}:{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if raw is None:  # empty or comments only: running on silent defaults would hide a lost or truncated file
        raise GacError(f"{path}: no parameters (empty or comments only; expected the GAC sections, see README)")
    return parse(raw, str(path))


def override(section: Section, source: str = "command line", **changes: Any) -> Section:
    """Return ``section`` with the non-``None`` ``changes`` applied and re-validated (CLI flags override params)."""
    changes = {k: v for k, v in changes.items() if v is not None}
    if not changes:
        return section
    try:
        return type(section).model_validate({**section.model_dump(), **changes})
    except ValidationError as e:
        raise GacError(_one_line(e, source)) from None
