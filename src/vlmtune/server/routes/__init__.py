"""HTTP handlers, one module per surface: each parses a body, calls the domain, answers.

``tinker`` (runs, primitives, sampling, futures), ``service`` (sessions, listings,
capabilities), ``jobs`` (the job control plane), ``files`` (uploads jobs read) and
``openai`` (chat completions).
"""

from vlmtune.server.routes import files, jobs, openai, service, tinker

ROUTERS = (service.router, tinker.router, jobs.router, files.router, openai.router)

__all__ = ["ROUTERS"]
