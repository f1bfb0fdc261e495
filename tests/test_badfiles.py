"""The bad-file ledger of one process: counts, the minimum sample, warnings, its saved state.
(Two processes: tests/distributed/test_rundata.py.)"""

from __future__ import annotations

import warnings

import pytest

from simclrkit.badfiles import BadFileLedger, TooManyBadFiles
from simclrkit.imagefiles import BadImageWarning


def _ledger(tmp_path, **kwargs) -> BadFileLedger:
    return BadFileLedger(0.01, 5000, lambda i: f"/data/{i}.jpg",
                         list_path=tmp_path / "bad_files.txt", **kwargs)  # fmt: skip


def test_counts_warn_once_per_file_and_keep_the_list(tmp_path):
    ledger = _ledger(tmp_path)
    ledger.add(64, [(7, "truncated")])
    ledger.add(64, [(7, "truncated"), (9, "no such file")])
    with pytest.warns(BadImageWarning) as record:
        ledger.sync()
    assert [str(w.message).split(":")[0] for w in record] == [
        "skipping image /data/7.jpg", "skipping image /data/9.jpg"
    ]
    assert (ledger.reads, ledger.bad_reads, sorted(ledger.bad)) == (128, 3, [7, 9])
    assert (tmp_path / "bad_files.txt").read_text() == (
        "/data/7.jpg\ttruncated\n/data/9.jpg\tno such file\n"
    )
    ledger.add(64, [(7, "truncated")])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a file already named is not named again
        ledger.sync()
    assert ledger.bad_reads == 4 and ledger.summary()["bad_files"] == 2


def test_the_limit_waits_for_a_minimum_sample_then_stops_with_the_files_named(tmp_path):
    ledger = _ledger(tmp_path)
    ledger.add(500, [(i, "truncated") for i in range(20)])  # 4%, but only 500 reads so far
    with pytest.warns(BadImageWarning):
        ledger.sync()
    ledger.add(500, [])  # 1,000 reads: 2% > 1%
    with pytest.raises(TooManyBadFiles) as error:
        ledger.sync()
    message = str(error.value)
    assert "20 of the 1000 image reads so far (2.00%) failed" in message
    assert "/data/0.jpg: truncated" in message and str(tmp_path / "bad_files.txt") in message
    # A small dataset needs fewer reads: min(1000, N).
    small = BadFileLedger(0.1, 30, str)
    small.add(30, [(1, "x"), (2, "x"), (3, "x"), (4, "x")])
    with pytest.warns(BadImageWarning), pytest.raises(TooManyBadFiles, match="4 of the 30"):
        small.sync()


def test_the_state_continues_the_counts_exactly(tmp_path):
    ledger = _ledger(tmp_path)
    ledger.add(100, [(3, "truncated")])
    with pytest.warns(BadImageWarning):
        ledger.sync()
    ledger.add(50, [(4, "lost")])  # not yet synced: not in the state (nor in a checkpoint)
    resumed = _ledger(tmp_path, state=ledger.state_dict())
    assert (resumed.reads, resumed.bad_reads, resumed.bad) == (100, 1, {3: "truncated"})
    assert ledger.state_dict() == {"reads": 100, "bad_reads": 1, "bad": {"3": "truncated"}}
