"""Fault injection on `bayesprune run` (digits, a 16-unit MLP, 2 + 1 epochs of 9 steps).

* kills (an exception that nothing catches, raised from the patched ``os.write``, ``os.fsync`` and
  ``os.replace`` at seeded random calls, some after writing half the bytes) during JSON, metric
  and checkpoint writes, then a resume: the numbers are those of the uninterrupted run and no
  epoch is in metrics.jsonl twice;
* two runs on one run directory; a real SIGKILL of a subprocess that holds a run;
* a truncated latest checkpoint, a foreign checkpoint, a full disk (ENOSPC from ``os.write``);
* every row of docs/cli.md's error table: exit code, message, and no traceback.
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bayesprune.experiments import cli, rundir, training

TINY = ["--model", "mlp", "--width", "16", "--extra-layers", "0", "--epochs", "2", "--finetune-epochs", "1",
        "--batch-size", "128", "--quiet", "--device", "cpu"]
GROUP = "mlp-digits-bmrs_n-t-0.919"
ROOT = Path(__file__).resolve().parents[1]


class Killed(BaseException):
    """Stands for SIGKILL: nothing in the code under test catches it."""


@pytest.fixture(autouse=True)
def _no_benchmark(monkeypatch):
    monkeypatch.setattr(training, "_size_speed", lambda *a, **k: None)


def _run(out, *extra) -> int:
    return cli.main(["run", *TINY, *extra, "--out-dir", str(out)])


def _numbers(out) -> tuple[list, dict]:
    d = Path(out) / GROUP / "seed0"
    rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("epoch_time")
    s = json.loads((d / "summary.json").read_text())
    return rows, {k: s[k] for k in ("test_acc", "test_loss", "param_compression", "structure_compression", "best_epoch")}


class _Counter:
    """Wraps ``os.<name>``: counts the calls made for files under ``root``; at call ``kill_at``
    raises ``fault`` (after writing half the bytes, for ``write`` with ``torn``)."""

    def __init__(self, name, root, kill_at=None, fault=Killed, torn=False):
        self.name, self.real, self.root = name, getattr(os, name), str(root)
        self.kill_at, self.fault, self.torn, self.calls = kill_at, fault, torn, 0

    def _ours(self, args) -> bool:
        target = args[0]
        if isinstance(target, int):  # a file descriptor (write, fsync)
            try:
                target = os.readlink(f"/proc/self/fd/{target}")
            except OSError:
                return False
        return str(target).startswith(self.root)

    def __call__(self, *args, **kwargs):
        if self._ours(args):
            self.calls += 1
            if self.calls == self.kill_at:
                if self.name == "write" and self.torn:
                    self.real(args[0], bytes(args[1])[: len(args[1]) // 2])
                raise self.fault() if isinstance(self.fault, type) else self.fault
        return self.real(*args, **kwargs)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run's numbers and how many write/fsync/replace calls it makes."""
    out = tmp_path_factory.mktemp("reference")
    mp = pytest.MonkeyPatch()
    mp.setattr(training, "_size_speed", lambda *a, **k: None)
    counters = {n: _Counter(n, out) for n in ("write", "fsync", "replace")}
    try:
        for n, c in counters.items():
            mp.setattr(os, n, c)
        assert _run(out) == 0
    finally:
        mp.undo()
    return _numbers(out), {n: c.calls for n, c in counters.items()}


def _kill_points():
    """(function, fraction of the reference run's calls to it, torn) at seeded random points, and
    the first and last call."""
    rng = random.Random(18)
    points = [(name, rng.random(), name == "write" and rng.random() < 0.5) for name in ("write", "fsync", "replace") for _ in range(3)]
    return points + [("replace", 0.0, False), ("write", 0.0, True), ("replace", 1.0, False)]


@pytest.mark.parametrize("name, where, torn", _kill_points())
def test_killed_during_a_write_resumes_to_identical_numbers(name, where, torn, reference, tmp_path, monkeypatch, capsys):
    (want_rows, want_summary), calls = reference
    at = max(1, math.ceil(where * calls[name]))
    out = tmp_path / "cut"
    monkeypatch.setattr(os, name, _Counter(name, out, kill_at=at, torn=torn))
    with pytest.raises(Killed):
        _run(out)
    monkeypatch.undo()
    monkeypatch.setattr(training, "_size_speed", lambda *a, **k: None)
    d = out / GROUP / "seed0"
    if d.exists():  # what a kill leaves: temporary files, maybe a cut metrics line; none is read as data
        for f in d.iterdir():
            if f.name.endswith(".json"):
                json.loads(f.read_text())  # never half a JSON file
    assert _run(out) == 0, capsys.readouterr().err
    rows, summary = _numbers(out)
    assert rows == want_rows and summary == want_summary
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert not list(d.glob(".*.tmp")) and not (d / "checkpoint.prev.pt").exists()


def test_full_disk_is_one_line_and_the_run_resumes(reference, tmp_path, monkeypatch, capsys):
    """ENOSPC from os.write while the second checkpoint is written: exit 4 naming the file; the
    run directory still holds the first checkpoint, and the same command later finishes the run
    with the numbers of the uninterrupted one."""
    (want_rows, want_summary), _ = reference
    out = tmp_path / "full"
    real_write = os.write

    def write(fd, data):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if str(out) in target and ".checkpoint.pt." in target and state["checkpoints"] == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        if str(out) in target and ".checkpoint.pt." in target:
            state["checkpoints"] += 1
        return real_write(fd, data)

    state = {"checkpoints": 0}
    monkeypatch.setattr(os, "write", write)
    assert _run(out) == cli.EXIT_OS
    err = capsys.readouterr().err
    d = out / GROUP / "seed0"
    assert f"error: {d / 'checkpoint.pt'}: no space left on the device" in err and "(ENOSPC)" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert torch.load(d / "checkpoint.prev.pt", weights_only=True)["epoch"] == 1 and not (d / "checkpoint.pt").exists()
    monkeypatch.setattr(os, "write", real_write)
    assert _run(out) == 0
    assert _numbers(out) == (want_rows, want_summary)


def _interrupt_after_epochs(monkeypatch, n):
    real = training._train_epoch
    calls = {"n": 0}

    def epoch(*a, **k):
        calls["n"] += 1
        if calls["n"] > n:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(training, "_train_epoch", epoch)
    return real


def test_truncated_latest_checkpoint_falls_back_to_the_previous(reference, tmp_path, monkeypatch, capsys):
    (want_rows, want_summary), _ = reference
    out = tmp_path / "trunc"
    real = _interrupt_after_epochs(monkeypatch, 2)
    assert _run(out) == cli.EXIT_INTERRUPTED
    monkeypatch.setattr(training, "_train_epoch", real)
    d = out / GROUP / "seed0"
    latest, prev = d / "checkpoint.pt", d / "checkpoint.prev.pt"
    assert torch.load(latest, weights_only=True)["epoch"] == 2 and torch.load(prev, weights_only=True)["epoch"] == 1
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
    capsys.readouterr()
    assert _run(out) == 0
    err = capsys.readouterr().err
    assert f"warning: checkpoint {latest} cannot be read" in err and f"resuming from {prev} (epoch 1)" in err
    assert (d / "checkpoint.pt.damaged").exists()
    assert _numbers(out) == (want_rows, want_summary)  # epoch 2 trained again, not listed twice


def test_no_readable_checkpoint_and_foreign_checkpoints_are_refused(tmp_path, monkeypatch, capsys):
    out = tmp_path / "bad"
    real = _interrupt_after_epochs(monkeypatch, 1)
    assert _run(out) == cli.EXIT_INTERRUPTED
    monkeypatch.setattr(training, "_train_epoch", real)
    d = out / GROUP / "seed0"
    good = (d / "checkpoint.pt").read_bytes()
    (d / "checkpoint.pt").write_bytes(b"garbage")
    capsys.readouterr()
    assert _run(out) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert f"checkpoint {d / 'checkpoint.pt'} cannot be read" in err and "no readable checkpoint is left" in err
    assert "Traceback" not in err
    # a valid torch file with other keys (today's KeyError: 'model')
    torch.save({"weights": torch.zeros(2)}, d / "checkpoint.pt")
    assert _run(out) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert f"{d / 'checkpoint.pt'} is not a checkpoint of this kind of run (it lacks model, optimizer" in err
    # a checkpoint of another model: the shapes do not fit
    state = torch.load(__import__("io").BytesIO(good), weights_only=True)
    state["model"] = {k: torch.zeros(3) for k in state["model"]}
    torch.save(state, d / "checkpoint.pt")
    assert _run(out) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert f"{d / 'checkpoint.pt'} does not fit this run's model" in err and "Traceback" not in err
    # the plot command says the same
    assert cli.main(["plot", str(d)]) == cli.EXIT_USAGE
    assert "does not fit the model of" in capsys.readouterr().err


def test_a_finished_run_is_read_never_written(tmp_path, monkeypatch, capsys):
    """Re-running a finished run (to print its table again) writes nothing: every file keeps its
    bytes, and it works in a directory where nothing may be written (PermissionError)."""
    out = tmp_path / "done"
    assert _run(out) == 0
    d = out / GROUP / "seed0"
    before = {f.name: (f.read_bytes(), f.stat().st_mtime_ns) for f in d.iterdir()}

    def refuse(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(a[0]) if a else None)

    monkeypatch.setattr(os, "open", refuse)
    monkeypatch.setattr(Path, "mkdir", refuse)
    monkeypatch.setattr(rundir, "write_bytes", refuse)
    capsys.readouterr()
    assert _run(out) == 0
    assert "test acc %" in capsys.readouterr().out
    monkeypatch.undo()
    assert {f.name: (f.read_bytes(), f.stat().st_mtime_ns) for f in d.iterdir()} == before


# --------------------------------------------------------------------------------------------
# real processes
def _spawn(out, *extra) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    return subprocess.Popen([sys.executable, "-m", "bayesprune", "run", *TINY, *extra, "--out-dir", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for(pred, proc, timeout=600.0):
    t0 = time.time()
    while not pred():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.02)


def test_two_runs_on_one_run_directory(reference, tmp_path, monkeypatch, capsys):
    """While a run trains (here in a thread of this process, with its own lock file descriptor),
    a second run on the same directory is refused at once (exit 3, naming the directory and the
    holder); the first finishes undisturbed, each epoch once in metrics.jsonl."""
    import threading

    (want_rows, want_summary), _ = reference
    out = tmp_path / "two"
    d = out / GROUP / "seed0"
    real = training._train_epoch
    started, go = threading.Event(), threading.Event()

    def paused_epoch(*a, **k):
        if threading.current_thread() is not threading.main_thread():
            started.set()
            assert go.wait(60)
        return real(*a, **k)

    monkeypatch.setattr(training, "_train_epoch", paused_epoch)
    codes = []
    first = threading.Thread(target=lambda: codes.append(_run(out)))
    first.start()
    assert started.wait(60)
    t0 = time.time()
    assert _run(out) == cli.EXIT_LOCKED
    assert time.time() - t0 < 5
    err = capsys.readouterr().err
    assert f"error: run directory {d} is in use by process {os.getpid()} on host" in err and "Traceback" not in err
    go.set()
    first.join(60)
    assert codes == [0]
    assert _numbers(out) == (want_rows, want_summary)  # epochs 1, 2, 3 once each


def test_sigkill_of_a_process_that_holds_the_run(tmp_path, capsys):
    """A real process: while it trains, this one is refused (its PID named); SIGKILL once its
    third epoch's line is written (somewhere in its checkpoint write or the next epoch); the OS
    drops its lock and the same command resumes to the uninterrupted numbers."""
    longer = ("--epochs", "4", "--batch-size", "16")  # 72 steps an epoch: the process is still running
    assert _run(tmp_path / "whole", *longer) == 0
    out = tmp_path / "sigkill"
    d = out / GROUP / "seed0"
    proc = _spawn(out, *longer)
    _wait_for(lambda: (d / "metrics.jsonl").exists() and (d / "metrics.jsonl").read_text().count("\n") >= 2, proc)
    capsys.readouterr()
    refused = _run(out, *longer)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert refused == cli.EXIT_LOCKED
    assert f"is in use by process {proc.pid} on host" in capsys.readouterr().err
    assert (d / "run.lock").exists()  # left behind, but the OS dropped the lock with the process
    assert _run(out, *longer) == 0
    assert _numbers(out) == _numbers(tmp_path / "whole")


def test_ctrl_c_during_start_up(tmp_path, monkeypatch, capsys):
    """A KeyboardInterrupt anywhere in the command (here: while the data set loads, and while the
    parser is built) is exit 130 and one line, and leaves no run directory behind."""
    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "load_dataset", interrupt)
    assert _run(tmp_path / "o") == cli.EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert err.strip().startswith("interrupted (run directory") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
    monkeypatch.setattr(cli, "build_parser", interrupt)
    assert cli.main(["run"]) == cli.EXIT_INTERRUPTED
    assert capsys.readouterr().err.strip() == "interrupted; run the same command again to resume from the last finished epoch"


_INTERRUPT_TORCH_IMPORT = """
import sys
class InterruptTorch:  # Ctrl-C arrives while torch is being imported
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name == "torch":
            raise KeyboardInterrupt
sys.meta_path.insert(0, InterruptTorch)
import _bayesprune_cli
sys.exit(_bayesprune_cli.main())
"""


def test_ctrl_c_while_torch_is_imported_by_the_console_script():
    """The console script (``_bayesprune_cli``) imports the CLI, and so torch, inside the same
    guard: a Ctrl-C during that import is exit 130 and one line, no traceback. Once with the
    interrupt injected at the import of torch, then with a real SIGINT 0.15-1 s after start."""
    import _bayesprune_cli

    assert _bayesprune_cli.EXIT_INTERRUPTED == cli.EXIT_INTERRUPTED
    p = subprocess.run([sys.executable, "-c", _INTERRUPT_TORCH_IMPORT], capture_output=True, text=True, timeout=60)
    assert (p.returncode, p.stderr.strip()) == (130, "interrupted while starting; nothing was run")
    script = Path(sys.executable).parent / "bayesprune"
    # at several points of the start-up: a SIGINT inside numpy's extension import once surfaced
    # as numpy's "cannot load module more than once per process" ImportError (CI, stop 24)
    for delay in (0.15, 0.3, 0.6, 1.0):
        proc = subprocess.Popen([str(script), "run", "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        # it may have got further (the CLI's own handler, or even finished --help): never a traceback
        assert "Traceback" not in err and proc.returncode in (0, 130), (delay, proc.returncode, err)
        if proc.returncode == 130:
            assert err.strip().splitlines()[-1].startswith("interrupted"), (delay, err)


# --------------------------------------------------------------------------------------------
# docs/cli.md's error table, row by row
def _setup_file(tmp):
    (tmp / "o").write_text("a file where the out dir should be")


def _setup_other_config(tmp):
    assert _run(tmp / "o", "--finetune-epochs", "0") == 0  # then the same directory with --finetune-epochs 1


def _setup_foreign(tmp):
    d = tmp / "o" / GROUP / "seed0"
    d.mkdir(parents=True)
    torch.save({"weights": 1}, d / "checkpoint.pt")


def _setup_locked(tmp):
    d = tmp / "o" / GROUP / "seed0"
    d.mkdir(parents=True)
    return rundir.RunLock(d).acquire()


def _setup_readonly(tmp, monkeypatch):
    def refuse(self, *a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)


ERROR_TABLE = [
    # (row id, argv after "run" + TINY, setup, exit, text in stderr)
    ("unknown data set", ["--dataset", "nope"], None, 2, "argument --dataset: invalid choice"),
    ("threshold nan", ["--threshold", "nan"], None, 2, "argument --threshold"),
    ("lr inf", ["--lr", "inf"], None, 2, "argument --lr: expected a finite number"),
    ("compression nan", ["--method", "l2", "--compression", "nan"], None, 2, "argument --compression"),
    ("precision nan", ["--method", "bmrs_u", "--precision", "nan"], None, 2, "argument --precision"),
    ("bad lr", ["--lr", "-1"], None, 2, "lr must be a positive number"),
    ("val fraction 0", ["--val-fraction", "0"], None, 2, "val_fraction must be in (0, 1), got 0.0"),
    ("val fraction 1.5", ["--val-fraction", "1.5"], None, 2, "val_fraction must be in (0, 1), got 1.5"),
    ("duplicate seeds", ["--seeds", "0", "0"], None, 2, "--seeds lists 0 more than once"),
    ("precision without bmrs_u", ["--precision", "0"], None, 2, "--precision is the precision of BMRS_U"),
    ("other configuration", ["--finetune-epochs", "1"], _setup_other_config, 2, "holds a run with another configuration"),
    ("missing data", ["--dataset", "mnist", "--data-dir", "{tmp}/none"], None, 2, "missing the IDX file"),
    ("foreign checkpoint", [], _setup_foreign, 2, "is not a checkpoint of this kind of run"),
    ("diverged lr 1e30", ["--lr", "1e30"], None, 1, "training diverged: loss exceeds 10000 nats"),
    ("diverged lr 1e38", ["--lr", "1e38"], None, 1, "training diverged: the optimiser's step overflowed"),
    ("locked", [], _setup_locked, 3, f"is in use by process {os.getpid()} on host"),
    ("out dir is a file", [], _setup_file, 4, "not a directory (a file is in the way)"),
    ("out dir not writable", [], _setup_readonly, 4, "permission denied: choose a writable --out-dir"),
    ("out of memory", ["--width", "1000000000000"], None, 5, "error: out of memory"),
]


@pytest.mark.parametrize("argv, setup, code, needle", [r[1:] for r in ERROR_TABLE], ids=[r[0] for r in ERROR_TABLE])
def test_error_table(argv, setup, code, needle, tmp_path, monkeypatch, capsys):
    held = None
    if setup is _setup_readonly:
        setup(tmp_path, monkeypatch)
    elif setup is not None:
        held = setup(tmp_path)
    capsys.readouterr()
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert cli.main(["run", *TINY, *argv, "--out-dir", str(tmp_path / "o")]) == code
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:") or "error:" in line]
    assert len(lines) == 1, err
    if held is not None:
        held.release()
    if setup is None and code in (1, 2, 5):  # a failed start leaves nothing behind
        assert not (tmp_path / "o").exists()
        if code == 1:
            assert "no checkpoint was written" in err


def test_error_table_is_docs_cli_md():
    """Every exit code of the table in docs/cli.md is exercised above, and no other."""
    text = (ROOT / "docs" / "cli.md").read_text()
    table = text.split("<!-- error table")[1].split("<!-- end of error table")[0]
    documented = {int(line.rsplit("|", 2)[1]) for line in table.splitlines() if line.startswith("| ") and line.rstrip().endswith("|")
                  and line.rsplit("|", 2)[1].strip().isdigit()}
    tested = {r[3] for r in ERROR_TABLE} | {cli.EXIT_INTERRUPTED}
    assert documented == tested


def test_garbage_shrunk_model_file_names_the_file(tmp_path):
    from bayesprune import load_shrunk

    bad = tmp_path / "model.pt"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="model.pt"):
        load_shrunk(bad, torch.nn.Linear(2, 2))
    torch.save({101: 1}, bad)  # a valid torch file that is not a shrunk model (once: KeyError 101)
    with pytest.raises(ValueError, match="model.pt"):
        load_shrunk(bad, torch.nn.Linear(2, 2))
