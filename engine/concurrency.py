"""The engine's model lock: pipeline calls share the model, calls that change it wait for them.

Any number of threads may run pipelines on one engine at once; a call that changes the shared model -- loading or
unloading a LoRA, changing its scale, fusing, loading an IP-Adapter or a learned token, switching the UNet backend,
training -- must not run while a pipeline call is between its steps, or that call would mix two models (a
red-team run saw 12 of 12 concurrent text2img calls fail with NaN while LoRAs were loaded and unloaded, and images
matching neither model while a LoRA's scale changed). :class:`ModelLock` is a readers-writer lock with writer
preference:

* a pipeline call (:func:`~dreamfuse.engine.pipelines.program.drive`, every ``engine.text2img(...)`` and sibling)
  holds a *read* for its whole run; a step scheduler holds one *lease* per running request
  (:meth:`ModelLock.try_lease`, never blocking its worker);
* a model change (:func:`changes_model`) waits until no read or lease is held, and from the moment it waits, new
  reads wait behind it and the scheduler admits nothing new: the change happens between calls, never inside one;
* reads re-enter (a pipeline that runs another pipeline inside it), a change may run pipelines (a trainer's
  validation images), and a change requested from inside a running call of the same thread (a step callback that
  loads a LoRA) is refused with a ``RuntimeError`` instead of deadlocking.
"""

from __future__ import annotations

import functools
import threading
from contextlib import contextmanager


class ModelLock:
    """A readers-writer lock over one engine's model (see the module docs)."""

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._held = 0  # reads and leases held
        self._writer: int | None = None  # the thread changing the model
        self._waiting = 0  # changes waiting
        self._local = threading.local()  # .reads: blocking reads this thread holds; .worker: a lease-holding worker

    # ------------------------------------------------------------------------------------------- reading
    def _reads(self) -> int:
        return getattr(self._local, "reads", 0)

    def _reentrant(self) -> bool:
        return self._writer == threading.get_ident() or self._reads() > 0 or getattr(self._local, "worker", False)

    @contextmanager
    def reading(self):
        """Held around a pipeline call: waits while the model is being changed (or a change waits)."""
        if self._reentrant():
            self._local.reads = self._reads() + 1
            try:
                yield
            finally:
                self._local.reads -= 1
            return
        with self._cond:
            self._cond.wait_for(lambda: self._writer is None and not self._waiting)
            self._held += 1
        self._local.reads = 1
        try:
            yield
        finally:
            self._local.reads = 0
            with self._cond:
                self._held -= 1
                self._cond.notify_all()

    def mark_worker(self) -> None:
        """Mark the calling thread as a scheduler worker: it runs only programs it holds leases for, so the reads of
        the pipelines it drives re-enter instead of waiting."""
        self._local.worker = True

    def try_lease(self) -> bool:
        """One read held until :meth:`release_lease`, from any thread, taken only when no change runs or waits
        (False otherwise: the caller admits the request later)."""
        with self._cond:
            if self._writer is not None or self._waiting:
                return False
            self._held += 1
            return True

    def release_lease(self) -> None:
        with self._cond:
            if self._held <= 0:
                raise RuntimeError("model lock: a lease was released twice")
            self._held -= 1
            self._cond.notify_all()

    @property
    def change_waiting(self) -> bool:
        """A model change runs or waits: admit nothing new."""
        return self._writer is not None or self._waiting > 0

    # ------------------------------------------------------------------------------------------- changing
    @contextmanager
    def changing(self, what: str):
        """Held around a model change: waits for every running call to end; new calls wait behind it."""
        me = threading.get_ident()
        if self._writer == me:
            yield
            return
        if self._reads() > 0 or getattr(self._local, "worker", False):
            raise RuntimeError(f"{what}: changes the shared model, which a call running in this thread is using; "
                               "change it between calls, not from inside one (e.g. a step callback)")
        with self._cond:
            self._waiting += 1
            try:
                self._cond.wait_for(lambda: self._writer is None and self._held == 0)
            finally:
                self._waiting -= 1
            self._writer = me
        try:
            yield
        finally:
            with self._cond:
                self._writer = None
                self._cond.notify_all()


def model_lock(engine) -> ModelLock | None:
    """The engine's :class:`ModelLock` (None for an engine-like object without one, e.g. a test double)."""
    return getattr(engine, "model_lock", None)


@contextmanager
def reading(engine):
    """``engine.model_lock.reading()``, or nothing for an object without a model lock."""
    lock = model_lock(engine)
    if lock is None:
        yield
        return
    with lock.reading():
        yield


def changes_model(what: str):
    """Decorate a function whose first argument is an engine and which changes its model: it runs under
    ``engine.model_lock.changing(what)``."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(engine, *args, **kwargs):
            lock = model_lock(engine)
            if lock is None:
                return fn(engine, *args, **kwargs)
            with lock.changing(what):
                return fn(engine, *args, **kwargs)

        return wrapper

    return decorate


__all__ = ["ModelLock", "changes_model", "model_lock", "reading"]
