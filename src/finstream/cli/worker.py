"""`finstream worker ROLE` and `finstream roles`: one worker role in this process."""

from __future__ import annotations

import click


@click.command("worker")
@click.argument("role")
def worker(role: str) -> None:
    """Run one worker role in this process (see `finstream roles`)."""
    from finstream.cli.common import fail
    from finstream.privacy.kms import PrivacyConfigError
    from finstream.runtime.worker import run_role

    try:
        run_role(role)
    except PrivacyConfigError as exc:  # missing keys or a placeholder link: one line
        fail(str(exc))


@click.command("roles")
def roles() -> None:
    """The worker roles and what each consumes."""
    from finstream.roles import ROLES

    for spec in ROLES.values():
        inputs = ", ".join(spec.inputs) or "-"
        click.echo(f"{spec.name:<16} {spec.kind:<8} in: {inputs:<28} {spec.description}")
