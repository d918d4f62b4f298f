"""Fixtures for the platform tests: a Kafka-protocol broker and an S3 server.

Each starts a real server as a helper process (see ``tests/fixtures``). Set
``HISTOLOOP_TEST_KAFKA_BOOTSTRAP`` or ``HISTOLOOP_TEST_S3_ENDPOINT`` (with
``HISTOLOOP_TEST_S3_ACCESS_KEY``/``_SECRET_KEY``) to run against servers you started
yourself, e.g. the compose stack; outage tests always use a private mock broker.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.fixtures.kafka import MockKafka, start_mock_kafka
from tests.fixtures.s3 import S3Server, start_moto_s3


@dataclass(frozen=True)
class KafkaEndpoint:
    """Where the tests' Kafka broker is, and the protocol version to pin (None: probe)."""

    bootstrap: str
    api_version: tuple[int, ...] | None


@dataclass(frozen=True)
class S3Endpoint:
    """Where the tests' S3 server is and credentials it accepts."""

    endpoint: str
    access_key: str
    secret_key: str
    region: str


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[KafkaEndpoint]:
    """A Kafka broker shared by the session (librdkafka's mock cluster unless overridden)."""
    external = os.environ.get("HISTOLOOP_TEST_KAFKA_BOOTSTRAP")
    if external:
        yield KafkaEndpoint(external, None)
        return
    with start_mock_kafka() as broker:
        yield KafkaEndpoint(broker.bootstrap, broker.api_version)


@pytest.fixture
def private_kafka_broker() -> Iterator[MockKafka]:
    """A mock Kafka cluster of this test's own, which the test may kill."""
    with start_mock_kafka() as broker:
        yield broker


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Endpoint]:
    """An S3 endpoint shared by the session (moto's server unless overridden)."""
    external = os.environ.get("HISTOLOOP_TEST_S3_ENDPOINT")
    if external:
        yield S3Endpoint(
            external,
            os.environ["HISTOLOOP_TEST_S3_ACCESS_KEY"],
            os.environ["HISTOLOOP_TEST_S3_SECRET_KEY"],
            os.environ.get("HISTOLOOP_TEST_S3_REGION", "us-east-1"),
        )
        return
    with start_moto_s3() as server:
        yield S3Endpoint(server.endpoint, server.access_key, server.secret_key, server.region)


@pytest.fixture
def private_s3_server() -> Iterator[S3Server]:
    """A moto S3 server of this test's own, which the test may stop."""
    with start_moto_s3() as server:
        yield server
