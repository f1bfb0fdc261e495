"""Benchmark the image-search index: HNSW's recall@10 and speed against exact search.

Builds the two kinds of ``simclrkit index-embeddings`` (``simclrkit.search``) on 100,000 random
unit vectors of dimension 128 (seed 0): HNSW (M 32, efConstruction 40, efSearch calibrated as
the command calibrates it) and exact (``IndexFlatIP``). On 1,000 random unit queries it
measures HNSW's recall@10 against the exact answers (:func:`simclrkit.vectorindex.recall_at_k`, the
function the tests use), the build time (adding the vectors; HNSW's calibration separately),
and microseconds per query with the queries in one batch (faiss spreads them over the cores)
and one at a time (the latency of a single query).

Random vectors are HNSW's hardest case: with no structure, a point's nearest neighbours are
barely nearer than any other point, and the graph search must look at many of them. Image
embeddings reach the same recall with a far smaller efSearch.

Usage::

    python benchmarks/search.py                      # writes benchmarks/results/search.json
    python benchmarks/search.py --n 20000 --out /tmp/search.json

Prints the results and writes them as JSON with the host.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from step import describe_machine  # noqa: E402 - every benchmark describes the machine alike


def _host() -> dict[str, object]:
    import faiss

    return {"machine": describe_machine(), "numpy": np.__version__, "faiss": faiss.__version__,
            "faiss_threads": faiss.omp_get_max_threads()}  # fmt: skip


def _per_query_microseconds(index, queries: np.ndarray, k: int, single: int) -> dict[str, float]:
    """Microseconds per query: all queries in one call, and the first ``single`` one by one."""
    started = time.perf_counter()
    index.search(queries, k)
    batched = (time.perf_counter() - started) / len(queries)
    started = time.perf_counter()
    for row in range(single):
        index.search(queries[row : row + 1], k)
    alone = (time.perf_counter() - started) / single
    return {"batched_us_per_query": batched * 1e6, "single_us_per_query": alone * 1e6}


def main() -> None:
    from simclrkit.vectorindex import (
        add_vectors,
        hnsw_facts,
        new_vector_index,
        normalize,
        recall_at_k,
    )

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="indexed vectors")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=1_000)
    parser.add_argument("--single", type=int, default=200, help="queries timed one at a time")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "search.json")
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    vectors = normalize(rng.standard_normal((args.n, args.dim), dtype=np.float32))
    queries = normalize(rng.standard_normal((args.queries, args.dim), dtype=np.float32))
    built = {}
    for kind in ("exact", "hnsw"):  # as index-embeddings builds them
        index, started = new_vector_index(kind, args.dim), time.perf_counter()
        add_vectors(index, [vectors])
        built[kind] = index, {"build_seconds": time.perf_counter() - started}
    (exact, exact_facts), (hnsw, graph) = built["exact"], built["hnsw"]
    started = time.perf_counter()
    graph.update(hnsw_facts(hnsw), calibrate_seconds=time.perf_counter() - started)
    recall = recall_at_k(hnsw, exact, queries, args.k)
    results = {
        "exact": {"build_seconds": exact_facts["build_seconds"],
                  **_per_query_microseconds(exact, queries, args.k, args.single)},
        "hnsw": {**graph, "calibration_recall_at_10": graph.pop("recall_at_10"),
                 f"query_recall_at_{args.k}": recall,
                 **_per_query_microseconds(hnsw, queries, args.k, args.single)},
    }  # fmt: skip
    report = {
        "benchmark": f"image-search index: recall@{args.k} and speed, HNSW against exact",
        "config": {key: getattr(args, key) for key in ("n", "dim", "queries", "single", "k", "seed")},
        "host": _host(),
        "results": results,
    }
    hnsw_row, exact_row = results["hnsw"], results["exact"]
    print(f"{args.n:,} random unit vectors, dim {args.dim}, {args.queries:,} queries, k {args.k}")
    print(f"HNSW recall@{args.k}: {recall:.4f} (efSearch {hnsw_row['ef_search']}, chosen by "
          f"recall@10 {hnsw_row['calibration_recall_at_10']:.4f} on "
          f"{hnsw_row['recall_queries']} indexed vectors)")  # fmt: skip
    print("kind   build s  calibrate s  us/query batched  us/query alone")
    print(f"exact  {exact_row['build_seconds']:7.2f}  {'-':>11}  "
          f"{exact_row['batched_us_per_query']:16.0f}  {exact_row['single_us_per_query']:14.0f}")
    print(f"hnsw   {hnsw_row['build_seconds']:7.2f}  {hnsw_row['calibrate_seconds']:11.2f}  "
          f"{hnsw_row['batched_us_per_query']:16.0f}  {hnsw_row['single_us_per_query']:14.0f}")
    host = report["host"]
    print(f"host: {host['machine']}; faiss {host['faiss']} with {host['faiss_threads']} threads")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
