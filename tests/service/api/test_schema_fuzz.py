"""Schema-driven fuzzing (schemathesis, default checks) of every operation, against the real server.

The document is the app's own (``service.api.openapi``); requests go over loopback to the
session's live server. Bounded: a fixed number of derandomized examples per operation.

One check is skipped for ``POST /v1/rectify`` only: ``positive_data_acceptance`` expects any
schema-valid body to be accepted, but a schema cannot say "these bytes are a decodable
image" (``format: binary``), so random bytes rightly get 400 "not a supported image".
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.specs.openapi.checks import positive_data_acceptance  # noqa: E402

from service.api.app import create_app  # noqa: E402
from service.settings import Settings  # noqa: E402

schema = schemathesis.openapi.from_dict(create_app(Settings()).openapi())


@schema.parametrize()
@settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_every_operation_conforms(case, server) -> None:  # noqa: ANN001
    excluded = [positive_data_acceptance] if case.operation.path == "/v1/rectify" else []
    case.call_and_validate(base_url=server.url, excluded_checks=excluded, timeout=30)
