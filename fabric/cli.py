"""The ``fabric`` command: ``up``, ``down``, ``status``, ``nodes``, ``req``, ``config``, and the task commands.

``fabric up`` runs the supervisor (:mod:`fabric.supervisor`) in the foreground,
or with ``-d`` detached (:mod:`fabric.control`), returning once every service
answers its ADR-32 ping.  ``fabric status`` asks ``$SRV.PING|INFO|STATS`` who is
there, and shows the nodes when a gpu-monitor runs; ``fabric nodes [--watch]``
shows the nodes' live telemetry; ``fabric req`` is a small stand-in for ``nats req``
that understands fabric's encodings and error headers; ``fabric config show|validate``
shows the effective configuration or checks a file; ``fabric submit``, ``tasks``, ``task``
and ``cancel`` run and follow durable tasks; ``fabric user add|rm|list`` manages who may
connect (auth is on by default).  Every command takes
``--state-dir``, so several fabrics run side by side.

One module per command: :mod:`fabric.cli_up`, :mod:`fabric.cli_down`,
:mod:`fabric.cli_status`, :mod:`fabric.cli_nodes`, :mod:`fabric.cli_req`,
:mod:`fabric.cli_config`, :mod:`fabric.cli_tasks`, :mod:`fabric.cli_users`, :mod:`fabric.cli_keys`, over what
they share in :mod:`fabric.cli_common`; this module only puts them together (the
console script ``fabric.cli:main``, and ``python -m fabric.cli``).
"""

from __future__ import annotations

import typer

from .cli_config import config_app
from .cli_down import down
from .cli_keys import keys_app, sign
from .cli_node import node_app
from .cli_nodes import nodes
from .cli_req import req
from .cli_status import status
from .cli_tasks import SUBMIT_CONTEXT, cancel, submit, task, tasks
from .cli_tokens import tokens_app, webhook_secret
from .cli_up import up
from .cli_users import join_token, users_app

__all__ = ["app", "main"]

app = typer.Typer(
    name="fabric",
    help="A resource fabric over NATS: remote memory, processes, tasks and telemetry.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# in this order in --help
for command in (up, down, status, nodes, req):
    app.command()(command)
app.command(context_settings=SUBMIT_CONTEXT)(submit)
for task_command in (tasks, task, cancel):
    app.command()(task_command)
app.add_typer(config_app, name="config")
app.add_typer(users_app, name="user")
app.add_typer(node_app, name="node")
app.add_typer(tokens_app, name="token")
app.command("webhook-secret")(webhook_secret)
app.command("join-token")(join_token)
app.add_typer(keys_app, name="keys")
app.command()(sign)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``fabric`` console script."""
    app(args=argv, prog_name="fabric")


if __name__ == "__main__":
    main()
