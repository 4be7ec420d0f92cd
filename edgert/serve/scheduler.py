"""The single-model executor: one worker thread runs generations one at a time, in arrival order.

The event loop never runs model code. A request becomes a Job; ``Scheduler.submit`` puts it in a bounded FIFO
(QueueFullError when full) and the worker thread takes jobs from it. The worker passes each decoded piece to the
job's asyncio side through a deque plus at most one pending ``call_soon_threadsafe`` wake-up, so a fast model does
not flood the loop with callbacks. Between tokens, and between the prompt's prefill chunks (at most 64 tokens), the
worker checks the job's cancel flag (set when the client disconnects or the server shuts down) and its deadline (the
per-request timeout), so either stops the generation after the token or chunk in flight. A job cancelled while it
waits leaves the queue at once, freeing its slot.

The LLM's KV-cache prefix reuse still applies between consecutive jobs. Jobs are not interleaved: the C decoder holds
one sequence's KV cache, so continuous batching would need a multi-sequence cache in the C core first.

This module must not know about HTTP: app.py turns jobs into responses.
"""
from __future__ import annotations

import asyncio
import collections
import threading
import time
from dataclasses import dataclass, field

from ..errors import EdgertError


class QueueFullError(EdgertError):
    """Every slot of the request queue is taken; retry later."""


class ShuttingDownError(QueueFullError):
    """The scheduler is closed: the server is shutting down and takes no new jobs (a QueueFullError, as it was)."""


@dataclass
class JobOutcome:
    result: object = None  # edgert.llm GenerationResult, None when the job never ran or failed
    finish_reason: str = "stop"  # the generation's reason, or "cancelled" / "shutdown" / "timeout" / "error"
    error: BaseException | None = None
    queue_wait_s: float = 0.0
    ttft_s: float | None = None  # from submission to the first piece, queue wait included


@dataclass
class Job:
    prompt_ids: list
    sampling: dict
    deadline: float  # time.monotonic() after which the job stops
    loop: asyncio.AbstractEventLoop
    scheduler: "Scheduler"
    submitted: float = field(default_factory=time.monotonic)
    cancelled: threading.Event = field(default_factory=threading.Event)
    cancel_reason: str | None = None  # the finish reason a cancel gives: "cancelled" (the client) or "shutdown"
    started: float | None = None
    outcome: JobOutcome | None = None
    on_done: object = None  # called with (job, outcome) at its end: on the worker, or where a queued job was cancelled
    ended: bool = False  # set once, by whichever ends the job first (the worker, a cancel while queued, or stop)
    _items: collections.deque = field(default_factory=collections.deque)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _wake_pending: bool = False

    def cancel(self, reason: str = "cancelled") -> None:
        """Stop the job: a queued one leaves the queue now and ends without running, a running one stops after the
        token or prefill chunk in flight. A no-op once it has ended."""
        self.scheduler.cancel(self, reason)

    # worker side
    def _push(self, item) -> None:
        self._items.append(item)
        if not self._wake_pending:
            self._wake_pending = True
            try:
                self.loop.call_soon_threadsafe(self._wake.set)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                self.cancelled.set()

    # asyncio side
    async def pieces(self):
        """Yields text until the job ends; its outcome is then in ``self.outcome``. Pieces that arrived while the
        consumer was busy come joined as one, so a slow client or a busy loop costs fewer events, not a backlog."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            self._wake_pending = False  # before draining: a push after this point wakes us again
            text = []
            while self._items:
                item = self._items.popleft()
                if isinstance(item, JobOutcome):
                    self.outcome = item
                    break
                text.append(item)
            if text:
                yield "".join(text)
            if self.outcome is not None:
                return


class Scheduler:
    """Runs ``llm._iterate`` for queued jobs on one worker thread."""

    def __init__(self, llm, max_queue: int = 64):
        if not isinstance(max_queue, int) or max_queue < 0:
            raise ValueError(f"max_queue must be an int >= 0, got {max_queue!r}")
        self.llm = llm
        self.max_queue = max_queue
        self._waiting: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._stop = False
        self.running: Job | None = None
        self._thread: threading.Thread | None = None  # made by start(), again after a worker ended

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    def start(self) -> None:
        """Start the worker unless it runs (an app's lifespan, or the first request of an app used without one).
        After ``close``: ShuttingDownError (a request that finished arriving after SIGTERM gets its 503; restarting
        a thread raised RuntimeError, a 500)."""
        with self._cond:
            if self._stop:
                raise ShuttingDownError("the server is shutting down")
            if self._thread is None or not self._thread.is_alive():  # (threads start once: an ended one, anew)
                self._thread = threading.Thread(target=self._work, name="edgert-serve-worker", daemon=True)
                self._thread.start()

    def reopen(self) -> None:
        """Take jobs again after ``close``/``stop`` and start the worker: the app's next lifespan (one app may be
        served, or put under a test client, more than once)."""
        with self._cond:
            self._stop = False
        self.start()

    def close(self) -> None:
        """Take no new jobs (ShuttingDownError), end the queued ones now and stop the running one after the token or
        prefill chunk in flight, all with finish reason "shutdown". Returns at once; ``stop`` also waits for the
        worker."""
        with self._cond:  # the queue is emptied in one step: the worker must not start a job that is being cancelled
            self._stop = True
            queued = list(self._waiting)
            self._waiting.clear()
            for job in (*queued, self.running):
                if job is not None:
                    self._flag(job, "shutdown")
            self._cond.notify_all()
        for job in queued:
            self._end_cancelled(job)

    def stop(self, timeout: float = 10.0) -> None:
        """close(), then wait up to ``timeout`` for the worker. A job still running then (a model step that outlasts
        the timeout) is ended here with its cancel reason, so its answer and its bookkeeping (telemetry) happen
        before the process exits; the worker's own end of it, if it comes, is skipped."""
        self.close()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout)
        with self._cond:
            job = self.running
        if job is not None:
            self._end_cancelled(job)

    def submit(self, prompt_ids: list, sampling: dict, timeout_s: float, submitted: float | None = None,
               on_done=None) -> Job:
        """Queue a job (from the event loop). QueueFullError when max_queue jobs already wait besides the one
        running; ShuttingDownError after ``close``. submitted: the request's arrival (time.monotonic()), from which
        the timeout and time to first token count."""
        submitted = time.monotonic() if submitted is None else submitted
        job = Job(prompt_ids=prompt_ids, sampling=sampling, deadline=submitted + timeout_s,
                  loop=asyncio.get_running_loop(), scheduler=self, submitted=submitted, on_done=on_done)
        with self._cond:
            if self._stop:
                raise ShuttingDownError("the server is shutting down")
            # with nothing running, the head of the queue is about to run (the worker has yet to take it): counting
            # it as waiting gave a burst of max_queue + 1 requests on an idle server a 503
            if len(self._waiting) + (self.running is not None) > self.max_queue:
                raise QueueFullError(f"{len(self._waiting)} requests are already waiting (--max-queue {self.max_queue})")
            self._waiting.append(job)
            self._cond.notify()
        return job

    def cancel(self, job: Job, reason: str = "cancelled") -> None:
        """Job.cancel: a queued job is taken out of the queue (its slot is free at once: a client that went away
        while waiting kept it until the worker reached the job) and ended here."""
        with self._cond:
            self._flag(job, reason)
            try:
                self._waiting.remove(job)
            except ValueError:  # running (it stops after the step in flight) or ended
                return
        self._end_cancelled(job)

    @staticmethod
    def _flag(job: Job, reason: str) -> None:
        if job.cancel_reason is None:  # the first reason stands: a client gone before the shutdown was "cancelled"
            job.cancel_reason = reason
        job.cancelled.set()

    def _end_cancelled(self, job: Job) -> None:
        """End ``job`` with its cancel reason: one still queued, or (stop) one whose model step outlasted the wait."""
        self._end(job, JobOutcome(finish_reason=job.cancel_reason,
                                  queue_wait_s=(job.started or time.monotonic()) - job.submitted))

    def _end(self, job: Job, outcome: JobOutcome) -> None:
        with self._cond:
            if job.ended:  # stop() ended it while the worker was still in a model step
                return
            job.ended = True
        # bookkeeping first: a client reading /metrics the moment it has its answer finds the answer counted
        if job.on_done is not None:
            try:
                job.on_done(job, outcome)
            except Exception:  # bookkeeping must never kill the worker
                pass
        job._push(outcome)  # jobs end on the worker and, cancelled while queued, on the loop

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._stop:
                    self._cond.wait()
                if not self._waiting:  # stopped
                    return
                job = self._waiting.popleft()
                self.running = job
            try:
                outcome = self._run(job)
            finally:
                # free before the answer goes out: a client that sends its next request the moment it has this
                # one's could find the finished job still running and get 503 from an idle server (--max-queue 0)
                with self._cond:
                    self.running = None
            self._end(job, outcome)

    def _run(self, job: Job) -> JobOutcome:
        job.started = time.monotonic()
        out = JobOutcome(queue_wait_s=job.started - job.submitted)
        if job.cancelled.is_set():  # cancelled between leaving the queue and starting
            out.finish_reason = job.cancel_reason
            return out
        if job.started >= job.deadline:
            out.finish_reason = "timeout"
            return out

        def should_stop():
            if job.cancelled.is_set():
                return job.cancel_reason
            if time.monotonic() >= job.deadline:
                return "timeout"
            return None

        try:
            it = self.llm._iterate(job.prompt_ids, record=False, should_stop=should_stop, **job.sampling)
            while True:
                try:
                    piece = next(it)
                except StopIteration as done:
                    out.result = done.value
                    out.finish_reason = done.value.finish_reason
                    break
                if piece:
                    if out.ttft_s is None:
                        out.ttft_s = time.monotonic() - job.submitted
                    job._push(piece)
        except Exception as exc:  # a model failure ends this job, never the worker
            out.error = exc
            out.finish_reason = "error"
        return out
