"""Where the runs of a sweep or a reproduction execute: a local process pool or Ray tasks.

Both engines run the same run function (``run_continuous``, ``run_sweep``, a Bayes-factor group)
on each config and yield a :class:`RunOutcome` as each run finishes, so the run directories are
the same whichever engine wrote them: a finished run is skipped, an interrupted one resumes from
its checkpoint, and a run that raises is reported with its error while the others go on.

* :class:`LocalEngine` (``--engine local``, the default): ``jobs`` processes on this machine,
  each with ``usable_cores() // jobs`` threads; ``jobs=1`` runs in this process, with no more
  threads than the caller set (restored after).
* :class:`RayEngine` (``--engine ray``): one Ray task per run with ``num_cpus_per_run`` CPUs and
  ``num_gpus_per_run`` GPUs (a fraction shares a GPU), on a local Ray started for the command or
  on the cluster at ``address``.  Ray is optional (``pip install 'bayesprune[ray]'``) and imported
  only when a ``RayEngine`` is made.  Every worker must see the out and data directories at the
  same paths (a shared file system); relative paths are taken from the driver's working directory.

See docs/scale-out.md.
"""

from __future__ import annotations

import math
import os
import sys
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any, Callable, Iterator, Sequence

import torch

__all__ = ["ENGINES", "LocalEngine", "RayEngine", "RunOutcome", "make_engine", "run_all", "usable_cores"]

ENGINES = ("local", "ray")


@dataclass(frozen=True)
class RunOutcome:
    """One finished run: its position in the submitted list, its config, and either the run
    function's result or the error it raised (``"<type>: <message>"``, with the traceback)."""

    index: int
    config: Any
    result: Any = None
    error: str | None = None
    traceback: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity (taskset, cgroup cpusets) where the OS
    reports one, else ``os.cpu_count()``."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS, Windows
        return os.cpu_count() or 1


def _guarded(fn: Callable, config, threads: int | None = None, cwd: str | None = None) -> tuple:
    """``fn(config)`` as ``(result, None, None)``, or ``(None, error, traceback)`` if it raised an
    ``Exception`` (a ``KeyboardInterrupt`` still stops the run, which resumes later)."""
    if cwd is not None:
        os.chdir(cwd)
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return fn(config), None, None
    except Exception as e:  # noqa: BLE001  (reported with the run; the other runs go on)
        return None, f"{type(e).__name__}: {e}", traceback.format_exc()


def _outcome(index: int, config, guarded: tuple) -> RunOutcome:
    result, error, tb = guarded
    return RunOutcome(index, config, result, error, tb)


class _Engine:
    """Context manager (a no-op unless the engine holds a resource, e.g. a local Ray) with one
    method, :meth:`map`."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def map(self, fn: Callable, configs: Sequence) -> Iterator[RunOutcome]:  # pragma: no cover
        raise NotImplementedError


class LocalEngine(_Engine):
    """``jobs`` forked processes of this machine, each with ``usable_cores() // jobs`` threads
    (``jobs=1``: in this process, with every usable core)."""

    def __init__(self, jobs: int = 1):
        if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
            raise ValueError(f"jobs must be an integer >= 1, got {jobs!r}")
        self.jobs = jobs

    def __repr__(self) -> str:
        return f"LocalEngine(jobs={self.jobs})"

    def map(self, fn: Callable, configs: Sequence) -> Iterator[RunOutcome]:
        """Run ``fn`` on every config; yield each run's outcome as it finishes."""
        configs = list(configs)
        jobs = max(1, min(self.jobs, len(configs)))
        threads = max(1, usable_cores() // jobs)
        if jobs == 1:  # in this process: never more threads than the caller set, and theirs restored after
            before = torch.get_num_threads()
            torch.set_num_threads(min(before, threads))
            try:
                for i, c in enumerate(configs):
                    yield _outcome(i, c, _guarded(fn, c))
            finally:
                torch.set_num_threads(before)
            return
        with ProcessPoolExecutor(jobs, mp_context=get_context("fork"), initializer=torch.set_num_threads,
                                 initargs=(threads,)) as ex:
            futures = {ex.submit(_guarded, fn, c): i for i, c in enumerate(configs)}
            try:
                for f in as_completed(futures):
                    i = futures[f]
                    try:
                        guarded = f.result()
                    except Exception as e:  # noqa: BLE001  (the worker process died: BrokenProcessPool)
                        guarded = (None, f"{type(e).__name__}: {e}", traceback.format_exc())
                    yield _outcome(i, configs[i], guarded)
            except BaseException:
                for f in futures:
                    f.cancel()
                raise


def _import_ray():
    try:
        import ray
    except ImportError as e:
        raise ImportError("the Ray engine needs Ray, which is not installed: pip install 'bayesprune[ray]' "
                          "(the 'ray' extra) or pip install ray") from e
    return ray


def _resource(name: str, value: float, minimum_exclusive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (value <= 0 if minimum_exclusive else value < 0):
        bound = "> 0" if minimum_exclusive else ">= 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    if value > 1 and value != int(value):
        raise ValueError(f"{name} above 1 must be a whole number (Ray shares a resource only in fractions "
                         f"below 1), got {value!r}")
    return float(value)


class RayEngine(_Engine):
    """One Ray task per run with ``num_cpus_per_run`` CPUs and ``num_gpus_per_run`` GPUs.

    ``address=None`` starts a local Ray with ``num_cpus`` CPUs (default: ``usable_cores()``) for
    the duration of :meth:`map`, or of a ``with`` block around several calls, and shuts it down
    afterwards; ``address`` (``"auto"``, ``"<head>:6379"``, ``"ray://<head>:10001"``) connects to
    a running cluster instead.  Where Ray is already initialised in this process it is used as it
    is and left running.  Each task runs with ``max(1, floor(num_cpus_per_run))`` torch threads;
    a task with no GPU share sees no GPU (``CUDA_VISIBLE_DEVICES=""``), one with a share sees the
    GPU Ray gave it.
    """

    def __init__(self, address: str | None = None, *, num_cpus_per_run: float = 1, num_gpus_per_run: float = 0,
                 num_cpus: int | None = None):
        self._ray = _import_ray()
        self.address = address or None
        self.num_cpus_per_run = _resource("num_cpus_per_run", num_cpus_per_run, True)
        self.num_gpus_per_run = _resource("num_gpus_per_run", num_gpus_per_run, False)
        if num_cpus is not None and self.address is not None:
            raise ValueError("num_cpus applies to the local Ray the engine starts, not to a cluster at an address")
        if num_cpus is not None and (isinstance(num_cpus, bool) or not isinstance(num_cpus, int) or num_cpus < 1):
            raise ValueError(f"num_cpus must be an integer >= 1, got {num_cpus!r}")
        self.num_cpus = num_cpus
        self._started = False
        self._depth = 0

    def __repr__(self) -> str:
        return (f"RayEngine(address={self.address!r}, num_cpus_per_run={self.num_cpus_per_run:g}, "
                f"num_gpus_per_run={self.num_gpus_per_run:g})")

    def __enter__(self):
        ray = self._ray
        if self._depth == 0 and not ray.is_initialized():
            import logging

            options = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
            if self.address is None:
                ray.init(num_cpus=self.num_cpus or usable_cores(), **options)
            else:
                ray.init(address=self.address, **options)
            self._started = True
        self._depth += 1
        return self

    def __exit__(self, *exc) -> None:
        self._depth -= 1
        if self._depth == 0 and self._started:
            self._ray.shutdown()
            self._started = False

    def _check_resources(self) -> None:
        """A task asking for more than any node has would wait for ever: refuse it, naming it."""
        nodes = [n.get("Resources", {}) for n in self._ray.nodes() if n.get("Alive")]
        for key, need, option in (("CPU", self.num_cpus_per_run, "num_cpus_per_run (--cpus-per-run)"),
                                  ("GPU", self.num_gpus_per_run, "num_gpus_per_run (--gpus-per-run)")):
            most = max((n.get(key, 0.0) for n in nodes), default=0.0)
            if need > most:
                raise ValueError(f"{option} is {need:g} but no node of the Ray cluster has that many {key}s "
                                 f"(largest: {most:g})")

    def map(self, fn: Callable, configs: Sequence) -> Iterator[RunOutcome]:
        """Submit every config as a Ray task; yield each run's outcome as it finishes."""
        configs = list(configs)
        if not configs:
            return
        with self:
            ray = self._ray
            self._check_resources()
            options = dict(num_cpus=self.num_cpus_per_run, num_gpus=self.num_gpus_per_run)
            if self.num_gpus_per_run == 0:  # Ray leaves a node's GPUs visible to a task that asked for none
                options["runtime_env"] = {"env_vars": {"CUDA_VISIBLE_DEVICES": ""}}
            task = ray.remote(**options)(_guarded)
            threads = max(1, int(self.num_cpus_per_run))
            refs = {task.remote(fn, c, threads, os.getcwd()): i for i, c in enumerate(configs)}
            pending = list(refs)
            try:
                while pending:
                    done, pending = ray.wait(pending, num_returns=1)
                    for ref in done:
                        i = refs[ref]
                        try:
                            guarded = ray.get(ref)
                        except ray.exceptions.RayError as e:  # the worker died, the task was cancelled, ...
                            guarded = (None, f"{type(e).__name__}: {e}", traceback.format_exc())
                        yield _outcome(i, configs[i], guarded)
            except BaseException:
                for ref in pending:
                    ray.cancel(ref, force=True)
                raise


def make_engine(name: str = "local", *, jobs: int = 1, address: str | None = None,
                num_cpus_per_run: float | None = None, num_gpus_per_run: float | None = None):
    """The engine the CLI's ``--engine`` names: ``LocalEngine(jobs)``, or ``RayEngine`` with the
    other options (None: 1 CPU and no GPU per run), which the local engine refuses."""
    if name == "local":
        given = [o for o, v in (("--ray-address", address), ("--cpus-per-run", num_cpus_per_run),
                                ("--gpus-per-run", num_gpus_per_run)) if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)} apply to --engine ray only")
        return LocalEngine(jobs)
    if name == "ray":
        return RayEngine(address, num_cpus_per_run=1 if num_cpus_per_run is None else num_cpus_per_run,
                         num_gpus_per_run=0 if num_gpus_per_run is None else num_gpus_per_run)
    raise ValueError(f"unknown engine {name!r}; valid: {', '.join(ENGINES)}")


def run_all(engine, fn: Callable, configs: Sequence, *, progress: bool = True,
            failures: list[RunOutcome] | None = None) -> list:
    """``fn`` on every config through ``engine``: the results in the order of ``configs``, None
    where a run failed (its outcome is printed with its error and appended to ``failures``)."""
    configs = list(configs)
    results = [None] * len(configs)
    for done, o in enumerate(engine.map(fn, configs), 1):
        where = getattr(o.config, "out_dir", o.config)
        if o.ok:
            results[o.index] = o.result
            if progress:
                print(f"[{done}/{len(configs)}] done {where}", flush=True)
        else:
            if failures is not None:
                failures.append(o)
            print(f"[{done}/{len(configs)}] FAILED {where}: {o.error}", file=sys.stderr, flush=True)
    return results
