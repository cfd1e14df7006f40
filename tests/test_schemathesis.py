"""schemathesis against the live API's OpenAPI document, with a valid key: no route answers 5xx,
and every answer is one the document declares, with the declared content type and shape.

Driven through schemathesis's Python API (each operation's hypothesis strategy), not its pytest
plugin: the plugin's lazy-fixture path reads a pytest internal that pytest 9 removed. Bounded: a
few examples per operation and generation mode (positive and negative), about a minute.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from headrace.stack import EmbeddedStack

CHECKS = [not_a_server_error, response_schema_conformance, status_code_conformance, content_type_conformance]
EXAMPLES = 15  # per operation and mode: about 30 s alone for the 40-odd operations


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedStack]:
    stack = EmbeddedStack(
        tmp_path_factory.mktemp("schemathesis"), workers=0, simulator_args=("--latency-ms", "5")
    )
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


@pytest.mark.slow
def test_every_route_answers_what_it_documents(stack: EmbeddedStack) -> None:
    schema = schemathesis.openapi.from_url(f"{stack.api_url}/openapi.json")
    headers = {"Authorization": f"Bearer {stack.api_key}", "anthropic-version": "2023-06-01"}
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 20, [op.label for op in operations]
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None
            )
            def run(case: schemathesis.Case) -> None:
                case.call_and_validate(base_url=stack.api_url, headers=headers, checks=CHECKS)

            try:
                run()
            except Unsatisfiable:
                assert mode is GenerationMode.NEGATIVE, operation.label  # only free strings: nothing invalid
            except (
                Exception,
                BaseExceptionGroup,
            ) as exc:  # every operation is tried, failures reported together
                failures.append(f"{operation.label} ({mode.value}): {exc}"[:3000])
    assert not failures, "\n\n".join(failures)
