"""Schemathesis over /api/openapi.json against the running app (in-process WSGI).

Every operation gets generated requests (valid and invalid) with an admin token; the
responses must be documented status codes, content types and schemas, and never a
server error.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from flowfleet.provisioning.authority import Authority
from flowfleet.registry.catalog.artifacts import LocalStore
from flowfleet.registry.catalog.keys import KeyRing
from flowfleet.registry.catalog.modelreg import MIB, ModelRegistry
from flowfleet.registry.fleet.commands import CommandPublisher
from flowfleet.registry.fleet.enrollment import EnrollmentSettings
from flowfleet.registry.http import auth
from flowfleet.registry.http.web import create_app
from flowfleet.registry.store import db as regdb
from flowfleet.registry.testing import release

TFLITE = "yolov8n_full_integer_quant.tflite"


@pytest.fixture(scope="module")
def served(tmp_path_factory, data):
    tmp = tmp_path_factory.mktemp("openapi")
    db = regdb.open_database(tmp / "r.db")
    reg = ModelRegistry(db, LocalStore(tmp / "a"), KeyRing(tmp / "k"), max_upload_bytes=8 * MIB)
    reg.start()
    with db.connection_context():
        reg.add_version(data / "models" / TFLITE, name="yolo", filename=TFLITE, actor="test")
        reg.set_alias("yolo", "production", 1, actor="test")
        auth.create_user("admin", "admin", actor="test")
        token, _ = auth.create_token("admin", actor="test")
    # A queue-only command publisher: schemathesis may deploy a real model/version, and
    # "no publisher configured" (503) would otherwise count as a failure.
    # Enrollment configured (a test CA), so its endpoints answer rather than 503.
    enrollment = EnrollmentSettings(Authority.create(tmp / "ca").folder, "127.0.0.1", 8883)
    # Live streams last a second here: each call reads a stream to its end.
    app = create_app(
        db, registry=reg, commands=CommandPublisher(db), enrollment=enrollment, live_stream_s=1
    )
    yield app, token
    release()


def test_api_matches_its_openapi_document(served):
    """Each operation in turn (schemathesis' own pytest plugin does not run on pytest 9)."""
    app, token = served
    schema = schemathesis.openapi.from_wsgi("/api/openapi.json", app)
    headers = {"Authorization": f"Bearer {token}"}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15
    failures = []
    for operation in operations:
        # An upload that is schema-valid (any bytes) is rightly refused when the bytes
        # are not a model (422): that is content validation, not a schema mismatch.
        upload = operation.method.upper() == "POST"
        # /api/series has rules across parameters that a schema cannot state (from
        # before to, at most 100,000 points, group values that fit the kind): a
        # schema-valid request may rightly get 400 there too.
        # The health series likewise: from and to at most 31 days apart.
        across = operation.path in ("/api/series", "/api/devices/{device}/health")
        excluded = [schemathesis.checks.positive_data_acceptance] if upload or across else []
        try:
            _checker(operation, headers, excluded)()
        except Exception as exc:
            failures.append(f"{operation.label}: {exc}")
    assert not failures, "\n\n".join(failures)


def _checker(operation, headers, excluded):
    @given(case=operation.as_strategy())
    @settings(
        max_examples=15,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def check(case):
        case.call_and_validate(headers=headers, excluded_checks=excluded)

    return check
