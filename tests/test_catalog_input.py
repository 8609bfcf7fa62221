"""The catalog's input checks (issue 14, cases 3, 4, 5, 7, 9, 10), each on real files damaged by the test.

Metadata is checked before any tile is read: duplicate ids refuse the root in one line; a null name or an unknown
split rejects that row with a reason and the rest go on; a patch id without a readable date keeps its tile, with
season ``unknown``. A rerun rebuilds the shards
whose files changed. ``rejected.parquet`` exists at the catalog's root. torchgeo's own BigEarthNetV2 test data is
catalogued and agrees with torchgeo's reader.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gac import cli
from gac.config import CatalogParams
from gac.data import catalog, layout, metadata
from gac.data.synthetic import broken_patches, generate
from gac.errors import GacError
from gac.io.store import REJECTED, SHARDS, ShardStore

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent


def _root(synthetic_root: Path, tmp_path: Path) -> Path:
    """A copy of the 24 intact synthetic tiles (8 per split) for this test to damage."""
    root = tmp_path / "root"
    shutil.copytree(synthetic_root, root)
    return root


def _edit_metadata(root: Path, edit) -> pd.DataFrame:  # noqa: ANN001 - a function of the frame
    """Rewrite ``root``'s metadata.parquet as ``edit(frame)`` returns it (pandas writes it, as a user would)."""
    meta = edit(pd.read_parquet(root / layout.METADATA_FILE))
    meta.to_parquet(root / layout.METADATA_FILE, index=False)
    return meta


def _catalog(capsys: pytest.CaptureFixture, root: Path, out: Path, *flags: str) -> tuple[int, str, str]:
    """``gac catalog`` through :func:`gac.cli.main` in this process, one reader process; (exit code, stdout, stderr)."""
    args = ["--params", REPO / "params.yaml", "catalog", "--data-dir", root, "--output-dir", out]
    code = cli.main([str(a) for a in (*args, "--metrics", out.parent / "m.json", "--workers", "1", *flags)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_error_line(code: int, stdout: str, stderr: str) -> str:
    """The single ``gac: error:`` line of a refused run (exit status 2, nothing else printed)."""
    assert code == 2 and stdout == "", (code, stdout, stderr)
    (line,) = stderr.splitlines()
    assert line.startswith("gac: error: ")
    return line


def _rejected_lines(stdout: str) -> dict[str, str]:
    """``{label: reason}`` of the ``rejected <patch id>: <reason>`` lines the CLI prints."""
    return dict(
        line.removeprefix("rejected ").split(": ", 1) for line in stdout.splitlines() if line.startswith("rejected ")
    )


# -- case 3: duplicate ids, one tile in two splits ------------------------------------------------------------------
def test_a_patch_id_in_two_splits_refuses_the_root_in_one_line(synthetic_root, tmp_path, capsys):
    root = _root(synthetic_root, tmp_path)
    row = int(pd.read_parquet(root / layout.METADATA_FILE)["split"].eq("train").idxmax())  # the first train tile
    meta = _edit_metadata(root, lambda m: pd.concat([m, m.iloc[[row]].assign(split="test")], ignore_index=True))

    line = _one_error_line(*_catalog(capsys, root, tmp_path / "cat"))
    assert line == (
        f"gac: error: {root / layout.METADATA_FILE}: patch_id {meta.loc[row, 'patch_id']!r} is on rows {row} (train) "
        "and 24 (test) (leakage: one tile in two splits); 1 repeated id(s) in all, 1 in two splits (expected each "
        "patch_id once: fix the metadata, neither row can be trusted)"
    )
    assert not (tmp_path / "cat").exists()  # refused before anything was written


def test_rows_for_refuses_a_store_that_holds_an_id_twice(tmp_path):
    """The downstream guard: ``rows_for`` would return two rows for one id and shift every pair after it."""
    store = ShardStore(tmp_path / "store")
    for name, ids in (("00000", ["a", "b"]), ("00001", ["b", "c"])):
        store.write_shard(name, pd.DataFrame({"patch_id": ids}), {"x": np.arange(2)})
    store.finalize()
    with pytest.raises(GacError, match=r"store: tile 'b' is in the store more than once \(1 such ids in all;"):
        store.rows_for(["a", "b", "c"])


# -- case 4: unknown split values ------------------------------------------------------------------------------------
def test_unknown_split_values_are_rejected_with_a_line_not_dropped(synthetic_root, tmp_path, capsys):
    root = _root(synthetic_root, tmp_path)

    def misspell(meta: pd.DataFrame) -> pd.DataFrame:
        meta = meta.copy()
        meta.loc[[1, 2], "split"] = ["holdout", "Train"]
        return meta

    meta = _edit_metadata(root, misspell)
    path = root / layout.METADATA_FILE

    code, stdout, stderr = _catalog(capsys, root, tmp_path / "cat", "--splits", "validation")
    assert code == 0, stderr
    expected = "is not a BigEarthNet split (expected one of train, validation, test)"
    assert _rejected_lines(stdout) == {
        meta.loc[1, "patch_id"]: f"{path} row 1: split 'holdout' {expected}",
        meta.loc[2, "patch_id"]: f"{path} row 2: split 'Train' {expected}",
    }
    store = ShardStore(tmp_path / "cat")
    assert sorted(store.index["patch_id"]) == sorted(meta.loc[meta["split"] == "validation", "patch_id"])
    assert sorted(pd.read_parquet(tmp_path / "cat" / REJECTED)["patch_id"]) == sorted(meta.loc[[1, 2], "patch_id"])


# -- case 5: a rerun sees changed files ------------------------------------------------------------------------------
def test_a_rerun_rebuilds_exactly_the_shards_whose_files_changed(synthetic_root, tmp_path):
    root, out = _root(synthetic_root, tmp_path), tmp_path / "cat"
    params = CatalogParams(out=str(out), workers=1, shard_size=4, max_tiles=8)
    report = catalog.build(params, root, progress=False)
    assert (report.tiles, report.shards_written, report.shards_kept) == (8, 2, 0)
    meta = metadata.read_metadata(root)
    victim, s1_name = meta.loc[5, "patch_id"], meta.loc[5, "s1_name"]  # in shard 00001
    band = layout.s2_band_path(root, victim, "B04")
    good = band.read_bytes()
    kept = {p: p.stat().st_mtime_ns for p in (out / SHARDS / "00000").iterdir()}

    band.write_bytes(good[:200])  # damaged after the catalog was built: the rerun must see it
    report = catalog.build(params, root, progress=False)
    assert (report.shards_written, report.shards_kept) == (1, 1)
    (reason,) = report.rejected.loc[report.rejected["patch_id"] == victim, "reason"]
    assert reason.startswith(f"{band}: unreadable GeoTIFF")
    assert victim not in set(ShardStore(out).index["patch_id"])
    assert {p: p.stat().st_mtime_ns for p in (out / SHARDS / "00000").iterdir()} == kept  # its files did not change

    band.write_bytes(good)  # repaired: read again and accepted
    report = catalog.build(params, root, progress=False)
    assert (report.tiles, len(report.rejected), report.shards_written, report.shards_kept) == (8, 0, 1, 1)
    store = ShardStore(out)
    np.testing.assert_array_equal(
        store.read("s2", store.rows_for([victim]))[0], catalog.read_tile(root, victim, s1_name).s2
    )
    report = catalog.build(params, root, progress=False)  # nothing changed: nothing rewritten
    assert (report.shards_written, report.shards_kept) == (0, 2)


def test_unchanged_files_are_confirmed_by_their_stat_without_reading_them(synthetic_root, tmp_path, monkeypatch):
    """At 550k tiles a rerun must not read 118 GB to learn that nothing changed: the stat cache (beside the catalog
    folder, never inside the DVC output) confirms shards whose files kept their stat; only the others are hashed."""
    root, out = _root(synthetic_root, tmp_path), tmp_path / "cat"
    params = CatalogParams(out=str(out), workers=1, shard_size=4, max_tiles=8)
    catalog.build(params, root, progress=False)
    assert catalog.StatCache(out).path.parent == tmp_path and set(catalog.StatCache(out).entries) == {"00000", "00001"}
    assert not list(out.rglob("*stat*"))
    hashed = []
    real = catalog._sources_digest
    monkeypatch.setattr(catalog, "_sources_digest", lambda r, rows: hashed.append(len(rows)) or real(r, rows))

    report = catalog.build(params, root, progress=False)
    assert (report.shards_written, report.shards_kept, hashed) == (0, 2, [])  # no file was opened

    meta = metadata.read_metadata(root)
    band = layout.s2_band_path(root, meta.loc[5, "patch_id"], "B04")
    band.write_bytes(band.read_bytes())  # same bytes, new mtime: shard 00001 is hashed, found unchanged, kept
    report = catalog.build(params, root, progress=False)
    assert (report.shards_written, report.shards_kept, hashed) == (0, 2, [4])

    catalog.StatCache(out).path.unlink()  # a lost cache costs one rehash, never a wrong answer
    report = catalog.build(params, root, progress=False)
    assert (report.shards_written, report.shards_kept, hashed) == (0, 2, [4, 4, 4])


# -- case 7: one line, never a traceback -----------------------------------------------------------------------------
def test_a_null_s1_name_rejects_that_row_and_the_rest_go_on(synthetic_root, tmp_path, capsys):
    root = _root(synthetic_root, tmp_path)
    meta = _edit_metadata(root, lambda m: m.assign(s1_name=m["s1_name"].where(m.index != 3, None)))

    code, stdout, stderr = _catalog(capsys, root, tmp_path / "cat")
    assert code == 0, stderr
    assert _rejected_lines(stdout) == {
        meta.loc[3, "patch_id"]: f"{root / layout.METADATA_FILE} row 3: s1_name is null (expected the paired S1 patch "
        f"name, e.g. {metadata.EXAMPLE_S1_NAME})"
    }
    assert "Catalog: 23 tiles, 1 rejected" in stdout


def test_a_tile_whose_name_has_no_readable_date_is_kept_with_season_unknown(synthetic_root, tmp_path, capsys):
    """A real root's ``…_20170924T93020_…`` (a time with 5 digits) names a valid S1/S2 pair: kept, said once."""
    from gac.data.synthetic import restamp

    root = _root(synthetic_root, tmp_path)
    ids = list(pd.read_parquet(root / layout.METADATA_FILE)["patch_id"])
    odd = [restamp(root, ids[i], ids[i].split("_")[2][:8] + "T93020") for i in (4, 7)]
    code, stdout, stderr = _catalog(capsys, root, tmp_path / "cat")
    assert code == 0, stderr
    assert _rejected_lines(stdout) == {}
    assert "Catalog: 24 tiles, 0 rejected" in stdout
    notes = [line for line in stdout.splitlines() if "season 'unknown'" in line]
    assert notes == [
        f"note: 2 tile(s) kept with season 'unknown': their patch_id has no readable acquisition date (e.g. {odd[0]}: "
        f"expected S2x_MSIL2A_<YYYYMMDD>T<hhmmss>_…, got {odd[0].split('_')[2]!r} as its third '_' part); the date "
        "only groups results by season"
    ]
    index = ShardStore(tmp_path / "cat").index.set_index("patch_id")
    assert list(index.loc[odd, "season"]) == ["unknown", "unknown"] and index.loc[odd, "date"].isna().all()
    assert (index.drop(odd)["season"] != "unknown").all()


def test_a_null_patch_id_is_rejected_naming_its_row(synthetic_root, tmp_path, capsys):
    root = _root(synthetic_root, tmp_path)
    _edit_metadata(root, lambda m: m.assign(patch_id=m["patch_id"].where(m.index != 0, None)))
    code, stdout, stderr = _catalog(capsys, root, tmp_path / "cat")
    assert code == 0, stderr
    assert _rejected_lines(stdout) == {
        "(no patch_id)": f"{root / layout.METADATA_FILE} row 0: patch_id is null (expected the S2 patch name, e.g. "
        f"{metadata.EXAMPLE_PATCH_ID})"
    }


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"", "not a readable parquet file (Could not open Parquet input source: Parquet file size is 0 bytes;"),
        (b"PAR1 this is not parquet at all", "not a readable parquet file ("),
        ("zero rows", "no rows (expected BigEarthNet v2's metadata.parquet"),
    ],
    ids=["empty-file", "garbage", "zero-rows"],
)
def test_an_empty_or_corrupt_metadata_parquet_is_one_line(synthetic_root, tmp_path, capsys, content, says):
    root = _root(synthetic_root, tmp_path)
    path = root / layout.METADATA_FILE
    if content == "zero rows":
        _edit_metadata(root, lambda m: m.iloc[:0])
    else:
        path.write_bytes(content)
    line = _one_error_line(*_catalog(capsys, root, tmp_path / "cat"))
    assert line.startswith(f"gac: error: {path}: {says}")
    assert (
        "expected BigEarthNet v2's metadata.parquet with at least the columns ['patch_id', 's1_name', 'split']" in line
    )
    assert not (tmp_path / "cat").exists()


def test_a_corrupt_metadata_parquet_is_one_line_from_a_fresh_interpreter(synthetic_root, tmp_path):
    """End to end through ``python -m gac``: exit 2, no traceback, one line naming the file."""
    root = _root(synthetic_root, tmp_path)
    (root / layout.METADATA_FILE).write_bytes(b"\x00" * 100)
    done = subprocess.run(
        [sys.executable, "-m", "gac", "--params", REPO / "params.yaml", "catalog", "--data-dir", root,
         "--output-dir", tmp_path / "cat", "--metrics", tmp_path / "m.json"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert (done.returncode, done.stdout) == (2, "")
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"gac: error: {root / layout.METADATA_FILE}: not a readable parquet file")


# -- case 9: rejected.parquet at the root ----------------------------------------------------------------------------
def test_rejected_parquet_is_written_at_the_catalog_root(tmp_path):
    root = tmp_path / "broken"
    generate(root, n_tiles=8, seed=3, broken={"missing_band": 1, "nan_sar": 1})
    out = tmp_path / "cat"
    report = catalog.build(CatalogParams(out=str(out), workers=1, shard_size=1), root, progress=False)
    merged = pd.read_parquet(out / REJECTED)
    assert list(merged.columns) == ["patch_id", "reason", "split"]  # the split: a summary of one split counts its own
    assert sorted(merged["patch_id"]) == sorted(broken_patches(root)) == sorted(report.rejected["patch_id"])
    splits = pd.read_parquet(root / layout.METADATA_FILE).set_index("patch_id")["split"]
    assert list(merged["split"]) == list(splits[merged["patch_id"]])
    assert len(list((out / SHARDS).glob(f"*/{REJECTED}"))) == 2  # one per shard with a broken tile, merged above
    pd.testing.assert_frame_equal(merged, ShardStore(out).rejected())


def test_rejected_parquet_at_the_root_is_there_and_empty_when_nothing_failed(synthetic_root, tmp_path):
    out = tmp_path / "cat"
    catalog.build(CatalogParams(out=str(out), workers=1, max_tiles=2), synthetic_root, progress=False)
    empty = pd.read_parquet(out / REJECTED)
    assert list(empty.columns) == ["patch_id", "reason"] and empty.empty  # as before rejections had a split: the
    # DVC pipeline's catalog (nothing rejected) keeps its bytes


# -- case 10: torchgeo's own BigEarthNetV2 test data -----------------------------------------------------------------
def _torchgeo_data(root: Path) -> Path:
    """torchgeo's test data written by ``tests/data/torchgeo_v2.py`` (a copy of torchgeo's ``data.py``)."""
    spec = importlib.util.spec_from_file_location("torchgeo_v2", HERE / "data" / "torchgeo_v2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(root)


def test_torchgeo_test_data_is_catalogued_and_agrees_with_torchgeo(tmp_path, capsys):
    from torchgeo.datasets import BigEarthNetV2

    root = _torchgeo_data(tmp_path / "torchgeo")
    assert list(pd.read_parquet(root / layout.METADATA_FILE).columns) == ["patch_id", "s1_name", "split", "labels"]
    out = tmp_path / "cat"
    code, stdout, stderr = _catalog(capsys, root, out)
    assert code == 0, stderr
    notes = [line for line in stdout.splitlines() if line.startswith("note: ")]
    assert notes == [
        f"note: {root / layout.METADATA_FILE}: no column(s) country, s2v1_name, contains_seasonal_snow, "
        "contains_cloud_or_shadow; every tile gets country 'unknown', s2v1_name none, contains_seasonal_snow false, "
        "contains_cloud_or_shadow false"
    ]  # said once for the root, not per tile
    assert "Catalog: 4 tiles, 0 rejected" in stdout

    store = ShardStore(out)
    index = store.index.set_index("patch_id")
    assert set(index["country"]) == {"unknown"} and not index["contains_cloud_or_shadow"].any()
    seen = 0
    for split in BigEarthNetV2.valid_splits:
        ds = BigEarthNetV2(root, split=split, bands="all")
        for i in range(len(ds)):
            item = ds[i]
            rec = index.loc[ds.metadata_df.loc[i, "patch_id"]]
            assert rec["split"] == BigEarthNetV2.split_map[split]
            assert list(rec["labels"]) == list(ds.metadata_df.loc[i, "labels"])
            s2 = store.array(rec["shard"], "s2")[rec["row"]]
            s1 = store.array(rec["shard"], "s1")[rec["row"]]
            # S2: the int16 DN (all ≥ 0 here) as our uint16, equal to torchgeo's int32 read.
            np.testing.assert_array_equal(item["image_s2"].numpy(), s2.astype(np.float32))
            # S1: int16 dB here, so torchgeo's int32 read is exact; it returns [VH, VV], we store [VV, VH].
            np.testing.assert_array_equal(item["image_s1"].numpy(), s1[::-1])
            seen += 1
    assert seen == len(index) == 4
    assert json.loads((out.parent / "m.json").read_text())["tiles"] == 4
