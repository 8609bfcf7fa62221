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


def test_missing_sections_are_the_defaults_but_an_empty_file_is_an_error(tmp_path):
    with pytest.raises(GacError, match="no parameters"):  # a lost file must not run on silent defaults
        _load(tmp_path, "")
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


# -- the real-world configuration and the cross-field rules ----------------------------------------------------------
REAL = REPO / "configs" / "bigearthnet-gpu.yaml"


def test_the_real_world_configuration_loads_and_scales_with_the_epoch():
    """``configs/bigearthnet-gpu.yaml`` passes every rule, and its cadences are fractions of an epoch (not steps
    tuned for 21 tiles): validation 4x per epoch, last.ckpt every 5 %, early stopping after 2 epochs."""
    real = config.load(REAL)
    assert real.data.source == "bigearthnet" and real.stage1.pretrained and real.stage2.load_in_8bit
    assert real.stage1.batch_size <= real.stage1.shard_size and real.stage1.img_size == 224
    for section in (real.stage2, real.stage3):
        t = section.train
        assert isinstance(t.val_every_n_steps, float) and isinstance(t.save_every_n_steps, float)
        assert t.patience * t.val_every_n_steps >= 1.0  # early stopping reaches at least one epoch back
        assert section.cache.batch_size <= section.cache.shard_size
        assert t.precision == "bf16-mixed" and section.cache.precision == "bf16"
    assert 549_488 / real.stage1.shard_size < 5000  # shards, not tens of thousands of them


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ("stage1: {batch_size: 32, shard_size: 16}", "stage1: batch_size 32 > shard_size 16"),
        ("stage2: {cache: {batch_size: 64, shard_size: 32}}", "stage2.cache: batch_size 64 > shard_size 32"),
        ("stage1: {img_size: 96}", "stage1: img_size 96 < the 120 px tile"),
        ("stage3: {img_size: 112}", "stage3: img_size 112 < the 120 px tile"),
        ("stage1: {img_size: 144}", "stage1: img_size 144 is not a multiple of 32"),
        ("stage2: {train: {val_every_n_steps: 2.5}}", "stage2.train: val_every_n_steps 2.5: a float is a fraction"),
    ],
)
def test_an_unsafe_combination_is_refused_in_one_line(tmp_path, change: str, expected: str):
    assert expected in _error(tmp_path, change)


def test_a_fraction_of_an_epoch_sets_lightnings_cadences(tmp_path):
    """``val_every_n_steps: 0.5`` validates twice per epoch; ``save_every_n_steps: 0.25`` of 8 steps is every 2."""
    from gac.training.fit import _trainer
    from gac.training.stage2 import Stage2Task

    train = config.TrainParams(val_every_n_steps=0.5, save_every_n_steps=0.25, accelerator="cpu")
    trainer, _, last = _trainer(config.Stage2Params(train=train), tmp_path, Stage2Task, False, steps_per_epoch=8)
    assert (trainer.val_check_interval, trainer.check_val_every_n_epoch) == (0.5, 1)
    assert last._every_n_train_steps == 2


def test_a_command_line_flag_is_held_to_the_same_rules():
    """``gac stage1 --batch-size 64`` with shards of 16 is refused like the same value in params.yaml."""
    with pytest.raises(GacError, match=r"^command line: batch_size 64 > shard_size 16 \(a batch never spans"):
        config.override(config.Stage1Params(), batch_size=64)
