"""HTTP handlers, one module per surface: each parses a body, calls the domain, answers.

``tinker`` (runs, primitives, sampling, futures), ``service`` (sessions, listings,
capabilities), ``jobs`` (the job control plane), ``files`` (uploads jobs read),
``openai`` (chat completions), ``fireworks`` (the Fireworks training control plane),
``deployments`` (its deployments: hot-load and completions, for RL), ``synth`` (the
hosted Qwen3-VL trainer's CLI: uploads and learning jobs under ``/api``) and ``report``
(a job's report page, and links a browser opens it by).
"""

from vlmtune.server.routes import (
    deployments,
    files,
    fireworks,
    jobs,
    openai,
    report,
    service,
    synth,
    tinker,
)

ROUTERS = (
    service.router,
    tinker.router,
    jobs.router,
    files.router,
    openai.router,
    fireworks.router,
    deployments.router,
    synth.router,
    report.router,
)

__all__ = ["ROUTERS"]
