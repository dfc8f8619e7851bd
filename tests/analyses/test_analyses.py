"""The five analyses against brute-force numpy computations, and their errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from clip_interpret import analyses as A
from clip_interpret import decompose, load_model
from clip_interpret.errors import ClipInterpretError
from clip_interpret.runstore import index_images
from clip_interpret.toyworld import generate

LABELS = {"labeller": "manual", "heads": {
    "L5.H3": {"label": "Colours", "source": "manual"},
    "L4.H1": {"label": "color", "source": "manual"},
    "L3.H0": {"label": "shape", "source": "manual"},
    "L2.H2": {"label": None, "source": "manual"},
}}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model(toy_model):
    return toy_model


@pytest.fixture(scope="module")
def run(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("analyses") / "run"
    run = index_images(model, "toyworld:300:1", path, shard_size=128, progress=False)  # 3 shards, fp16
    (path / "labels.json").write_text(json.dumps(LABELS))
    return run


def _query_heads(model, run, image):
    """The query image's head contributions [L, H, D], computed independently."""
    return decompose(model, [image], layers=run.layers).heads[0].numpy()


def _brute(matrix, query, k):
    scores = matrix.astype(np.float64) @ query.astype(np.float64)
    order = np.argsort(-scores, kind="stable")[:k]
    return order, scores[order]


def test_image_neighbours_match_brute_force(model, run):
    image = generate(17, seed=1).image
    result = A.image_neighbours(model, run, image, "L5.H3")
    q = _query_heads(model, run, image)[run.layers.index(5), 3]
    order, scores = _brute(run.heads(5, 3), q, 8)
    assert list(result.indices) == list(order) and len(result.images) == 8
    assert np.allclose(result.scores, scores, rtol=1e-4, atol=1e-7)
    assert result.names == [run.names[i] for i in order]
    # the query image itself: its own score is its squared norm (up to fp16 storage)
    indices, scores = A.ContributionStore(run).search(["L5.H3"], q, k=len(run))  # the whole ranking
    assert scores[list(indices).index(17)] == pytest.approx(float(q @ q), rel=2e-3)


def test_image_neighbours_query_comes_first_by_cosine(model, run):
    for index in (3, 150, 299):  # across shards
        result = A.image_neighbours(model, run, index, "L4.H1", metric="cosine")
        assert result.indices[0] == index and result.scores[0] == pytest.approx(1.0, abs=1e-3)


def test_a_set_of_heads_is_the_sum_of_their_contributions(model, run):
    image = generate(5, seed=1).image
    result = A.image_neighbours(model, run, image, ["L5.H3", "L2.H0"], k=5)
    q = _query_heads(model, run, image)
    query = q[run.layers.index(5), 3] + q[run.layers.index(2), 0]
    order, scores = _brute(run.heads(5, 3) + run.heads(2, 0), query, 5)
    assert list(result.indices) == list(order) and np.allclose(result.scores, scores, rtol=1e-4, atol=1e-7)
    assert result.heads == ["L2.H0", "L5.H3"]


def test_text_neighbours_match_brute_force(model, run):
    text = "a large red star"
    result = A.text_neighbours(model, run, text, "L4.H1")
    t = model.encode_text([text])[0].numpy()
    order, scores = _brute(run.heads(4, 1), t, 3)
    assert list(result.indices) == list(order) and np.allclose(result.scores, scores, rtol=1e-4, atol=1e-7)
    everything = A.text_neighbours(model, run, text, "all", k=4)
    order, _ = _brute(run.all_heads().sum(axis=(1, 2)), t, 4)
    assert list(everything.indices) == list(order)


def test_property_neighbours_use_the_mean_of_the_property_heads(model, run):
    image = generate(40, seed=1).image
    result = A.property_neighbours(model, run, image, "colours")  # normalised to "color"
    assert result.property == "color" and result.heads == ["L4.H1", "L5.H3"] and len(result.indices) == 4
    q = _query_heads(model, run, image)
    query = (q[run.layers.index(5), 3] + q[run.layers.index(4), 1]) / 2
    order, scores = _brute((run.heads(5, 3) + run.heads(4, 1)) / 2, query, 4)
    assert list(result.indices) == list(order) and np.allclose(result.scores, scores, rtol=1e-4, atol=1e-7)


def test_store_caches_and_reads_across_shards(run):
    store = A.ContributionStore(run)
    a = store.matrix(["L3.H2"])
    assert store.matrix(["L3.H2"]) is a and np.array_equal(a, run.heads(3, 2))
    both = store.matrix(["L3.H2", "L5.H7"], reduce="mean")
    assert np.allclose(both, (run.heads(3, 2) + run.heads(5, 7)) / 2, atol=1e-6)
    tiny = A.ContributionStore(run, max_bytes=a.nbytes)  # room for one matrix: the oldest is evicted
    first = tiny.matrix(["L3.H2"])
    tiny.matrix(["L4.H2"])
    assert tiny.matrix(["L3.H2"]) is not first


def test_top_k_is_exact_with_ties_and_small_inputs():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, size=1000).astype(np.float32)
    idx = A.top_k(scores, 10)
    assert np.all(np.diff(scores[idx]) <= 0) and scores[idx].min() >= np.sort(scores)[-10]
    assert list(A.top_k(np.array([0.5, 2.0], np.float32), 5)) == [1, 0]


def test_approximate_index_recall(model, run):
    pytest.importorskip("faiss")  # the optional `ann` extra
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(50, 32)).astype(np.float32)
    matrix = centres[rng.integers(0, 50, 20000)] + 0.3 * rng.normal(size=(20000, 32)).astype(np.float32)
    queries = matrix[rng.choice(20000, 30, replace=False)] + 0.05
    index = A.ApproximateIndex(matrix)
    exact = np.stack([A.top_k(matrix @ q, 10) for q in queries])
    approx = np.stack([index.search(q, 10)[0] for q in queries])
    assert A.recall_at_k(exact, approx) >= 0.9
    assert A.recall_at_k(exact, exact) == 1.0
    store = A.ContributionStore(run, approximate=True, ann_min_rows=100)  # the run is served approximately
    result = A.image_neighbours(model, run, 42, "L5.H3", metric="cosine", store=store)
    assert result.indices[0] == 42 and len(result.indices) == 8


def test_topic_segmentation_all_heads_is_the_sum_over_heads(model, run):
    image, text = generate(9, seed=1).image, "a blue circle"
    every = A.topic_segmentation(model, image, text, "all", run=run)
    assert every.heads_label == "all heads" and len(every.heads) == len(run.layers) * run.n_heads
    d = decompose(model, [image], layers=run.layers, spatial=True)
    t = model.encode_text([text])[0]
    per_head = torch.einsum("lthd,d->lht", d.head_tokens[0], t)[..., 1:]  # [L, H, patches]
    grid = per_head.sum((0, 1)).reshape(d.grid).numpy()
    assert np.allclose(every.grid[0], grid, atol=1e-6)
    assert every.maps.shape == (1, *model.vit.cfg.image_size) and every.image.size == (64, 64)
    assert every.shares[0] == pytest.approx(float(d.head_similarity(t)[0].sum()), abs=1e-5)
    pair = A.topic_segmentation(model, image, text, "L5.H3,L3.H1", run=run)
    one = A.topic_segmentation(model, image, text, "L5.H3", run=run)
    other = A.topic_segmentation(model, image, text, ["L3.H1"], run=run)
    assert np.allclose(pair.grid, one.grid + other.grid, atol=1e-6)
    assert np.allclose(one.grid[0], per_head[run.layers.index(5), 3].reshape(d.grid).numpy(), atol=1e-6)


def test_contrastive_maps_are_exact_negatives_on_one_scale(model, run):
    image = generate(21, seed=1).image
    result = A.contrastive_segmentation(model, image, "a red square", "a green background", "all", run=run)
    a_minus_b, b_minus_a = result.maps
    assert np.array_equal(b_minus_a, -a_minus_b)
    assert result.vmax == pytest.approx(float(np.abs(a_minus_b).max()))
    a = A.topic_segmentation(model, image, "a red square", "all", run=run)
    b = A.topic_segmentation(model, image, "a green background", "all", run=run)
    assert np.allclose(result.grid[0], a.grid[0] - b.grid[0], atol=1e-6)
    single = A.contrastive_segmentation(model, image, "a red square", "a green background", "L4.H6", run=run)
    assert single.heads == ["L4.H6"] and not np.allclose(single.grid, result.grid)


def test_run_images_of_a_folder_run(model, tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    for i, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        Image.new("RGB", (80, 60), colour).save(root / f"{i}.png")
    run = index_images(model, str(root), tmp_path / "run", progress=False)
    assert np.array_equal(np.asarray(A.run_image(run, 1)), np.asarray(Image.open(root / "1.png").convert("RGB")))
    result = A.image_neighbours(model, run, 2, "L5.H0", k=3, metric="cosine")
    assert result.indices[0] == 2 and result.images[0].size == (64, 64)
    with pytest.raises(ClipInterpretError, match="no image 3"):
        A.run_image(run, 3)


def test_renderers_write_pngs(model, run, tmp_path):
    neighbours = A.text_neighbours(model, run, "a yellow triangle", "L5.H3")
    segmentation = A.contrastive_segmentation(model, 4, "stripes", "dots", run=run)
    for name, result in (("nn", neighbours), ("seg", segmentation)):
        image = A.render(result, tmp_path / f"{name}.png")
        assert Image.open(tmp_path / f"{name}.png").size == image.size and image.size[0] > 300
        json.dumps(result.to_dict())
    shown = A.overlay(segmentation.image, segmentation.maps[0], segmentation.vmax, size=200)
    assert shown.size == (200, 200)


def test_a_huge_k_is_capped_with_a_warning_and_drawn_as_a_grid(model, run):
    with pytest.warns(UserWarning, match=f"k=100000000 is more than {A.MAX_K}.*showing the top {A.MAX_K}"):
        result = A.image_neighbours(model, run, 3, "L4.H1", k=100_000_000)
    assert len(result.indices) == len(result.images) == A.MAX_K
    image = A.render(result)
    assert image.size[0] <= 2000 and image.size[1] > image.size[0]  # rows of at most 9 tiles
    with pytest.warns(UserWarning, match=r"k=50 is more than 20 \(the run has 20 images\); showing the top 20"):
        assert A.check_k(50, n=20) == 20
    with pytest.raises(ClipInterpretError, match="k must be a whole number"):
        A.check_k("many")


def test_scores_print_with_enough_digits_to_rank():
    assert A.format_scores([0.00104, 0.00101, 0.00098]) == ["+0.00104", "+0.00101", "+0.00098"]
    assert A.format_scores([0.501234, 0.501239, -2]) == ["+0.50123", "+0.50124", "-2"]
    assert A.format_scores([0.25, 0.25]) == ["+0.25", "+0.25"]  # equal scores stay equal


def test_figure_titles_name_every_head(run):
    heads = [f"L{layer}.H{h}" for layer in (4, 5) for h in range(8)] + ["L3.H0"]
    result = A.Neighbours("property", "query", heads, np.arange(4), np.full(4, 0.001, np.float32),
                          ["a"] * 4, [Image.new("RGB", (64, 64))] * 4, Image.new("RGB", (64, 64)), "color")
    title = A._figure(result)._suptitle.get_text()
    assert all(head in title for head in heads) and "property 'color'" in title


def test_errors_are_clear(model, run, tmp_path):
    with pytest.raises(ClipInterpretError, match="cannot read image"):
        A.image_neighbours(model, run, b"this is not an image", "L5.H3")
    with pytest.raises(ClipInterpretError, match="text is empty"):
        A.text_neighbours(model, run, "   ", "L5.H3")
    with pytest.raises(ClipInterpretError, match="second text is empty"):
        A.contrastive_segmentation(model, 0, "a cat", "", run=run)
    with pytest.raises(ClipInterpretError, match=r"no head .* carries the property 'animals'.*color, shape"):
        A.property_neighbours(model, run, 0, "animals")
    with pytest.raises(ClipInterpretError, match=r"L0.H1 is outside the analysed layers \[2, 3, 4, 5\]"):
        A.image_neighbours(model, run, 0, "L0.H1")
    with pytest.raises(ClipInterpretError, match=r"L1.H0 is outside the analysed layers"):
        A.topic_segmentation(model, 0, "a cat", ["L5.H3", "L1.H0"], run=run)
    with pytest.raises(ClipInterpretError, match="heads 0-7"):
        A.text_neighbours(model, run, "a cat", "L5.H9")
    with pytest.raises(ClipInterpretError, match="bad head name"):
        A.text_neighbours(model, run, "a cat", "head five")
    with pytest.raises(ClipInterpretError, match="no image 300"):
        A.image_neighbours(model, run, 300, "L5.H3")
    with pytest.raises(ClipInterpretError, match="k must be at least 1"):
        A.text_neighbours(model, run, "a cat", "L5.H3", k=0)
    unlabelled = index_images(model, "toyworld:20:1", tmp_path / "bare", progress=False)
    with pytest.raises(ClipInterpretError, match="clip-interpret label"):
        A.property_neighbours(model, unlabelled, 0, "color")
    other = load_model("open_clip:test-vit-tiny")
    with pytest.raises(ClipInterpretError, match="other weights"):
        A.image_neighbours(other, run, 0, "L5.H3")
