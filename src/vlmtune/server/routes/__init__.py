"""HTTP handlers, one module per surface: each parses a body, calls the domain, answers.

``tinker`` (runs, primitives, sampling, futures), ``service`` (sessions, listings,
capabilities), ``jobs`` (the job control plane), ``files`` (uploads jobs read),
``openai`` (chat completions), ``fireworks`` (the Fireworks training control plane) and
``deployments`` (its deployments: hot-load and completions, for RL).
"""

from vlmtune.server.routes import deployments, files, fireworks, jobs, openai, service, tinker

ROUTERS = (
    service.router,
    tinker.router,
    jobs.router,
    files.router,
    openai.router,
    fireworks.router,
    deployments.router,
)

__all__ = ["ROUTERS"]
