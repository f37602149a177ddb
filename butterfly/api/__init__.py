"""The node's HTTP API (status, health, readiness, Prometheus metrics), served by the supervisor.

This package owns rendering a ``NodeStatus`` for operators over HTTP; it reads status through a
cheap synchronous callable and must never change node state, block the event loop or talk to
children directly.
"""

from butterfly.api.http import MAX_BODY_BYTES, ApiBindError, ApiServer, make_app, start_api
from butterfly.api.metrics import NodeStatusCollector, make_registry

__all__ = [
    "MAX_BODY_BYTES",
    "ApiBindError",
    "ApiServer",
    "NodeStatusCollector",
    "make_app",
    "make_registry",
    "start_api",
]
