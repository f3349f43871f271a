"""torchrun helpers: sharding arithmetic, collectives and sharded sampling on two real Gloo processes, the
data-parallel step the trainer relies on (== one process on the whole batch), and the single-process path."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch import nn

from difflab import distributed as D
from difflab.denoisers import VPParameterization
from difflab.errors import DifflabError
from difflab.generate import generate, generate_sharded
from difflab.models import build, model_config
from difflab.nn import unet_config
from difflab.schedules import make_schedule

WORLD = 2
SAMPLING = dict(sampler="ddim", eta=1.0, steps=4, batch_size=2)  # stochastic: every image uses its own generator
CONFIG = model_config(unet_config("tiny", image_size=8, in_channels=1, base_channels=16),
                      parameterization=VPParameterization(make_schedule("linear", 1000)), data={"name": "test"})
DDP_BATCH, DDP_LR = 6, 0.1  # global batch 2B = 6, B = 3 per rank


def tiny_model(weights: Path | None = None):
    """The tiny U-Net with random-normal weights (the zero-initialised output layer would make every
    sample the same), saved to / loaded from ``weights`` so every process holds the same model."""
    model = build(CONFIG)
    denoiser = model.denoiser
    if weights is not None and weights.exists():
        denoiser.net.load_state_dict(load_file(weights))
    else:
        torch.manual_seed(0)
        with torch.no_grad():
            for p in denoiser.net.parameters():
                p.normal_(0, 0.2)
        if weights is not None:
            save_file({k: v.contiguous() for k, v in denoiser.net.state_dict().items()}, weights)
    denoiser.eval()
    return model


def ddp_model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def ddp_data(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.randn(n, 1, generator=g)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, out: str, port: int) -> None:
    """One of two processes, started as torchrun would start it (environment variables, then setup())."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    out = Path(out)
    info = D.setup("cpu", timeout_s=60)
    facts = dict(rank=info.rank, local_rank=info.local_rank, world_size=info.world_size, backend=info.backend,
                 device=str(info.device), is_main=info.is_main, distributed=info.distributed,
                 fn=[D.is_distributed(), D.rank(), D.world_size(), D.is_main()])
    tensors = {}

    # gather_shards: uneven (5 over 2), one item (rank 1 empty), none
    for n in (5, 1, 0):
        start, stop = D.shard_range(n, rank, WORLD)
        local = torch.arange(start * 6, stop * 6, dtype=torch.float32).reshape(-1, 2, 3)
        tensors[f"gather{n}"] = D.gather_shards(local, n)

    # collectives
    tensors["sum"] = D.all_reduce_(torch.tensor([rank + 1.0, 10.0]))
    tensors["mean"] = D.all_reduce_(torch.tensor([rank + 1.0]), "mean")
    tensors["max"] = D.all_reduce_(torch.tensor([rank + 1.0]), "max")
    facts["broadcast"] = D.broadcast_object({"run": f"chosen-by-{rank}", "steps": (1, 2), "é": None})
    torch.distributed.barrier()

    # sharded sampling: 5 images (3 + 2) and 1 image (rank 1 has none)
    model = tiny_model(out / "weights.safetensors")
    tensors["images5"] = generate_sharded(model, 5, seed=11, **SAMPLING)
    tensors["images1"] = generate_sharded(model, 1, seed=11, **SAMPLING)

    # data parallel: each rank takes half of the global batch, loss averaged over its half
    model = nn.parallel.DistributedDataParallel(ddp_model())
    opt = torch.optim.SGD(model.parameters(), lr=DDP_LR)
    x, y = ddp_data(0, DDP_BATCH)
    start, stop = D.shard_range(DDP_BATCH, rank, WORLD)
    nn.functional.mse_loss(model(x[start:stop]), y[start:stop]).backward()
    opt.step()
    tensors.update({f"step1.{k}": v.detach().clone() for k, v in model.module.state_dict().items()})
    for step in range(3):  # different data on each rank: DDP keeps the replicas equal anyway
        opt.zero_grad()
        xr, yr = ddp_data(100 + 10 * step + rank, 3)
        nn.functional.mse_loss(model(xr), yr).backward()
        opt.step()
    tensors.update({f"step4.{k}": v.detach().clone() for k, v in model.module.state_dict().items()})

    D.teardown()
    facts["after_teardown"] = [D.is_distributed(), torch.distributed.is_initialized()]
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / f"rank{rank}.safetensors")
    (out / f"rank{rank}.json").write_text(json.dumps(facts))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Start two Gloo processes once and return what each reported (tensors, facts)."""
    out = tmp_path_factory.mktemp("dist")
    tiny_model(out / "weights.safetensors")  # the parent draws the weights; the workers load them
    mp.spawn(worker, args=(str(out), free_port()), nprocs=WORLD, join=True)
    return [(load_file(out / f"rank{r}.safetensors"), json.loads((out / f"rank{r}.json").read_text()))
            for r in range(WORLD)]


# --- sharding arithmetic (pure) -----------------------------------------------------------------------------

def test_shard_range_covers_everything_once_and_evenly():
    for world in range(1, 9):
        for n in range(0, 40):
            shards = [D.shard_range(n, r, world) for r in range(world)]
            assert shards[0][0] == 0 and shards[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(shards, shards[1:]))  # contiguous, in rank order
            sizes = [stop - start for start, stop in shards]
            assert min(sizes) >= 0 and max(sizes) - min(sizes) <= 1 and sum(sizes) == n
    assert D.shard_range(5, 0, 2) == (0, 3) and D.shard_range(5, 1, 2) == (3, 5)
    for bad in [(5, 2, 2), (5, -1, 2), (-1, 0, 2), (5, 0, 0)]:
        with pytest.raises(DifflabError, match="cannot shard"):
            D.shard_range(*bad)


# --- two processes ------------------------------------------------------------------------------------------

def test_setup_reads_the_torchrun_environment(ranks):
    for r, (_, facts) in enumerate(ranks):
        assert facts["rank"] == facts["local_rank"] == r
        assert facts["world_size"] == WORLD and facts["backend"] == "gloo" and facts["device"] == "cpu"
        assert facts["is_main"] == (r == 0) and facts["distributed"]
        assert facts["fn"] == [True, r, WORLD, r == 0]
        assert facts["after_teardown"] == [False, False]


def test_gather_shards_returns_the_whole_batch_in_order_on_every_rank(ranks):
    for tensors, _ in ranks:
        for n in (5, 1, 0):
            expected = torch.arange(n * 6, dtype=torch.float32).reshape(n, 2, 3)
            assert torch.equal(tensors[f"gather{n}"], expected), n


def test_collectives(ranks):
    for tensors, facts in ranks:
        assert torch.equal(tensors["sum"], torch.tensor([3.0, 20.0]))
        assert torch.equal(tensors["mean"], torch.tensor([1.5])) and torch.equal(tensors["max"], torch.tensor([2.0]))
        assert facts["broadcast"] == {"run": "chosen-by-0", "steps": [1, 2], "é": None}


def test_sharded_sampling_equals_one_process(ranks, tmp_path):
    model, threads = tiny_model(), torch.get_num_threads()
    torch.set_num_threads(1)  # the same kernels as the workers
    try:
        single = generate(model, 5, seed=11, **SAMPLING)
    finally:
        torch.set_num_threads(threads)
    for tensors, _ in ranks:
        images = tensors["images5"]
        assert images.shape == (5, 1, 8, 8)
        torch.testing.assert_close(images, single, rtol=0, atol=1e-5)
        torch.testing.assert_close(tensors["images1"], single[:1], rtol=0, atol=1e-5)
        distances = torch.cdist(images.flatten(1), images.flatten(1)) + torch.eye(5) * 1e9
        assert distances.min() > 0.1  # no image twice (a shard sampled with the wrong seeds would repeat one)


def test_data_parallel_step_equals_one_process_on_the_whole_batch(ranks):
    model = ddp_model()
    opt = torch.optim.SGD(model.parameters(), lr=DDP_LR)
    x, y = ddp_data(0, DDP_BATCH)
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    (t0, _), (t1, _) = ranks
    for name, value in model.state_dict().items():
        assert not torch.equal(value, ddp_model().state_dict()[name])  # the step moved every tensor
        torch.testing.assert_close(t0[f"step1.{name}"], value, rtol=0, atol=1e-6)
        torch.testing.assert_close(t1[f"step1.{name}"], value, rtol=0, atol=1e-6)
    step4 = [k for k in t0 if k.startswith("step4.")]
    assert step4 and all(torch.equal(t0[k], t1[k]) for k in step4)  # replicas identical after more steps
    assert not all(torch.equal(t0[k], t0[k.replace("step4", "step1")]) for k in step4)


# --- one process (no torchrun, no process group) -------------------------------------------------------------

def test_single_process_path(monkeypatch):
    for name in D.TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)
    info = D.setup("cpu")
    assert (info.rank, info.local_rank, info.world_size, info.backend) == (0, 0, 1, None)
    assert info.is_main and not info.distributed and info.device == torch.device("cpu")
    assert (D.is_distributed(), D.rank(), D.world_size(), D.is_main()) == (False, 0, 1, True)
    t = torch.tensor([2.0, 3.0])
    assert D.all_reduce_(t, "sum") is t and torch.equal(t, torch.tensor([2.0, 3.0]))
    assert torch.equal(D.all_reduce_(t, "mean"), torch.tensor([2.0, 3.0]))
    with pytest.raises(ValueError, match="op must be one of"):
        D.all_reduce_(t, "avg")
    assert D.broadcast_object({"a": (1, 2)}) == {"a": [1, 2]}  # JSON round trip, as under torchrun
    batch = torch.randn(4, 3)
    assert D.gather_shards(batch, 4) is batch
    with pytest.raises(ValueError, match="holds 4 items but its shard of 5 is 5"):
        D.gather_shards(batch, 5)
    D.teardown()  # nothing to tear down

    monkeypatch.setenv("RANK", "0")  # torchrun with one process: still a single process, no group
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert D.setup("cpu").world_size == 1 and not torch.distributed.is_initialized()


def test_single_process_generate_sharded_is_generate():
    model = tiny_model()
    a = generate_sharded(model, 3, seed=5, sampler="ddim", steps=2)
    b = generate(model, 3, seed=5, sampler="ddim", steps=2)
    assert torch.equal(a, b)
    with pytest.raises(DifflabError, match="at least 1"):
        generate_sharded(model, 0)
    with pytest.raises(DifflabError, match="cond has 2 entries for 3 images"):
        generate_sharded(model, 3, cond=torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("env, message", [
    ({"RANK": "0"}, "RANK set but WORLD_SIZE, LOCAL_RANK missing"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "MASTER_ADDR, MASTER_PORT not set"),
    ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "inconsistent torchrun environment"),
    ({"RANK": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "RANK='x' is not an integer"),
])
def test_half_set_environment_is_a_one_line_error(monkeypatch, env, message):
    for name in D.TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(DifflabError, match=message) as info:
        D.setup("cpu")
    assert "\n" not in str(info.value) and not torch.distributed.is_initialized()


def test_unreachable_group_is_a_one_line_error(monkeypatch):
    """Rank 1 of 2 whose rank 0 never comes: a clear error after the timeout, not a hang or a stack trace."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    with pytest.raises(DifflabError, match=r"rank 1 could not join the gloo process group at 127\.0\.0\.1:\d+: ") as info:
        D.setup("cpu", timeout_s=1)
    assert "\n" not in str(info.value) and not torch.distributed.is_initialized()
