"""Access control on the distributed stack: tokens on every RPC, mutual TLS, project isolation,
and no credential in any service's log.

Runs last in this folder (alphabetically), so the log check covers every log line the
other e2e tests made the services write — faults and restarts included.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from histoloop.channels import make_channel
from histoloop.config import Settings
from histoloop.v1 import (
    acquisition_pb2,
    annotation_store_pb2,
    embedding_pb2,
    prediction_pb2,
    tiling_pb2,
    training_pb2,
)
from histoloop.v1 import annotation_store_pb2 as pb
from tests.e2e.loop import ProjectLoop
from tests.e2e.stack import GRPC_SERVICES, Stack

_MODULES = {
    "annotation_store": annotation_store_pb2,
    "tiling": tiling_pb2,
    "embedding": embedding_pb2,
    "training": training_pb2,
    "prediction": prediction_pb2,
    "acquisition": acquisition_pb2,
}


def _methods(service: str) -> list[tuple[str, type[Message], bool]]:
    """(full method path, request type, server-streaming) of every RPC of a service."""
    full = GRPC_SERVICES[service]
    descriptor = _MODULES[service].DESCRIPTOR.services_by_name[full.rsplit(".", 1)[1]]
    out = []
    for method in descriptor.methods:
        module = _MODULES[service]
        request = getattr(module, method.input_type.name, None)
        if request is None:  # a request type defined in another file
            from google.protobuf import message_factory

            request = message_factory.GetMessageClass(method.input_type)
        out.append((f"/{full}/{method.name}", request, method.server_streaming))
    return out


def _call(channel: grpc.Channel, path: str, request: Message, streaming: bool) -> grpc.StatusCode:
    try:
        if streaming:
            stream = channel.unary_stream(
                path,
                request_serializer=type(request).SerializeToString,
                response_deserializer=lambda b: b,
            )(request, timeout=10)
            for _ in stream:
                break
            stream.cancel()
        else:
            channel.unary_unary(
                path,
                request_serializer=type(request).SerializeToString,
                response_deserializer=lambda b: b,
            )(request, timeout=10)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("service", list(GRPC_SERVICES))
def test_every_rpc_needs_a_token(stack: Stack, service: str) -> None:
    address = stack.services[service].address
    anonymous = make_channel(address, stack.settings, token="")
    forged = make_channel(address, stack.settings, token="not-a-token")
    try:
        methods = _methods(service)
        assert methods
        for path, request_type, streaming in methods:
            assert (
                _call(anonymous, path, request_type(), streaming) == grpc.StatusCode.UNAUTHENTICATED
            ), path
            assert (
                _call(forged, path, request_type(), streaming) == grpc.StatusCode.UNAUTHENTICATED
            ), path
        # the service-to-service token is accepted (the call then fails or succeeds on its merits)
        path, request_type, streaming = methods[0]
        code = _call(stack.channel(service, stack.service_token), path, request_type(), streaming)
        assert code != grpc.StatusCode.UNAUTHENTICATED
        # probes need none
        reply = health_pb2_grpc.HealthStub(anonymous).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        anonymous.close()
        forged.close()


@pytest.mark.parametrize("service", list(GRPC_SERVICES))
def test_transport_is_mutual_tls(stack: Stack, service: str) -> None:
    assert stack.tls is not None
    address = stack.services[service].address
    request = health_pb2.HealthCheckRequest()

    def probe(channel: grpc.Channel) -> grpc.StatusCode:
        with channel:
            try:
                health_pb2_grpc.HealthStub(channel).Check(request, timeout=5)
            except grpc.RpcError as exc:
                return exc.code()
        return grpc.StatusCode.OK

    assert probe(grpc.insecure_channel(address)) == grpc.StatusCode.UNAVAILABLE, "plaintext refused"
    no_cert = Settings(tls_ca=stack.tls.ca)
    assert probe(make_channel(address, no_cert, token="")) == grpc.StatusCode.UNAVAILABLE, (
        "needs a client cert"
    )
    rogue = Settings(
        tls_ca=stack.tls.ca, tls_cert=stack.tls.rogue_cert, tls_key=stack.tls.rogue_key
    )
    assert probe(make_channel(address, rogue, token="")) == grpc.StatusCode.UNAVAILABLE, (
        "cert of another CA"
    )
    assert probe(make_channel(address, stack.settings, token="")) == grpc.StatusCode.OK


def test_annotator_reaches_only_their_projects(stack: Stack, visium: Path, slide: Path) -> None:
    mine = ProjectLoop(stack, visium, slide)
    theirs = ProjectLoop(stack, visium, slide)
    mine.start()
    theirs_qs = theirs.start()
    try:
        token = (
            stack.store_stub()
            .RegisterAnnotator(
                pb.RegisterAnnotatorRequest(
                    annotator_id=f"ann-{mine.project_id}",
                    display_name="Dr A",
                    role=pb.ANNOTATOR_ROLE_ANNOTATOR,
                    projects=[mine.project_id],
                ),
                timeout=10,
            )
            .token
        )
        store = stack.store_stub(token)
        # their project: nothing readable, nothing writable
        labels = [pb.SpotLabel(barcode=s.barcode, label="upper") for s in theirs_qs.spots]
        attempts = {
            "SubmitLabels": lambda: store.SubmitLabels(
                pb.SubmitLabelsRequest(
                    project_id=theirs.project_id, dataset_id="cmu", batch_id="sneaky", labels=labels
                ),
                timeout=10,
            ),
            "ImportLoupeCsv": lambda: store.ImportLoupeCsv(
                pb.ImportLoupeCsvRequest(
                    project_id=theirs.project_id,
                    dataset_id="cmu",
                    batch_id="sneaky2",
                    csv=b"Barcode,G\n" + b"".join(f"{x.barcode},upper\n".encode() for x in labels),
                ),
                timeout=10,
            ),
            "ExportLabels": lambda: store.ExportLabels(
                pb.ExportLabelsRequest(
                    project_id=theirs.project_id, dataset_id="cmu", kind=pb.EXPORT_KIND_LABELS
                ),
                timeout=10,
            ),
            "GetStatus": lambda: store.GetStatus(
                pb.GetStatusRequest(project_id=theirs.project_id), timeout=10
            ),
            "GetProject": lambda: store.GetProject(
                pb.GetProjectRequest(project_id=theirs.project_id), timeout=10
            ),
            "GetQuerySet": lambda: store.GetQuerySet(
                pb.GetQuerySetRequest(project_id=theirs.project_id), timeout=10
            ),
            "ListQuerySets": lambda: store.ListQuerySets(
                pb.ListQuerySetsRequest(project_id=theirs.project_id), timeout=10
            ),
            "GetAgreement": lambda: store.GetAgreement(
                pb.GetAgreementRequest(project_id=theirs.project_id), timeout=10
            ),
            "ListLabelEvents": lambda: store.ListLabelEvents(
                pb.ListLabelEventsRequest(project_id=theirs.project_id), timeout=10
            ),
            "WatchQuerySets": lambda: next(
                iter(
                    store.WatchQuerySets(
                        pb.WatchQuerySetsRequest(project_id=theirs.project_id, include_latest=True),
                        timeout=10,
                    )
                )
            ),
            "AddClasses": lambda: store.AddClasses(
                pb.AddClassesRequest(project_id=theirs.project_id, classes=[]), timeout=10
            ),
            # and not through another annotator's name either
            "SubmitLabels as admin": lambda: store.SubmitLabels(
                pb.SubmitLabelsRequest(
                    project_id=mine.project_id,
                    dataset_id="cmu",
                    batch_id="as-admin",
                    labels=labels[:1],
                    annotator_id="admin",
                ),
                timeout=10,
            ),
            "RegisterAnnotator": lambda: store.RegisterAnnotator(
                pb.RegisterAnnotatorRequest(annotator_id="me-too", projects=[theirs.project_id]),
                timeout=10,
            ),
            "CreateProject": lambda: store.CreateProject(
                pb.CreateProjectRequest(project_id="mine-now"), timeout=10
            ),
        }
        for name, attempt in attempts.items():
            with pytest.raises(grpc.RpcError) as err:
                attempt()
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, name
        assert stack.sql(
            "SELECT count(*) FROM label_events WHERE project_id = %s", theirs.project_id
        ) == [(0,)]
        assert stack.sql(
            "SELECT count(*) FROM label_batches WHERE project_id = %s", theirs.project_id
        ) == [(0,)]
        # their own project works, as them
        status = store.GetStatus(pb.GetStatusRequest(project_id=mine.project_id), timeout=10)
        assert status.project_id == mine.project_id
        qs = store.GetQuerySet(pb.GetQuerySetRequest(project_id=mine.project_id), timeout=10)
        reply = store.SubmitLabels(
            pb.SubmitLabelsRequest(
                project_id=mine.project_id,
                dataset_id="cmu",
                batch_id="mine-1",
                labels=[
                    pb.SpotLabel(barcode=s.barcode, label=mine.truth[s.barcode]) for s in qs.spots
                ],
            ),
            timeout=10,
        )
        assert reply.n_labels == len(qs.spots)
        authors = stack.sql(
            "SELECT DISTINCT annotator_id FROM label_batches WHERE project_id = %s", mine.project_id
        )
        assert authors == [(f"ann-{mine.project_id}",)]
        # annotator tokens live in the annotation store; the other services do not know them
        with pytest.raises(grpc.RpcError) as err:
            stack.training_stub(token).ListModels(
                training_pb2.ListModelsRequest(project_id=mine.project_id), timeout=10
            )
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        mine.close()
        theirs.close()


def test_no_credential_in_any_log(stack: Stack) -> None:
    logs = stack.logs()
    assert all(logs.values()), "every service wrote a log"
    for name, text in logs.items():
        for what, secret in stack.secrets.items():
            assert secret not in text, f"{what} appears in the {name} log"
        assert stack.database_url not in text
