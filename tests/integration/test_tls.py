"""TLS for HTTP and gRPC from cert/key files, and mutual TLS for gRPC, with throwaway certificates."""

import datetime
import ipaddress

import grpc
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from clients import GrpcRewardClient, RewardClient
from protos import reward_pb2 as pb
from protos import reward_pb2_grpc
from tests.helpers import LiveServer, test_config


def _issue(subject, issuer_key, issuer_name, is_ca, key=None):
    key = key or ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer_name or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
    )
    if not is_ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    cert = builder.sign(issuer_key or key, hashes.SHA256())
    return key, cert


def _write(path, key, cert):
    path.with_suffix(".key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(path.with_suffix(".crt")), str(path.with_suffix(".key"))


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    ca_key, ca_cert = _issue("rewardserve test CA", None, None, True)
    ca_crt, _ = _write(root / "ca", ca_key, ca_cert)
    server = _write(root / "server", *_issue("127.0.0.1", ca_key, ca_cert.subject, False))
    client = _write(root / "client", *_issue("trainer", ca_key, ca_cert.subject, False))
    return {"ca": ca_crt, "server": server, "client": client}


@pytest.fixture(scope="module")
def tls_server(tiny_bert_dir, pki):
    cert, key = pki["server"]
    cfg = test_config(tiny_bert_dir, model_name="tiny-bert", tls_cert=cert, tls_key=key, tls_client_ca=pki["ca"])
    with LiveServer(cfg) as server:
        yield server


def test_https(tls_server, pki):
    url = f"https://127.0.0.1:{tls_server.runtime.http_port}"
    r = httpx.post(url + "/v1/score", json={"inputs": [{"raw": "hi"}]}, verify=pki["ca"])
    assert r.status_code == 200
    with pytest.raises(httpx.HTTPError):  # plaintext to the TLS port fails
        httpx.post(f"http://127.0.0.1:{tls_server.runtime.http_port}/v1/score", json={"inputs": [{"raw": "hi"}]})
    with pytest.raises(httpx.ConnectError):  # an untrusted certificate is refused by the client
        httpx.get(url + "/health")
    with RewardClient(url, ca_cert=pki["ca"]) as client:
        assert client.score(["hi"]) == [r.json()["scores"][0]["reward"]]


def test_grpc_mutual_tls(tls_server, pki):
    with open(pki["ca"], "rb") as f:
        ca = f.read()
    cert_path, key_path = pki["client"]
    with open(cert_path, "rb") as c, open(key_path, "rb") as k:
        with_cert = grpc.ssl_channel_credentials(ca, k.read(), c.read())
    request = pb.ScoreRequest(inputs=[pb.ScoreInput(raw="hi")])
    with grpc.secure_channel(tls_server.grpc_target, with_cert) as channel:
        reward = reward_pb2_grpc.RewardServiceStub(channel).Score(request, timeout=10).scores[0].reward
    with grpc.secure_channel(tls_server.grpc_target, grpc.ssl_channel_credentials(ca)) as channel:
        with pytest.raises(grpc.RpcError) as err:  # no client certificate: the handshake is refused
            reward_pb2_grpc.RewardServiceStub(channel).Score(request, timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    with grpc.insecure_channel(tls_server.grpc_target) as channel:
        with pytest.raises(grpc.RpcError):
            reward_pb2_grpc.RewardServiceStub(channel).Score(request, timeout=5)
    with GrpcRewardClient(tls_server.grpc_target, ca_cert=pki["ca"], client_cert=cert_path,
                          client_key=key_path) as client:
        assert client.score(["hi"]) == [reward]


def test_tls_config_must_pair():
    from pydantic import ValidationError

    from service.config import ServeConfig

    with pytest.raises(ValidationError, match="tls_cert and tls_key go together"):
        ServeConfig(tls_cert="server.crt")
    with pytest.raises(ValidationError, match="needs tls_cert"):
        ServeConfig(tls_client_ca="ca.crt")
