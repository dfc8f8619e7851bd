"""TextSpan from statistics streamed shard by shard equals TextSpan on the whole matrix in memory."""

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


def _published_textspan(data, texts, m, rank):
    """The published loop, written out on the data itself (no Gram matrix, no subspace coordinates):
    texts projected onto the top-``rank`` right singular vectors of the uncentred data, the data
    centred, then m times: the text with the largest projection variance is picked, its component
    is moved from the data into the reconstruction, and the other texts are orthogonalised to it."""
    data = np.asarray(data, np.float64)
    _, _, vh = np.linalg.svd(data, full_matrices=False)
    texts = np.asarray(texts, np.float64) @ vh[:rank].T @ vh[:rank]
    mean = data.mean(axis=0)
    rest = data - mean
    rebuilt = [np.repeat(mean[None], len(data), axis=0)]
    picks = []
    for _ in range(m):
        top = int(np.argmax((rest @ texts.T).var(axis=0)))
        a = texts[top]
        part = np.outer(rest @ a, a) / (a @ a)
        rest = rest - part
        rebuilt.append(rebuilt[-1] + part)
        texts = texts - np.outer(texts @ a, a) / (a @ a)
        picks.append(top)
    return picks, rebuilt


def test_textspan_and_its_reconstructions_equal_the_published_loop_on_the_data(run_and_model):
    run, model = run_and_model
    pool = load_pool("toy")
    texts = text_embeddings(model, pool)
    for layer, head in ((2, 1), (0, 3)):
        data = run.heads(layer, head)
        rank = run.dim  # the full rank: a cut inside the noise floor would make the subspace arbitrary
        picks, rebuilt = _published_textspan(data, texts, m=5, rank=rank)
        full = textspan(data, texts, pool.texts, m=5, rank=rank, keep_reconstruction=True)
        c = data.astype(np.float64)
        stats = textspan_from_gram(c.T @ c, c.mean(axis=0), len(c), texts, pool.texts, m=5, rank=rank)
        assert full.indices == picks and stats.indices == picks
        scale = np.abs(c).max()
        for m in (0, 1, 3, 5):
            assert np.allclose(full.reconstruct(m), rebuilt[m], atol=1e-6 * scale)
            assert np.allclose(stats.reconstruct(m, data=data), rebuilt[m], atol=1e-6 * scale)
