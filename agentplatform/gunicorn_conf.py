"""gunicorn settings of the production stack (scripts/prod.sh): N uvicorn worker processes
sharing one listening socket, HTTP and WebSockets alike.

    gunicorn -c python:agentplatform.gunicorn_conf -w 2 -b 0.0.0.0:8000 agentplatform.asgi:application

Why gunicorn + uvicorn's worker rather than several daphne processes on one socket (measured,
docs/benchmarks.md "Server"): the same app served more requests per CPU second under uvicorn
(httptools + uvloop) than under daphne (Twisted), and gunicorn is the pre-fork supervisor
daphne lacks: it owns the socket, restarts a worker that dies, kills one whose event loop stops
answering its heartbeat for `timeout` seconds, and on SIGTERM lets workers finish what they are
serving for `graceful_timeout`. daphne stays the development server (scripts/run.sh).

Only what does not vary per host lives here; scripts/prod.sh passes the address and the worker
count. The app itself reads its settings from the environment as always (settings.py).
"""

from __future__ import annotations

import os
from typing import Any

from uvicorn_worker import UvicornWorker


class PlatformUvicornWorker(UvicornWorker):
    """uvicorn's gunicorn worker with the platform's choices:

    * lifespan off: Channels' ProtocolTypeRouter has no lifespan handler (uvicorn's "auto" would
      log an error at every start), and the app needs no start-up hook.
    * proxy headers off: the app alone decides whether X-Forwarded-For is trusted
      (TRUST_X_FORWARDED_FOR); uvicorn would otherwise rewrite the client address for any
      request from 127.0.0.1.
    * WebSocket messages up to 1 MiB, as daphne's default: WS_MAX_FRAME_BYTES (512 KiB) stays
      the limit the consumer enforces with its own error frame.
    * no Server header, no uvicorn access log (the app logs requests itself).
    """

    CONFIG_KWARGS: dict[str, Any] = {
        "loop": "auto", "http": "auto", "ws": "auto", "lifespan": "off", "proxy_headers": False,
        "ws_max_size": 1 << 20, "server_header": False, "access_log": False,
    }


worker_class = "agentplatform.gunicorn_conf.PlatformUvicornWorker"
# Longer than a load balancer's idle timeout (60 s on the common ones), so the balancer, not we,
# closes idle keep-alive connections (no race on a connection closed as a request arrives).
keepalive = 65
# A worker whose event loop does not beat for this long is killed and replaced. Streams and
# model calls are async: only a blocked loop misses the beat.
timeout = 30
# SIGTERM: workers stop accepting and finish what they serve for this long (then are killed).
graceful_timeout = 30
# The master's own log: worker boots, exits and restarts.
errorlog = "-"
loglevel = "info"
proc_name = "agentplatform-web"
# gunicorn >= 24 opens a control socket in $HOME by default: one per user, so a second stack on
# the host (or a test) would take it over. Nothing here uses it.
control_socket_disable = True


def child_exit(server: Any, worker: Any) -> None:
    """A worker exited: with Prometheus multiprocess metrics (PROMETHEUS_MULTIPROC_DIR, set by
    scripts/prod.sh), its live gauges must stop counting."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # gunicorn's process, not the app's settings
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)
