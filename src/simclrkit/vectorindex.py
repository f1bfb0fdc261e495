"""Unit vectors in a faiss index: the two kinds, recall against exact search, HNSW's breadth.

``search.py`` keeps an index of images on disk; this module is what it holds: h scaled to
unit length (so that the inner product is the cosine similarity) in ``IndexFlatIP`` (exact: a
scan of every vector) or ``IndexHNSWFlat`` (a proximity graph searched greedily, Malkov &
Yashunin 2018), whose search breadth efSearch :func:`calibrate_ef_search` chooses from measured
recall. faiss does what no hand-written code here would do as fast (BLAS scans, the graph);
it is an optional dependency (``pip install 'simclrkit[search]'``).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from typing import Any

import numpy as np

from simclrkit.config import ConfigError

ADD_CHUNK = 16384  # vectors handed to faiss at once (its HNSW insertion runs in parallel)
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 40  # faiss's default
EF_SEARCH_LADDER = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
# The calibration sample's recall@10 has a standard error of ~0.005 (500 queries): asking 0.96
# of it keeps the recall of new queries above 0.95.
_CALIBRATION_RECALL = 0.96
_CALIBRATION_QUERIES = 500


def faiss_module() -> Any:
    if importlib.util.find_spec("faiss") is None:
        raise ConfigError(
            "image search needs faiss: pip install 'simclrkit[search]' (or pip install faiss-cpu)"
        )
    import faiss

    return faiss


# --------------------------------------------------------------------------------------------
# Vectors: unit rows, faiss indexes, recall and the HNSW search breadth
# --------------------------------------------------------------------------------------------


def normalize(h: np.ndarray) -> np.ndarray:
    """(N, D) rows scaled to unit L2 norm, contiguous float32; a zero row stays zero."""
    h = np.asarray(h, dtype=np.float32)
    norms = np.linalg.norm(h, axis=1, keepdims=True)
    return np.ascontiguousarray(h / np.maximum(norms, np.finfo(np.float32).tiny))


def new_vector_index(kind: str, dim: int) -> Any:
    """An empty inner-product faiss index: ``IndexFlatIP`` (exact) or ``IndexHNSWFlat`` (hnsw)."""
    faiss = faiss_module()
    if kind == "exact":
        return faiss.IndexFlatIP(dim)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        return index
    raise ConfigError(f"--kind: got {kind!r}; allowed: exact, hnsw (or auto)")


def _neighbour_ids(index: Any, queries: np.ndarray, k: int, query_ids: np.ndarray | None) -> np.ndarray:
    """(Q, k) ids of each query's k nearest; with ``query_ids``, each query's own entry is left
    out (the farthest of k + 1 goes instead when the search did not return it)."""
    if query_ids is None:
        return index.search(queries, k)[1]
    ids = index.search(queries, k + 1)[1]
    dropped = ids == np.asarray(query_ids)[:, None]
    dropped[~dropped.any(axis=1), -1] = True
    return ids[~dropped].reshape(len(ids), k)


def recall_at_k(
    approximate: Any,
    exact: Any,
    queries: np.ndarray,
    k: int,
    *,
    query_ids: np.ndarray | None = None,
) -> float:
    """Recall@k of an approximate index: the share of each query's true k nearest neighbours
    that it returns among its own k, averaged over the queries.

    Args:
        approximate: a faiss index (``IndexHNSWFlat``, say).
        exact: an exhaustive index over the same vectors (``IndexFlatIP``), or the (Q, k)
            true neighbour ids when they are already known.
        queries: (Q, D) float32.
        k: neighbours per query.
        query_ids: (Q,) ids of the queries when they are indexed vectors themselves: each
            one's own entry is left out of both lists (finding itself proves nothing).

    Returns:
        Recall in [0, 1] (1.0 when there is nothing to find).
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    truth = exact if isinstance(exact, np.ndarray) else _neighbour_ids(exact, queries, k, query_ids)
    found = _neighbour_ids(approximate, queries, k, query_ids)
    hits = total = 0
    for got, true in zip(found, truth):
        wanted = set(true[true >= 0].tolist())
        hits += len(wanted.intersection(got.tolist()))
        total += len(wanted)
    return hits / total if total else 1.0


def calibrate_ef_search(index: Any, *, k: int = 10, seed: int = 0) -> tuple[int, float]:
    """Sets an HNSW index's efSearch to the smallest of :data:`EF_SEARCH_LADDER` whose
    recall@k on a sample of the indexed vectors (500, each query's own entry left out)
    reaches 0.96; returns (efSearch, that recall). The exact neighbours come from a scan of
    the index's own storage (no copy). When no step reaches it, the largest is kept.
    """
    faiss = faiss_module()
    count = index.ntotal
    k = min(k, count - 1)
    if k < 1:
        index.hnsw.efSearch = EF_SEARCH_LADDER[0]
        return EF_SEARCH_LADDER[0], 1.0
    sample = min(_CALIBRATION_QUERIES, count)
    ids = np.sort(np.random.default_rng(seed).choice(count, size=sample, replace=False))
    queries = index.reconstruct_batch(ids)
    truth = _neighbour_ids(faiss.downcast_index(index.storage), queries, k, ids)
    for ef in EF_SEARCH_LADDER:
        index.hnsw.efSearch = ef
        recall = recall_at_k(index, truth, queries, k, query_ids=ids)
        if recall >= _CALIBRATION_RECALL or ef >= count:
            break
    return int(index.hnsw.efSearch), recall


def hnsw_facts(index: Any) -> dict[str, Any]:
    """Calibrates efSearch; what meta.json records about the graph."""
    ef, recall = calibrate_ef_search(index)
    return {
        "M": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION, "ef_search": ef,
        "recall_at_10": round(recall, 4),
        "recall_queries": min(_CALIBRATION_QUERIES, index.ntotal),
    }  # fmt: skip


def add_vectors(index: Any, chunks: Iterable[np.ndarray]) -> None:
    """Adds (n, D) float32 unit vectors to a faiss index in the order given, handed over
    ``ADD_CHUNK`` rows at a time however the caller batches them (faiss spreads one ``add`` of
    an HNSW index over the cores, so many small adds would leave them idle)."""
    pending, rows = [], 0
    for chunk in chunks:
        pending.append(np.asarray(chunk, dtype=np.float32))
        rows += len(chunk)
        if rows >= ADD_CHUNK:
            index.add(np.ascontiguousarray(np.concatenate(pending)))
            pending, rows = [], 0
    if pending:
        index.add(np.ascontiguousarray(np.concatenate(pending)))
