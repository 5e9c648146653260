"""Schemathesis against the gateway's own OpenAPI document, on a real fabric: no 5xx, every answer as documented.

Schemathesis reads ``/schema/openapi.json`` and generates requests for every operation --
valid ones from the schemas, and (its negative mode) ones that break them -- and sends
them to the running gateway with a token of a plain user (its tasks run as the sandbox's
user, never as root).  Each response must match its operation's documented status codes,
content type and body schema.  A 5xx fails, except 507 ``out_of_memory``: an
allocation larger than the node's arena is a well-formed request that can never fit,
and the fabric answers it with its documented code.

One of Schemathesis' default checks is left out: ``positive_data_acceptance``, which
wants every schema-valid request accepted.  The API validates meaning beyond what a
schema says (a task needs a ``kind`` or a UDCS ``type``; a ``core`` task names its
core; a python payload is an FPY1 frame) and answers those with 400 or 422 -- documented
responses, whose problem+json bodies the schema check still validates.  Invalid data
must still be refused (``negative_data_rejection`` stays on).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="install the test extras: pip install -e '.[test]'")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import positive_data_acceptance  # noqa: E402

from tests._cli import cleanup, cli_env, fabric, status_json  # noqa: E402

pytestmark = pytest.mark.slow


class Target:
    def __init__(self, url: str, token: str) -> None:
        self.url = url
        self.token = token


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    state_dir: Path = tmp_path_factory.mktemp("gwschema")
    env = cli_env(FABRIC_GATEWAY_RATE_PER_S="100000", FABRIC_GATEWAY_BURST="100000")
    try:
        up = fabric("up", state_dir, "-d", "--nats-port", "0", "--node", "fuzz", env=env, timeout=90)
        assert up.returncode == 0, up.stdout + up.stderr
        _, doc = status_json(state_dir)
        made = fabric("token create", state_dir, "fuzzer", "--scope", "read,submit")
        assert made.returncode == 0, made.stderr
        yield Target(doc["gateway"], made.stdout.strip())
    finally:
        cleanup(state_dir)


@schemathesis.check
def no_server_error_but_documented_out_of_memory(ctx: Any, response: Any, case: Any) -> bool | None:
    if response.status_code < 500:
        return None
    if response.status_code == 507 and response.json().get("kind") == "out_of_memory":
        return None
    raise AssertionError(f"{response.status_code} from {case.method} {case.formatted_path}: {response.text[:500]}")


#: an endless stream: tests/test_gateway.py reads it
SKIPPED = {("GET", "/api/events")}


def test_every_operation_answers_as_documented(target: Target) -> None:
    # driven from here rather than through schemathesis' pytest plugin: one fabric, every operation in turn
    schema = schemathesis.openapi.from_url(f"{target.url}/schema/openapi.json")
    headers = {"Authorization": f"Bearer {target.token}"}
    ran: list[str] = []
    for result in schema.get_all_operations():
        op = result.ok()
        if (op.method.upper(), op.path) in SKIPPED:
            continue
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):

            @given(case=op.as_strategy(generation_mode=mode))
            @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            def check(case: Any) -> None:
                case.call_and_validate(base_url=target.url, headers=headers,
                                       excluded_checks=[not_a_server_error, positive_data_acceptance],
                                       additional_checks=[no_server_error_but_documented_out_of_memory], timeout=30)

            try:
                check()
            except Unsatisfiable:
                # negative mode on an operation with no parameters and no body: nothing to break
                assert mode is schemathesis.GenerationMode.NEGATIVE, f"{op.method.upper()} {op.path}"
            except Exception as exc:
                exc.add_note(f"{op.method.upper()} {op.path}, {mode.value} data")
                raise
        ran.append(f"{op.method.upper()} {op.path}")
    assert len(ran) >= 15 and "POST /api/submit" in ran and "PUT /api/mem/{handle}" in ran, ran
