"""``finstream api``: serve the API, mint development tokens, write the OpenAPI document, stream."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import click

from finstream.settings import REPO_ROOT, get_settings

OPENAPI_PATH = REPO_ROOT / "api" / "openapi.json"


def openapi_text() -> str:
    """The OpenAPI document exactly as committed: stable key order, two-space indent."""
    from finstream.api.app import create_app

    return json.dumps(create_app().openapi(), indent=2, ensure_ascii=False) + "\n"


@click.group("api", invoke_without_command=True)
@click.option("--host", default=None, help="Default: FINSTREAM_API_HOST.")
@click.option("--port", type=int, default=None, help="Default: FINSTREAM_API_PORT.")
@click.pass_context
def api(ctx: click.Context, host: str | None, port: int | None) -> None:
    """HTTP API and WebSocket streams. Without a subcommand: serve."""
    if ctx.invoked_subcommand is not None:
        return
    import uvicorn

    from finstream.api.app import create_app
    from finstream.api.service import uvicorn_config
    from finstream.runtime.logging import configure_logging

    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format, role="api")
    config = uvicorn_config(
        settings, create_app(settings), host or settings.api_host, port or settings.api_port
    )
    uvicorn.Server(config).run()


@api.command("token")
@click.option("--sub", "subject", default="demo-user", show_default=True, help="The user id.")
@click.option(
    "--role",
    "roles",
    multiple=True,
    type=click.Choice(["user", "service", "operator"]),
    help="Repeatable; default user.",
)
@click.option("--ttl", type=float, default=3600.0, show_default=True, help="Seconds valid.")
def token(subject: str, roles: tuple[str, ...], ttl: float) -> None:
    """Print a token signed with the development key (env=dev, no JWKS configured)."""
    from finstream.api.devkeys import mint_token

    settings = get_settings()
    if settings.api_jwks:
        click.echo(
            "warning: FINSTREAM_API_JWKS is set; the API will not accept development tokens",
            err=True,
        )
    click.echo(mint_token(settings, subject, roles or ("user",), ttl))


@api.command("openapi")
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    default=OPENAPI_PATH,
    show_default=True,
)
@click.option("--check", is_flag=True, help="Exit 1 if the file differs from the app's document.")
def openapi(output: Path, check: bool) -> None:
    """Write the OpenAPI document kept in the repository (api/openapi.json)."""
    text = openapi_text()
    if check:
        current = output.read_text() if output.exists() else ""
        if current != text:
            click.echo(f"{output} is out of date; run `finstream api openapi`", err=True)
            sys.exit(1)
        click.echo(f"{output} is up to date")
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    click.echo(f"wrote {output}")


@api.command("stream")
@click.argument("symbols", nargs=-1)
@click.option("--bars", default=None, help="Also stream bars of this interval, e.g. 1m.")
@click.option("--inbox", is_flag=True, help="Also stream the user's inbox.")
@click.option("--url", default=None, help="Default: ws://FINSTREAM_API_HOST:FINSTREAM_API_PORT.")
@click.option("--token", "token_", default=None, help="Default: a development token for --user.")
@click.option("--user", default="demo-user", show_default=True)
@click.option("--count", type=int, default=None, help="Stop after this many data frames.")
def stream_cmd(
    *,
    symbols: tuple[str, ...],
    bars: str | None,
    inbox: bool,
    url: str | None,
    token_: str | None,
    user: str,
    count: int | None,
) -> None:
    """Open a live stream of quotes (and bars, inbox) and print each frame as JSON."""
    import websockets

    from finstream.api.client import stream, subscriptions
    from finstream.api.devkeys import mint_token

    settings = get_settings()
    if not symbols and not inbox:
        raise click.UsageError("name at least one symbol, or --inbox")
    url = url or f"ws://{settings.api_host}:{settings.api_port}/v1/stream"
    token_value = token_ or mint_token(settings, user, ("user",), 12 * 3600)

    def show(frame: dict[str, Any]) -> None:
        click.echo(json.dumps(frame, separators=(",", ":")))

    subs = subscriptions([s.upper() for s in symbols], bars, inbox)
    try:
        asyncio.run(stream(url, token_value, subs, show, count=count))
    except KeyboardInterrupt:
        pass
    except (OSError, websockets.WebSocketException) as exc:
        click.echo(f"error: cannot stream from {url}: {exc}", err=True)
        sys.exit(1)
