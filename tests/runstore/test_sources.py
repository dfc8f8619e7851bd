"""Sources for large collections: WebDataset tar shards and Parquet/CSV tables of paths."""

import tarfile

import numpy as np
import pytest

from clip_interpret import load_model
from clip_interpret.analyses import run_image
from clip_interpret.errors import ClipInterpretError
from clip_interpret.runstore import index_images, open_source
from clip_interpret.runstore.sources import expand_braces
from clip_interpret.toyworld import generate

from tests.helpers import BROKEN, toy_png, write_tars

TINY = "open_clip:test-vit-tiny"


@pytest.fixture(scope="module")
def model():
    return load_model(TINY)


def test_brace_patterns_expand_in_order():
    assert expand_braces("d/{00..02}.tar") == ["d/00.tar", "d/01.tar", "d/02.tar"]
    assert expand_braces("d/{8..10}.tar") == ["d/8.tar", "d/9.tar", "d/10.tar"]
    assert expand_braces("{a,b}/{0..1}.tar") == ["a/0.tar", "a/1.tar", "b/0.tar", "b/1.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(ClipInterpretError, match="empty"):
        expand_braces("d/{5..1}.tar")


def test_tar_shards_with_a_broken_image_in_the_middle(model, tmp_path):
    write_tars(tmp_path)
    spec = f"tars:{tmp_path}/shard-{{0..2}}.tar"
    source = open_source(spec)
    assert source.kind == "tars" and len(source) == 12
    assert source.names[0] == f"{tmp_path}/shard-0.tar/sample0000.png"
    assert source.names[5] == f"{tmp_path}/shard-1.tar/sample0005.jpg"
    assert source.labels["cls"] == [str(i % 2) for i in range(12)]
    assert source.labels["json.color"][:4] == ["red", "blue", "green", "red"]
    assert "txt" not in source.labels and "json.id" not in source.labels  # captions and ids are not labels
    assert open_source(spec).list_hash() == source.list_hash()  # deterministic
    run = index_images(model, spec, tmp_path / "run", shard_size=5, batch_size=3, progress=False)
    assert run.complete and len(run) == 11 and len(set(run.names)) == 11
    assert [f["index"] for f in run.failures] == [5] and run.failures[0]["source"] == source.names[5]
    assert run.labels["json.color"] == [c for i, c in enumerate(source.labels["json.color"]) if i != 5]
    direct = index_images(model, str(_image_list(tmp_path)), tmp_path / "files", progress=False)
    assert np.allclose(run.embeddings(), direct.embeddings(), atol=1e-6)  # the same pixels as from files
    assert np.array_equal(np.asarray(run_image(run, 5)), np.asarray(generate(6, seed=5).image.convert("RGB")))


def _image_list(folder):
    """The same images as files, in a list (the broken one left out)."""
    listing = folder / "files.txt"
    lines = []
    for i in range(12):
        if i != 5:
            (folder / f"img{i}.png").write_bytes(toy_png(i))
            lines.append(f"img{i}.png")
    listing.write_text("\n".join(lines))
    return listing


@pytest.mark.parametrize("make, message", [
    (lambda p: f"tars:{p}/missing-{{0..1}}.tar", "2 of the 2 tar files"),
    (lambda p: (p / "x.tar.gz").write_bytes(b"\x1f\x8b\x08 compressed") and f"tars:{p}/x.tar.gz", "uncompressed"),
    (lambda p: tarfile.open(p / "e.tar", "w").close() or f"tars:{p}/e.tar", "hold no images"),
])
def test_tar_source_errors(tmp_path, make, message):
    with pytest.raises(ClipInterpretError, match=message):
        open_source(make(tmp_path))


def _table_rows(folder):
    rows = []
    for i in range(9):
        name = f"images/{i}.png"
        (folder / "images").mkdir(exist_ok=True)
        if i == 4:
            (folder / name).write_bytes(BROKEN)
        else:
            generate(i, seed=6).image.save(folder / name)
        rows.append({"image": name, "color": ["red", "blue"][i % 2], "caption": f"picture {i}", "split": "val"})
    return rows


def test_parquet_and_csv_tables_with_a_broken_image_in_the_middle(model, tmp_path):
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _table_rows(tmp_path)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "images.parquet")
    with open(tmp_path / "images.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    parquet, table = open_source(str(tmp_path / "images.parquet")), open_source(str(tmp_path / "images.csv"))
    assert parquet.kind == table.kind == "table"
    assert parquet.names == table.names == [str(tmp_path / r["image"]) for r in rows]
    assert parquet.labels == table.labels == {"color": [r["color"] for r in rows]}  # one task per labelled column
    run = index_images(model, str(tmp_path / "images.parquet"), tmp_path / "run", shard_size=4, progress=False)
    assert run.complete and len(run) == 8 and [f["index"] for f in run.failures] == [4]
    assert run.labels["color"] == [r["color"] for i, r in enumerate(rows) if i != 4]


def test_a_parquet_table_without_an_image_column_is_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"url": ["a", "b"]}), tmp_path / "t.parquet")
    with pytest.raises(ClipInterpretError, match="needs an image column named 'image', 'file', 'path' or "
                                                 "'filename'.*it has url"):
        open_source(str(tmp_path / "t.parquet"))
