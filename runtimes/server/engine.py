"""One model, one generation at a time, in arrival order.

Request handlers run on the event loop; generation runs on one worker thread that drives the
runtime's Generator. A Job carries a request across: the worker asks its cancel flag after every
token (so a client that leaves, a time limit that passes, or a shutdown stops it within one
token) and hands events back to the loop. Admission is bounded: past ``max_queue`` a request is
refused at once (429) instead of waiting without end.
"""
from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time

from ..generate import Result, Sampling

log = logging.getLogger(__name__)


class Job:
    """One admitted request. ``items`` receives ("event", Event) per piece of text when streaming,
    ("timeout", None) when the time limit passes, and ("end", None) once the worker is done with it."""

    def __init__(self, prompt_ids: list[int], sampling: Sampling, streaming: bool):
        self.loop = asyncio.get_running_loop()
        self.prompt_ids, self.sampling, self.streaming = prompt_ids, sampling, streaming
        self.result = Result()
        self.items: asyncio.Queue = asyncio.Queue()
        self.settled = self.loop.create_future()  # set when the worker is done, or the time limit passes
        self.error: BaseException | None = None
        self.stop_reason: str | None = None  # disconnect | timeout | shutdown
        self.arrived = time.perf_counter()
        self.started: float | None = None
        self._stop = threading.Event()
        self._timer: asyncio.TimerHandle | None = None

    # ---- either side ----------------------------------------------------------------------------
    def cancel(self, reason: str) -> None:
        """Ask the worker to stop this job (before it starts, or within one token); the first reason stays."""
        if not self._stop.is_set():
            self.stop_reason = reason
            self._stop.set()

    def cancelled(self) -> bool:
        return self._stop.is_set()

    # ---- event loop side ------------------------------------------------------------------------
    def limit(self, seconds: float) -> None:
        self._timer = self.loop.call_later(seconds, self._expire)

    def _expire(self) -> None:
        if self.settled.done():
            return
        self.cancel("timeout")
        self.items.put_nowait(("timeout", None))
        self.settled.set_result("timeout")

    def _finish(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.items.put_nowait(("end", None))
        if not self.settled.done():
            self.settled.set_result("done")

    # ---- worker side ----------------------------------------------------------------------------
    def emit(self, event) -> None:
        self.loop.call_soon_threadsafe(self.items.put_nowait, ("event", event))

    def finish(self, error: BaseException | None = None) -> None:
        self.error = error
        try:
            self.loop.call_soon_threadsafe(self._finish)
        except RuntimeError:  # the loop closed first (the server is shutting down): nobody is waiting
            pass


class Engine:
    """The worker thread and its bounded admission. ``on_finished(job)`` runs on the worker after each job."""

    def __init__(self, generator, max_queue: int, on_finished=lambda job: None):
        self.generator, self.max_queue, self.on_finished = generator, max_queue, on_finished
        self.jobs: queue.Queue = queue.Queue()
        self.lock = threading.Lock()
        self.admitted = 0
        self.running: Job | None = None
        self.seconds_per_job = 1.0  # moving average, for Retry-After
        self.thread: threading.Thread | None = None

    def submit(self, job: Job) -> bool:
        """Admit ``job`` (True) or refuse it because ``max_queue`` requests are already admitted (False)."""
        with self.lock:
            if self.admitted >= self.max_queue:
                return False
            self.admitted += 1
            if self.thread is None:  # started on first use, so an app that mounts this one needs no lifespan
                self.thread = threading.Thread(target=self._work, name="edge-serve-generate", daemon=True)
                self.thread.start()
        self.jobs.put(job)
        return True

    def waiting(self) -> int:
        with self.lock:
            return self.admitted - (1 if self.running is not None else 0)

    def active(self) -> int:
        return 1 if self.running is not None else 0

    def retry_after_s(self) -> int:
        """Seconds until a place in the queue is likely free: one job's typical duration, at least 1."""
        return max(1, math.ceil(self.seconds_per_job))

    def close(self, timeout_s: float = 10.0) -> None:
        """Cancel every admitted job and stop the worker."""
        if self.running is not None:
            self.running.cancel("shutdown")
        pending = []
        while True:
            try:
                pending.append(self.jobs.get_nowait())
            except queue.Empty:
                break
        for job in pending:
            if job is not None:
                job.cancel("shutdown")
                self.jobs.put(job)  # the worker finishes each (cancelled, so at once) and reports it
        self.jobs.put(None)
        if self.thread is not None:
            self.thread.join(timeout_s)

    def _work(self) -> None:
        while (job := self.jobs.get()) is not None:
            with self.lock:
                self.running = job
            try:
                self._run(job)
            finally:
                with self.lock:
                    self.running = None
                    self.admitted -= 1

    def _run(self, job: Job) -> None:
        if job.cancelled():  # it left or timed out while waiting
            self.on_finished(job)
            job.finish()
            return
        job.started = time.perf_counter()
        error = None
        try:
            for event in self.generator.stream(job.prompt_ids, job.sampling, job.result, cancel=job.cancelled):
                if job.streaming:
                    job.emit(event)
        except Exception as e:  # noqa: BLE001 -- reported to the request's client; the server keeps serving
            log.exception("generation failed")
            error = e
        self.seconds_per_job = 0.8 * self.seconds_per_job + 0.2 * (time.perf_counter() - job.started)
        job.error = error
        self.on_finished(job)
        job.finish(error)
