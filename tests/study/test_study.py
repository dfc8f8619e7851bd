"""The whole study: analyze (steps skipped when up to date), report, demo, and the label/metrics commands."""

import json
import re
import shutil

import pytest

from clip_interpret.cli import main


def _steps(out: str) -> dict[str, str]:
    return {m.group(1): m.group(2) for m in re.finditer(r"\[\d/7\] (\w+): (.*)", out)}


def test_analyze_chains_every_step_and_skips_what_is_up_to_date(tmp_path, capsys):
    run = tmp_path / "run"
    manual = tmp_path / "manual.tsv"
    manual.write_text("L5.H1\tposition\n")
    args = ["analyze", "--model", "toy", "--images", "toyworld:200:1", "--out", str(run), "--pool", "toy",
            "--layers", "4,5", "--labeller", "taxonomy", "--labeller", "embedding"]
    assert main(args) == 0
    first = _steps(capsys.readouterr().out)
    assert list(first) == ["index", "ablate", "textspan", "label", "faithfulness", "metrics", "report"]
    assert all(v.startswith("done") for v in first.values()), first
    for name in ("manifest.json", "ablation.json", "textspan-toy.json", "labels-taxonomy.json",
                 "labels-embedding.json", "labels.json", "faithfulness.json", "metrics.json", "metrics.png",
                 "report.html"):
        assert (run / name).is_file(), name
    assert json.loads((run / "labels.json").read_text())["labeller"] == "taxonomy"  # the first labeller is in force

    assert main(args) == 0
    second = _steps(capsys.readouterr().out)
    assert all("up to date" in v for v in second.values()), second

    assert main(args + ["--manual", str(manual)]) == 0  # a new input: only the steps after it run again
    third = _steps(capsys.readouterr().out)
    assert "up to date" in third["textspan"] and "up to date" in third["faithfulness"]
    assert third["label"].startswith("done") and third["report"].startswith("done")
    labels = json.loads((run / "labels.json").read_text())["heads"]
    assert labels["L5.H1"]["label"] == "position" and labels["L5.H1"]["source"] == "manual"


def test_report_is_self_contained(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["analyze", "--model", "toy", "--images", "toyworld:120:1", "--out", str(run), "--pool", "toy",
                 "--layers", "5"]) == 0
    capsys.readouterr()
    page = (run / "report.html").read_text()
    for section in ("Model card", "Mean-ablation study", "Interpretability scores", "Faithfulness", "Heads",
                    "Heat maps"):
        assert f"<h2>{section}" in page
    for head in (f"L5.H{h}" for h in range(8)):
        assert f"<td>{head}</td>" in page
    assert page.count("data:image/png;base64,") >= 4  # the chart and three heat maps
    # nothing to fetch: every src/href is a data URL
    assert not re.findall(r'(?:src|href)="(?!data:)', page)
    assert "<script" not in page
    # the report names the paper's six models' published scores
    assert "ViT-L-14/laion2b_s32b_b82k" in page
    assert main(["report", str(run), "--out", str(tmp_path / "r.html"), "--images", "1"]) == 0
    assert (tmp_path / "r.html").read_text().count("<figure>") == 1


def test_demo_runs_the_whole_study(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--n", "150"]) == 0
    text = capsys.readouterr().out
    assert "report: " in text and str((out / "report.html").resolve()) in text
    assert "taxonomy:" in text and "confirmed by ablation" in text
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["faithfulness"]) == {"taxonomy", "embedding"}
    with pytest.raises(SystemExit):
        main(["demo", "--n", "abc"])
    assert main(["demo", "--out", str(out), "--n", "10"]) == 2
    assert "at least 50" in capsys.readouterr().err


@pytest.fixture
def labelled_copy(toy_textspan_run, tmp_path):
    src, _ = toy_textspan_run
    run = tmp_path / "run"
    shutil.copytree(src, run)
    return run


def test_label_command_and_errors(labelled_copy, tmp_path, capsys):
    run = labelled_copy
    assert main(["label", str(run)]) == 0  # a tagged pool: taxonomy by default
    out = capsys.readouterr().out
    assert "labels by taxonomy" in out and (run / "labels.json").is_file()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"L7.H0": "color"}))
    assert main(["label", str(run), "--manual", str(bad)]) == 2
    assert "L7.H0" in capsys.readouterr().err
    bare = tmp_path / "bare"
    shutil.copytree(run, bare, ignore=shutil.ignore_patterns("textspan-*.json"))
    assert main(["label", str(bare)]) == 2
    assert "clip-interpret textspan" in capsys.readouterr().err
    assert main(["label", str(tmp_path / "nothing")]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert main(["label", str(run), "--labeller", "llm"]) == 2  # no endpoint configured
    assert "--llm-url" in capsys.readouterr().err


def test_metrics_compares_runs(labelled_copy, tmp_path, capsys):
    other = tmp_path / "other"
    assert main(["label", str(labelled_copy), "--labeller", "embedding", "--encoder", "minilm"]) == 0
    shutil.copytree(labelled_copy, other)
    assert main(["faithfulness", str(labelled_copy)]) == 0
    plain = capsys.readouterr().out
    assert "testable labels confirmed" in plain
    assert main(["faithfulness", str(labelled_copy), "--verdict", "relative", "--min-confidence", "0.9"]) == 0
    strict = capsys.readouterr().out
    import re
    counted = [int(n) for n in re.findall(r"of (\d+) testable labels", plain)]
    kept = [int(n) for n in re.findall(r"of (\d+) testable labels", strict)]
    below = [int(n) for n in re.findall(r"\((\d+) below it counted as abstentions\), relative verdict", strict)]
    assert len(kept) == len(counted) == len(below) == 1  # the embedding labels
    assert [k + b for k, b in zip(kept, below)] == counted  # every label either kept or abstained
    with pytest.raises(SystemExit) as bad:
        main(["faithfulness", str(labelled_copy), "--min-confidence", "1.5"])
    assert bad.value.code == 2 and "--min-confidence: expected a number in [0, 1], got 1.5" in capsys.readouterr().err
    out_dir = tmp_path / "cmp"
    assert main(["metrics", str(labelled_copy), str(other), "--out", str(out_dir)]) == 0
    text = capsys.readouterr().out
    assert "association" in text and "ViT-B-32/openai" in text and "confirmed by ablation" in text
    assert (out_dir / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    rows = json.loads((out_dir / "comparison.json").read_text())
    assert {"run: toy (embedding)", "other: toy (embedding)"} <= set(rows) and len(rows) == 2 + 6
    assert main(["metrics", str(tmp_path / "nothing")]) == 2


def test_textspan_without_the_reconstruction_check(labelled_copy, capsys):
    assert main(["textspan", str(labelled_copy), "--pool", "toy", "--no-check"]) == 0
    result = json.loads((labelled_copy / "textspan-toy.json").read_text())
    assert "reconstruction" not in result and len(result["heads"]) == 48


def test_analyze_a_folder_without_classes(tmp_path, capsys):
    """No zero-shot tasks: the ablation steps say why they cannot run; the rest of the study goes on."""
    from clip_interpret.toyworld import export

    export(tmp_path / "imgs", 20, seed=1, masks=False)
    run = tmp_path / "run"
    assert main(["analyze", "--model", "open_clip:test-vit-tiny", "--images", str(tmp_path / "imgs" / "images"),
                 "--out", str(run)]) == 0
    out = capsys.readouterr().out
    steps = _steps(out)
    assert "not possible here" in steps["ablate"] and "class sub-folders" in steps["ablate"]
    assert "not possible here" in steps["faithfulness"]
    assert steps["textspan"].startswith("done") and "pool general" in steps["textspan"]
    assert "open_clip:test-vit-tiny (taxonomy)" in out  # the run's own row in the printed comparison
    assert "RANDOM" in out and (run / "report.html").is_file()


def test_csv_table_of_labelled_images_gives_one_task_per_property(tmp_path, capsys):
    """Faithfulness on any labelled image collection: a CSV names the images and their properties."""
    from clip_interpret.runstore.sources import open_source
    from clip_interpret.toyworld import export

    export(tmp_path / "set", 80, seed=1, masks=False)  # writes attributes.csv: image, caption, shape, color, ...
    table = tmp_path / "set" / "attributes.csv"
    source = open_source(str(table))
    assert source.kind == "table" and len(source) == 80
    assert source.names[0] == str(tmp_path / "set" / "images" / "000000.png")
    # the free-text caption, the empty mask column and the per-image object lists are not label sets
    assert set(source.labels) == {"shape", "color", "size", "count", "position", "background", "pattern"}
    run = tmp_path / "run"
    assert main(["analyze", "--model", "toy", "--images", str(table), "--out", str(run), "--pool", "toy",
                 "--layers", "5"]) == 0
    capsys.readouterr()
    drops = json.loads((run / "faithfulness.json").read_text())
    assert set(drops["tasks"]) == set(source.labels)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["faithfulness"]["taxonomy"]["testable"] > 0

    bad = tmp_path / "bad.csv"
    bad.write_text("name,color\na.png,red\n")
    assert main(["index", "--model", "toy", "--images", str(bad), "--out", str(tmp_path / "r2")]) == 2
    assert "needs an image column named 'image', 'file', 'path' or 'filename'" in capsys.readouterr().err


def test_a_grown_run_a_new_pool_and_new_labels_rerun_exactly_what_depends_on_them(tmp_path):
    from clip_interpret import load_model
    from clip_interpret.runstore import index_images
    from clip_interpret.study import step_ablate, step_faithfulness, step_label, step_metrics, step_textspan

    model = load_model("toy", device="cpu")
    out = tmp_path / "run"
    partial = index_images(model, "toyworld:150:1", out, layers=[5], shard_size=100, stop_after_shards=1,
                           progress=False)
    assert len(partial) == 100
    ablation, _ = step_ablate(partial, model)
    textspan, path, _ = step_textspan(partial, model, "toy", check=False, progress=False)
    step_label(partial, model, "taxonomy", path, progress=False)
    faith, _ = step_faithfulness(partial, model)
    assert ablation["n_images"] == faith["n_images"] == textspan["run"]["n_images"] == 100
    assert step_ablate(partial, model)[1] is False  # nothing changed: skipped

    grown = index_images(model, "toyworld:150:1", out, layers=[5], shard_size=100, progress=False)
    assert len(grown) == 150
    ablation, ran_ablate = step_ablate(grown, model)
    faith, ran_faith = step_faithfulness(grown, model)
    textspan, path, ran_textspan = step_textspan(grown, model, "toy", check=False, progress=False)
    _, ran_label = step_label(grown, model, "taxonomy", path, progress=False)
    assert ran_ablate and ran_faith and ran_textspan and ran_label
    assert ablation["n_images"] == faith["n_images"] == textspan["run"]["n_images"] == 150

    pool = tmp_path / "colors.txt"
    pool.write_text("color\ta red object\ncolor\ta blue object\ncolor\ta green object\nshape\ta circle\n"
                    "shape\ta square\nshape\ta star\n")
    _, other_path, ran = step_textspan(grown, model, str(pool), m=3, check=False, progress=False)
    assert ran and other_path != path
    assert step_textspan(grown, model, "toy", check=False, progress=False)[2] is False  # the toy one still holds
    metrics, _ = step_metrics(grown)
    manual = tmp_path / "manual.tsv"
    manual.write_text("L5.H0\tposition\n")
    _, relabelled = step_label(grown, model, "taxonomy", path, manual=str(manual), progress=False)
    assert relabelled and step_metrics(grown)[1] is True


def test_an_attention_pooled_tower_goes_through_the_whole_study(tmp_path, capsys):
    """A SigLIP-layout tower (no CLS token, MAP attention pooling, SigLIP's logit bias; random weights)
    through analyze, then the five analyses, ablation by heads (direct and total effects) and the app."""
    import numpy as np

    from clip_interpret.app import core
    from clip_interpret.runstore import open_run
    from clip_interpret.toyworld import generate

    run = tmp_path / "run"
    assert main(["analyze", "--model", "open_clip:test-vit-tiny-map", "--images", "toyworld:150:1", "--out",
                 str(run), "--pool", "toy", "--layers", "all"]) == 0
    steps = _steps(capsys.readouterr().out)
    assert list(steps) == ["index", "ablate", "textspan", "label", "faithfulness", "metrics", "report"]
    assert all(v.startswith("done") for v in steps.values()), steps
    opened = open_run(run)
    assert opened.manifest["model"]["vit"]["pool"] == "map" and "pool_mlp" in opened.layout
    assert len(opened.head_names()) == 12 and np.abs(opened.sum_of_pieces() - opened.embeddings()).max() < 5e-3
    assert "<h2>Heat maps" in (run / "report.html").read_text()
    labels = json.loads((run / "labels.json").read_text())["heads"]
    labelled = [h for h, e in labels.items() if e["label"]]
    assert labelled

    query = tmp_path / "query.png"
    generate(3, seed=4).image.save(query)
    out = tmp_path / "out"
    for command in (["segment", str(run), "--image", str(query), "--text", "a red circle"],
                    ["contrast", str(run), "--run-image", "3", "--text", "a red circle", "--text", "stripes"],
                    ["image-nn", str(run), "--image", str(query), "--head", "L2.H1"],
                    ["text-nn", str(run), "--text", "a blue star", "--head", "L2.H1"],
                    ["property-nn", str(run), "--image", str(query), "--property", labels[labelled[0]]["label"]]):
        assert main([*command, "--out", str(out / command[0])]) == 0, command
        result = json.loads(next((out / command[0]).glob("*.json")).read_text())
        if command[0] == "segment":  # the map covers the 4x4 patch grid: every token is a patch
            assert len(result["maps"][0]["grid"]) == 4 and len(result["maps"][0]["grid"][0]) == 4
    assert main(["ablate", str(run), "--heads", "L2.H1,L1.H0", "--mode", "mean"]) == 0
    assert "total effect" in capsys.readouterr().out

    registry = core.Registry([run])
    gallery, text = core.run_topic_segmentation(registry, "run", 2, "a red circle", "all heads")
    assert len(gallery) == 2 and "share of the similarity" in text


def test_a_hugging_face_siglip_folder_is_indexed_and_analysed(tmp_path):
    """A random-weight Hugging Face SiglipModel saved with its own tokenizer: indexed (SigLIP's squash
    preprocessing recorded in the run), its pieces summing to the stored embeddings, and analysed."""
    import numpy as np

    from clip_interpret.runstore import open_run

    from tests.helpers import make_hf_siglip
    from tests.helpers import tiny_tokenizer

    folder = tmp_path / "siglip"
    make_hf_siglip(seed=2).save_pretrained(folder)
    tiny_tokenizer(folder)
    run = tmp_path / "run"
    assert main(["index", "--model", f"hf:{folder}", "--images", "toyworld:24:1", "--out", str(run),
                 "--layers", "all", "--storage", "fp32", "--workers", "0"]) == 0
    opened = open_run(run)
    assert opened.manifest["preprocess"]["resize_mode"] == "squash" and "pool_mlp" in opened.layout
    assert np.abs(opened.sum_of_pieces() - opened.embeddings()).max() < 1e-5
    out = tmp_path / "out"
    for command in (["segment", str(run), "--run-image", "2", "--text", "a red square"],
                    ["text-nn", str(run), "--text", "a blue circle", "--head", "L1.H2"]):
        assert main([*command, "--out", str(out / command[0])]) == 0, command
        assert next((out / command[0]).glob("*.json")).is_file()


def test_a_label_step_that_labelled_nothing_keeps_the_labels_in_force(tmp_path, monkeypatch):
    """analyze's label step, like ``label``: a labeller whose every head failed (a dead LLM server)
    writes its own file but does not replace the run's labels.json."""
    import clip_interpret.labels.runs as label_runs
    from clip_interpret.study import step_label

    class FakeRun:
        path = tmp_path

    textspan = tmp_path / "textspan-toy.json"
    textspan.write_text("{}")
    good = {"labeller": "taxonomy", "heads": {"L0.H0": {"label": "color"}}, "failed": {}}
    (tmp_path / "labels.json").write_text(json.dumps(good))
    failed = {"labeller": "llm", "heads": {"L0.H0": {"label": None, "error": "no answer within 5 s"}},
              "failed": {"L0.H0": "no answer within 5 s"}, "kept": {}}
    monkeypatch.setattr(label_runs, "label_run", lambda *a, **k: dict(failed))
    result, computed = step_label(FakeRun(), None, "llm", textspan, progress=False)
    assert computed and result["failed"]
    assert json.loads((tmp_path / "labels.json").read_text()) == good
    assert json.loads((tmp_path / "labels-llm.json").read_text())["failed"] == failed["failed"]
    # a step that labelled something does replace it
    monkeypatch.setattr(label_runs, "label_run", lambda *a, **k: {**good, "labeller": "embedding"})
    step_label(FakeRun(), None, "embedding", textspan, progress=False)
    assert json.loads((tmp_path / "labels.json").read_text())["labeller"] == "embedding"
