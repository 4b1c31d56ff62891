"""Serving: the step scheduler (continuous batching of diffusion requests, :mod:`.scheduler`), and on top of it
the HTTP API and Ray Serve deployment (``dreamfuse serve``)."""

from .scheduler import JOB_STATES, KINDS, Job, QueueFull, SchedulerClosed, StepScheduler

__all__ = ["JOB_STATES", "KINDS", "Job", "QueueFull", "SchedulerClosed", "StepScheduler"]
