"""Property-based fuzzing of a real server against its own OpenAPI document (schemathesis).

Every operation gets schema-valid and schema-invalid requests; every answer must be a non-5xx
with a documented status code, content type and body schema. Bounded (MMOE_FUZZ_EXAMPLES per
operation and mode, derandomized) so it runs in CI in about a minute; raise it to search longer.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.config._checks import (
    NEGATIVE_DATA_REJECTION_EXPECTED_STATUSES,
    NegativeDataRejectionConfig,
)
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from tests.server import ServerProcess

EXAMPLES = int(os.environ.get("MMOE_FUZZ_EXAMPLES", "30"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


@pytest.fixture(scope="module")
def fuzzed(tiny_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    # A model directory of its own, so fuzzed reloads only ever find this one file.
    model = tmp_path_factory.mktemp("fuzz-models") / "model.onnx"
    model.write_bytes(tiny_onnx.read_bytes())
    log = tmp_path_factory.mktemp("fuzz-log") / "server.log"
    with ServerProcess(model, {"MMOE_MAX_BATCH_ROWS": "64"}, log_path=log) as server:
        yield server


def _fuzz(server: ServerProcess, mode: GenerationMode, fixed: dict[str, str]) -> list[str]:
    """Fuzz every operation; the failures, one line each (hypothesis has shrunk them)."""
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    # Refusing a too-long array (the schema's maxItems: the row limit) with 413 is a rejection.
    schema.config.checks.negative_data_rejection = NegativeDataRejectionConfig(
        expected_statuses=[*NEGATIVE_DATA_REJECTION_EXPECTED_STATUSES, "413"]
    )
    failures = []
    for result in schema.get_all_operations():
        operation = result.ok()  # type: ignore[union-attr]
        params = {k: v for k, v in fixed.items() if f"{{{k}}}" in operation.path}
        if fixed and not params:
            continue

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(generation_mode=mode, path_parameters=params or None))
        def run(case: Any) -> None:
            case.call_and_validate(base_url=server.url, checks=CHECKS, timeout=30)

        try:
            run()
        except Unsatisfiable:
            pass  # nothing in this operation can be made schema-invalid (negative mode)
        except Exception as err:
            failures.append(f"{operation.label}: {err}")
    return failures


@pytest.mark.slow
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_every_operation_answers_as_documented(fuzzed: ServerProcess, mode: GenerationMode) -> None:
    failures = _fuzz(fuzzed, mode, {})
    assert not failures, "\n\n".join(failures)
    assert httpx.get(fuzzed.url + "/readyz").status_code == 200


@pytest.mark.slow
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_kserve_bodies_for_the_served_model(fuzzed: ServerProcess, mode: GenerationMode) -> None:
    # Random model names stop at 404; naming the served model gets the bodies to the decoder.
    ready = httpx.get(fuzzed.url + "/readyz").json()
    failures = _fuzz(fuzzed, mode, {"name": ready["model"], "version": ready["version"]})
    assert not failures, "\n\n".join(failures)
    assert httpx.get(fuzzed.url + "/readyz").status_code == 200
