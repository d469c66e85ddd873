"""Serving a model over HTTP: continuous batching (`scheduler`), token ids to text with stop strings (`text`), and
the OpenAI-compatible API (`api`, FastAPI). `python -m lpjax.serve` is the command line over them.

The engine thread of `scheduler.Scheduler` owns the device state (`runtime.slots.Slots`); the HTTP handlers submit
requests to it and read each one's tokens from a queue of its own.
"""
