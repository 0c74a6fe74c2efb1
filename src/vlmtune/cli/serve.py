"""`vlmtune serve`, `vlmtune keys`, `vlmtune jobs`, and `submit_job` for `train --server`."""

from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from vlmtune.sdk.jobs import JobsClient

DEFAULT_DATA_DIR = Path(os.environ.get("VLMTUNE_DATA_DIR", "~/.vlmtune/server")).expanduser()
ServerOpt = Annotated[str, typer.Option("--server", envvar="VLMTUNE_SERVER", help="server URL")]
KeyOpt = Annotated[
    str | None, typer.Option("--api-key", envvar="VLMTUNE_API_KEY", help="API key (tml-...)")
]
DataDirOpt = Annotated[Path, typer.Option("--data-dir", help="server state (SQLite, checkpoints)")]

keys_app = typer.Typer(help="Manage the server's API keys.", no_args_is_help=True)
jobs_app = typer.Typer(help="Jobs on a server: list, show, cancel, resume.", no_args_is_help=True)


def _err(message: str) -> None:
    typer.echo(message, err=True)


def serve(
    host: Annotated[
        str, typer.Option(help="interface to bind (loopback unless told)")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    api_keys_file: Annotated[
        Path | None, typer.Option(help="extra keys: one per line, plain or kid:salt:digest")
    ] = None,
    max_body_mb: Annotated[float, typer.Option(help="largest request body accepted")] = 64.0,
    max_loaded_models: Annotated[int, typer.Option(help="inference engines kept loaded")] = 2,
    max_concurrent_jobs: Annotated[int, typer.Option(help="TOML jobs run at once")] = 1,
) -> None:
    """Serve the training API (Tinker-compatible), jobs and OpenAI chat completions."""
    from vlmtune.server import ServerConfig, run_server
    from vlmtune.server.store import Store

    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        _err(f"warning: binding {host}: API keys and data cross the network in plain HTTP; "
             "put a TLS proxy in front")  # fmt: skip
    if api_keys_file is not None and not api_keys_file.is_file():
        _err(f"--api-keys-file: {api_keys_file} does not exist")
        raise typer.Exit(2)
    store = Store(data_dir / "server.db")
    n_keys = store.active_key_count()
    store.close()
    if n_keys == 0 and api_keys_file is None:
        _err(f"no API keys yet: every request will get 401. Create one with "
             f"`vlmtune keys create --data-dir {data_dir}`")  # fmt: skip
    config = ServerConfig(
        data_dir=data_dir, host=host, port=port, api_keys_file=api_keys_file,
        max_body_mb=max_body_mb, max_loaded_models=max_loaded_models,
        max_concurrent_jobs=max_concurrent_jobs,
    )  # fmt: skip
    run_server(config)


@keys_app.command("create")
def keys_create(
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    label: Annotated[str, typer.Option(help="a note to tell keys apart")] = "",
) -> None:
    """Create an API key and print it (only its salted hash is stored: copy it now)."""
    from vlmtune.server.auth import create_key
    from vlmtune.server.store import Store

    store = Store(data_dir / "server.db")
    key = create_key(store, label)
    store.close()
    typer.echo(key)


@keys_app.command("list")
def keys_list(data_dir: DataDirOpt = DEFAULT_DATA_DIR) -> None:
    """Key ids, labels and status (never the keys)."""
    from vlmtune.server.store import Store

    store = Store(data_dir / "server.db")
    for row in store.api_keys():
        status = "revoked" if row["revoked"] else "active"
        typer.echo(f"tml-{row['kid']}_...  {status:8s}  {row['label']}")
    store.close()


@keys_app.command("revoke")
def keys_revoke(kid: str, data_dir: DataDirOpt = DEFAULT_DATA_DIR) -> None:
    """Revoke a key by its id (the part after tml- and before _)."""
    from vlmtune.server.store import Store

    store = Store(data_dir / "server.db")
    n = store.revoke_api_key(kid.removeprefix("tml-").split("_")[0])
    store.close()
    if not n:
        _err(f"no key with id {kid}")
        raise typer.Exit(1)


def _jobs(server: str, api_key: str | None) -> JobsClient:
    from vlmtune.sdk.jobs import JobsClient

    return JobsClient(server, api_key)


def _print_job(job: dict[str, Any]) -> None:
    typer.echo(json.dumps(job, indent=2))


@jobs_app.command("list")
def jobs_list(server: ServerOpt = "http://127.0.0.1:8000", api_key: KeyOpt = None) -> None:
    for j in _jobs(server, api_key).list():
        model = f"  model {j['model_id']}" if j.get("model_id") else ""
        typer.echo(f"{j['id']}  {j['kind']:7s}  {j['state']:11s}  {j['name']}{model}")


@jobs_app.command("show")
def jobs_show(
    job_id: str,
    server: ServerOpt = "http://127.0.0.1:8000",
    api_key: KeyOpt = None,
    events: bool = False,
) -> None:
    client = _jobs(server, api_key)
    _print_job(client.get(job_id))
    if events:
        for e in client.events(job_id)["events"]:
            typer.echo(f"{e['seq']:5d} {e['type']:10s} {e['message']}")


@jobs_app.command("cancel")
def jobs_cancel(
    job_id: str, server: ServerOpt = "http://127.0.0.1:8000", api_key: KeyOpt = None
) -> None:
    _print_job(_jobs(server, api_key).cancel(job_id))


@jobs_app.command("resume")
def jobs_resume(
    job_id: str, server: ServerOpt = "http://127.0.0.1:8000", api_key: KeyOpt = None
) -> None:
    _print_job(_jobs(server, api_key).resume(job_id))


def submit_job(
    config_path: str | Path,
    type_: str,
    server_url: str,
    api_key: str | None,
    overrides: list[str] | None,
    poll: bool,
) -> int:
    """Send a TOML job to a server; with ``poll``, stream its events and print the model id.

    The job is validated here first (every problem reported at once, before anything is
    sent), with overrides applied and data paths made absolute: the server reads the
    files itself, so they must be paths it can see. Returns the exit code.
    """
    from vlmtune.config import ConfigError, dump_toml, load_job
    from vlmtune.sdk.http import RemoteError

    path = Path(config_path)
    try:
        job = load_job(path, overrides or [], method=type_)
    except ConfigError as e:
        _err(str(e))
        return 2
    name = job.job.name or path.stem
    client = _jobs(server_url, api_key)
    try:
        created = client.submit_toml(dump_toml(job), type_, [], name)
    except (RemoteError, OSError) as e:
        _err(f"{server_url}: job not accepted: {e}")
        return 1
    job_id = created["id"]
    if not poll:
        typer.echo(job_id)
        return 0
    _err(f"job {job_id} submitted to {server_url}")
    final: dict[str, Any] = created
    try:
        for state, event in client.follow(job_id):
            final = state
            if event is not None:
                _err(f"[{event['type']}] {event['message']}")
    except (RemoteError, OSError) as e:
        _err(f"lost contact with {server_url}: {e} (the job goes on: vlmtune jobs show {job_id})")
        return 1
    if final["state"] != "succeeded":
        _err(
            f"job {job_id} {final['state']}"
            + (f":\n{final['error']}" if final.get("error") else "")
        )
        return 1
    typer.echo(final["model_id"] or job_id)
    return 0


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
    app.add_typer(keys_app, name="keys")
    app.add_typer(jobs_app, name="jobs")
