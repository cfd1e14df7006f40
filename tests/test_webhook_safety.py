"""Webhook URLs: what is refused and why, the POST going to the address that was checked (a DNS
answer that changes afterwards cannot redirect it), TLS verified for the name, and no URL with its
token in a log line."""

from __future__ import annotations

import logging
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from api.batch_input import BatchLine
from api.batch_service import BatchSpec, create_batch
from api.log_redaction import RedactWebhookUrls, redact_query
from broker_config.settings import Settings
from broker_config.webhook_urls import UnsafeWebhookUrl, check_webhook_url, redact_url, resolve_webhook_target
from db.engine import Database
from db.ids import new_id
from db.models import Tenant, WebhookAttempt, WebhookDelivery
from db.states import Priority
from db.tenants import create_api_key
from db.types import utcnow
from workers.webhooks import WebhookSender

SECRET = "tok_SECRET_4242"


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://100.100.100.200/latest/meta-data", "a non-public address (100.100.100.200)"),
        ("http://100.64.0.1/", "a non-public address"),
        ("http://169.254.169.254/", "a non-public address"),
        ("http://[::ffff:127.0.0.1]/", "an IPv4-mapped IPv6 address"),
        ("http://[::ffff:8.8.8.8]/", "an IPv4-mapped IPv6 address"),
        ("http://[2002:7f00:1::]/", "embedding the non-public 127.0.0.1"),
        ("http://[64:ff9b::a9fe:a9fe]/", "embedding the non-public 169.254.169.254"),
        ("http://2130706433/", "write an IPv4 address as four decimal numbers"),
        ("http://0177.0.0.1/", "write an IPv4 address as four decimal numbers"),
        ("http://0x7f.0.0.1/", "write an IPv4 address as four decimal numbers"),
        ("http://127.1/", "write an IPv4 address as four decimal numbers"),
        ("http://0.0.0.0/", "the unspecified address"),
        ("http://[::]/", "the unspecified address"),
        ("http://224.0.0.1/", "a multicast address"),
        ("http://example.com:99999/", "port '99999' is not a number from 1 to 65535"),
        ("http://example.com:0/", "port 0 is not a number from 1 to 65535"),
        ("http://user:pw@example.com/", "must not carry credentials"),
        ("ftp://example.com/", "must be http(s)://host/"),
        ("http://①②⑦.0.0.1/", "must be ASCII"),
    ],
)
def test_unsafe_webhook_urls_are_refused_with_the_reason(url: str, reason: str) -> None:
    with pytest.raises(UnsafeWebhookUrl) as refused:
        check_webhook_url(f"{url}?token={SECRET}", None)
    assert reason in str(refused.value)
    assert SECRET not in str(refused.value)  # the message goes to logs and delivery records


def test_public_addresses_pass_and_the_allow_list_still_opens_private_ones() -> None:
    assert resolve_webhook_target("https://8.8.8.8/hook", None).addresses == (
        __import__("ipaddress").ip_address("8.8.8.8"),
    )
    assert check_webhook_url("http://127.0.0.1:5/x", "127.0.0.1") == "http://127.0.0.1:5/x"
    assert check_webhook_url("http://10.1.2.3/x", "10.0.0.0/8") == "http://10.1.2.3/x"
    with pytest.raises(UnsafeWebhookUrl):
        check_webhook_url("http://10.1.2.3/x", "127.0.0.1")


def test_redaction_keeps_scheme_and_host_only() -> None:
    assert (
        redact_url(f"https://hooks.example.com:8443/t/{SECRET}?k={SECRET}")
        == "https://hooks.example.com:8443/..."
    )
    assert redact_url("http://[::1]/") == "http://[::1]"
    logged = redact_query(f"/v1/batches?priority=bulk&webhook_url=https://h.example/x?token%3D{SECRET}")
    assert SECRET not in logged and "priority=bulk" in logged and "h.example" in logged
    record = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:1", "POST", f"/v1/batches?webhook_url=http://h.example/{SECRET}", "1.1", 201),
        None,
    )
    assert RedactWebhookUrls().filter(record) and SECRET not in record.getMessage()


# --- delivery ------------------------------------------------------------------------------------


@dataclass
class Receiver:
    """An HTTP(S) server on loopback that records each POST's Host header and the TLS server name."""

    status: int = 200
    context: ssl.SSLContext | None = None
    hosts: list[str] = field(default_factory=list)
    server_names: list[str | None] = field(default_factory=list)

    def start(self) -> int:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length", 0)))
                receiver.hosts.append(self.headers["host"])
                self.send_response(receiver.status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if self.context is not None:
            self.context.sni_callback = lambda _sock, name, _ctx: self.server_names.append(name)
            self.server.socket = self.context.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return int(self.server.server_address[1])

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receivers() -> Iterator[Callable[..., Receiver]]:
    made: list[Receiver] = []

    def make(**kwargs: Any) -> Receiver:
        made.append(Receiver(**kwargs))
        return made[-1]

    yield make
    for receiver in made:
        receiver.stop()


@pytest.fixture
def lookups(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """``hooks.test`` resolves to 127.0.0.1 once, then (rebinding) to an address nothing serves;
    every lookup of it is recorded. Other names resolve as usual."""
    real = socket.getaddrinfo
    seen: list[str] = []

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "hooks.test":
            seen.append(host)
            address = "127.0.0.1" if len(seen) == 1 else "127.0.0.9"
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, int(port)))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return seen


@pytest.fixture
def ledger(make_database_url: Callable[[str], str]) -> Iterator[Database]:
    db = Database(make_database_url("sqlite"))
    yield db
    db.dispose()


def _delivery(db: Database, url: str) -> str:
    create_api_key(db, "acme")
    with db.session() as session:
        tenant_id = session.query(Tenant.id).filter(Tenant.name == "acme").scalar()
    line = BatchLine(1, "a", "fast", {"model": "fast", "messages": [{"role": "user", "content": "x"}]})
    batch = create_batch(db, BatchSpec(tenant_id, Priority.DEFAULT, None, 3600), [line], publish=False)
    delivery = WebhookDelivery(
        id=new_id("msg"),
        tenant_id=tenant_id,
        batch_id=batch.id,
        event_type="batch.completed",
        url=url,
        payload={"type": "batch.completed", "data": {"id": batch.id}},
        state="pending",
        attempts=0,
        next_attempt_at=utcnow(),
        created_at=utcnow(),
    )
    db.transact(lambda session: session.add(delivery))
    return delivery.id


def _attempts(db: Database, delivery_id: str) -> list[WebhookAttempt]:
    with db.session() as session:
        return list(session.query(WebhookAttempt).filter(WebhookAttempt.delivery_id == delivery_id))


def test_the_post_goes_to_the_checked_address_with_the_name_as_host(
    ledger: Database, lookups: list[str], receivers: Callable[..., Receiver]
) -> None:
    """The name is resolved once, by the check; a second lookup would rebind it to 127.0.0.9
    where nothing listens. The POST reaches 127.0.0.1 carrying Host: hooks.test:PORT."""
    receiver = receivers()
    port = receiver.start()
    delivery_id = _delivery(ledger, f"http://hooks.test:{port}/hook?token={SECRET}")
    sender = WebhookSender(ledger, Settings(database_url=ledger.url, webhook_allow_hosts="127.0.0.0/8"))
    assert sender.deliver(delivery_id)
    assert lookups == ["hooks.test"]
    assert receiver.hosts == [f"hooks.test:{port}"]
    assert [a.status for a in _attempts(ledger, delivery_id)] == [200]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
@pytest.mark.parametrize("cert_name", ["hooks.test", "other.test"])
def test_https_verifies_the_certificate_for_the_name_not_the_address(
    ledger: Database,
    lookups: list[str],
    receivers: Callable[..., Receiver],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    cert_name: str,
) -> None:
    """Connected to 127.0.0.1, the TLS handshake still names hooks.test (SNI) and the certificate is
    checked against it: one for hooks.test is accepted, one for other.test is refused."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    make_cert = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
    names = ["-subj", f"/CN={cert_name}", "-addext", f"subjectAltName=DNS:{cert_name}"]
    subprocess.run(
        [*make_cert, "-keyout", str(key), "-out", str(cert), *names],
        check=True,
        capture_output=True,
    )
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    receiver = receivers(context=server_context)
    port = receiver.start()
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the sender trusts this certificate as a root
    delivery_id = _delivery(ledger, f"https://hooks.test:{port}/hook")
    settings = Settings(database_url=ledger.url, webhook_allow_hosts="127.0.0.0/8")
    assert WebhookSender(ledger, settings).deliver(delivery_id)
    assert receiver.server_names == ["hooks.test"] and lookups == ["hooks.test"]
    attempt = _attempts(ledger, delivery_id)[0]
    if cert_name == "hooks.test":
        assert attempt.status == 200 and receiver.hosts == [f"hooks.test:{port}"]
    else:
        assert attempt.status is None and "CERTIFICATE_VERIFY_FAILED" in (attempt.error or "")
        assert receiver.hosts == []


def test_no_log_line_or_record_carries_the_webhook_url(
    ledger: Database, receivers: Callable[..., Receiver], caplog: pytest.LogCaptureFixture
) -> None:
    """A refused URL and a receiver that fails for good: the warnings name scheme and host only."""
    receiver = receivers(status=500)
    port = receiver.start()
    settings = Settings(database_url=ledger.url, webhook_allow_hosts="127.0.0.1", webhook_retry_schedule_s="")
    sender = WebhookSender(ledger, settings)
    refused = _delivery(ledger, f"http://10.9.9.9/hook?token={SECRET}")
    failing = _delivery(ledger, f"http://127.0.0.1:{port}/hook/{SECRET}")
    with caplog.at_level(logging.DEBUG):
        assert sender.deliver(refused) and sender.deliver(failing)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 2 and all("failed for good" in w for w in warnings)
    assert "http://10.9.9.9/..." in warnings[0] and f"http://127.0.0.1:{port}/..." in warnings[1]
    assert SECRET not in caplog.text
    assert all(SECRET not in (a.error or "") for a in _attempts(ledger, refused) + _attempts(ledger, failing))
