"""Launchers: run a sweep's runs one after another, in a local process pool, or as Slurm array jobs (submitit).

``launcher.map(fn, items) -> list[Result]``: ``fn`` is a top-level (picklable) function that executes one run
and returns a small picklable value; ``items`` are picklable run specs. Results come back in item order, one per
item, whatever the order the runs finish in. A failed run never stops the others and never raises from
``map``: its ``Result`` has ``ok=False``, ``error`` (one line: exception type and message) and ``traceback``
(the full text). The caller decides: ``raise_for_failures(results)`` raises ``RunsFailedError`` naming every
failed item after all have run, or the caller reports and carries on (e.g. marks the runs for re-submission;
filtering out finished runs before ``map`` is also the caller's job).

- ``LocalLauncher(jobs=1)``: in this process, one run after another (KeyboardInterrupt still stops everything).
- ``LocalLauncher(jobs=N)``: a ``ProcessPoolExecutor`` with the ``spawn`` start method (no forked torch/CUDA
  state); each worker sets torch's threads (and ``OMP_NUM_THREADS``/``MKL_NUM_THREADS``) to
  ``max(1, cores // N)`` before running anything. A worker that dies (killed for memory) fails the items it had
  and those still queued, each with the pool's error; completed results are kept.
- ``SlurmLauncher``: ``submitit.AutoExecutor(folder=...)``; every item is one task of a Slurm job array
  (``executor.map_array``), at most ``array_parallelism`` running at once; waits for all, then gathers.
  ``executor="local"`` runs the same jobs as local subprocesses (all at once; submitit's local executor has no
  array parallelism) and ``"debug"`` in this process: both for tests and for trying a sweep without a cluster.
  Logs and pickles of every job are under ``folder`` (``%j`` = job id); ``Result.job_id`` names the job.
"""

from __future__ import annotations

import os
import traceback as tb
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from samadapt.errors import ConfigError


@dataclass
class Result:
    """What one run returned, or why it failed."""

    index: int
    item: Any
    value: Any = None
    error: str | None = None
    traceback: str | None = None
    job_id: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class RunsFailedError(RuntimeError):
    """Some runs of a sweep failed; ``.results`` holds every result (failed and finished)."""

    def __init__(self, results: Sequence[Result]) -> None:
        failed = [r for r in results if not r.ok]
        lines = "; ".join(f"item {r.index}: {r.error}" for r in failed[:5])
        more = f" (and {len(failed) - 5} more)" if len(failed) > 5 else ""
        super().__init__(f"{len(failed)} of {len(results)} runs failed: {lines}{more}")
        self.results = list(results)


def raise_for_failures(results: Sequence[Result]) -> list[Result]:
    """Return ``results`` unchanged when every run finished, else raise ``RunsFailedError``."""
    if any(not r.ok for r in results):
        raise RunsFailedError(results)
    return list(results)


def _failure(index: int, item: Any, exc: BaseException, *, job_id: str | None = None) -> Result:
    text = "".join(tb.format_exception(type(exc), exc, exc.__traceback__))
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    error = f"{type(exc).__name__}: {lines[-1] if lines else ''}".rstrip(": ")
    if job_id is not None:
        # submitit's FailedJobError quotes the run's traceback between dashed lines: its last line is the error
        # ("ValueError: ..."); the log paths that follow are in `traceback`.
        quoted = str(exc).split("----------------------")
        if len(quoted) >= 3 and quoted[1].strip():
            error = quoted[1].strip().splitlines()[-1].strip()
    return Result(index=index, item=item, error=error, traceback=text, job_id=job_id)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _init_worker(threads: int) -> None:
    # Runs first in every pool worker: N workers share the machine's cores instead of each taking all of them.
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(threads)
    import torch

    torch.set_num_threads(threads)


class LocalLauncher:
    kind = "local"

    def __init__(self, *, jobs: int = 1) -> None:
        if jobs < 1:
            raise ConfigError(f"jobs must be at least 1, got {jobs}")
        self.jobs = int(jobs)

    @property
    def threads_per_worker(self) -> int:
        return max(1, available_cores() // self.jobs)

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> list[Result]:
        items = list(items)
        if self.jobs == 1 or len(items) <= 1:
            return [self._run_here(fn, i, item) for i, item in enumerate(items)]
        import multiprocessing

        results: list[Result | None] = [None] * len(items)
        pool = ProcessPoolExecutor(
            max_workers=min(self.jobs, len(items)),
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(self.threads_per_worker,),
        )
        try:
            futures = [pool.submit(fn, item) for item in items]
            for i, future in enumerate(futures):
                try:
                    results[i] = Result(index=i, item=items[i], value=future.result())
                except Exception as exc:  # the run's own error, or the pool's (a worker died)
                    results[i] = _failure(i, items[i], exc)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return [r for r in results if r is not None]

    @staticmethod
    def _run_here(fn: Callable[[Any], Any], index: int, item: Any) -> Result:
        try:
            return Result(index=index, item=item, value=fn(item))
        except Exception as exc:
            return _failure(index, item, exc)


SUBMITIT_EXECUTORS = ("slurm", "local", "debug")


class SlurmLauncher:
    kind = "slurm"

    def __init__(
        self,
        *,
        folder: str | Path,
        executor: str = "slurm",
        slurm_partition: str | None = None,
        slurm_time_min: int = 60,
        gpus_per_run: int = 0,
        cpus_per_run: int = 4,
        mem_gb: float = 16,
        array_parallelism: int = 16,
        job_name: str = "samadapt",
    ) -> None:
        """Slurm resources per run: one task with ``cpus_per_run`` CPUs, ``gpus_per_run`` GPUs, ``mem_gb`` memory,
        ``slurm_time_min`` minutes, in ``slurm_partition`` (the cluster's default when None)."""
        if executor not in SUBMITIT_EXECUTORS:
            raise ConfigError(
                f"unknown submitit executor {executor!r}; choose one of {', '.join(SUBMITIT_EXECUTORS)}"
            )
        self.folder = Path(folder)
        self.executor_kind = executor
        self.parameters: dict[str, Any] = {
            "name": job_name,
            "timeout_min": int(slurm_time_min),
            "gpus_per_node": int(gpus_per_run),
            "cpus_per_task": int(cpus_per_run),
            "mem_gb": float(mem_gb),
            "slurm_array_parallelism": int(array_parallelism),
            "slurm_partition": slurm_partition,  # None is "not set" for submitit
        }

    def _executor(self) -> Any:
        import submitit

        try:
            executor = submitit.AutoExecutor(folder=str(self.folder / "%j"), cluster=self.executor_kind)
        except (RuntimeError, ValueError) as exc:  # e.g. no sbatch on this machine
            raise ConfigError(f"submitit {self.executor_kind} executor in {self.folder}: {exc}") from None
        executor.update_parameters(**self.parameters)
        return executor

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> list[Result]:
        items = list(items)
        if not items:
            return []
        executor = self._executor()
        try:
            jobs = executor.map_array(fn, items)
        except Exception as exc:  # sbatch missing or refusing the parameters: nothing was submitted
            raise ConfigError(
                f"submitit {self.executor_kind}: submitting {len(items)} runs (logs in {self.folder}) failed: {exc}"
            ) from exc
        results = []
        for i, (item, job) in enumerate(zip(items, jobs)):
            # exception() first: it waits like result(), and the debug executor's result() would open pdb on a
            # failed run. FailedJobError carries the run's traceback; UncompletedJobError a killed/timed-out job.
            try:
                exc = job.exception()
                if exc is None:
                    results.append(Result(index=i, item=item, value=job.result(), job_id=str(job.job_id)))
                    continue
            except Exception as error:
                exc = error
            results.append(_failure(i, item, exc, job_id=str(job.job_id)))
        return results


Launcher = LocalLauncher | SlurmLauncher
LAUNCHERS: dict[str, type[LocalLauncher] | type[SlurmLauncher]] = {
    "local": LocalLauncher,
    "slurm": SlurmLauncher,
}


def make_launcher(
    kind: str,
    *,
    jobs: int = 1,
    folder: str | Path,
    slurm_partition: str | None = None,
    slurm_time_min: int = 60,
    gpus_per_run: int = 0,
    cpus_per_run: int = 4,
    mem_gb: float = 16,
    array_parallelism: int = 16,
    executor: str = "slurm",
) -> Launcher:
    """``"local"`` (``jobs`` processes; 1 = in this process) or ``"slurm"`` (submitit; ``executor`` "slurm",
    "local" or "debug"); ``folder`` holds submitit's logs (unused by the local launcher)."""
    if kind not in LAUNCHERS:
        raise ConfigError(f"unknown launcher {kind!r}; choose one of {', '.join(LAUNCHERS)}")
    if kind == "local":
        return LocalLauncher(jobs=jobs)
    return SlurmLauncher(
        folder=folder,
        executor=executor,
        slurm_partition=slurm_partition,
        slurm_time_min=slurm_time_min,
        gpus_per_run=gpus_per_run,
        cpus_per_run=cpus_per_run,
        mem_gb=mem_gb,
        array_parallelism=array_parallelism,
    )
