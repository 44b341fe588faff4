"""Flower's simulation engine without Ray: the virtual hospitals' ClientApp runs in this process.

Flower's simulation engine (``flwr.server.superlink.fleet.vce``) hands each message for a virtual
SuperNode to a ``Backend``: ``process_message(message, context) -> (reply, context)``, called from
``num_workers`` engine threads. The engine, its in-memory SuperLink state, the ServerApp with its
strategy, and the messages are the same whichever backend runs the ClientApp. Flower 1.41 ships one
backend, ``RayBackend``: a pool of Ray actors, each a process with a share of the cores.

With fewer cores than sites fedrad plans a single actor that serves every site in turn
(``fedrad.simulation.plan_actors``). Ray then buys neither parallelism nor isolation between the
hospitals (they share that one actor), while its processes take seconds to start and wake hundreds
of times a second beside the training (README "Federation overhead"). :class:`InlineBackend` runs
the ClientApp in the engine's worker thread instead, one message at a time, as that actor would.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from flwr.app import Context, Message
from flwr.clientapp.client_app import ClientApp, ClientAppException, LoadClientAppError
from flwr.server.superlink.fleet.vce.backend import Backend, BackendConfig


class InlineBackend(Backend):
    """One worker that runs the ClientApp in the calling thread, as a Ray actor's ``run`` does.

    A ClientApp that raises becomes a ``ClientAppException``, which the engine turns into an error
    reply to the server (the round goes on without that site), exactly as with an actor. The ClientApp
    gets its own copy of the message, as an actor gets one through Ray's serialisation: Flower's SecAgg+
    workflow sends one RecordDict to every node and its client mod takes a key out of what it receives.
    """

    def __init__(self, backend_config: BackendConfig) -> None:
        super().__init__(backend_config)
        self._app_fn: Callable[[], ClientApp] | None = None

    def build(self, app_fn: Callable[[], ClientApp]) -> None:
        self._app_fn = app_fn

    @property
    def num_workers(self) -> int:
        return 1

    def is_worker_idle(self) -> bool:
        return self._app_fn is not None

    def terminate(self) -> None:
        self._app_fn = None

    def process_message(self, message: Message, context: Context) -> tuple[Message, Context]:
        if self._app_fn is None:
            raise RuntimeError("InlineBackend.build() was not called")
        app = self._app_fn()
        try:
            reply = app(message=copy.deepcopy(message), context=context)  # arrays' bytes are shared, not copied
        except LoadClientAppError:
            raise
        except Exception as ex:
            raise ClientAppException(str(ex)) from ex
        return reply, context


@contextmanager
def inline_backend() -> Iterator[None]:
    """Within this block, Flower's simulation engine builds :class:`InlineBackend` instead of Ray's.

    Flower 1.41 has no way to name another backend: ``start_vce`` builds ``RayBackend``, looked up in
    its module when the engine starts. The name is rebound for the block and restored after it;
    ``tests/test_simulation.py`` fails if a Flower release moves it.
    """
    from flwr.server.superlink.fleet.vce.backend import raybackend

    saved = raybackend.RayBackend
    raybackend.RayBackend = InlineBackend  # type: ignore[misc]
    try:
        yield
    finally:
        raybackend.RayBackend = saved
