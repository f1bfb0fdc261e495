"""What each of the 2 gloo processes of ``test_rundata.py`` does (torch.multiprocessing.spawn).

Rank 1 is given a data root that does not exist: if it listed the data itself it would fail,
so a success proves it read the run folder's index. Results go to ``OUT/rank{r}.pt``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist


def run(rank: int, world: int, port: int, folder: str, run_dir: str, out: str, phase: str) -> None:
    from simclrkit import distributed
    from simclrkit.badfiles import BadFileLedger, TooManyBadFiles
    from simclrkit.config import ConfigError, load_config
    from simclrkit.rundata import prepare_train_data

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    info = distributed.DistInfo(rank, world, rank, rank == 0, False)
    root = folder if rank == 0 else "/nonexistent/folder/on/this/rank"
    config = load_config(None, ["data.dataset=imagefolder", f"data.root={root}"])
    results: dict = {}
    saved = torch.load(Path(out) / "record.pt") if phase == "changed" else None
    try:
        data, record = prepare_train_data(
            config, Path(run_dir), saved, resuming=phase == "changed", force=False, info=info
        )
        results.update(record=record, names=data.index.all_names(), root=data.index.root)
    except ConfigError as error:
        results["error"] = str(error)

    if phase == "fresh":
        ledger = BadFileLedger(0.5, 100, str, is_main=rank == 0)
        ledger.add(10, [(3, "x")] if rank == 0 else [(5, "y"), (3, "x")])
        ledger.sync()
        results["ledger"] = ledger.state_dict()
        strict = BadFileLedger(0.1, 20, str, is_main=False)
        strict.add(10, [(rank, "x")] if rank == 0 else [(7, "y"), (8, "y")])
        try:
            strict.sync()
        except TooManyBadFiles as error:
            results["refused"] = str(error)
        rows = torch.arange(3 * 2, dtype=torch.float32).view(3, 2) if rank == 0 else -torch.ones(2, 2)
        results["gathered"] = distributed.gather_rows(rows)
    torch.save(results, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()
