"""Who steps the engine and in which thread: the caller, a driver in `run()`, or a background
thread, one at a time, so that torch's work stays in one thread; apart from what a step does."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Protocol

import torch


class Steps(Protocol):
    """What driving needs of the engine."""

    @property
    def batch_size(self) -> int: ...

    def admit(self, block: bool) -> None:
        """Moves waiting requests into the batch; `block`: waits for one (or for wake())."""

    def step(self) -> None:
        """One step of the batch; never raises."""

    def end_all(self, reason: str) -> None:
        """Ends every running and waiting request with `reason`."""

    def wake(self) -> None:
        """Ends a wait in admit(block=True)."""


class Driving:
    """One thread at a time drives the model and the KV cache, a step at a time. Without a
    server, whoever waits for a result drives: `model.generate()` steps the engine in the
    caller's own thread (once()). A server has a driver that runs for as long as it serves
    (`gptj serve`: the main thread in run(); an app made in Python: start_background()). Why not
    always a worker thread: torch's OpenMP runtime keeps a thread pool per thread that runs
    parallel ops, and with two pools on a small machine it sleeps between ops instead of
    spinning, so every op pays a wake-up. Loading, stepping and `model.logits()` (call()) in one
    thread keep one pool."""

    def __init__(self, engine: Steps) -> None:
        self.engine = engine
        self.lock = threading.Lock()  # for `driver`
        self.step_lock = threading.Lock()  # held for each step: one thread drives at a time
        self.driver: threading.Thread | None = None  # a thread in run(): it alone drives
        self.thread: threading.Thread | None = None  # the background driver, when started
        self.calls: queue.Queue[tuple[Callable[[], Any], Future]] = queue.Queue()  # for call()
        self.stopping = False

    def elsewhere(self) -> bool:
        """A driver thread other than the calling one runs."""
        driver = self.driver
        return driver is not None and driver.is_alive() and driver is not threading.current_thread()

    def once(self) -> bool:
        """One step in the calling thread, unless a driver thread runs or another thread is
        stepping (then False: the caller waits for its events instead)."""
        if self.elsewhere():
            return False
        if not self.step_lock.acquire(blocking=False):
            return False
        try:
            with torch.no_grad():
                self._run_calls()
                self.engine.admit(block=False)
                self.engine.step()
        finally:
            self.step_lock.release()
        return True

    def run(self, on_ready: Callable[[], None] | None = None) -> None:
        """Drives in this thread until stop(), then ends what is left with "shutdown"."""
        with self.lock:
            if self.elsewhere():
                raise RuntimeError("the engine already has a driver thread")
            self.driver = threading.current_thread()
        try:
            if on_ready is not None:
                on_ready()
            with torch.no_grad():
                while not self.stopping:
                    with self.step_lock:
                        self._run_calls()
                        self.engine.admit(block=self.engine.batch_size == 0)
                        if self.stopping:
                            break
                        self.engine.step()
                with self.step_lock:
                    self.engine.end_all("shutdown")
        finally:
            with self.lock:
                self.driver = None

    def start_background(self) -> bool:
        """Starts a thread in run(), unless a driver runs; True when it started one."""
        with self.lock:
            if self.driver is not None and self.driver.is_alive():
                return False
            self.stopping = False
            self.thread = threading.Thread(target=self.run, name="gptj-engine", daemon=True)
            # set here, not in run(): a submit right after this call must not drive too
            self.driver = self.thread
            self.thread.start()
            return True

    def stop(self) -> None:
        """Makes run() return after its current step."""
        self.stopping = True
        self.engine.wake()

    def call(self, fn: Callable[[], Any]) -> Any:
        """Runs `fn` in the driving thread between steps (here, when none runs elsewhere) and
        returns its result."""
        if not self.elsewhere():
            with self.step_lock, torch.no_grad():
                return fn()
        future: Future = Future()
        self.calls.put((fn, future))
        self.engine.wake()  # a driver waiting for requests
        return future.result()

    def _run_calls(self) -> None:
        while True:
            try:
                fn, future = self.calls.get_nowait()
            except queue.Empty:
                return
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:  # the caller gets it
                    future.set_exception(exc)
