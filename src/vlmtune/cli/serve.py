"""`vlmtune serve`, `vlmtune keys`, `vlmtune jobs`, and `submit_job` for `train --server`."""

from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from vlmtune.config import JobFile
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
        Path | None,
        typer.Option(
            help="extra keys, one per line: [tenant:]<key> or kid:salt:digest[:tenant] "
            "(tenant * marks an operator key; none: the default tenant)"
        ),
    ] = None,
    max_body_mb: Annotated[float, typer.Option(help="largest request body accepted")] = 64.0,
    max_loaded_models: Annotated[int, typer.Option(help="inference engines kept loaded")] = 2,
    max_concurrent_jobs: Annotated[int, typer.Option(help="TOML jobs run at once")] = 1,
    allow_data_root: Annotated[
        list[Path] | None,
        typer.Option(
            "--allow-data-root",
            help="a folder TOML jobs may read (data, images, model directories) besides "
            "their uploads; repeat for several (default: uploads only)",
        ),
    ] = None,
    model_alias: Annotated[
        list[str] | None,
        typer.Option(
            "--model-alias",
            help="NAME=PATH: serve the model at PATH (a directory, a registry name such as "
            "tiny-qwen3-vl, or a cached hub id) whenever a client names NAME, e.g. "
            "accounts/fireworks/models/qwen3-vl-8b-instruct=tiny-qwen3-vl; repeatable",
        ),
    ] = None,
) -> None:
    """Serve the training API (Tinker-compatible), jobs and OpenAI chat completions."""
    from vlmtune.server import ServerConfig, run_server
    from vlmtune.server.job_access import resolved_roots
    from vlmtune.server.store import Store

    try:
        roots = resolved_roots(allow_data_root or [], data_dir)
    except ValueError as e:
        _err(str(e))
        raise typer.Exit(2) from None
    try:
        aliases = model_aliases(model_alias or [])
    except ValueError as e:
        _err(f"--model-alias {e}")
        raise typer.Exit(2) from None

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
    from vlmtune.server.auth import KeyChecker

    store = Store(data_dir / "server.db")
    n_keys = store.active_key_count()
    try:
        KeyChecker(store, api_keys_file)  # a bad line (or tenant) stops here, not at startup
    except ValueError as e:
        _err(f"--api-keys-file: {e}")
        raise typer.Exit(2) from None
    finally:
        store.close()
    if n_keys == 0 and api_keys_file is None:
        _err(f"no API keys yet: every request will get 401. Create one with "
             f"`vlmtune keys create --data-dir {data_dir}`")  # fmt: skip
    config = ServerConfig(
        data_dir=data_dir, host=host, port=port, api_keys_file=api_keys_file,
        max_body_mb=max_body_mb, max_loaded_models=max_loaded_models,
        max_concurrent_jobs=max_concurrent_jobs, allowed_data_roots=roots,
        model_aliases=aliases,
    )  # fmt: skip
    run_server(config)


def model_aliases(texts: list[str]) -> dict[str, str]:
    """``--model-alias NAME=PATH`` values as the server's table (names lower-cased), each
    target checked now: a server that would fail every request naming it does not start."""
    from vlmtune.models.loading import resolve_model_path
    from vlmtune.models.registry import parse_model_alias

    out: dict[str, str] = {}
    for text in texts:
        name, target = parse_model_alias(text)
        if name.lower() in out:
            raise ValueError(f"{text!r}: {name!r} is aliased twice")
        if Path(target).expanduser().exists():  # a directory: absolute, whatever the cwd
            target = str(Path(target).expanduser().resolve())
        try:
            resolve_model_path(target)
        except (OSError, ValueError) as e:
            raise ValueError(f"{text!r}: {e}") from None
        out[name.lower()] = target
    return out


@keys_app.command("create")
def keys_create(
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    label: Annotated[str, typer.Option(help="a note to tell keys apart")] = "",
    tenant: Annotated[
        str, typer.Option(help="the tenant the key speaks for: it sees only that tenant's work")
    ] = "default",
    operator: Annotated[
        bool, typer.Option("--operator", help="the key sees and acts on every tenant's work")
    ] = False,
    style: Annotated[
        str,
        typer.Option(
            help="how to spell the key: tinker (tml-<id>_<secret>) or fireworks "
            "(fw_<id>_<secret>, for the Fireworks training client); the server takes both"
        ),
    ] = "tinker",
) -> None:
    """Create an API key and print it (only its salted hash is stored: copy it now)."""
    from vlmtune.server.auth import check_tenant, create_key, fireworks_spelling

    if style not in ("tinker", "fireworks"):
        _err(f"--style: expected tinker or fireworks, got {style!r}")
        raise typer.Exit(2)
    from vlmtune.server.store import Store

    try:
        check_tenant(tenant)
    except ValueError as e:
        _err(f"--tenant: {e}")
        raise typer.Exit(2) from None
    store = Store(data_dir / "server.db")
    key = create_key(store, label, tenant, operator)
    store.close()
    typer.echo(fireworks_spelling(key) if style == "fireworks" else key)


@keys_app.command("list")
def keys_list(data_dir: DataDirOpt = DEFAULT_DATA_DIR) -> None:
    """Key ids, status, tenants and labels (never the keys)."""
    from vlmtune.server.store import Store

    store = Store(data_dir / "server.db")
    for row in store.api_keys():
        status = "revoked" if row["revoked"] else "active"
        role = "operator" if row["operator"] else "tenant"
        typer.echo(
            f"tml-{row['kid']}_...  {status:8s}  {role:8s}  {row['tenant']:16s}  {row['label']}"
        )
    store.close()


@keys_app.command("revoke")
def keys_revoke(kid: str, data_dir: DataDirOpt = DEFAULT_DATA_DIR) -> None:
    """Revoke a key by its id (the part after tml- or fw_ and before _)."""
    from vlmtune.server.store import Store

    store = Store(data_dir / "server.db")
    n = store.revoke_api_key(kid.removeprefix("tml-").removeprefix("fw_").split("_")[0])
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
    job = client.get(job_id)
    _print_job(job)
    _print_report_url(client, job)
    if events:
        for e in client.events(job_id)["events"]:
            typer.echo(f"{e['seq']:5d} {e['type']:10s} {e['message']}")


def _print_report_url(client: JobsClient, job: dict[str, Any]) -> None:
    """``report: URL`` on stderr for a job that has a report page (a TOML job)."""
    if job.get("kind") != "toml":
        return
    from vlmtune.sdk.http import RemoteError

    try:
        _err(f"report: {client.report_link(job['id'])['url']}")
    except RemoteError as e:  # a server from before report pages: the job goes on
        _err(f"report: none ({e})")


@jobs_app.command("report")
def jobs_report(
    job_id: str,
    server: ServerOpt = "http://127.0.0.1:8000",
    api_key: KeyOpt = None,
    open_: Annotated[bool, typer.Option("--open", help="open it in the browser")] = False,
) -> None:
    """Print the URL of the job's report page (it opens without a key, for a day)."""
    from vlmtune.sdk.http import RemoteError

    try:
        url = _jobs(server, api_key).report_link(job_id)["url"]
    except RemoteError as e:
        _err(f"{server}: {e}")
        raise typer.Exit(1) from None
    typer.echo(url)
    if open_:
        import webbrowser

        webbrowser.open(url)


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
    sent), with overrides applied and relative paths resolved from the job file's folder.
    Its data and validation files are then uploaded (``POST /v1/files``, skipped when the
    server has the same bytes) and named by their ids; the server validates it again and
    checks every other path it reads against the folders it allows. Returns the exit
    code: 2 for a config either side refuses.
    """
    import httpx

    from vlmtune.config import ConfigError, dump_toml, load_job
    from vlmtune.job_checks import data_file_problems
    from vlmtune.sdk.http import RemoteError
    from vlmtune.sdk.jobs import JobRejected

    path = Path(config_path)
    try:
        job = load_job(path, overrides or [], method=type_)
        problems = [
            p
            for key in ("data", "validation_data")
            if not _on_server(getattr(job.job, key))
            for p in data_file_problems(f"job.{key}", getattr(job.job, key))
        ]
        if problems:
            raise ConfigError(str(path), problems)
    except ConfigError as e:
        _err(str(e))
        return 2
    name = job.job.name or path.stem
    client = _jobs(server_url, api_key)
    try:
        for note in _for_server(job, client):
            _err(note)
        created = client.submit_toml(dump_toml(job), type_, [], name)
    except JobRejected as e:
        _err(
            f"{server_url}: the server refused {path}:\n"
            + "\n".join(f"  - {p}" for p in e.problems)
        )
        return 2
    except (RemoteError, OSError, httpx.HTTPError) as e:
        _err(f"{server_url}: job not accepted: {e}")
        return 1
    job_id = created["id"]
    if not poll:
        typer.echo(job_id)
        _print_report_url(client, created)
        return 0
    _err(f"job {job_id} submitted to {server_url}")
    _print_report_url(client, created)
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
        from vlmtune.cli.train_stops import job_failure_text

        reason = job_failure_text(final.get("error"))
        _err(f"job {job_id} {final['state']}" + (f": {reason}" if reason else ""))
        return 1
    typer.echo(final["model_id"] or job_id)
    return 0


def _on_server(value: str | None) -> bool:
    """A data value naming an upload (``file-<id>``, which load_job made a path under the
    job file's folder) rather than a file here."""
    from vlmtune.protocol.files import is_file_id

    return value is not None and is_file_id(Path(value).name) and not Path(value).exists()


def _for_server(job: JobFile, client: JobsClient) -> list[str]:
    """Make the job one the server can run, in place, and say what changed: data files
    uploaded and named by id, and the folders it would write on this machine left to the
    server (which keeps everything a job writes in the job's own folder)."""
    notes = []
    for key in ("data", "validation_data"):
        value = getattr(job.job, key)
        if value is None:
            continue
        if _on_server(value):
            setattr(job.job, key, Path(value).name)
            continue
        row = client.upload_file(value)
        setattr(job.job, key, row["id"])
        how = "is on the server already as" if row.get("reused") else "uploaded as"
        notes.append(f"job.{key}: {value} {how} {row['id']} ({row['bytes']:,} bytes)")
    if Path(job.job.output_dir).expanduser().is_absolute():
        notes.append(f"job.output_dir: {job.job.output_dir} is not sent (the server chooses "
                     "where a job's run goes)")  # fmt: skip
        job.job.output_dir = "runs"
    cache = job.training.image_cache_dir
    if cache is not None and Path(cache).expanduser().is_absolute():
        job.training.image_cache_dir = Path(cache).name or "image_cache"
        notes.append(f"training.image_cache_dir: {cache} is a folder here; on the server the "
                     f"cache is {job.training.image_cache_dir!r} in the job's folder")  # fmt: skip
    return notes


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
    app.add_typer(keys_app, name="keys")
    app.add_typer(jobs_app, name="jobs")
