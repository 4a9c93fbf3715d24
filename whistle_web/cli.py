"""Command-line interface: ``flask --app wsgi whistle ...`` or the ``whistle`` script."""

from __future__ import annotations

import json
import os
import sys

import click
from flask.cli import AppGroup, FlaskGroup

from whistle_web.errors import DomainError

whistle_cli = AppGroup("whistle", help="Whistle administration commands.")


def _fail(error: DomainError) -> None:
    click.echo(f"Error: {error.detail}", err=True)
    sys.exit(1)


@whistle_cli.command("bootstrap")
@click.option("--org", "org_name", required=True, help="Organization name.")
@click.option("--email", required=True, help="Owner's email address.")
@click.option("--password", required=True, help="Owner's password (10+ characters).")
@click.option("--name", default="", help="Owner's display name.")
def bootstrap_command(org_name: str, email: str, password: str, name: str) -> None:
    """Create an organization, its owner and an API key; print them as JSON."""
    from whistle_web.setup import bootstrap

    try:
        result = bootstrap(org_name, email, password, owner_name=name)
    except DomainError as error:
        _fail(error)
    click.echo(json.dumps(result))


@whistle_cli.command("demo")
def demo_command() -> None:
    """Seed the demo organization (idempotent) and print its login."""
    from whistle_web.demo import DEMO_EMAIL, DEMO_PASSWORD, seed_demo

    created = seed_demo()
    state = "created" if created else "already present"
    click.echo(f"Demo organization {state}. Sign in as {DEMO_EMAIL} / {DEMO_PASSWORD}")


@whistle_cli.command("rotate-keys")
def rotate_keys_command() -> None:
    """Re-encrypt stored secrets under the current key (after changing WHISTLE_ENCRYPTION_KEY
    or WHISTLE_KMS_KEY_ID, with the old key in WHISTLE_ENCRYPTION_KEYS_PREVIOUS)."""
    from whistle_web.organizations.keys import rotate_secrets

    report = rotate_secrets()
    click.echo(
        f"Re-encrypted {report.providers} provider credentials and "
        f"{report.widget_secrets} widget secrets; {report.unchanged} were already current."
    )


@whistle_cli.command("worker")
@click.option("--burst", is_flag=True, help="Exit when the queues are empty.")
@click.option("--simple", is_flag=True, help="Run jobs in the worker process (no fork).")
def worker_command(burst: bool, simple: bool) -> None:
    """Run an RQ worker on the queues, highest priority first."""
    from whistle_web import get_redis
    from whistle_web.extensions import db
    from workers.queues import QUEUES
    from workers.worker import WhistleSimpleWorker, WhistleWorker

    # A forked work horse must not reuse the parent's pooled database connections.
    engine = db.engine
    os.register_at_fork(after_in_child=lambda: engine.dispose(close=False))
    worker_class = WhistleSimpleWorker if simple else WhistleWorker
    worker = worker_class(list(QUEUES), connection=get_redis())
    worker.work(burst=burst)


@whistle_cli.command("scheduler")
@click.option("--burst", is_flag=True, help="Enqueue what is due once, then exit.")
@click.option("--interval", default=5, show_default=True, help="Seconds between checks.")
def scheduler_command(burst: bool, interval: int) -> None:
    """Run rq-scheduler with Whistle's periodic jobs registered."""
    from whistle_web import get_redis
    from workers.schedule import make_scheduler, register_periodic_jobs

    scheduler = make_scheduler(get_redis(), interval=interval)
    register_periodic_jobs(scheduler)
    scheduler.run(burst=burst)


@click.command("dev")
@click.option("--port", default=5000, show_default=True)
def dev_command(port: int) -> None:
    """Run the whole product locally: services, migrations, demo data, web, worker, scheduler."""
    from whistle_web.devserver import run

    sys.exit(run(port=port))


def _create_app():  # type: ignore[no-untyped-def]
    from whistle_web import create_app

    return create_app()


main = FlaskGroup(create_app=_create_app, help="Whistle: notifications for your product.")
for command in whistle_cli.commands.values():
    main.add_command(command)
main.add_command(dev_command)
