"""TextSpan from statistics streamed shard by shard equals TextSpan on the whole matrix in memory."""

import warnings

import numpy as np
import pytest

from clip_interpret import load_model
from clip_interpret.runstore import index_images
from clip_interpret.pools import load_pool, text_embeddings
from clip_interpret.textspan import head_statistics, textspan, textspan_from_gram, textspan_run


@pytest.fixture(scope="module")
def run_and_model(tmp_path_factory):
    model = load_model("open_clip:test-vit-tiny", device="cpu")
    run = index_images(model, "toyworld:300:2", tmp_path_factory.mktemp("runs") / "r", shard_size=64,
                       storage="fp32", progress=False)
    return run, model


def test_statistics_streamed_in_head_groups_equal_the_in_memory_ones(run_and_model):
    run, _ = run_and_model
    assert len(run.shards) == 5
    names = run.head_names()
    tiny = 3 * run.dim * run.dim * 8  # three heads' Gram matrices per pass: several passes
    for index, gram, total in head_statistics(run, max_bytes=tiny):
        layer, head = map(int, names[index][1:].split(".H"))
        data = run.heads(layer, head).astype(np.float64)
        assert np.allclose(gram, data.T @ data, rtol=1e-10, atol=1e-12)
        assert np.allclose(total, data.sum(axis=0), rtol=1e-10, atol=1e-12)


def test_streamed_textspan_picks_and_figures_equal_the_in_memory_ones(run_and_model):
    run, model = run_and_model
    pool = load_pool("toy")
    texts = text_embeddings(model, pool)
    # the full rank: a cut inside the noise floor makes the top-r subspace (so the figures) arbitrary
    rank = run.dim
    streamed = textspan_run(run, model, pool, m=4, rank=rank, check_ms=[], progress=False)
    for name, head in streamed["heads"].items():
        layer, h = map(int, name[1:].split(".H"))
        expected = textspan(run.heads(layer, h), texts, pool.texts, m=4, rank=rank)
        assert head["indices"] == expected.indices
        assert np.allclose(head["variance"], expected.variance, rtol=1e-6)
        assert np.allclose(head["explained"], expected.explained, rtol=1e-6)


def test_reconstruction_from_statistics_equals_the_in_memory_reconstruction(run_and_model):
    run, model = run_and_model
    pool = load_pool("toy")
    data = run.heads(2, 1)
    texts = text_embeddings(model, pool)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = textspan(data, texts, pool.texts, m=5, rank=20, keep_reconstruction=True)
        c = data.astype(np.float64)
        stats = textspan_from_gram(c.T @ c, c.mean(axis=0), len(c), texts, pool.texts, m=5, rank=20)
    for m in (0, 1, 3, 5):
        assert np.allclose(stats.reconstruct(m, data=data), full.reconstruct(m), atol=1e-6)
