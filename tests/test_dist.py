"""utils.dist.process_group: the processes of a finished run leave together; one that fails leaves at once."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from utils.dist import all_gather_objects, launch, process_group


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_zero_works_longer(folder: Path) -> None:
    """Rank 0 writes its files after the last collective (as test.py's main process does); every rank then notes
    when it got out of its process group."""
    with process_group("cpu") as (info, _):
        if info.is_main:
            time.sleep(1.0)
            (folder / "main_done").write_text(str(time.monotonic_ns()))
    (folder / f"left_{info.rank}").write_text(str(time.monotonic_ns()))


@pytest.mark.slow
def test_a_process_done_first_waits_for_the_main_process_before_leaving_the_group(tmp_path):
    launch(_rank_zero_works_longer, tmp_path, 2, _free_port())
    main_done = int((tmp_path / "main_done").read_text())
    assert int((tmp_path / "left_1").read_text()) >= main_done  # rank 1 was still in the group when rank 0 finished


def _rank_one_fails_before_a_collective(folder: Path) -> None:
    """Rank 1 fails before a gather that rank 0 is already waiting in."""
    with process_group("cpu") as (info, _):
        if info.rank == 1:
            raise RuntimeError("rank 1 failed")
        all_gather_objects(info.rank)
        (folder / "gathered").write_text("")


@pytest.mark.slow
def test_a_failing_process_leaves_at_once_so_its_peer_errors_instead_of_waiting_forever(tmp_path):
    # were the failing rank to wait at the closing barrier, rank 0 would wait in the gather: neither would ever end
    with pytest.raises(mp.ProcessRaisedException, match="rank 1 failed|Connection (closed|reset) by peer"):
        launch(_rank_one_fails_before_a_collective, tmp_path, 2, _free_port())
    assert not (tmp_path / "gathered").exists()
