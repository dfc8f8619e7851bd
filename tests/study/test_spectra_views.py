"""Spectra where a user reads them: the run folder's spectra-POOL.json (``spectra --run``), the report's
table per head, and the app's Spectra tab (clip_interpret.report, clip_interpret.app.core)."""

import html
import json
import re

import numpy as np
import pytest

from clip_interpret.app import core
from clip_interpret.errors import ClipInterpretError
from clip_interpret.labels.store import normalise_property
from clip_interpret.pools import Pool, load_pool
from clip_interpret.runstore import index_images, open_run
from clip_interpret.spectra import head_spectra

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LABELS = {"labeller": "manual", "heads": {"L5.H3": {"label": "colours"}, "L4.H1": {"label": "shape"}}}
EVIL = "<script>alert({})</script>"


def _evil_pool(dim: int, n: int = 12):
    """A tagged pool whose every text is markup (user input), with random unit embeddings."""
    emb = np.random.default_rng(4).standard_normal((n, dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    pool = Pool("evil", [EVIL.format(i) + f" & text {i}" for i in range(n)], ["colour", "shape"] * (n // 2))
    return pool, emb


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory, toy_model):
    root = tmp_path_factory.mktemp("spectra-runs")
    index_images(toy_model, "toyworld:6:1", root / "toy", progress=False)
    (root / "toy" / "labels.json").write_text(json.dumps(LABELS))
    index_images(toy_model, "toyworld:4:2", root / "bare", progress=False)
    return root


@pytest.fixture(scope="module")
def evil_spectra(toy_model):
    pool, emb = _evil_pool(toy_model.vit.cfg.output_dim)
    return head_spectra(toy_model, pool=pool, k=2, text_emb=emb, layers=[4, 5])


def _head_block(page: str, head: str) -> str:
    start = page.index(f'<h4 id="spectra-{head}">')
    end = page.find("<h4", start + 1)
    return page[start:end if end > 0 else len(page)]


def test_the_report_has_a_table_per_head_with_its_directions_escaped(toy_run, toy_model, evil_spectra, tmp_path):
    from clip_interpret.report import write_report

    run = open_run(toy_run / "toy")
    page = write_report(run, None, tmp_path / "before.html").read_text()
    assert "No spectra in this run" in page and 'id="spectra-' not in page  # nothing to show yet
    data = evil_spectra.to_json()
    data["fingerprint"] = toy_model.fingerprint()
    (run.path / "spectra-evil.json").write_text(json.dumps(data))
    try:
        page = write_report(run, None, tmp_path / "report.html").read_text()
    finally:
        (run.path / "spectra-evil.json").unlink()
    assert "<script" not in page  # every pool text is escaped
    assert not re.findall(r'(?:src|href)="(?!data:)', page)  # still self-contained
    assert re.findall(r'<h4 id="spectra-(L\d\.H\d)">', page) == list(evil_spectra.heads)  # 16 heads, in order
    assert "another model than the run" not in page
    for name, head in evil_spectra.heads.items():
        block = _head_block(page, name)
        assert block.count("<tr>") == 1 + 2  # the header and k directions
        assert f"label from the weights: <b>{head.label}</b> ({head.confidence:.0%})" in block
        rows = block.split("<tr>")[2:]
        for j, (row, ex) in enumerate(zip(rows, head.explanations)):
            cells = re.findall(r"<td[^>]*>(.*?)</td>", row, flags=re.S)
            assert cells[0] == str(j + 1) and cells[1] == f"{float(head.singular[j]):.4f}"
            assert cells[2] == ("+" if ex.sign > 0 else "-") and cells[3] == f"{ex.fit:.1%}"
            shown = [html.unescape(re.sub(r" <span.*", "", t)) for t in cells[4].split("<br>")]
            assert shown == [evil_spectra.texts[i] for i in ex.indices]
        theirs = LABELS["heads"].get(name, {}).get("label")
        if theirs:  # the run's label beside the one from the weights, marked as agreeing or not
            same = normalise_property(theirs) == normalise_property(head.label)
            assert f"manual label: <b>{theirs}</b> <span class={'ok' if same else 'bad'}>" in block
        else:
            assert "manual label" not in block
    both = [n for n in LABELS["heads"] if n in evil_spectra.heads]
    agree = sum(normalise_property(LABELS["heads"][n]["label"]) == evil_spectra.heads[n].label for n in both)
    assert f"manual: {agree}/{len(both)}" in page


def test_the_report_says_when_spectra_are_of_another_model_or_unreadable(toy_run, evil_spectra, tmp_path):
    from clip_interpret.report import write_report

    run = open_run(toy_run / "bare")
    data = evil_spectra.to_json()
    data["fingerprint"] = "0" * 16
    (run.path / "spectra-other.json").write_text(json.dumps(data))
    (run.path / "spectra-cut.json").write_text(json.dumps(data)[:200])
    try:
        page = write_report(run, None, tmp_path / "report.html").read_text()
    finally:
        (run.path / "spectra-other.json").unlink()
        (run.path / "spectra-cut.json").unlink()
    assert "computed from another model than the run" in page
    assert "spectra-cut.json cannot be read" in page and page.count('<h4 id="spectra-L4.H0">') == 1


def test_cli_spectra_run_writes_the_runs_spectra_file(toy_run, toy_model, tiny_model, tmp_path, capsys):
    from clip_interpret.cli import main

    run = toy_run / "bare"
    target = run / "spectra-toy.json"
    try:
        assert main(["spectra", "--run", str(run), "--k", "1", "--layers", "5", "--device", "cpu"]) == 0
        assert f"wrote {target}" in capsys.readouterr().out
        data = json.loads(target.read_text())
    finally:
        target.unlink(missing_ok=True)
    assert sorted(data["heads"]) == [f"L5.H{h}" for h in range(8)] and data["pool"]["name"] == "toy"
    assert data["fingerprint"] == open_run(run).fingerprint == toy_model.fingerprint()
    other = tmp_path / "tiny"
    index_images(tiny_model, "toyworld:2:1", other, progress=False)
    assert main(["spectra", "toy", "--run", str(other), "--k", "1", "--device", "cpu"]) == 2  # not the run's model
    err = capsys.readouterr().err
    assert err.startswith("error: run ") and "other weights" in err and err.count("\n") == 1
    assert not list(other.glob("spectra-*.json"))
    assert main(["spectra"]) == 2
    err = capsys.readouterr().err
    assert err == "error: give a MODEL (e.g. toy), or --run RUN to read the heads of a run's model\n"


def test_the_app_lists_a_heads_directions_computed_once_per_model(toy_run, toy_model):
    registry = core.Registry([toy_run / "toy", toy_run / "bare"])
    toy = registry.entries["toy"]
    assert toy.default_spectra_pool() == "toy" and "toy" in toy.spectra_pools() and "general" in toy.spectra_pools()
    rows, text = core.run_spectra(registry, "toy", "L4.H1", "toy")
    expected = head_spectra(toy_model, pool="toy", heads="L4.H1").heads["L4.H1"]
    toy_texts = load_pool("toy").texts
    assert len(rows) == len(expected.explanations) == 5
    for j, (row, ex) in enumerate(zip(rows, expected.explanations)):
        assert row[0] == j + 1 and row[1] == pytest.approx(float(expected.singular[j]), abs=1e-4)
        assert row[2] == ("+" if ex.sign > 0 else "-") and row[3] == f"{ex.fit:.1%}"
        total = sum(ex.weights)
        assert [part.rsplit(" (", 1)[0] for part in row[4].split("; ")] == [toy_texts[i] for i in ex.indices]
        weights = [float(part.rsplit(" (", 1)[1].rstrip(")")) for part in row[4].split("; ")]
        assert weights == pytest.approx([w / total for w in ex.weights], abs=0.006)
    assert f"label from the weights **{expected.label}**" in text and "the run's label: **shape**" in text
    assert "computed once" in text and registry.spectra_computed == 1
    again = core.run_spectra(registry, "bare", "L0.H0", "toy")  # the same model: no second computation
    assert registry.spectra_computed == 1 and len(again[0]) == 5
    assert core.run_spectra(registry, "toy", "L4.H1", None)[0] == rows  # the default pool: toy for the toy model
    for bad, message in (("all heads", "choose one head"), ("layer:4", "choose one head"), ("L9.H9", "not in these"),
                         (None, "choose one head")):
        with pytest.raises(ClipInterpretError, match=message):
            core.run_spectra(registry, "toy", bad, "toy")
    with pytest.raises(ClipInterpretError, match="unknown pool '/etc/passwd'; choose one of toy, general"):
        core.run_spectra(registry, "toy", "L4.H1", "/etc/passwd")  # no file named by the page


def test_the_app_reads_the_runs_spectra_file_without_server_paths(toy_run, toy_model, evil_spectra):
    run = toy_run / "toy"
    data = evil_spectra.to_json()
    data["fingerprint"] = toy_model.fingerprint()
    data["pool"]["name"] = str(run / "pools" / "evil.txt")  # a file pool is named by its path
    (run / "spectra-evil.json").write_text(json.dumps(data))
    try:
        registry = core.Registry([run])
        entry = registry.entries["toy"]
        assert entry.spectra_pools() == ["evil", "toy", "general"] and entry.default_spectra_pool() == "toy"
        rows, text = core.run_spectra(registry, "toy", "L5.H3", "evil")
    finally:
        (run / "spectra-evil.json").unlink()
    head = evil_spectra.heads["L5.H3"]
    assert registry.spectra_computed == 0 and "the run's spectra-evil.json" in text
    assert [r[1] for r in rows] == pytest.approx([float(s) for s in head.singular], abs=1e-4)
    assert [[p.rsplit(" (", 1)[0] for p in r[4].split("; ")] for r in rows] == \
        [[evil_spectra.texts[i] for i in ex.indices] for ex in head.explanations]  # plain text for the table
    assert str(toy_run) not in text and "pool evil.txt" in text and "<script" not in text
