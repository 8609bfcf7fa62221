"""``params.yaml`` parsing: defaults, and one clear line naming the key for every kind of bad input."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest

from gac import config
from gac.errors import GacError

REPO = Path(__file__).resolve().parents[1]


def _load(tmp_path: Path, text: str) -> config.Params:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return config.load(path)


def _error(tmp_path: Path, text: str) -> str:
    """The one-line message :func:`config.load` raises for ``text``."""
    with pytest.raises(GacError) as err:
        _load(tmp_path, text)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(str(tmp_path / "params.yaml"))
    return message


def test_repo_params_load():
    params = config.load(REPO / "params.yaml")
    assert params.catalog.splits == ["train", "validation", "test"]
    assert params.stage2.lora.target_modules  # nested sections are parsed, not left as dicts
    assert isinstance(params.stage3.train, config.TrainParams)


def test_empty_file_and_missing_sections_are_the_defaults(tmp_path):
    assert _load(tmp_path, "") == config.Params()
    params = _load(tmp_path, "catalog:\n  max_tiles: 5\n")
    assert params.catalog.max_tiles == 5
    assert params.catalog.shard_size == config.CatalogParams().shard_size
    assert params.stage1 == config.Stage1Params()
    # Section defaults differ where the stage needs it: stage 3's LoRA targets decoder cross-attention.
    assert "cross_attn" in str(params.stage3.lora.target_modules)
    assert "attn" in str(params.stage2.lora.target_modules)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("catalgo:\n  out: x\n", "catalgo"),
        ("catalog:\n  shard_sise: 8\n", "catalog.shard_sise"),
        ("stage2:\n  lora:\n    rnak: 4\n", "stage2.lora.rnak"),
        ("stage3:\n  train:\n    learning_rate: 0.1\n", "stage3.train.learning_rate"),
    ],
)
def test_unknown_key_is_named(tmp_path, text, key):
    assert f"unknown key '{key}'" in _error(tmp_path, text)


@pytest.mark.parametrize(
    ("text", "key", "value"),
    [
        ("catalog:\n  shard_size: lots\n", "catalog.shard_size", "'lots'"),
        ("catalog:\n  max_tiles: 0\n", "catalog.max_tiles", "0"),
        ("catalog:\n  splits: [train, val]\n", "catalog.splits.1", "'val'"),
        ("stage1:\n  img_size: 100\n", "stage1.img_size", "100"),  # not a multiple of the 16 px patch
        ("stage2:\n  lora:\n    dropout: 1.5\n", "stage2.lora.dropout", "1.5"),
        ("stage2:\n  train:\n    precision: fp8\n", "stage2.train.precision", "'fp8'"),
        ("data:\n  source: s3\n", "data.source", "'s3'"),
        ("catalog: 3\n", "catalog", "3"),
    ],
)
def test_wrong_value_names_dotted_key_and_value(tmp_path, text, key, value):
    message = _error(tmp_path, text)
    assert f": {key}: " in message
    assert message.endswith(f"(got {value})")


def test_not_a_mapping_and_not_yaml(tmp_path):
    assert "expected a mapping" in _error(tmp_path, "- catalog\n- stage1\n")
    assert ": line 2: not valid YAML (found character '\\t'" in _error(tmp_path, "catalog:\n\tout: x\n")


def test_missing_file_is_an_error_not_defaults(tmp_path):
    with pytest.raises(GacError, match=r"nope\.yaml: parameters file not found"):
        config.load(tmp_path / "nope.yaml")


def test_override_validates_and_keeps_the_original(tmp_path):
    section = config.CatalogParams()
    assert config.override(section, max_tiles=None, splits=None) is section  # unset flags change nothing
    changed = config.override(section, max_tiles=3, splits=["test"])
    assert (changed.max_tiles, changed.splits, changed.shard_size) == (3, ["test"], section.shard_size)
    assert section.max_tiles is None
    with pytest.raises(GacError, match=r"^command line: max_tiles: .*\(got 0\)$"):
        config.override(section, max_tiles=0)
    with pytest.raises(GacError, match=r"^command line: splits\.0: .*\(got 'val'\)$"):
        config.override(section, splits=["val"])
    with pytest.raises(GacError, match=r"unknown key 'max_tile'"):
        config.override(section, max_tile=3)


def test_sections_are_frozen():
    params = config.Params()
    with pytest.raises(pydantic.ValidationError):
        params.catalog.max_tiles = 3
