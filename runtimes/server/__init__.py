"""`edge-export serve`: OpenAI's chat-completions protocol over one artifact, with R1's thinking
in ``reasoning_content`` (as DeepSeek's API returns it).

Needs the ``serve`` extra (``pip install 'edge-export[serve]'``: FastAPI and uvicorn); ``import
runtimes`` does not import this package, so an app that only embeds the runtime never needs them.

    from runtimes.server import create_app, ServeConfig
    app = create_app(runtimes.load("smollm2-int4"), ServeConfig(api_key="..."))   # mount it, or:
    runtimes.serve("smollm2-int4", port=8000)                                      # blocks
    with running(runtime, port=0) as url:                                          # a thread of this process
        ...                                                                        # url: http://127.0.0.1:PORT
"""
from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path

from .config import API_KEY_ENV, REASONING_BUDGETS, ServeConfig, ServeError, parse_budgets

log = logging.getLogger(__name__)
INSTALL = "pip install 'edge-export[serve]'"
GRACEFUL_SHUTDOWN_S = 5


def _require() -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ServeError(f"serving needs FastAPI and uvicorn ({e.name} is missing): {INSTALL}") from None


def _runtime(artifact_or_runtime, **load_options):
    from .. import Runtime, load
    if isinstance(artifact_or_runtime, Runtime):
        return artifact_or_runtime
    return load(Path(artifact_or_runtime), **load_options)


def create_app(artifact_or_runtime, config: ServeConfig | None = None, **load_options):
    """The ASGI app (FastAPI) serving an artifact folder or a loaded runtimes.Runtime."""
    _require()
    from .app import create_app as build
    return build(_runtime(artifact_or_runtime, **load_options), config)


def _uvicorn_server(app, config: ServeConfig, log_level: str):
    import uvicorn
    return uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level=log_level,
                                         timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S, access_log=False))


def serve(artifact_or_runtime, host: str = "127.0.0.1", port: int = 8000, config: ServeConfig | None = None,
          log_level: str = "info", **load_options) -> None:
    """Serve until interrupted. ``config`` overrides host and port; ``load_options`` go to runtimes.load
    (backend, provider, threads). Refuses a non-loopback host without an API key (ServeError)."""
    config = config or ServeConfig(host=host, port=port)
    config.check_bind()
    _require()
    server = _uvicorn_server(create_app(artifact_or_runtime, config, **load_options), config, log_level)
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C / SIGTERM it shut down on: stopping is the normal end
        log.info("server on %s:%s stopped", config.host, config.port)


@contextlib.contextmanager
def running(artifact_or_runtime, config: ServeConfig | None = None, log_level: str = "warning", **load_options):
    """Serve in a thread of this process; yields the base URL (``http://HOST:PORT``). Port 0 picks a
    free port. The server is shut down (jobs cancelled, socket closed) when the block ends."""
    config = config or ServeConfig(port=0)
    config.check_bind()
    server = _uvicorn_server(create_app(artifact_or_runtime, config, **load_options), config, log_level)
    thread = threading.Thread(target=server.run, name="edge-serve-http", daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise ServeError(f"the server did not start on {config.host}:{config.port} (see the log above)")
            thread.join(0.01)
        host, port = server.servers[0].sockets[0].getsockname()[:2]
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(GRACEFUL_SHUTDOWN_S + 10)


__all__ = ["API_KEY_ENV", "REASONING_BUDGETS", "ServeConfig", "ServeError", "create_app", "parse_budgets",
           "running", "serve"]
