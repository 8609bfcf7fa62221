"""Loading local weights safely and strictly: GAC's own state dicts and the files the models' authors publish.

TerraTorch's ``ckpt_path`` loads with ``strict=False`` and only *warns* about missing keys, so a checkpoint of the
wrong variant would silently leave most of a model at random init. GAC reads local files itself, with
``weights_only=True`` (no pickled code runs), maps published layouts with TerraTorch's own checkpoint filters, and then
demands that every weight of the model came from the file (a mismatch is one clear error line).

Published layouts (what the Hugging Face repositories TerraTorch downloads from hold, see ``pretrained_weights`` in
``terramind_register.py``, ``tokenizer_register.py`` and ``prithvi_vit.py``):

* ``TerraMind_v1_<size>.pt`` — a ``TerraMind`` encoder-decoder state dict, unprefixed keys, with the embeddings of
  *all* pretraining modalities at 224 px. Extra modalities are ignored; sin-cos position tables of another size are
  rebuilt for ``img_size`` (TerraTorch's ``checkpoint_filter_fn`` skips them too).
* ``TerraMind_Tokenizer_S2L2A.pt`` — the S2L2A tokenizer (DiVAE) state dict, loaded strictly, as TerraTorch does.
* ``Prithvi_EO_V2_<size>.pt`` — a Prithvi MAE state dict (``encoder.*``/``decoder.*``) with a 6-band (HLS) patch
  embedding; TerraTorch's ``checkpoint_filter_fn_vit`` drops the decoder and maps the six bands into the model's band
  list (new bands keep their fresh init).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from gac.errors import GacError

#: Weights that are a function of the input size (sin-cos position tables): rebuilt for ``img_size``, never loaded.
REBUILT = ("pos_emb", "pos_embed")


def read_state_dict(path: str | Path, key: str) -> dict[str, torch.Tensor]:
    """The tensors of the file at ``path`` (``weights_only``); ``key`` names the parameter for the error line."""
    path = Path(path)
    if not path.is_file():
        raise GacError(f"{key}: {path} not found (expected a local state-dict file saved with torch.save)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file or a pickle that weights_only refuses
        raise GacError(f"{key}: {path} is not a loadable state dict ({type(e).__name__}: {e})") from None
    for wrapper in ("state_dict", "model"):  # Lightning / training-script checkpoints wrap the weights
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise GacError(f"{key}: {path} holds no state dict of tensors")
    return state


def load_state_dict(model: torch.nn.Module, path: str | Path, key: str = "ckpt_path") -> None:
    """Load the state dict at ``path`` into ``model`` strictly; ``key`` names the parameter for the error line."""
    _load_strict(model, read_state_dict(path, key), key, path)


def _load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], key: str, path: str | Path) -> None:
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # same keys, other shapes (another variant, another band layout)
        first = str(e).strip().splitlines()[-1].strip()
        raise GacError(f"{key}: {path} does not match the model ({first})") from None
    if result.missing_keys or result.unexpected_keys:
        raise GacError(
            f"{key}: {path} does not match the model ({len(result.missing_keys)} missing keys, e.g. "
            f"{result.missing_keys[:2]}; {len(result.unexpected_keys)} unexpected, e.g. {result.unexpected_keys[:2]})"
        )


def load_published(
    model: torch.nn.Module,
    path: str | Path,
    key: str,
    filter_fn: Callable[[dict, torch.nn.Module], dict],
    source_key: Callable[[str], str] = lambda k: k,
    skip: tuple[str, ...] = (),
    remapped: tuple[str, ...] = (),
) -> None:
    """Load a published checkpoint through TerraTorch's ``filter_fn``, demanding that it covers the whole model.

    Every model weight except those under ``skip`` (loaded from another file) and the :data:`REBUILT` position tables
    must be in the file under ``source_key(name)`` with the model's shape; extra entries (other modalities, an MAE
    decoder) are ignored. ``filter_fn`` is TerraTorch's own mapping from the file to the model's keys; weights named in
    ``remapped`` may differ in shape because ``filter_fn`` maps them (Prithvi's 6 → 12-band patch embedding).
    """
    state = read_state_dict(path, key)
    own = model.state_dict()
    needed = [k for k in own if not k.startswith(skip) and not k.endswith(REBUILT) and ".pos_emb" not in k]
    missing = [k for k in needed if source_key(k) not in state]
    if missing:
        raise GacError(
            f"{key}: {path} does not match the model ({len(missing)} of its {len(needed)} weights are not in the "
            f"file, e.g. {missing[:2]}; expected the published layout, see README 'Real world')"
        )
    other = [k for k in needed if state[source_key(k)].shape != own[k].shape and not k.endswith(remapped)]
    if other:
        k = other[0]
        raise GacError(
            f"{key}: {path} does not match the model ({len(other)} weights of another shape, e.g. {k} "
            f"{tuple(state[source_key(k)].shape)} vs {tuple(own[k].shape)}: another variant?)"
        )
    _load_strict(model, filter_fn(state, model), key, path)
