"""Shared fixtures: the real reBEN sample and a small synthetic set, each built once per test session."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import torch


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--reverse", action="store_true", help="run the tests in reverse order (modules and the tests within them)"
    )


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, one intra-op thread per worker, in process and in the processes it starts.

    Workers are as many as the cores (``-n auto``, at most ``--maxprocesses``): with torch's default of one thread per
    core each, two workers on two cores would fight over them and run slower than one.
    """
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        os.environ["MKL_NUM_THREADS"] = "1"
        import torch

        torch.set_num_threads(1)
    if os.environ.get("PYTEST_XDIST_WORKER") or config.getoption("numprocesses", None) in (None, 0):
        # the process that runs the tests: TerraTorch (and with it torch, Lightning, timm…) imported once, up front,
        # with the collector quiet and what it built frozen (gac.startup), not re-scanned by each later collection
        from gac.models.backend import import_terratorch

        import_terratorch()


#: Modules that take minutes, longest first: under pytest-xdist (``--dist loadscope``: a module stays on one worker, in
#: collection order) they start at once instead of one of them ending the run alone on one core while the others idle.
LONGEST_FIRST = ("test_experiments.py", "test_team.py", "test_benchmarks.py", "test_training.py", "test_sweep.py",
                 "test_refine.py", "test_stage1.py", "test_mosaic.py", "test_learning.py", "test_bad_input.py",
                 "test_dvc_remote.py")  # fmt: skip


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Long modules first (a stable sort: the order of tests within a module is kept)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
    if config.getoption("--reverse"):  # no test may depend on another having run first
        items.reverse()


@contextlib.contextmanager
def _mlflow_state_restored() -> Iterator[None]:
    """MLflow's tracking and registry URIs, the active run stack and the ``MLFLOW_*_URI`` variables, as they were.

    ``mlflow.set_tracking_uri`` sets a module global *and* ``os.environ["MLFLOW_TRACKING_URI"]`` (for subprocesses):
    without this, the store one test (or gac inside it) chose would leak into every later test and its children.
    """
    names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    env = {name: os.environ.get(name) for name in names}
    tracking = sys.modules.get("mlflow.tracking._tracking_service.utils")
    registry = sys.modules.get("mlflow.tracking._model_registry.utils")
    uris = (getattr(tracking, "_tracking_uri", None), getattr(registry, "_registry_uri", None))
    yield
    if "mlflow" in sys.modules:
        import mlflow
        import mlflow.tracking._model_registry.utils as registry
        import mlflow.tracking._tracking_service.utils as tracking

        while mlflow.active_run():
            mlflow.end_run()
        tracking._tracking_uri, registry._registry_uri = uris
    for name, value in env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="module", autouse=True)
def _module_leaves_mlflow_as_it_found_it() -> Iterator[None]:
    with _mlflow_state_restored():
        yield


@pytest.fixture(autouse=True)
def _test_leaves_mlflow_as_it_found_it() -> Iterator[None]:
    with _mlflow_state_restored():
        yield


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real BigEarthNet v2 sample (21 T33UUP patches) at ``<tmp>/sample``.

    The pinned wheel is downloaded once into ``<tmp>/wheel-cache`` (tests reuse it beside the root), or taken from
    ``$GAC_WHEEL_CACHE`` when set, so repeated sessions need not download 55 MB again.
    """
    from gac.data.sample import materialise_sample

    base = tmp_path_factory.mktemp("reben")
    cache = Path(os.environ.get("GAC_WHEEL_CACHE") or base / "wheel-cache")
    materialise_sample(base / "sample", cache_dir=cache)
    if not (base / "wheel-cache").exists():
        (base / "wheel-cache").symlink_to(cache.resolve(), target_is_directory=True)
    return base / "sample"


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 intact synthetic tiles (seed 0), 8 per split."""
    from gac.data.synthetic import generate

    root = tmp_path_factory.mktemp("synthetic") / "seed0"
    generate(root, n_tiles=24, seed=0)
    return root


@pytest.fixture(scope="session")
def empty_mlflow_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated, empty MLflow SQLite store, made once per session; tests copy it (creating one costs seconds)."""
    from mlflow import MlflowClient

    path = tmp_path_factory.getbasetemp() / "mlflow-empty.db"
    tmp = path.with_suffix(".tmp")
    MlflowClient(tracking_uri=f"sqlite:///{tmp}", registry_uri=f"sqlite:///{tmp}").search_registered_models()
    tmp.rename(path)
    return path


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's in-process runs, like its subprocesses (``OMP_NUM_THREADS=1``).

    CPU kernels sum in an order that depends on the thread count (~0.05 % of the DN move by ±1), so caches written in
    process and by ``gac``/``torchrun`` subprocesses compare byte for byte only at the same count.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


#: Standard deviation of the weights :func:`moving_heads` gives a pixel head's output conv: the stage then moves a
#: reflectance by ~0.02 (a few hundred DN) on average, a residual of the size a trained stage adds.
HEAD_STD = 0.05


def moving_heads(model: torch.nn.Module, seed: int = 5, std: float = HEAD_STD) -> torch.nn.Module:
    """``model`` with seeded N(0, ``std``) weights in the output conv of every pixel head
    (:class:`gac.models.heads.TokenPixelDecoder`) and σ head (:class:`gac.models.heads.LogVarianceHead`, so its σ
    varies), in place; returns ``model``. σ heads are built last, so the pixel heads' draws do not depend on them.

    Why: those convs start at zero, so an untrained stage is the identity and returns its input; a test that compares
    an output with its input, or with another stage's, could not tell a model that ran from one that was skipped. The
    weights come from their own generator: the global RNG is left as it was.
    """
    import torch

    from gac.models.heads import LogVarianceHead, TokenPixelDecoder

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for head in (m for m in model.modules() if isinstance(m, TokenPixelDecoder | LogVarianceHead)):
            head.out.weight.normal_(0.0, std, generator=generator)
    return model


@pytest.fixture(scope="session")
def non_identity() -> Callable:
    """:func:`moving_heads`, for tests and fixtures that need a stage whose output is not its input."""
    return moving_heads
