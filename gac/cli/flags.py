"""Flags that set params: one table from each flag to the ``params.yaml`` field it sets, and flags made from fields.

The seed's flags are the users' interface and keep their names (``--lr``, ``--val-every``…); every other flag that
sets a param is named after its field (``train.max_steps`` → ``--max-steps``), so there is no third spelling to
learn. A flag's default is ``None``: a flag the user did not pass changes nothing, and ``params.yaml`` decides.
:func:`apply` is the only place flags reach :class:`gac.config.Params` (through :func:`gac.config.override`).
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from gac import config
from gac.config import Params
from gac.pipeline import StageName as S


@dataclass(frozen=True)
class Flag:
    """A flag and the field of :class:`~gac.config.Params` it sets (dotted: ``stage2.train.lr``)."""

    name: str
    field: str
    help: str = ""
    #: Maps the parsed value to the field's value (``None``: as parsed).
    to_field: Callable[[Any], Any] | None = None


def _lora_cross_attention_only(on: bool) -> Any:
    """``--lora-cross-attention-only``: the design's decoder cross-attention targets; ``--no-…``: leave
    ``stage3.lora.target_modules`` as ``params.yaml`` has it (both return ``None`` = no change, or the targets)."""
    return config.Stage3Params().lora.target_modules if on else None


def seed_training_flags(stage: str) -> list[Flag]:
    """The seed's training flags of ``gac stage2``/``gac stage3`` (names kept from the seed, fields named here)."""
    return [
        Flag("--output-dir", f"{stage}.out", "checkpoints, model and logs"),
        Flag("--data-dir", "catalog.out", "tile catalog folder"),
        Flag("--max-tiles", f"{stage}.train.max_tiles", "at most N train and N validation tiles"),
        Flag("--batch-size", f"{stage}.train.batch_size"),
        Flag("--grad-accum-steps", f"{stage}.train.grad_accum_steps"),
        Flag("--lr", f"{stage}.train.lr"),
        Flag("--lora-rank", f"{stage}.lora.rank"),
        Flag("--epochs", f"{stage}.train.epochs"),
        Flag("--val-every", f"{stage}.train.val_every_n_steps", "validate every N training batches"),
        Flag("--save-every", f"{stage}.train.save_every_n_steps", "write last.ckpt every N optimizer steps"),
        Flag("--early-stopping", f"{stage}.train.early_stopping"),
        Flag("--early-stopping-patience", f"{stage}.train.patience"),
    ]


#: Fields of a trained stage's ``train`` section that get a flag of their own name.
TRAIN_FIELD_FLAGS = ("max_steps", "devices", "strategy", "accelerator")

#: The seed's flags of each command, and the fields other flags are generated from (command → flags).
FLAGS: dict[str, list[Flag]] = {
    S.CATALOG: [
        Flag("--data-dir", "data.root", "BigEarthNet v2 root"),
        Flag("--output-dir", f"{S.CATALOG}.out", "catalog folder"),
        *(Flag(f"--{f.replace('_', '-')}", f"{S.CATALOG}.{f}") for f in ("max_tiles", "splits", "workers")),
    ],
    S.STAGE1: [
        Flag("--data-dir", "catalog.out", "the tile catalog folder"),
        Flag("--output-dir", f"{S.STAGE1}.out", "opt_v1 cache folder"),
        Flag("--batch-size", f"{S.STAGE1}.batch_size", "tiles per forward pass"),
        Flag("--timesteps", f"{S.STAGE1}.timesteps", "diffusion decoding steps"),
        Flag("--max-tiles", f"{S.STAGE1}.max_tiles", "first N catalog tiles only"),
        *(Flag(f"--{f.replace('_', '-')}", f"{S.STAGE1}.{f}") for f in ("device", "precision", "mosaic")),
    ],
    S.STAGE2: [
        *seed_training_flags(S.STAGE2),
        *(Flag(f"--{f.replace('_', '-')}", f"{S.STAGE2}.train.{f}") for f in TRAIN_FIELD_FLAGS),
        Flag("--stage1-dir", f"{S.STAGE1}.out", "opt_v1 cache"),
        Flag("--load-in-8bit", f"{S.STAGE2}.load_in_8bit", "int8 frozen base (bitsandbytes)"),
    ],
    S.STAGE3: [
        *seed_training_flags(S.STAGE3),
        *(Flag(f"--{f.replace('_', '-')}", f"{S.STAGE3}.train.{f}") for f in TRAIN_FIELD_FLAGS),
        Flag(
            "--lora-cross-attention-only",
            f"{S.STAGE3}.lora.target_modules",
            "LoRA on the decoder's cross-attention only (the design's targets); without the flag "
            f"{S.STAGE3}.lora.target_modules from the params file decides",
            _lora_cross_attention_only,
        ),
    ],
    "sweep": [*(Flag(f"--{f.replace('_', '-')}", f"sweep.{f}") for f in ("n_trials", "storage", "study", "stage"))],
}


def field_info(path: str):
    """The pydantic ``FieldInfo`` of a dotted field of :class:`Params` (``KeyError`` if there is none)."""
    model: Any = Params
    *sections, name = path.split(".")
    for part in sections:
        model = model.model_fields[part].annotation
    return model.model_fields[name]


def _value_type(annotation: Any) -> Callable[[str], Any]:
    """The argparse ``type`` for a field: numbers parsed as the field takes them; ``int | str`` takes digits as int."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        if int in args and float in args:
            return lambda text: int(text) if text.lstrip("-").isdigit() else float(text)
        if int in args and str in args:
            return lambda text: int(text) if text.isdigit() else text
    kind = args[0]
    return kind if kind in (int, float) else str


def add_flags(parser: argparse.ArgumentParser, command: str) -> None:
    """Add ``command``'s flags of :data:`FLAGS`, typed from their fields, each defaulting to ``None``."""
    for flag in FLAGS[command]:
        info = field_info(flag.field)
        default_help = f"(default: {flag.field} from the params file)"
        help_ = f"{flag.help} {default_help}".strip()
        literal = typing.get_args(info.annotation) if typing.get_origin(info.annotation) is typing.Literal else None
        if info.annotation is bool or flag.to_field is not None:
            parser.add_argument(flag.name, dest=_dest(flag), action=argparse.BooleanOptionalAction, default=None,
                                help=help_)  # fmt: skip
        elif literal:
            parser.add_argument(flag.name, dest=_dest(flag), choices=literal, default=None, help=help_)
        elif typing.get_origin(info.annotation) is list:
            (item,) = typing.get_args(info.annotation)
            choices = typing.get_args(item) if typing.get_origin(item) is typing.Literal else None
            parser.add_argument(flag.name, dest=_dest(flag), nargs="+", choices=choices, default=None, help=help_)
        else:
            parser.add_argument(flag.name, dest=_dest(flag), type=_value_type(info.annotation), default=None,
                                metavar=flag.field.rsplit(".", 1)[-1].upper(), help=help_)  # fmt: skip


def _dest(flag: Flag) -> str:
    return "set:" + flag.name.removeprefix("--")


def passed(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """``{field: value}`` of the flags of ``command`` the user passed (mapped through ``to_field``)."""
    out = {}
    for flag in FLAGS[command]:
        value = getattr(args, _dest(flag), None)
        if value is not None and flag.to_field is not None:
            value = flag.to_field(value)
        if value is not None:
            out[flag.field] = value
    return out


def apply(cfg: Params, changes: Mapping[str, Any]) -> Params:
    """``cfg`` with ``{dotted field: value}`` set, each section re-validated (one clear line on a bad value)."""
    for path, value in changes.items():
        *sections, name = path.split(".")
        cfg = _set(cfg, sections, name, value)
    return cfg


def _set(model: Any, sections: list[str], name: str, value: Any) -> Any:
    if not sections:
        return config.override(model, **{name: value})
    head, *rest = sections
    inner = _set(getattr(model, head), rest, name, value)
    if isinstance(model, Params):
        return model.model_copy(update={head: inner})
    return config.override(model, **{head: inner.model_dump()})
