"""``vlmtune serve``: the training primitives over HTTP (Tinker-compatible), jobs, and
OpenAI-compatible chat completions, with state in SQLite under a data directory."""

from vlmtune.server.app import ServerThread, create_app, run_server
from vlmtune.server.context import ServerConfig

__all__ = ["ServerConfig", "ServerThread", "create_app", "run_server"]
