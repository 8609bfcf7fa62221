"""The MLflow model registry: log a trained stage, register it as ``gac-stage2``/``gac-stage3`` ``@challenger``.

Promotion to ``champion`` is gated (see :mod:`gac.mlops.promote`); registration only ever moves ``challenger``.

A registered version stands alone: it is logged as code (:mod:`gac.mlops.registry_model`, MLflow's models-from-code)
with
the GAC modules that code reaches (:func:`model_code`, shipped as ``code/gac`` through ``code_paths``) and the exact
versions of the packages they import (:func:`pip_requirements`), so ``mlflow.pyfunc.load_model`` (or ``mlflow models
serve`` with a virtualenv) works where GAC is not installed, and behaves the same whatever GAC is installed there. Why
not a bare ``gac`` requirement: the package of that name on PyPI is an unrelated project. Tag ``content_sha256``
(:func:`content_digest`) covers all of it: shipped code, requirements and the model folder.

**A registration that a kill cut short is finished, never repeated.** The version is created with its
``content_sha256`` tag in the same database write (``mlflow.register_model(tags=…)``), and the tag ``stage`` is
written last, so a version without ``stage`` is one whose registration was cut short: the next registration of the
same model finds it by its digest and finishes it (alias, description, card, tags) instead of creating a copy. A version
an earlier GAC left with no tags at all is recognised by the digest of its stored files (:func:`stored_digest`).
Registry updates hold :func:`registry_lock`, so two processes never interleave their steps on one registered model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from gac.errors import GacError
from gac.io import tracking
from gac.io.lock import exclusive
from gac.mlops.model_card import describe_version, model_card, registered_model_description
from gac.pipeline import TRAINED, previous, registry_names
from gac.training.export import load_model, pyfunc_output
from gac.training.stages import TRAINED_STAGES

MODEL_NAMES = registry_names()
CHALLENGER = "challenger"
CHAMPION = "champion"
#: Model-version tag: sha256 of what a registry model is made of (its code, requirements and the files of its folder).
CONTENT_TAG = "content_sha256"
#: Model-version tag written last by a registration: a version without it was cut short (see the module docstring).
DONE_TAG = "stage"
#: Seconds a registry update waits for another process's to end (registering uploads a model: up to minutes).
LOCK_WAIT_S = 300.0
#: Registered model → (the registered model whose output it was trained on, version tags naming that model and
#: version). A Stage 3 version is trained on the opt_v2 one Stage 2 version wrote: the two only work as a pair.
TRAINED_ON = {
    MODEL_NAMES[s]: (MODEL_NAMES[previous(s)], f"gac.{previous(s)}_model", f"gac.{previous(s)}_version")
    for s in TRAINED
    if previous(s) in TRAINED
}
#: Where the package's modules are: the root of the code a registry model ships.
PACKAGE_DIR = Path(__file__).resolve().parents[1]
#: MLflow's models-from-code script of every registered version (named by path, never imported here: importing it
#: calls ``mlflow.models.set_model``, which only the process that loads a model should do).
MODEL_MODULE = "gac.mlops.registry_model"
MODEL_SCRIPT = PACKAGE_DIR.parent.joinpath(*MODEL_MODULE.split(".")).with_suffix(".py")


def trained_on(name: str, tags: Mapping[str, str]) -> tuple[str | None, str]:
    """``(version, why)``: the version of ``TRAINED_ON[name]``'s model that a version of ``name`` with ``tags`` was
    trained on the output of, or ``(None, why it is not known)``."""
    upstream, model_tag, version_tag = TRAINED_ON[name]
    model, version = tags.get(model_tag), tags.get(version_tag)
    if model == upstream and version:
        return str(version), f"trained on {upstream} version {version}"
    if model:
        return None, f"trained on {model} ({model_tag}), not on a registered {upstream} version"
    return None, f"names no {upstream} version it was trained on (no {version_tag} tag)"


def model_code() -> dict[str, Path]:
    """``{path relative to the package's parent: file}`` of every GAC module a registry model can run.

    The closure, through ``import``/``from … import`` statements anywhere in a file (lazy imports included) and the
    packages on the way, of :mod:`gac.mlops.registry_model` and the builder modules the trained-stage table names
    (loading a
    model calls them by name). Why not the whole package: a change to, say, evaluation code must not make an
    unchanged model a new version (the digest covers exactly this code).
    """
    import ast

    root = PACKAGE_DIR.parent

    def module_file(name: str) -> Path | None:
        path = root.joinpath(*name.split("."))
        return next((p for p in (path.with_suffix(".py"), path / "__init__.py") if p.is_file()), None)

    builders = (module_file(s.builder_module) for s in TRAINED_STAGES.values())
    todo = [MODEL_SCRIPT, *builders]
    seen: dict[str, Path] = {}
    while todo:
        path = todo.pop()
        key = path.relative_to(root).as_posix()
        if key in seen:
            continue
        seen[key] = path
        module = path.relative_to(root).with_suffix("").parts
        names = {".".join(module[:i]) for i in range(1, len(module))}  # the packages on the way
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        for name in names:
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # importing gac.a.b runs gac/__init__.py and gac/a/__init__.py
                found = module_file(".".join(parts[:i])) if parts[0] == "gac" else None
                if found is not None:
                    todo.append(found)
    return dict(sorted(seen.items()))


def third_party_imports(files: Mapping[str, Path]) -> set[str]:
    """Top-level names of the modules ``files`` import that are neither GAC's nor Python's own."""
    import ast
    import sys

    names = set()
    for path in files.values():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n != "gac" and n != "__future__" and n not in sys.stdlib_module_names}


def pip_requirements(files: Mapping[str, Path] | None = None) -> list[str]:
    """``dist==version`` of every package the model code imports (:func:`model_code`), as installed here.

    Derived from the shipped code, so it cannot miss a package that code gains; no ``gac`` line (the code travels
    with the model, and PyPI's ``gac`` is an unrelated project). Given to MLflow, which would otherwise spend seconds
    inferring a list that ends in that bare ``gac``.
    """
    from importlib.metadata import PackageNotFoundError, packages_distributions, version

    dists = packages_distributions()
    out = set()
    for module in third_party_imports(model_code() if files is None else files):
        found = dists.get(module, [])
        dist = module if module in found else (sorted(found)[0] if found else module)
        try:
            out.add(f"{dist}=={version(dist)}")
        except PackageNotFoundError:  # imported only on a path this machine cannot take (none today): unpinned
            out.add(dist)
    return sorted(out, key=str.lower)


def content_digest(model_dir: str | Path, files: Mapping[str, Path] | None = None,
                   requirements: list[str] | None = None) -> str:  # fmt: skip
    """sha256 of everything that defines a registry model's behaviour, in a fixed order: the shipped code
    (:func:`model_code`, names and bytes), the pinned requirements and every file of ``model_dir`` (names and bytes).

    Why: a stage rerun that leaves the model as it was must not pile up identical versions in the registry, and a
    change to the model's code or packages must not pass for the same model.
    """
    import hashlib

    files = model_code() if files is None else files
    requirements = pip_requirements(files) if requirements is None else requirements
    h = hashlib.sha256()
    for name, path in sorted(files.items()):
        h.update(b"code\0" + name.encode() + b"\0" + path.read_bytes())
    h.update(b"requirements\0" + "\n".join(requirements).encode())
    for path in sorted(p for p in Path(model_dir).rglob("*") if p.is_file()):
        h.update(b"model\0" + path.relative_to(model_dir).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def stored_digest(client, name: str, version: str) -> str | None:
    """:func:`content_digest` of a registered version, from its stored files (``code/``, ``requirements.txt``, the
    ``model`` artifact) rather than its tag: how a version registered without tags is recognised. ``None`` for a
    version that is not laid out as GAC logs one."""
    import tempfile

    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        uri = client.get_model_version_download_uri(name, version)
        folder = Path(mlflow.artifacts.download_artifacts(uri, dst_path=tmp))
        code, requirements, model = folder / "code", folder / "requirements.txt", folder / "artifacts" / "model"
        if not (code.is_dir() and requirements.is_file() and model.is_dir()):
            return None
        files = {p.relative_to(code).as_posix(): p for p in code.rglob("*.py")}
        return content_digest(model, files, [line for line in requirements.read_text().splitlines() if line.strip()])


def same_content(client, name: str, digest: str) -> tuple[Any, str] | None:
    """``(version, how it was found)`` of ``name`` holding exactly the model of ``digest``, or ``None``.

    First by tag; then, for versions with no ``content_sha256`` tag (a registration an earlier GAC had cut short
    between creating the version and tagging it), by the digest of their stored files, which is then written on each
    such version (matching or not), so its files are read once.
    """
    tagged = client.search_model_versions(f"name = '{name}' and tags.{CONTENT_TAG} = '{digest}'")
    if tagged:
        return max(tagged, key=lambda v: int(v.version)), f"its {CONTENT_TAG} tag"
    for untagged in sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: -int(v.version)):
        stored = None if CONTENT_TAG in untagged.tags else stored_digest(client, name, str(untagged.version))
        if stored is not None:
            client.set_model_version_tag(name, str(untagged.version), CONTENT_TAG, stored)
        if stored == digest:
            return untagged, f"the {CONTENT_TAG} of its stored files; it had no tags"
    return None


def lock_target(name: str, registry_uri: str | None = None) -> Path | None:
    """What :func:`registry_lock` ``flock``-s for registered model ``name`` on a registry of this machine
    (:func:`gac.io.lock.exclusive` puts a hidden ``.<target>.lock`` beside it): beside the database for a SQLite
    registry (``mlruns/.mlflow.db.gac-stage2.lock``), in the store folder for a file registry. ``None`` for a registry
    other machines share (a server, PostgreSQL): that one is locked on the registry itself (:func:`shared_lock`)."""
    from urllib.parse import urlparse

    import mlflow

    uri = registry_uri or mlflow.get_registry_uri()
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        return db.parent / f"{db.name}.{name}"
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return Path(parsed.path or uri) / name
    return None


#: Suffix of the registered model that is the cross-host lock of a registered model (``gac-stage2.lock``).
LOCK_SUFFIX = ".lock"
#: Seconds after which a lock another machine took is taken for its holder's crash (a registration uploads a model,
#: a promotion moves aliases: both take seconds to minutes). A lock of this machine is judged by its process instead.
LOCK_LEASE_S = 3600.0
#: Shared locks this process holds (re-entrant, as :func:`gac.io.lock.exclusive` is).
_held_shared: set[str] = set()


@contextlib.contextmanager
def shared_lock(name: str, what: str) -> Iterator[None]:
    """Hold registered model ``name``'s lock on a registry many machines share, for the ``with`` block; raise
    :class:`~gac.errors.GacError` naming the holder if another process has it.

    A compare-and-set on the registry itself: the lock is a registered model ``<name>.lock``, which only one client
    can create (the registry's unique name; MLflow answers ``RESOURCE_ALREADY_EXISTS`` to the others), tagged with its
    holder (host, pid, process start: :data:`gac.io.tracking.OWNER_TAGS`) and deleted on release. No ``flock`` or
    shared disk is needed, so it excludes processes on every host that uses the server. A lock whose holder died is
    broken: at once on the holder's own host (the process is gone), after :data:`LOCK_LEASE_S` elsewhere.
    """
    import os
    import time

    import mlflow
    from mlflow.exceptions import MlflowException

    lock = f"{name}{LOCK_SUFFIX}"
    if lock in _held_shared:
        yield
        return
    client = mlflow.MlflowClient()
    owner = dict(zip(tracking.OWNER_TAGS, tracking.process_owner(os.getpid()), strict=True))
    for attempt in range(2):
        try:
            about = f"Lock of {name} held by {what}; deleted when it ends."
            client.create_registered_model(lock, tags={**owner, "gac.lock_for": what}, description=about)
            break
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        try:
            held = client.get_registered_model(lock)
        except MlflowException:  # released meanwhile
            continue
        host, pid, start = (held.tags.get(k, "") for k in tracking.OWNER_TAGS)
        age = time.time() - held.creation_timestamp / 1000
        dead = host == owner["gac.host"] and not tracking.process_alive(pid, start)
        if attempt == 0 and (dead or age > LOCK_LEASE_S):
            print(f"{name}: breaking the registry lock of pid {pid} on {host} ({held.tags.get('gac.lock_for')}), "
                  f"{'which is gone' if host == owner['gac.host'] else f'held {age:.0f} s'}")  # fmt: skip
            with contextlib.suppress(MlflowException):
                client.delete_registered_model(lock)
            continue
        raise GacError(f"{name}: in use by pid {pid} on {host} ({held.tags.get('gac.lock_for')}) for {age:.0f} s "
                       f"(registered model {lock}); wait for it to finish")  # fmt: skip
    else:
        raise GacError(f"{name}: could not take the registry lock {lock}")
    _held_shared.add(lock)
    try:
        yield
    finally:
        _held_shared.discard(lock)
        client.delete_registered_model(lock)


def _lock(name: str, what: str):
    target = lock_target(name)
    return exclusive(target, what) if target is not None else shared_lock(name, what)


@contextlib.contextmanager
def registry_lock(names: Iterable[str], what: str, wait: float = LOCK_WAIT_S) -> Iterator[None]:
    """Hold the exclusive lock of every registered model in ``names`` for the ``with`` block (a name may also stand
    for another section that processes of every host must take in turn, e.g. ``sweep-<study>``: making its parent run).

    Why: a registration (find the version of this content, else create it, then alias and tag it) and a promotion
    (record the intent, move the aliases, record the decision) are each several registry writes that must not
    interleave with another process's on the same model. Waits up to ``wait`` seconds for a holder (these updates
    take seconds, and failing a training run at its end for that would be worse), then raises the
    :class:`~gac.errors.GacError` that names the holder. Locks are taken in sorted order and all released on any miss,
    so two holders never wait on each other.

    The lock is an ``flock`` for a registry of this machine (SQLite, a folder) and a lock on the registry itself for
    one that several machines share (:func:`shared_lock`).
    """
    import time

    deadline = time.monotonic() + wait
    while True:
        stack = contextlib.ExitStack()
        try:
            for name in sorted(set(names)):
                stack.enter_context(_lock(name, what))
        except GacError:
            stack.close()
            if time.monotonic() >= deadline:
                raise
            time.sleep(1.0)
            continue
        with stack:
            yield
        return


def example_input(n: int = 1) -> dict[str, np.ndarray]:
    """A valid input (for the signature): SAR at -12 dB and a grey 0.1 reflectance optical tile."""
    return {"s1": np.full((n, 2, 120, 120), -12.0, np.float32), "opt": np.full((n, 12, 120, 120), 0.1, np.float32)}


def log_and_register(
    model_dir: str,
    section: Any,
    metrics: dict[str, float],
    trainable: dict | None = None,
    register: bool = True,
    tags: dict | None = None,
) -> str | None:
    """Log a stage's model folder as an MLflow model in the active run and register it ``@challenger``.

    The logged model carries its code (:func:`model_code`, as ``code/gac``) and exact requirements; a version with the
    same :func:`content_digest` (:func:`same_content`) is reused instead of registered again, which also finishes a
    registration a kill cut short. The registered model's description, the version's model card and tags (``tags``,
    e.g. the lineage ``gac.stage2_version``) are (re)written either way, under :func:`registry_lock`.
    """
    import shutil
    import tempfile

    import mlflow
    from mlflow.models import infer_signature

    stage, _, model = load_model(model_dir)
    x = example_input(2)
    import torch

    y = pyfunc_output(stage, model, torch.from_numpy(x["s1"]), torch.from_numpy(x["opt"]))
    name = MODEL_NAMES[stage]
    files = model_code()
    requirements = pip_requirements(files)
    digest = content_digest(model_dir, files, requirements)
    client = mlflow.MlflowClient()
    with registry_lock([name] if register else [], f"registering {name}"):
        found = same_content(client, name, digest) if register else None
        if found is not None:  # this very model is registered already (dvc repro after a code change that left it)
            version, run_id = str(found[0].version), found[0].run_id
            if DONE_TAG not in found[0].tags:  # created, then killed before it was finished
                print(
                    f"{name}: version {version} holds this model ({found[1]}) but its registration was cut short: "
                    f"finishing it instead of registering a copy"
                )
        else:
            with tempfile.TemporaryDirectory() as tmp:  # code_paths copies a folder as is: give it only the model code
                for rel, path in files.items():
                    (Path(tmp) / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(path, Path(tmp) / rel)
                info = mlflow.pyfunc.log_model(
                    name="model",
                    python_model=MODEL_SCRIPT,
                    artifacts={"model": model_dir},
                    code_paths=[str(Path(tmp) / PACKAGE_DIR.name)],
                    signature=infer_signature(x, y),
                    input_example=example_input(1),
                    pip_requirements=requirements,
                )
            if not register:
                return None
            # the digest is written with the version, in one database write: a kill after it leaves a version the
            # next registration finds (above), never an anonymous copy
            created = mlflow.register_model(info.model_uri, name, tags={CONTENT_TAG: digest})
            version, run_id = str(created.version), mlflow.active_run().info.run_id
        tags = {CONTENT_TAG: digest, **(tags or {})}
        _finish(client, name, version, run_id, stage, section, metrics, trainable, tags)
    return version


def _finish(client, name: str, version: str, run_id: str, stage: str, section: Any, metrics: dict[str, float],
            trainable: dict | None, tags: dict) -> None:  # fmt: skip
    """Everything a registration writes after creating the version: ``@challenger``, the registered model's
    description, the version's model card and tags, :data:`DONE_TAG` last (its absence marks a version to finish)."""

    client.set_registered_model_alias(name, CHALLENGER, version)
    client.update_registered_model(name, description=registered_model_description(name, stage))
    origin = tracking.weights_origin(getattr(section, "pretrained", False), getattr(section, "ckpt_path", None))
    card = model_card(
        {
            "name": name,
            "version": version,
            "stage": stage,
            "run_id": run_id,
            "weights_origin": origin,
            "data": tags.get("gac.data", "unknown"),
            "params": section.model_dump(),
            "metrics": metrics,
            "trainable": trainable or {},
            "git_commit": tracking.git_commit(),
        }
    )
    describe_version(client, name, version, card)
    for key, value in {"weights_origin": origin, **tags, DONE_TAG: stage}.items():
        client.set_model_version_tag(name, version, key, str(value))
