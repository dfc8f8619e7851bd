"""Search over runs larger than memory: streamed exact search, and FAISS indexes stored in the run."""

import errno
import json
import sys

import numpy as np
import pytest

from clip_interpret import analyses as A
from clip_interpret import search
from clip_interpret.runstore import index_images, open_run

pytestmark = pytest.mark.usefixtures("one_torch_thread")
N = 1500


@pytest.fixture(scope="module")
def run(toy_model, tmp_path_factory):
    return index_images(toy_model, f"toyworld:{N}:1", tmp_path_factory.mktemp("search") / "run", shard_size=200,
                        progress=False)


def _queries(run, heads, n=20, seed=0):
    """Image-like queries (rows of the head set) and text-like ones (random directions)."""
    rng = np.random.default_rng(seed)
    matrix = A.ContributionStore(run).matrix(heads)
    return np.concatenate([matrix[rng.choice(len(run), n, replace=False)],
                           rng.normal(size=(n, run.dim)).astype(np.float32)])


@pytest.mark.parametrize("heads, reduce, metric", [(["L5.H3"], "sum", "dot"), (["L5.H3", "L2.H0"], "mean", "cosine"),
                                                   (["L4.H1", "L4.H2", "L4.H3"], "sum", "cosine")])
def test_streamed_exact_search_equals_the_in_memory_search(run, heads, reduce, metric):
    cached = A.ContributionStore(run)
    streamed = A.ContributionStore(run, max_bytes=0)  # nothing fits: scored shard by shard
    for query in _queries(run, heads, n=5):
        idx, scores = streamed.search(heads, query, 10, reduce, metric)
        expected_idx, expected = cached.search(heads, query, 10, reduce, metric)
        assert list(idx) == list(expected_idx) and np.allclose(scores, expected, rtol=1e-5, atol=1e-7)


def _recall(run, store, heads, metric):
    exact = A.ContributionStore(run)
    queries = _queries(run, heads)
    truth = np.stack([exact.search(heads, q, 8, metric=metric)[0] for q in queries])
    found = np.stack([store.search(heads, q, 8, metric=metric)[0] for q in queries])
    return A.recall_at_k(truth, found)


def test_the_index_is_built_on_demand_stored_with_its_inputs_and_reused(run, monkeypatch):
    store = A.ContributionStore(run, approximate=True, ann_min_rows=1000)
    assert _recall(run, store, ["L5.H3"], "cosine") >= 0.95
    (stamp,) = (run.path / "search").glob("*.json")
    recorded = json.loads(stamp.read_text())
    assert recorded["heads"] == ["L5.H3"] and recorded["metric"] == "cosine" and recorded["rows"] == N
    assert recorded["kind"].endswith(",SQ8") and recorded["fingerprint"] == run.manifest["model"]["fingerprint"]
    assert stamp.with_suffix(".faiss").is_file()

    def no_build(self):
        raise AssertionError("the stored index should have been reused")

    monkeypatch.setattr(search.RunIndex, "_build", no_build)
    again = A.ContributionStore(run, approximate=True, ann_min_rows=1000)  # a new process, say
    assert _recall(run, again, ["L5.H3"], "cosine") >= 0.95


def test_product_quantised_codes_with_exact_reranking(run, monkeypatch):
    monkeypatch.setattr(search, "PQ_FROM_ROWS", 0)  # the kind used from a million rows on
    store = A.ContributionStore(run, approximate=True, ann_min_rows=1000)
    heads = ["L5.H3", "L5.H1"]
    assert _recall(run, store, heads, "dot") >= 0.95
    index = store._large._indexes[(tuple(sorted(heads)), "sum", "dot")]
    assert ",PQ" in index.kind and index.index.ntotal == N
    idx, scores = store.search(heads, _queries(run, heads)[0], 8)
    exact = A.ContributionStore(run).matrix(heads)[idx] @ _queries(run, heads)[0]
    assert np.allclose(scores, exact, rtol=1e-5, atol=1e-6)  # the scores are exact


def test_an_index_of_an_older_state_of_the_run_is_rebuilt(toy_model, tmp_path):
    out = tmp_path / "run"
    index_images(toy_model, "toyworld:600:2", out, shard_size=100, progress=False, stop_after_shards=3)
    partial = open_run(out)
    A.ContributionStore(partial, approximate=True, ann_min_rows=100).search(["L5.H3"], np.ones(partial.dim), 5)
    full = index_images(toy_model, "toyworld:600:2", out, shard_size=100, progress=False)  # resumed: more rows
    store = A.ContributionStore(full, approximate=True, ann_min_rows=100)
    idx, _ = store.search(["L5.H3"], np.ones(full.dim), 5)
    assert store._large._indexes[(("L5.H3",), "sum", "dot")].index.ntotal == 600
    assert idx.max() < 600 and list(idx) == list(A.ContributionStore(full).search(["L5.H3"], np.ones(full.dim), 5)[0])


def test_a_run_folder_that_cannot_take_the_index_gets_a_warning_and_an_index_in_memory(run, monkeypatch):
    def read_only(*args):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(search.os, "replace", read_only)
    store = A.ContributionStore(run, approximate=True, ann_min_rows=1000)
    with pytest.warns(UserWarning, match="cannot store the search index"):
        idx, _ = store.search(["L3.H3"], np.ones(run.dim), 4)
    assert len(idx) == 4 and not list((run.path / "search").glob(".*.tmp"))


def test_runs_larger_than_the_cache_are_searched_through_an_index_when_faiss_is_there(run, monkeypatch):
    assert not A.ContributionStore(run, ann_min_rows=1000).approximate  # fits the cache: exact
    large = A.ContributionStore(run, max_bytes=0, ann_min_rows=1000)  # the analysis commands keep nothing
    assert large.approximate
    assert _recall(run, large, ["L2.H5"], "dot") >= 0.95
    monkeypatch.setitem(sys.modules, "faiss", None)
    assert not A.ContributionStore(run, max_bytes=0, ann_min_rows=1000).approximate  # then exact, streamed
