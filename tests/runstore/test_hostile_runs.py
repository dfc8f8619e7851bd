"""Hostile inputs that used to pass silently (issue 24): a run missing a shard, image tables whose image
column is of the wrong type or holds the images' bytes, a source where no image can be read."""

import io
import json
import shutil

import numpy as np
import pytest
from clip_interpret import analyses, cli, load_model
from clip_interpret.errors import ClipInterpretError
from clip_interpret.runstore import index_images, open_run, open_source
from clip_interpret.toyworld import generate

TINY = "open_clip:test-vit-tiny"
BROKEN = b"\xff\xd8\xff\xe0 not really a jpeg"


@pytest.fixture(scope="module")
def model():
    return load_model(TINY)


def _one_line_error(capsys, *needles):
    """The command's one-line error (after the progress bar, which index draws on stderr)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.endswith("\n") and err.count("error: ") == 1, err
    err = err.rstrip("\n").rpartition("\n")[2]
    assert err.startswith("error: "), err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def toy_png(i: int) -> bytes:
    buffer = io.BytesIO()
    generate(i, seed=4).image.save(buffer, format="PNG")
    return buffer.getvalue()


# ------------------------------------------------------------ a missing shard
def test_a_run_missing_a_whole_shard_is_refused_then_repaired_by_index(model, tmp_path, capsys):
    """300 images in shards of 100, the middle shard's files deleted, the manifest still saying complete:
    once, image-nn searched the 200 left and run image 170 was silently the source's image 270."""
    run = tmp_path / "run"
    index_images(model, "toyworld:300:1", run, shard_size=100, progress=False)
    before = open_run(run)
    for path in (run / "shards").glob("00001.*"):
        path.unlink()
    assert json.loads((run / "manifest.json").read_text())["complete"]
    argv = ["image-nn", str(run), "--run-image", "170", "--heads", "L2.H0", "--out", str(tmp_path / "nn")]
    assert cli.main(argv) == 2
    _one_line_error(capsys, "is missing shard 00001 (of 3)", "source items 100-199 (100 of 300)",
                    f"clip-interpret index --model {TINY} --images toyworld:300:1 --out {run} --shard-size 100")
    assert not (tmp_path / "nn").exists()
    assert cli.main(["index", "--model", TINY, "--images", "toyworld:300:1", "--out", str(run), "--shard-size", "100",
                     "--workers", "0"]) == 0
    assert "indexed 300 images" in capsys.readouterr().out
    repaired = open_run(run)
    assert repaired.complete and repaired.names == before.names
    assert np.array_equal(repaired.embeddings(), before.embeddings())
    assert cli.main(argv) == 0
    result = json.loads(next((tmp_path / "nn").glob("*.json")).read_text())
    assert "toyworld:1:170" in json.dumps(result)  # run image 170 is the source's image 170 again


# ------------------------------------------------------------ table columns
def _parquet(path, columns, **kw):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path, **kw)
    return str(path)


@pytest.mark.parametrize("values, kind", [([1, 2, 3], "int64"), ([1.5, 2.5, 3.5], "double"),
                                          ([[1], [2], [3]], "list<element: int64>"), ([None, None, None], "null")])
def test_a_parquet_image_column_of_another_type_is_refused_in_one_line(tmp_path, capsys, values, kind):
    table = _parquet(tmp_path / "t.parquet", {"image": values, "color": ["red", "blue", "red"]})
    with pytest.raises(ClipInterpretError, match=rf"column 'image' holds {kind} values; an image column holds image "
                                                 r"paths \(strings\), image bytes \(binary\), or \{bytes, path\}"):
        open_source(table)
    out = tmp_path / "run"
    assert cli.main(["index", "--model", TINY, "--images", table, "--out", str(out)]) == 2
    _one_line_error(capsys, str(tmp_path / "t.parquet"), f"holds {kind} values")
    assert not out.exists()  # nothing is written before the source is validated


def test_a_struct_without_bytes_is_refused(tmp_path):
    table = _parquet(tmp_path / "t.parquet", {"image": [{"path": "a.png", "width": 3}, {"path": "b.png", "width": 4}]})
    with pytest.raises(ClipInterpretError, match=r"column 'image' holds struct<path: string, width: int64> values"):
        open_source(table)


def test_tables_without_an_image_column_name_every_accepted_name(tmp_path):
    (tmp_path / "t.csv").write_text("url,color\na.png,red\n")
    with pytest.raises(ClipInterpretError, match=r"t\.csv needs an image column named 'image', 'file', 'path' or "
                                                 r"'filename' \(image paths relative to the table\); it has url, "
                                                 r"color"):
        open_source(str(tmp_path / "t.csv"))
    table = _parquet(tmp_path / "t.parquet", {"url": ["a.png"]})
    with pytest.raises(ClipInterpretError, match=r"'image', 'file', 'path' or 'filename' \(image paths relative to "
                                                 r"the table, or the images' bytes\); it has url"):
        open_source(table)


@pytest.mark.parametrize("column", ["file", "path", "filename"])
def test_every_accepted_column_name_reads_a_csv(tmp_path, column):
    generate(0, seed=4).image.save(tmp_path / "a.png")
    (tmp_path / "t.csv").write_text(f"{column},color\na.png,red\n")
    assert open_source(str(tmp_path / "t.csv")).names == [str(tmp_path / "a.png")]


# ------------------------------------------------------------ images inside a table
N_ROWS = 7  # row 3 holds broken bytes


def _rows():
    return [BROKEN if i == 3 else toy_png(i) for i in range(N_ROWS)]


def _reference(model, tmp_path):
    """The same images as files, indexed from a list (the broken one left out)."""
    lines = []
    for i in range(N_ROWS):
        if i != 3:
            (tmp_path / f"ref{i}.png").write_bytes(toy_png(i))
            lines.append(f"ref{i}.png")
    (tmp_path / "ref.txt").write_text("\n".join(lines))
    return index_images(model, str(tmp_path / "ref.txt"), tmp_path / "ref", progress=False)


@pytest.mark.parametrize("layout", ["binary", "struct", "struct without paths"])
def test_a_parquet_table_holding_the_images_bytes_is_indexed(model, tmp_path, capsys, layout):
    import pyarrow as pa

    data = _rows()
    colors = [["red", "blue"][i % 2] for i in range(N_ROWS)]
    if layout == "binary":
        column = pa.array(data, pa.binary())
    else:
        paths = [f"photo{i}.png" for i in range(N_ROWS)] if layout == "struct" else [None] * N_ROWS
        column = pa.array([{"bytes": b, "path": p} for b, p in zip(data, paths)],
                          pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    table = _parquet(tmp_path / "t.parquet", {"image": column, "color": colors}, row_group_size=3)
    source = open_source(table)
    expected = [f"photo{i}.png" for i in range(N_ROWS)] if layout == "struct" \
        else [f"{table}#{i}" for i in range(N_ROWS)]
    assert source.kind == "table-bytes" and source.names == expected and source.labels == {"color": colors}
    out = tmp_path / "run"
    assert cli.main(["index", "--model", TINY, "--images", table, "--out", str(out), "--shard-size", "4",
                     "--batch-size", "2"]) == 0
    printed = capsys.readouterr().out
    assert "indexed 6 images" in printed and f"skipped {expected[3]}" in printed
    run = open_run(out)
    assert run.complete and run.names == [n for i, n in enumerate(expected) if i != 3]
    assert run.labels["color"] == [c for i, c in enumerate(colors) if i != 3]
    assert np.allclose(run.embeddings(), _reference(model, tmp_path).embeddings(), atol=1e-6)  # the same pixels
    shown = analyses.run_image(run, 4)  # row 5 of the table: read back from it, not from a file of that name
    assert np.array_equal(np.asarray(shown), np.asarray(generate(5, seed=4).image.convert("RGB")))


def test_a_struct_row_without_bytes_reads_the_file_its_path_names(model, tmp_path):
    """Hugging Face datasets leave ``bytes`` empty when the image stays in its file (``path``)."""
    import pyarrow as pa

    (tmp_path / "on-disk.png").write_bytes(toy_png(1))
    column = pa.array([{"bytes": toy_png(0), "path": "zero.png"}, {"bytes": None, "path": "on-disk.png"},
                       {"bytes": None, "path": None}], pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    table = _parquet(tmp_path / "t.parquet", {"image": column})
    run = index_images(model, table, tmp_path / "run", progress=False)
    assert run.names == ["zero.png", "on-disk.png"]
    assert [f["source"] for f in run.failures] == [f"{table}#2"] and "empty" in run.failures[0]["reason"]


def test_repeated_struct_paths_fall_back_to_row_names(tmp_path):
    import pyarrow as pa

    column = pa.array([{"bytes": toy_png(i), "path": p} for i, p in enumerate(["a.png", "a.png", "b.png"])],
                      pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    table = _parquet(tmp_path / "t.parquet", {"image": column})
    assert open_source(table).names == [f"{table}#0", f"{table}#1", "b.png"]


# ------------------------------------------------------------ no readable image
def _all_bad(folder):
    folder.mkdir()
    (folder / "a.jpg").write_bytes(BROKEN)
    (folder / "b.png").write_bytes(b"")
    (folder / "c.png").write_bytes(b"not a png at all")
    return folder


def test_a_source_without_one_readable_image_is_an_error_and_no_run(tmp_path, capsys):
    photos = _all_bad(tmp_path / "photos")
    out = tmp_path / "run"
    assert cli.main(["index", "--model", TINY, "--images", str(photos), "--out", str(out), "--workers", "0"]) == 2
    _one_line_error(capsys, f"run {out} holds no image: none of the 3 images of its source", "could be read",
                    f"({photos / 'a.jpg'}: ", f"{out / 'shards'}/*.json")
    assert not json.loads((out / "manifest.json").read_text())["complete"]
    with pytest.raises(ClipInterpretError, match="holds no image: none of the 3 images"):
        open_run(out)
    # an analysis on it says so, not "k must be at least 1, got 0" (the user gave no --k)
    assert cli.main(["text-nn", str(out), "--text", "a red circle", "--heads", "L2.H0"]) == 2
    err = _one_line_error(capsys, "holds no image")
    assert "k must be" not in err


def test_an_empty_run_marked_complete_by_an_older_version_is_refused_plainly(model, tmp_path, capsys):
    photos = _all_bad(tmp_path / "photos")
    out = tmp_path / "run"
    with pytest.raises(ClipInterpretError, match="holds no image"):
        index_images(model, str(photos), out, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "complete": True, "n_indexed": 0, "n_failed": 3}))
    for argv in (["image-nn", str(out), "--run-image", "0", "--heads", "L2.H0"],
                 ["text-nn", str(out), "--text", "a red circle", "--heads", "L2.H0"],
                 ["ablate", str(out)]):
        assert cli.main(argv) == 2
        err = _one_line_error(capsys, "holds no image")
        assert "k must be" not in err


def test_searching_an_empty_run_says_it_is_empty():
    with pytest.raises(ClipInterpretError, match="the run holds no image, so there is nothing to search"):
        analyses.check_k(8, 0)


def test_a_run_whose_indexing_stopped_before_any_image_says_how_to_resume(model, tmp_path):
    out = tmp_path / "run"
    index_images(model, "toyworld:20:1", out, shard_size=10, stop_after_shards=0, progress=False)
    shutil.rmtree(out / "shards")
    (out / "shards").mkdir()
    with pytest.raises(ClipInterpretError, match=r"holds no image yet: its indexing stopped before any image was "
                                                 r"stored; run the index command again, `clip-interpret index"):
        open_run(out)
