"""One run on 2 processes (gloo, CPU): experiments/distributed.py and run_continuous under DDP.

Two processes are spawned (torch.multiprocessing) on a tiny MLP/digits run with --shrink, so a
shrink happens after the first epoch and the DDP wrapper and the optimiser are rebuilt.  Each
rank records, after every epoch's pruning, whether its own decisions agreed with rank 0's before
any were copied, its masks and its whole state_dict.  Checks: identical masks and parameters on
both ranks after every epoch, only rank 0 writes, config and summary record world_size 2; a run
stopped after its first epoch resumes (here through ``torchrun -m bayesprune run``, the command a
user types) to the numbers of the uninterrupted 2-process run.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bayesprune.experiments import distributed, training
from bayesprune.experiments.training import resolve_config, run_continuous, run_dir_name

OPTIONS = dict(dataset="digits", model="mlp", method="etheta", compression=0.3, shrink=True,
               epochs=2, finetune_epochs=1, device="cpu")
CLI = ["--dataset", "digits", "--model", "mlp", "--method", "etheta", "--compression", "0.3", "--shrink",
       "--epochs", "2", "--finetune-epochs", "1", "--device", "cpu", "--quiet"]
TIMES = ("wall_time_s", "epoch_time", "size_speed", "machine")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str, record: str, stop_at_epoch) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    seen = []
    original = distributed.Context.sync_masks

    def sync_and_record(self, model):
        agreed = original(self, model)
        seen.append(dict(agreed=agreed, masks=[n.mask.clone() for n in training.noise_layers(model)],
                         state={k: v.clone() for k, v in model.state_dict().items()}))
        return agreed

    distributed.Context.sync_masks = sync_and_record
    if stop_at_epoch is not None:  # both ranks stop before this epoch's training, as a kill would
        train_epoch, calls = training._train_epoch, []

        def stopping(*args, **kwargs):
            calls.append(1)
            if len(calls) == stop_at_epoch:
                raise KeyboardInterrupt
            return train_epoch(*args, **kwargs)

        training._train_epoch = stopping
    summary = None
    try:
        summary = run_continuous(resolve_config(**OPTIONS, out_dir=out_dir), progress=False)
    except KeyboardInterrupt:
        pass
    torch.save(dict(seen=seen, summary=summary), Path(record) / f"rank{rank}.pt")
    dist.barrier()  # neither rank tears gloo down while the other still uses it (a SIGABRT otherwise, seen once)
    dist.destroy_process_group()


def _spawn(tmp: Path, name: str, stop_at_epoch=None) -> tuple[Path, list[dict]]:
    out, rec = tmp / name / "run", tmp / name / "record"
    rec.mkdir(parents=True)
    mp.spawn(_worker, args=(2, _free_port(), str(out), str(rec), stop_at_epoch), nprocs=2, join=True)
    return out, [torch.load(rec / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    return _spawn(tmp_path_factory.mktemp("ddp"), "full")


def _metrics(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMES} for r in rows]


def test_every_rank_takes_the_same_decisions_and_holds_the_same_parameters(full):
    _, (r0, r1) = full
    epochs = OPTIONS["epochs"] + OPTIONS["finetune_epochs"]
    assert len(r0["seen"]) == len(r1["seen"]) == epochs
    for e0, e1 in zip(r0["seen"], r1["seen"]):
        assert e0["agreed"] and e1["agreed"]  # decided alike before rank 0's masks were copied
        assert all(torch.equal(a, b) for a, b in zip(e0["masks"], e1["masks"]))
        assert e0["state"].keys() == e1["state"].keys()
        assert all(torch.equal(e0["state"][k], e1["state"][k]) for k in e0["state"])  # DDP kept them in sync
    first = r0["seen"][0]["masks"]
    assert sum(int((m == 0).sum()) for m in first) > 0  # the first pruning removed structures...
    second = r0["seen"][1]["state"]
    dense = resolve_config(**OPTIONS)
    assert sum(v.numel() for k, v in second.items() if "bayes_noise" not in k) < sum(
        v.numel() for k, v in r0["seen"][0]["state"].items() if "bayes_noise" not in k)  # ...and were shrunk away
    assert dense.shrink


def test_only_rank_0_writes_and_the_run_records_its_world_size(full):
    out, (r0, r1) = full
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == summary["config"]["world_size"] == 2
    assert r0["summary"]["test_acc"] == r1["summary"]["test_acc"] == summary["test_acc"]
    assert r1["summary"]["size_speed"] is None  # measured by the writer only
    assert len(_metrics(out)) == 3
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert len(state["rng_ranks"]) == 2 and not torch.equal(state["rng_ranks"][0]["torch"], state["rng_ranks"][1]["torch"])


def test_a_single_process_refuses_the_2_process_run_directory(full):
    out, _ = full
    with pytest.raises(ValueError, match="world_size"):
        run_continuous(resolve_config(**OPTIONS, out_dir=str(out)), progress=False)


def test_a_2_process_run_resumes_under_torchrun_to_the_uninterrupted_numbers(full, tmp_path):
    out_full, _ = full
    group = tmp_path / "cli" / run_dir_name("mlp", "digits", "etheta")
    out, (r0, r1) = _spawn(tmp_path, "cut", stop_at_epoch=2)
    assert r0["summary"] is None and len(r0["seen"]) == 1
    (group).mkdir(parents=True)
    os.replace(out, group / "seed0")  # where bayesprune run --out-dir <tmp>/cli puts seed 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "bayesprune", "run", *CLI, "--out-dir", str(tmp_path / "cli")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("test acc %") == 1  # rank 1 prints nothing
    resumed = json.loads((group / "seed0" / "summary.json").read_text())
    uncut = json.loads((out_full / "summary.json").read_text())
    for key in ("test_acc", "test_loss", "param_compression", "structure_compression", "params_kept", "layers",
                "best_epoch", "best_val_acc", "world_size"):
        assert resumed[key] == uncut[key], key
    assert _metrics(group / "seed0") == _metrics(out_full)


def test_the_batch_must_split_over_the_processes():
    cfg = resolve_config(dataset="digits", batch_size=16)
    assert distributed.Context(0, 2, 0).record(cfg).world_size == 2
    with pytest.raises(ValueError, match="batch_size 16 does not split over 3 processes"):
        distributed.Context(0, 3, 0).record(cfg)
    with pytest.raises(ValueError, match="world_size is 4 in the configuration"):
        distributed.Context(0, 2, 0).record(resolve_config(dataset="digits", world_size=4))


def test_rank_seeds_differ_per_seed_and_rank():
    seeds = {distributed.rank_seed(s, r) for s in range(20) for r in range(1, 9)}
    assert len(seeds) == 160 and all(0 <= v < 2**63 for v in seeds)


def test_other_commands_refuse_torchrun(monkeypatch, capsys):
    from bayesprune.experiments.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["sweep", "--dataset", "digits", "--epochs", "1"]) == 2
    assert "does not run under torchrun" in capsys.readouterr().err
