"""TextSpan equals the published algorithm; pools; the text-embedding cache; the CLI commands."""

import json
import warnings

import numpy as np
import pytest

from clip_interpret import load_model
from clip_interpret.cli import main
from clip_interpret.errors import ClipInterpretError
from clip_interpret.runstore import index_images
from clip_interpret.pools import Pool, load_pool, parse_pool_lines, text_embeddings
from clip_interpret.textspan import textspan, textspan_run


def published(data, text_features, iters, rank):
    """The published steps, written plainly (SVD, projection, centring, greedy removal).

    Returns the picks, the reconstruction, and for each pick the variance of the remaining data
    along the picked (unit) direction and the head's total variance (both with ddof=1)."""
    data = np.asarray(data, dtype=np.float64)
    _, _, vh = np.linalg.svd(data, full_matrices=False)
    vh = vh[:rank]
    text_features = vh.T.dot(np.linalg.inv(vh.dot(vh.T)).dot(vh)).dot(text_features.T).T
    mean = data.mean(axis=0, keepdims=True)
    data = data - mean
    total = data.var(axis=0, ddof=1).sum()
    reconstruct = np.repeat(mean, data.shape[0], axis=0)
    picks, variances = [], []
    for _ in range(iters):
        projection = data @ text_features.T
        top = int(np.argmax(projection.std(axis=0)))
        picks.append(top)
        t = text_features[top]
        norm = t @ t
        variances.append((data @ t / np.sqrt(norm)).var(ddof=1))
        part = np.outer(data @ t / norm, t)
        reconstruct = reconstruct + part
        data = data - part
        text_features = text_features - np.outer(text_features @ t / norm, t)
    return picks, reconstruct, np.asarray(variances), total


def random_problem(seed, k=600, d=64, m_texts=300, structured=True):
    rng = np.random.default_rng(seed)
    texts = rng.normal(size=(m_texts, d))
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    if structured:  # contributions that really lie along a few texts, plus noise
        weights = rng.normal(size=(k, 6)) * np.array([3, 2.5, 2, 1.5, 1, 0.5])
        data = weights @ texts[rng.choice(m_texts, 6, replace=False)] + 0.05 * rng.normal(size=(k, d))
    else:
        data = rng.normal(size=(k, d)) @ rng.normal(size=(d, d)) * 0.1
    return (data + rng.normal(size=d)).astype(np.float32), texts


@pytest.mark.parametrize("seed, rank, m, structured, d", [
    (0, 40, 10, True, 64), (1, 64, 20, False, 64), (2, 8, 5, True, 64), (3, 20, 20, False, 64),
    (4, 80, 10, True, 512), (5, 80, 20, False, 512), (6, 80, 20, True, 768), (7, 80, 10, False, 768)])
def test_same_picks_in_the_same_order_as_the_published_steps(seed, rank, m, structured, d):
    """At the toy's width and at the joint-space widths of ViT-B (512) and ViT-L (768), the paper's rank 80."""
    data, texts = random_problem(seed, structured=structured, d=d)
    names = [f"t{i}" for i in range(len(texts))]
    expected, expected_recon, variances, total = published(data, texts, m, rank)
    ours = textspan(data, texts, names, m=m, rank=rank, keep_reconstruction=True)
    assert ours.indices == expected
    assert ours.texts == [names[i] for i in expected]
    assert np.allclose(ours.reconstruct(), expected_recon, atol=1e-3)  # float32 Gram vs float64 SVD
    assert np.allclose(ours.total_variance, total, rtol=1e-4)
    assert np.allclose(ours.variance, variances, rtol=1e-4, atol=1e-6 * total)  # float32 data
    assert np.allclose(ours.explained, variances / total, rtol=1e-4, atol=1e-6)
    # each pick removes its own direction: the shares are proper parts of the head's variance
    assert all(0 <= e <= 1 for e in ours.explained) and sum(ours.explained) <= 1 + 1e-6


def test_structured_heads_are_explained_by_their_texts():
    data, texts = random_problem(5, structured=True)
    result = textspan(data, texts, [str(i) for i in range(len(texts))], m=6, rank=32)
    assert sum(result.explained) > 0.9  # six texts carry the head
    assert result.explained[0] > result.explained[-1]


def test_reconstruction_improves_with_m():
    data, texts = random_problem(6)
    result = textspan(data, texts, [str(i) for i in range(len(texts))], m=10, rank=40, keep_reconstruction=True)
    errors = [np.linalg.norm(result.reconstruct(k) - data) for k in range(11)]
    assert np.allclose(result.reconstruct(0), data.mean(axis=0, keepdims=True).repeat(len(data), 0), atol=1e-5)
    assert all(a >= b - 1e-6 for a, b in zip(errors, errors[1:])) and errors[-1] < 0.5 * errors[0]


def test_rank_clamp_and_input_errors():
    data, texts = random_problem(7, k=30, d=64)
    names = [str(i) for i in range(len(texts))]
    with pytest.warns(UserWarning, match="rank 80 is larger than the data allows .*using rank 30"):
        result = textspan(data, texts, names, m=3, rank=80)
    assert result.rank == 30
    with pytest.raises(ClipInterpretError, match="fewer than m=5"):
        textspan(data, texts[:4], names[:4], m=5)
    with pytest.raises(ClipInterpretError, match="m must be at least 1"):
        textspan(data, texts, names, m=0)
    with pytest.raises(ClipInterpretError, match="at least 2 images"):
        textspan(data[:1], texts, names, m=1)


def test_pool_files(tmp_path):
    path = tmp_path / "pool.txt"
    path.write_text("colors\tA red image\nA photo of a dog\n\n  \nshapes\tA circle\n")
    with pytest.warns(UserWarning, match="skipped 2 empty line"):
        pool = load_pool(str(path))
    assert pool.texts == ["A red image", "A photo of a dog", "A circle"]
    assert pool.categories == ["colors", None, "shapes"] and not pool.tagged
    with pytest.raises(ClipInterpretError, match="pool not found"):
        load_pool(str(tmp_path / "nope.txt"))
    with pytest.raises(ClipInterpretError, match="no descriptions"):
        parse_pool_lines(["\n", "\n"], "empty")
    with pytest.warns(UserWarning, match="duplicate"):
        parse_pool_lines(["a\n", "a\n"], "dups")


def test_builtin_pools():
    general = load_pool("general")
    assert len(set(general.texts)) >= 3000 and general.tagged
    categories = set(general.categories)
    assert len(categories) >= 25
    for needed in ("colors", "animals", "locations_geography", "weather", "emotions", "text_letters"):
        assert needed in categories
    toy = load_pool("toy")
    assert toy.tagged and {"color", "shape", "pattern"} <= set(toy.categories)


def test_text_embeddings_are_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIP_INTERPRET_CACHE", str(tmp_path / "cache"))
    model = load_model("open_clip:test-vit-tiny")
    pool = Pool("p", ["a red square", "a dog", "stripes"], [None] * 3)
    first = text_embeddings(model, pool)
    calls = []
    monkeypatch.setattr(model, "encode_text", lambda *a, **k: calls.append(1))
    second = text_embeddings(model, pool)
    assert not calls and np.array_equal(first, second)
    assert len(list((tmp_path / "cache" / "text").glob("*.npy"))) == 1


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    model = load_model("open_clip:test-vit-tiny")
    out = tmp_path_factory.mktemp("runs") / "toy"
    index_images(model, "toyworld:120:1", out, progress=False)
    return out


def test_textspan_run_and_reconstruction_check(tiny_run, monkeypatch, tmp_path):
    monkeypatch.setenv("CLIP_INTERPRET_CACHE", str(tmp_path / "cache"))
    from clip_interpret.runstore import open_run

    model = load_model("open_clip:test-vit-tiny")
    run = open_run(tiny_run, model)
    pool = load_pool("toy")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = textspan_run(run, model, pool, m=3, rank=16, check_ms=[1, 3], progress=False)
    assert len(result["heads"]) == len(run.layers) * run.n_heads
    head = result["heads"]["L2.H1"]
    assert len(head["texts"]) == 3 and all(c in {"color", "shape", "size", "count", "position", "background",
                                                  "pattern"} for c in head["categories"])
    expected = textspan(run.heads(2, 1), text_embeddings(model, pool), pool.texts, m=3, rank=16)
    assert head["texts"] == expected.texts
    table = result["reconstruction"]["accuracy"]
    assert set(table) == {"full", "heads mean-ablated (m=0)", "m=1", "m=3"}
    assert set(table["full"]) == {"shape", "color", "size", "count", "position", "background", "pattern", "mean"}


def test_ablate_and_textspan_commands(tiny_run, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("CLIP_INTERPRET_CACHE", str(tmp_path / "cache"))
    assert main(["ablate", str(tiny_run)]) == 0
    out = capsys.readouterr().out
    assert "MLPs mean-ablated" in out and "attention 0-2 mean-ablated" in out
    saved = json.loads((tiny_run / "ablation.json").read_text())
    assert saved["n_images"] == 120
    # the "full" row against the model's own forward on the same 120 images (toyworld's evaluation,
    # not the run's stored pieces; fp16 storage may flip a near-tie)
    from clip_interpret.toyworld.evaluate import heldout_embeddings, zero_shot
    model = load_model("open_clip:test-vit-tiny")
    embs, labels, _ = heldout_embeddings(model, n=120, seed=1, workers=0)
    direct = zero_shot(model, embs, labels)
    for prop, row in direct.items():
        assert abs(saved["accuracy"]["full"][prop] - row["accuracy"]) <= 2 / 120, prop
    assert main(["textspan", str(tiny_run), "--pool", "toy", "--m", "2", "--rank", "8"]) == 0
    assert (tiny_run / "textspan-toy.json").is_file()
    assert main(["textspan", str(tiny_run), "--pool", "toy", "--m", "500"]) == 2
    assert "fewer than m=500" in capsys.readouterr().err
    assert main(["textspan", str(tiny_run), "--model", "open_clip:test-vit-tiny-ls"]) == 2
    assert "other weights" in capsys.readouterr().err


@pytest.mark.parametrize("folders, task, expected", [
    (("n01440764", "n01443537"), "imagenet", [0, 1]),  # ImageNet synsets: tench, goldfish
    (("tench", "goldfish"), "imagenet", [0, 1]),  # ImageNet class names
    (("my_cats", "my_dogs"), "class", [0, 1]),  # anything else: the folder names
])
def test_zero_shot_tasks_for_folders(tmp_path, monkeypatch, folders, task, expected):
    from PIL import Image

    from clip_interpret.ablation import ablation_study, zero_shot_tasks

    monkeypatch.setenv("CLIP_INTERPRET_CACHE", str(tmp_path / "cache"))
    for name in folders:
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (32, 32), (40 * i, 90, 200)).save(tmp_path / "imgs" / name / f"{i}.png")
    model = load_model("open_clip:test-vit-tiny")
    run = index_images(model, str(tmp_path / "imgs"), tmp_path / "run", progress=False)
    tasks = zero_shot_tasks(run, model)
    assert [t.name for t in tasks] == [task]
    assert sorted(set(tasks[0].labels.tolist())) == expected
    assert len(tasks[0].class_names) == (998 if task == "imagenet" else 2)
    result = ablation_study(run, model)
    assert result["tasks"] == [task] and 0 <= result["accuracy"]["full"][task] <= 1


@pytest.mark.parametrize("folders", [("n03773504", "n04008634", "n04355933", "n04356056"),  # synsets
                                     ("missile", "sunglasses")])  # names
def test_imagenet_classes_named_alike_are_one_class(tmp_path, monkeypatch, folders):
    """open_clip names classes 657 and 744 "missile", 836 and 837 "sunglasses": each pair is one class."""
    from PIL import Image

    from clip_interpret.ablation import zero_shot_tasks

    monkeypatch.setenv("CLIP_INTERPRET_CACHE", str(tmp_path / "cache"))
    for name in folders:
        (tmp_path / "imgs" / name).mkdir(parents=True)
        Image.new("RGB", (32, 32), (90, 90, 200)).save(tmp_path / "imgs" / name / "0.png")
    model = load_model("open_clip:test-vit-tiny")
    run = index_images(model, str(tmp_path / "imgs"), tmp_path / "run", progress=False)
    (task,) = zero_shot_tasks(run, model)
    assert len(task.class_names) == len(set(task.class_names)) == 998
    names = [task.class_names[i] for i in task.labels]
    assert names == (["missile", "missile", "sunglasses", "sunglasses"] if len(folders) == 4
                     else ["missile", "sunglasses"])
    # an image that looks exactly like its class's prompts is predicted right, whichever synset it is
    assert ((task.classes[task.labels] @ task.classes.T).argmax(axis=1) == task.labels).all()


def test_ablation_needs_labels(tmp_path):
    from PIL import Image

    from clip_interpret.ablation import zero_shot_tasks

    (tmp_path / "flat").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "flat" / "a.png")
    model = load_model("open_clip:test-vit-tiny")
    run = index_images(model, str(tmp_path / "flat"), tmp_path / "run", progress=False)
    with pytest.raises(ClipInterpretError, match="no labels to classify"):
        zero_shot_tasks(run, model)
