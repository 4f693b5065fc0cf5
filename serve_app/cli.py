"""The `raysight` command line: thin wrappers; the logic lives in the modules they call.

    raysight models fetch smollm2-135m [--cache-dir DIR] [--force]   # prints the folder
    raysight models list [--cache-dir DIR]
    raysight keys new [--user NAME]      # a new API key, and the config entry with its hash
    raysight keys hash KEY               # KEY "-" reads it from stdin (keeps it out of history)

Output meant for scripts (a folder, a hash) goes to stdout alone; messages go to stderr.
"""

from __future__ import annotations

import getpass
import secrets
import signal
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from serve_app import model_store
from serve_app.config import hash_key

# Locals in pretty tracebacks would print API keys: keep them out.
app = typer.Typer(
    help="raysight: nnsight-style interventions on models served by Ray.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
models_app = typer.Typer(help="Fetch and list the models raysight can serve.", no_args_is_help=True)
keys_app = typer.Typer(help="Create and hash API keys for the Serve config.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(keys_app, name="keys")

err = Console(stderr=True)

CacheDir = Annotated[
    Path | None,
    typer.Option(
        "--cache-dir",
        help=f"Model cache folder [default: ${model_store.CACHE_ENV} or ~/.cache/raysight/models]",
        show_default=False,
    ),
]

# --- serve / demo -----------------------------------------------------------------------------


@app.command()
def serve(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="A Serve config (or bare app config) YAML.")
    ] = None,
    model: Annotated[
        list[str] | None, typer.Option("--model", "-m", help="NAME=PATH; repeatable; replaces the config's models.")
    ] = None,
    port: Annotated[int, typer.Option(help="HTTP port on 127.0.0.1.")] = 8000,
    api_key: Annotated[
        str | None, typer.Option(help="Accept this key (also: env RAYSIGHT_API_KEY); else the config's keys.")
    ] = None,
    state_dir: Annotated[
        Path | None,
        typer.Option("--state-dir", help="Request state and results [default: the config's state_dir, "
                     "else ~/.raysight/state]; a restart with the same folder still serves its results.",
                     show_default=False),
    ] = None,
) -> None:
    """Start a local Ray + Serve running raysight on 127.0.0.1; Ctrl-C or SIGTERM stops it and Ray
    (exit status 0). Bad model paths and a busy port are reported before Ray starts (status 2)."""
    from serve_app import launcher, local_server, preflight

    if config is None and not model:
        _fail("give --config FILE or at least one --model NAME=PATH", 2)
    try:
        app_config, generated = local_server.build_config(
            str(config) if config else None, model or [], api_key, str(state_dir) if state_dir else None
        )
    except (ValueError, OSError) as e:
        _fail(str(e), 2)

    def announce(url: str) -> None:
        names = ", ".join(m.name for m in app_config.models)
        typer.echo(f"raysight is ready at {url} (models: {names})")
        metrics = _metrics_url()
        if metrics:
            typer.echo(f"Prometheus metrics (Ray's export): {metrics}")
        if generated:
            typer.echo(f"API key (shown once): {generated}")
        typer.echo("Ctrl-C to stop.")

    def progress(line: str) -> None:
        err.print(line, highlight=False, markup=False, soft_wrap=True)

    try:
        stopped_by = local_server.serve_forever(app_config, port, announce, progress)
    except preflight.PreflightError as e:
        _fail(str(e), 2)
    except launcher.StartError as e:
        _fail(str(e), 1)
    err.print(f"raysight stopped ({signal.Signals(stopped_by).name})", highlight=False, soft_wrap=True)


def _fail(message: str, status: int) -> NoReturn:
    """Each line of `message` as one `error:` line on stderr (never wrapped), then exit."""
    for line in message.splitlines():
        err.print(f"[red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)
    raise typer.Exit(status)


@app.command()
def demo(
    examples: Annotated[
        list[str] | None,
        typer.Argument(help="Examples to run: names in examples/, or 'all' (default: seed_session patch_answer).",
                       show_default=False),
    ] = None,
    port: Annotated[int, typer.Option(help="HTTP port on 127.0.0.1 (another if busy).")] = 8000,
) -> None:
    """Fetch the default model, serve it locally (float32 and bfloat16), run the seed session and
    patch_answer (or the examples named) against it, stop."""
    from serve_app.demo import run_demo

    raise typer.Exit(run_demo(port, examples))


@models_app.command("fetch")
def models_fetch(
    name: Annotated[str, typer.Argument(help="A known model name (see `raysight models list`).")],
    cache_dir: CacheDir = None,
    force: Annotated[bool, typer.Option(help="Fetch again even if already cached.")] = False,
) -> None:
    """Download and convert a known model into the cache; print its folder."""
    try:
        folder = model_store.fetch_model(name, cache_dir=cache_dir, force=force)
    except model_store.UnknownModelError as e:
        err.print(f"[red]error:[/] {e}", highlight=False)
        raise typer.Exit(2) from None
    except model_store.FetchError as e:
        err.print(f"[red]error:[/] {e}", highlight=False)
        raise typer.Exit(1) from None
    typer.echo(str(folder))


@models_app.command("list")
def models_list(cache_dir: CacheDir = None) -> None:
    """Known models, and which ones are in the cache."""
    cached = model_store.cached_models(cache_dir)
    table = Table("name", "description", "size")
    table.add_column("cached at", overflow="fold")  # a path must stay whole to be copied
    for name, known in model_store.KNOWN_MODELS.items():
        where = str(cached[name]) if name in cached else "[dim]not fetched[/]"
        table.add_row(name, known.description, known.size, where)
    for name, folder in cached.items():
        if name not in model_store.KNOWN_MODELS:
            table.add_row(name, "[dim](not a known model)[/]", "", str(folder))
    Console().print(table)


@keys_app.command("new")
def keys_new(
    user: Annotated[
        str | None, typer.Option(help="Who the key is for [default: your login name]")
    ] = None,
) -> None:
    """Generate an API key; print it once, with the auth.api_keys entry holding its hash."""
    user = user or _login_name()
    key = "rs-" + secrets.token_urlsafe(32)  # 256 random bits; the prefix makes it recognisable
    out = Console(highlight=False)
    out.print(f"[bold]API key for {user}[/] (shown once, stored nowhere: hand it over now):")
    typer.echo(key)  # plain echo: never wrapped or restyled, so it copies cleanly
    out.print("\n[bold]Add this entry under auth.api_keys in the Serve config:[/]")
    typer.echo(f"- user: {user}\n  key_sha256: {hash_key(key)}")


@keys_app.command("hash")
def keys_hash(key: Annotated[str, typer.Argument(help='The API key, or "-" to read stdin.')]) -> None:
    """Print the SHA-256 of a key, as auth.api_keys[].key_sha256 wants it."""
    if key == "-":
        key = sys.stdin.readline().strip()
    if not key:
        err.print("[red]error:[/] empty key")
        raise typer.Exit(2)
    typer.echo(hash_key(key))


def _metrics_url() -> str | None:
    """Where this node's Ray metrics agent serves Prometheus text (Serve's metrics among them)."""
    import ray

    try:
        port = next((n.get("MetricsExportPort") for n in ray.nodes() if n.get("Alive")), None)
    except Exception:  # noqa: BLE001 - informative only
        return None
    return f"http://127.0.0.1:{port}/metrics" if port else None


def _login_name() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name in some containers
        return "default"


if __name__ == "__main__":
    app()
