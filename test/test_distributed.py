"""Data-parallel training through torch's DistributedDataParallel (gloo on CPU, as torchrun starts it): 2 ranks
with per-rank batches of B/2 end with the same parameters as 1 process with batch B, through the trainer's own
epoch loop (sharding, the DDP wrapper the losses run through, clipping, one-cycle schedule)."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch

GLOBAL_BATCH, SAMPLES, EPOCHS = 8, 48, 3


def _data():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(SAMPLES, 4, generator=g)
    return x, torch.stack([x[:, 0] * 2 - x[:, 1], torch.tanh(x[:, 2] + x[:, 3])], 1)


def _train(log_path: str):
    """The same model, data and loop in every process; returns the final parameters."""
    from spanvla_ros.train.trainer import CsvLog, supervised_epochs

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    x, y = _data()

    def batch_loss(ii):
        ii = torch.as_tensor(ii)
        return torch.nn.functional.mse_loss(model(x[ii]), y[ii])

    supervised_epochs(model, list(range(SAMPLES)), EPOCHS, GLOBAL_BATCH, 3e-2, 0.2, CsvLog(Path(log_path)),
                      "toy", "toy", batch_loss, seed=3)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _rank(rank: int, world: int, port: int, out_dir: str):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        params = _train(os.path.join(out_dir, f"log{rank}.csv"))
        torch.save(params, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_match_one_process_with_the_same_global_batch(tmp_path):
    import torch.multiprocessing as mp

    if not torch.distributed.is_available():
        pytest.skip("torch was built without torch.distributed")
    single = _train(str(tmp_path / "single.csv"))
    mp.spawn(_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    start = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    for k, v in single.items():
        assert torch.allclose(ranks[0][k], ranks[1][k], atol=1e-7)           # the ranks agree with each other
        assert torch.allclose(ranks[0][k], v, atol=1e-5), k                 # and with the single process
    moved = max(float((v - w).abs().max()) for v, w in zip(single.values(), start.state_dict().values()))
    assert moved > 1e-2                                                     # training changed the parameters
    steps = [sum(1 for line in open(tmp_path / f"log{r}.csv") if ",toy," in line) for r in range(2)]
    assert steps[0] == steps[1] == EPOCHS * SAMPLES // GLOBAL_BATCH         # each rank: half of every batch
