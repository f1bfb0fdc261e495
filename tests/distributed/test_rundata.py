"""The run's data over 2 real gloo processes: one index for all, one refusal for all, the
bad-file counts and feature rows summed and gathered across them."""

from __future__ import annotations

import socket

import data_workers
import pytest
import torch
import torch.multiprocessing as mp

from conftest import write_jpeg_tree


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _spawn(folder, run_dir, out, phase: str) -> list[dict]:
    mp.spawn(data_workers.run, args=(2, _free_port(), str(folder), str(run_dir), str(out), phase),
             nprocs=2, join=True)  # fmt: skip
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("rundata")
    folder, run_dir, out = base / "data", base / "run", base / "out"
    out.mkdir()
    write_jpeg_tree(folder, classes=2, per_class=3)
    fresh = _spawn(folder, run_dir, out, "fresh")
    torch.save(fresh[0]["record"], out / "record.pt")
    write_jpeg_tree(folder / "train" / "class9", classes=1, per_class=1)  # a new file
    changed = _spawn(folder, run_dir, out, "changed")
    return fresh, changed


def test_every_rank_trains_on_the_index_the_main_process_wrote(runs):
    (main, other), _ = runs
    assert "error" not in other, other.get("error")  # rank 1 could not have listed anything
    assert other["record"] == main["record"] and other["names"] == main["names"]
    assert len(main["names"]) == 6 and main["record"]["num_examples"] == 6


def test_a_changed_folder_is_refused_on_every_rank_with_the_same_reason(runs):
    _, (main, other) = runs
    assert main["error"] == other["error"]
    assert "the data changed since the run started: 6 -> 7 images: 1 file added" in main["error"]
    assert "--force" in main["error"] and "data_index.npz" in main["error"]


def test_bad_file_counts_are_summed_and_the_limit_stops_every_rank_together(runs):
    (main, other), _ = runs
    expected = {"reads": 20, "bad_reads": 3, "bad": {"3": "x", "5": "y"}}
    assert main["ledger"] == other["ledger"] == expected
    assert "3 of the 20 image reads" in main["refused"] and main["refused"] == other["refused"]


def test_rows_of_unequal_counts_are_gathered_in_rank_order_on_the_main_process(runs):
    (main, other), _ = runs
    assert torch.equal(main["gathered"], torch.cat([torch.arange(6.0).view(3, 2), -torch.ones(2, 2)]))
    assert other["gathered"] is None
