from pathlib import Path

import pytest
from PIL import Image

from client.sources import SourceError, assign_splits, read_manifest, read_tile_folder


def manifest(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "manifest.csv"
    path.write_text(text)
    return path


def test_manifest_rows_and_problems(tmp_path):
    path = manifest(tmp_path, "slide,label,patient\n"
                              "a.tif,adenoma,p1\nb.tif,carcinoid,p2\n,adenoma,p3\na.tif,adenoma,p1\nc.tif,,p4\n")
    items, problems = read_manifest(path, ("adenoma", "adenocarcinoma"), 0.0, 0)
    assert [it.item_id for it in items] == ["a.tif"]
    assert items[0].files == ((tmp_path / "a.tif").resolve(),)
    messages = [f"{p.where}: {p.message}" for p in problems]
    assert f"{path}:3: b.tif: unknown label 'carcinoid' (allowed: adenoma, adenocarcinoma)" in messages
    assert f"{path}:4: empty slide path" in messages
    assert f"{path}:5: a.tif: listed twice (first on row 2)" in messages
    assert f"{path}:6: c.tif: empty label" in messages


def test_manifest_missing_column(tmp_path):
    with pytest.raises(SourceError, match="missing column"):
        read_manifest(manifest(tmp_path, "file,label\nx,y\n"), (), 0.2, 0)


def test_a_comma_inside_a_value_is_a_problem_of_its_row_not_a_merged_patient(tmp_path):
    path = manifest(tmp_path, 'slide,label,patient\na.tif,adenoma,"Smith, John"\nb.tif,adenoma,Smith, Jane\n'
                              'c.tif,adenoma,p3,,\n')
    items, problems = read_manifest(path, (), 0.0, 0)
    # quoted: one field; empty trailing fields (a spreadsheet's) are no problem
    assert [(it.item_id, it.patient) for it in items] == [("a.tif", "Smith, John"), ("c.tif", "p3")]
    assert [f"{p.where}: {p.message}" for p in problems] == [
        f'{path}:3: 4 fields where the header has 3: a value holding a comma must be quoted ("Smith, John")']


def test_a_manifest_that_is_not_utf8_or_not_a_file_or_empty_says_so(tmp_path):
    path = tmp_path / "manifest.csv"
    rows = "".join(f"s{i}.tif,adenoma,p{i}\n" for i in range(2000))  # past the reader's first chunk
    path.write_bytes(f"slide,label,patient\n{rows}a.tif,adenoma,M\u00fcller\n".encode("latin-1"))  # Excel export
    with pytest.raises(SourceError, match=rf"{path}:2002 \(byte 0xfc\): not UTF-8 text; save it as 'CSV UTF-8'"):
        read_manifest(path, (), 0.0, 0)
    with pytest.raises(SourceError, match="is a folder; data.manifest names the CSV file"):
        read_manifest(tmp_path, (), 0.0, 0)
    items, problems = read_manifest(manifest(tmp_path, "slide,label\n"), (), 0.0, 0)
    assert not items and [p.message for p in problems] == ["lists no slides (only its header)"]


def test_splits_keep_patients_together_and_stratify(tmp_path):
    rows = ["slide,label,patient"]
    for i in range(20):
        label = "A" if i < 10 else "B"
        rows += [f"s{i}a.tif,{label},p{i}", f"s{i}b.tif,{label},p{i}"]  # two slides per patient
    items, _ = read_manifest(manifest(tmp_path, "\n".join(rows) + "\n"), (), 0.2, split_seed=1)
    by_patient = {}
    for it in items:
        by_patient.setdefault(it.patient, set()).add(it.split)
    assert all(len(s) == 1 for s in by_patient.values())
    val = [it for it in items if it.split == "val"]
    assert sum(it.label == "A" for it in val) == 4 and sum(it.label == "B" for it in val) == 4  # 2 patients each
    again, _ = read_manifest(manifest(tmp_path, "\n".join(rows) + "\n"), (), 0.2, split_seed=1)
    assert [it.split for it in again] == [it.split for it in items]


def test_given_splits_are_kept(tmp_path):
    path = manifest(tmp_path, "slide,label,split\na.tif,A,val\nb.tif,A,train\nc.tif,A,bogus\n")
    items, problems = read_manifest(path, (), 0.5, 0)
    assert [(it.item_id, it.split) for it in items] == [("a.tif", "val"), ("b.tif", "train")]
    assert "unknown split 'bogus'" in problems[0].message


def test_small_class_keeps_one_training_patient():
    from client.sources import Item
    items = [Item(f"s{i}", "A", f"p{i}", "", (Path(f"s{i}"),), "slide") for i in range(2)]
    assert sorted(it.split for it in assign_splits(items, 0.9, 0)) == ["train", "val"]


def test_tile_folder_items_and_groups(tmp_path):
    for name, count in (("AC", 5), ("T", 4)):
        (tmp_path / name).mkdir()
        for i in range(count):
            Image.new("RGB", (8, 8)).save(tmp_path / name / f"{i}.jpg")
    (tmp_path / "T" / "notes.txt").write_text("not a tile")
    items, problems = read_tile_folder(tmp_path, (), group_size=2, val_fraction=0.0, split_seed=0)
    assert [it.label for it in items] == ["AC", "AC", "T", "T"]
    assert all(len(it.files) == 2 and it.kind == "tiles" for it in items)
    assert len({f for it in items for f in it.files}) == 8  # no tile used twice
    assert problems[0].message.startswith("1 tile(s) left over") and not problems[0].fatal
    with pytest.raises(SourceError, match="no folder for class"):
        read_tile_folder(tmp_path, ("AC", "V"), 1, 0.0, 0)
