"""The service against its own OpenAPI schema: Schemathesis generates requests for every
operation (valid and invalid ones) and checks each response: no server error, and status
codes, content types and bodies as the schema documents them. Bounded: a fixed number of
examples per operation, derandomised, on the real demo release, in process."""

from __future__ import annotations

import shutil

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from serving.api import create_app
from serving.recommender import Recommender
from tests.conftest import make_settings

pytestmark = pytest.mark.integration

EXAMPLES = 50  # per operation
OPERATIONS = [("POST", "/recommend"), ("POST", "/events"), ("GET", "/items/{item_id}"),
              ("GET", "/sessions/{session_id}"), ("GET", "/facets"), ("GET", "/healthz"),
              ("GET", "/readyz"), ("GET", "/metrics")]


@pytest.fixture(scope="module")
def api_schema(demo_home, tmp_path_factory):
    home = tmp_path_factory.mktemp("schema") / "home"
    shutil.copytree(demo_home, home)
    config = make_settings(home)
    rec = Recommender.load(settings=config, watch=False)
    yield schemathesis.openapi.from_asgi("/openapi.json", create_app(config, rec))
    rec.close()


def test_the_schema_lists_every_operation(api_schema):
    listed = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert listed == set(OPERATIONS)


@pytest.mark.parametrize("method,path", OPERATIONS)
def test_every_operation_answers_as_documented(api_schema, method, path):
    operation = api_schema[path][method]

    @given(case=operation.as_strategy())
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def check(case):
        # Every check but "schema-valid data is accepted": some rules are the catalogue's and
        # the session's, not the schema's (a query of spaces only, a session with nothing to
        # recommend from). Those answer 422 with the field named, which the other checks
        # hold to the schema.
        case.call_and_validate(excluded_checks=[positive_data_acceptance])

    check()
