"""uvicorn's server, stopped the way a command should be: on Ctrl-C or SIGTERM it ends the requests in flight first
(their clients get an error event instead of holding the shutdown up) and then returns, where uvicorn would re-raise
the signal once it has shut down."""

from __future__ import annotations

import contextlib
import signal
import socket
import threading

import uvicorn
from fastapi import FastAPI

from lpjax.serving.scheduler import Scheduler


class Server(uvicorn.Server):
    def __init__(self, app: FastAPI, scheduler: Scheduler):
        super().__init__(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5))
        self.scheduler = scheduler

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.scheduler.stop()
        await super().shutdown(sockets)

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)
