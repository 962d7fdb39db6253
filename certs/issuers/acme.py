"""ACME (RFC 8555) issuance over the synchronous `acme` package.

Layers, outermost first:
- AcmeIssuer.issue(): asyncio. Runs every ACME request in a worker thread (asyncio.to_thread),
  publishes HTTP-01 answers in the shared Http01Responder and DNS-01 TXT records through
  dnspython's asyncio API, and always withdraws exactly what it published.
- AcmeSession: one conversation with the CA in one worker thread at a time: directory, account
  (key made once under data_dir and reused; registered again when the CA forgot it), orders,
  polling with short intervals (the library's own polling sleeps whole seconds).
- _Network: the library's ClientNetwork with our retry rules (retry_delay(), pure): a badNonce
  is retried up to NONCE_RETRIES times (the library gives up after one), 429/503 with a short
  Retry-After are waited out, longer ones surface as AcmeError.retry_after for the scheduler.

A threading.Event handed down from the caller stops a worker thread at its next request or
sleep once the asyncio side is cancelled (a thread cannot be cancelled from outside).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import josepy as jose
import requests
from acme import challenges, client, messages
from acme import errors as acme_errors
from cryptography.hazmat.primitives.asymmetric import ec

from ..challenges.dns01 import Dns01Error, Rfc2136Client, load_tsig_key, records_for
from ..challenges.http01 import Http01Responder
from ..errors import CertificateFileError, IssuanceError
from ..keys import (
    generate_private_key,
    load_certificates,
    load_private_key,
    make_csr,
    private_key_to_pem,
)
from ..storage import KEY_MODE, Storage

log = logging.getLogger("tlsproxy.certs.acme")

T = TypeVar("T")

HTTP01 = "http-01"
DNS01 = "dns-01"
NONCE_RETRIES = 10
# A Retry-After up to this long is waited out inside the request; a longer one ends the
# attempt and becomes the earliest time of the next one.
INLINE_WAIT_MAX = 30.0
SERVER_BUSY_RETRIES = 3
ORDER_DEADLINE = 180.0  # from new order to certificate, validation included
NETWORK_TIMEOUT = 30  # per connect / read


@dataclass(frozen=True)
class DnsUpdateSettings:
    server_host: str
    server_port: int
    tsig_key_file: Path
    zone: str | None
    propagation_timeout: float


@dataclass(frozen=True)
class AcmeSettings:
    directory: str
    email: str | None
    default_challenge: str  # "http-01" | "dns-01"
    ca_bundle: Path | None
    eab_kid: str | None
    eab_hmac_key: str | None
    profile: str | None
    dns: DnsUpdateSettings | None


def validate_settings(settings: AcmeSettings) -> None:
    """For `tlsproxy check`: every file the [acme] table names is usable.
    CertificateFileError(path, reason) on the first that is not."""
    if settings.ca_bundle is not None:
        path = settings.ca_bundle
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise CertificateFileError(path, f"cannot read CA bundle: {e.strerror or e}") from None
        try:
            load_certificates(data)
        except ValueError as e:
            raise CertificateFileError(path, f"not a PEM CA bundle: {e}") from None
    if settings.dns is not None:
        load_tsig_key(settings.dns.tsig_key_file)


class AcmeError(IssuanceError):
    """An ACME attempt failed. `retry_after` (epoch seconds) is the earliest moment the CA
    wants to hear from us again, when it said so."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        # One line, for logs and `tlsproxy certs` (a CA's subproblems come on extra lines).
        super().__init__("; ".join(line.strip() for line in message.splitlines() if line.strip()))
        self.retry_after = retry_after


class AcmeStopped(AcmeError):
    """The asyncio side gave up on this attempt (task cancelled); the thread stops here."""

    def __init__(self) -> None:
        super().__init__("stopped")


# -- pure rules --------------------------------------------------------------------------------


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), None when
    absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now)


def retry_delay(
    code: str | None, status: int | None, retry_after: float | None, attempt: int
) -> float | None:
    """How long to wait before sending a failed request again, or None to give up.

    `attempt` counts the retries already made for this request.
    """
    if code == "badNonce":
        # A fresh nonce is fetched for the retry; nothing to wait for.
        return 0.0 if attempt < NONCE_RETRIES else None
    if status in (429, 503) or code == "rateLimited":
        if attempt >= SERVER_BUSY_RETRIES:
            return None
        if retry_after is None:
            return None if status == 429 or code == "rateLimited" else 1.0 * (attempt + 1)
        return retry_after if retry_after <= INLINE_WAIT_MAX else None
    return None


def challenge_type_for(host: str, site_challenge: str | None, default: str) -> str:
    """A wildcard can only be validated with DNS-01; other names use the site's choice, else
    the [acme] default."""
    if host.startswith("*."):
        return DNS01
    return site_challenge or default


@dataclass(frozen=True)
class PendingChallenge:
    host: str  # "*.app.test" for the wildcard authorization of app.test
    type: str
    challenge: messages.ChallengeBody
    response: challenges.ChallengeResponse
    validation: str  # HTTP-01: the key authorization; DNS-01: the TXT value
    authz_url: str

    @property
    def token(self) -> str:
        return jose.b64encode(self.challenge.chall.token).decode()


def authz_host(authz: messages.Authorization) -> str:
    host = str(authz.identifier.value).lower()
    return f"*.{host}" if authz.wildcard else host


def plan_challenges(
    authzs: Sequence[messages.AuthorizationResource],
    account_key: jose.JWK,
    choose: Callable[[str], str],
) -> list[PendingChallenge]:
    """The challenges to answer for an order: one per pending authorization, of the type
    `choose(host)` names. Authorizations the CA already holds as valid (reuse) are skipped."""
    plan: list[PendingChallenge] = []
    for authzr in authzs:
        body = authzr.body
        host = authz_host(body)
        status = body.status
        if status == messages.STATUS_VALID:
            continue
        if status != messages.STATUS_PENDING:
            raise AcmeError(f"authorization for {host} is {_status(status)} (expected pending)")
        wanted = challenge_type_for(host, None, choose(host))
        offered = [c for c in body.challenges if getattr(c.chall, "typ", None) == wanted]
        if not offered:
            names = ", ".join(sorted({str(getattr(c.chall, "typ", "?")) for c in body.challenges}))
            raise AcmeError(f"the CA offers no {wanted} challenge for {host} (offered: {names})")
        challb = offered[0]
        response, validation = challb.response_and_validation(account_key)
        plan.append(
            PendingChallenge(host, wanted, challb, response, str(validation), str(authzr.uri))
        )
    return plan


def challenge_error(authz: messages.Authorization) -> str:
    """The CA's own words on why an authorization failed."""
    host = authz_host(authz)
    problems = [f"{c.chall.typ}: {c.error}" for c in authz.challenges if getattr(c, "error", None)]
    detail = "; ".join(problems) if problems else "no detail from the CA"
    return f"{host}: authorization {_status(authz.status)}: {detail}"


def _status(status: object) -> str:
    return str(getattr(status, "name", status))


def directory_slug(directory: str) -> str:
    """A stable directory name for one ACME server's account files."""
    host = urlsplit(directory).netloc or "acme"
    digest = hashlib.sha256(directory.encode()).hexdigest()[:10]
    return f"{host}-{digest}"


# -- the transport -----------------------------------------------------------------------------


class _Network(client.ClientNetwork):
    """ClientNetwork that retries per retry_delay() and stops when asked to."""

    def __init__(self, key: jose.JWK, *, verify: bool | str, stop: threading.Event) -> None:
        super().__init__(
            key,
            alg=jose.ES256,
            verify_ssl=verify,  # type: ignore[arg-type]  # requests takes a CA file path too
            user_agent="tlsproxy (acme-python)",
            timeout=NETWORK_TIMEOUT,
        )
        self._stop = stop
        self._last: tuple[int, float | None] = (0, None)

    def _send_request(self, method: str, url: str, *args: Any, **kwargs: Any) -> requests.Response:
        if self._stop.is_set():
            raise AcmeStopped()
        response = super()._send_request(method, url, *args, **kwargs)
        after = parse_retry_after(response.headers.get("Retry-After"), time.time())
        self._last = (response.status_code, after)
        return response

    def _retrying(self, send: Callable[[], requests.Response]) -> requests.Response:
        attempt = 0
        while True:
            try:
                return send()
            except messages.Error as e:
                error: Exception = e
                code = e.code
            except acme_errors.ClientError as e:  # a non-JSON error body, e.g. a proxy's 503
                error, code = e, None
            status, after = self._last
            delay = retry_delay(code, status, after, attempt)
            if delay is None:
                if status in (429, 503) and after is not None:
                    raise AcmeError(
                        f"ACME server busy (HTTP {status}, Retry-After {after:g}s): {error}",
                        retry_after=time.time() + after,
                    ) from error
                raise error
            attempt += 1
            log.debug(
                "ACME request retried (%s, attempt %d) in %.1fs", code or status, attempt, delay
            )
            if delay and self._stop.wait(delay):
                raise AcmeStopped()

    def post(self, *args: Any, **kwargs: Any) -> requests.Response:
        return self._retrying(lambda: self._post_once(*args, **kwargs))

    def get(
        self, url: str, content_type: str = client.ClientNetwork.JSON_CONTENT_TYPE, **kwargs: Any
    ) -> requests.Response:
        parent = super().get
        return self._retrying(lambda: parent(url, content_type, **kwargs))


def _reason(e: requests.exceptions.RequestException) -> str:
    """urllib3's innermost reason ("... [Errno 111] Connection refused") rather than the whole
    "HTTPSConnectionPool(...): Max retries exceeded ..." wrapping."""
    inner = e.args[0] if e.args else None
    reason = getattr(inner, "reason", None)
    return str(reason) if reason is not None else str(e)


def _describe(e: BaseException, directory: str) -> AcmeError | None:
    """One line naming the cause, for logs and `tlsproxy certs`; None for a bug."""
    if isinstance(e, AcmeError):
        return e
    if isinstance(e, requests.exceptions.SSLError):
        return AcmeError(
            f"cannot verify the HTTPS certificate of ACME server {directory}"
            f" (acme.ca_bundle?): {_reason(e)}"
        )
    if isinstance(e, requests.exceptions.RequestException):
        return AcmeError(f"cannot reach ACME server {directory}: {_reason(e)}")
    if isinstance(e, messages.Error):
        return AcmeError(f"ACME server error: {e}")
    if isinstance(e, acme_errors.Error | jose.errors.Error | ValueError):
        return AcmeError(f"ACME: {type(e).__name__}: {e}")
    return None


# -- one conversation (worker thread) ----------------------------------------------------------


class AcmeSession:
    """Directory + account + orders; blocking, for one worker thread at a time."""

    def __init__(self, settings: AcmeSettings, storage: Storage, stop: threading.Event) -> None:
        self.settings = settings
        self.storage = storage
        self.stop = stop
        slug = directory_slug(settings.directory)
        self.key_path = storage.path("acme", slug, "account.key")
        self.account_path = storage.path("acme", slug, "account.json")
        self.account_key: jose.JWKEC | None = None
        self.client: client.ClientV2 | None = None

    # -- account -------------------------------------------------------------------------
    def open(self, *, account: bool = True) -> None:
        """Fetch the directory and, with `account`, make sure the CA knows our account."""
        key = self._load_or_make_key()
        self.account_key = key
        verify: bool | str = str(self.settings.ca_bundle) if self.settings.ca_bundle else True
        net = _Network(key, verify=verify, stop=self.stop)
        directory = client.ClientV2.get_directory(self.settings.directory, net)
        self.client = client.ClientV2(directory, net)
        if not account:
            return
        # Under the lock: two orders starting together (or two proxies) register once.
        with self.storage.lock("acme-account"):
            regr = self._load_account()
            if regr is None:
                self._register()
            else:
                net.account = regr

    def _load_or_make_key(self) -> jose.JWKEC:
        # Two proxies sharing data_dir must end up with one key: decide under the lock.
        with self.storage.lock("acme-account"):
            pem = self.storage.read(self.key_path)
            if pem is None:
                pem = private_key_to_pem(ec.generate_private_key(ec.SECP256R1()))
                self.storage.write(self.key_path, pem, mode=KEY_MODE)
                log.info("ACME account key created: %s", self.key_path)
        key = load_private_key(pem)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise AcmeError(f"{self.key_path}: the ACME account key must be an EC key")
        return jose.JWKEC(key=key)

    def _load_account(self) -> messages.RegistrationResource | None:
        raw = self.storage.read(self.account_path)
        if raw is None:
            return None
        try:
            data = json.loads(raw)
            if data.get("directory") != self.settings.directory:
                return None
            return messages.RegistrationResource.from_json(data["registration"])
        except (ValueError, KeyError, jose.errors.Error):
            log.warning("ignoring unreadable ACME account file %s", self.account_path)
            return None

    def register(self) -> None:
        """Register the account key (again): a CA that already knows it hands back the same
        account; one that forgot it (Pebble after a restart) makes a new one."""
        with self.storage.lock("acme-account"):
            self._register()

    def _register(self) -> None:
        """register() for a caller holding the account lock."""
        assert self.client is not None and self.account_key is not None
        net = self.client.net
        net.account = None
        eab = None
        if self.settings.eab_kid and self.settings.eab_hmac_key:
            eab = messages.ExternalAccountBinding.from_data(
                account_public_key=self.account_key.public_key(),
                kid=self.settings.eab_kid,
                hmac_key=self.settings.eab_hmac_key,
                directory=self.client.directory,
            )
        elif self.client.external_account_required():
            raise AcmeError(
                f"ACME server {self.settings.directory} requires external account binding:"
                " set acme.eab_kid and acme.eab_hmac_key"
            )
        registration = messages.NewRegistration.from_data(
            email=self.settings.email,
            terms_of_service_agreed=True,
            external_account_binding=eab,
        )
        try:
            regr = self.client.new_account(registration)
        except acme_errors.ConflictError as e:  # the key is already registered: use that account
            regr = messages.RegistrationResource(body=messages.Registration(), uri=e.location)
            net.account = regr
        data = {"directory": self.settings.directory, "registration": regr.to_json()}
        self.storage.write(self.account_path, json.dumps(data, indent=1).encode())
        log.info("ACME account registered at %s: %s", self.settings.directory, regr.uri)

    # -- requests ------------------------------------------------------------------------
    def _post_as_get(self, url: str) -> requests.Response:
        assert self.client is not None
        return self.client.net.post(url, None, new_nonce_url=self.client.directory["newNonce"])

    def new_order(self, csr_pem: bytes) -> messages.OrderResource:
        assert self.client is not None
        try:
            return self.client.new_order(csr_pem, profile=self.settings.profile)
        except messages.Error as e:
            if e.code != "accountDoesNotExist":
                raise
            log.warning("ACME server no longer knows our account (%s): registering again", e)
            self.register()
            return self.client.new_order(csr_pem, profile=self.settings.profile)

    def answer(self, plan: Sequence[PendingChallenge]) -> None:
        assert self.client is not None
        for p in plan:
            self.client.answer_challenge(p.challenge, p.response)

    def _sleep(self, delay: float) -> None:
        if self.stop.wait(delay):
            raise AcmeStopped()

    def _poll_delay(self, delay: float, response: requests.Response, deadline: float) -> float:
        after = parse_retry_after(response.headers.get("Retry-After"), time.time())
        wait = delay if after is None else max(delay, min(after, 10.0))
        if time.monotonic() + wait > deadline:
            raise AcmeError("timed out waiting for the ACME server")
        return wait

    def wait_authorizations(self, order: messages.OrderResource, deadline: float) -> None:
        """Until no authorization of the order is pending; AcmeError with the CA's reason
        when one became invalid."""
        for url in order.body.authorizations:
            delay = 0.05
            while True:
                response = self._post_as_get(url)
                authz = messages.Authorization.from_json(response.json())
                if authz.status == messages.STATUS_VALID:
                    break
                if authz.status != messages.STATUS_PENDING:
                    raise AcmeError(challenge_error(authz))
                self._sleep(self._poll_delay(delay, response, deadline))
                delay = min(delay * 2, 1.0)

    def finalize(self, order: messages.OrderResource, deadline: float) -> str:
        """Send the CSR and return the certificate chain (PEM) once the CA issued it."""
        assert self.client is not None and order.uri is not None
        order = self.client.begin_finalization(order)
        delay = 0.05
        while True:
            body = order.body
            if body.status == messages.STATUS_VALID and body.certificate:
                return self._post_as_get(body.certificate).text
            if body.status == messages.STATUS_INVALID:
                raise AcmeError(f"the CA refused to issue: {body.error or 'no detail given'}")
            if body.status == messages.STATUS_READY:  # it was not ready at the first finalize
                order = self.client.begin_finalization(order)
            response = self._post_as_get(order.uri)
            order = order.update(body=messages.Order.from_json(response.json()))
            if order.body.status in (messages.STATUS_PROCESSING, messages.STATUS_PENDING):
                self._sleep(self._poll_delay(delay, response, deadline))
                delay = min(delay * 2, 1.0)

    def renewal_time(self, cert_pem: bytes) -> tuple[float | None, float] | None:
        """ARI: (suggested renewal time or None, next time to ask), in epoch seconds; None when
        the CA has no renewalInfo."""
        assert self.client is not None
        try:
            self.client.directory["renewalInfo"]
        except KeyError:
            return None
        when, next_check = self.client.renewal_time(cert_pem)
        return (when.timestamp() if when else None, next_check.timestamp())


# -- the asyncio side --------------------------------------------------------------------------


def _in_thread(fn: Callable[[], T]) -> asyncio.Future[T]:
    """Run one blocking ACME step in a daemon thread of its own.

    Not the default executor: many certificates ordered at once (each step waits on a CA for
    seconds) would starve the rest of the proxy, and at exit the interpreter joins executor
    threads, so one stuck in a request to an unresponsive CA would hold up a SIGTERM for the
    whole network timeout. A cancelled caller sets the session's stop event; the thread ends at
    its next request or sleep, and its result goes nowhere.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if future.done():
            return
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    def run() -> None:
        try:
            outcome: tuple[bool, Any] = (True, fn())
        except BaseException as e:
            outcome = (False, e)
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=run, name="acme", daemon=True).start()
    return future


@dataclass(frozen=True)
class Issued:
    chain_pem: bytes
    key_pem: bytes


class AcmeIssuer:
    """Turns a list of hosts into a certificate from the configured ACME CA."""

    def __init__(
        self,
        settings: AcmeSettings,
        storage: Storage,
        http01: Http01Responder,
        *,
        order_deadline: float = ORDER_DEADLINE,
    ) -> None:
        self.settings = settings
        self.storage = storage
        self.http01 = http01
        self.order_deadline = order_deadline

    async def _run(self, stop: threading.Event, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await _in_thread(functools.partial(fn, *args))
        except asyncio.CancelledError:
            stop.set()
            raise
        except Exception as e:
            error = _describe(e, self.settings.directory)
            if error is None:
                raise
            raise error from e

    def _dns_client(self) -> Rfc2136Client:
        dns_settings = self.settings.dns
        if dns_settings is None:
            raise AcmeError("dns-01 needs [acme.dns] (a DNS server taking RFC 2136 updates)")
        try:
            key = load_tsig_key(dns_settings.tsig_key_file)
        except CertificateFileError as e:
            raise AcmeError(str(e)) from None
        return Rfc2136Client(
            dns_settings.server_host, dns_settings.server_port, key, zone=dns_settings.zone
        )

    def session(self, stop: threading.Event) -> AcmeSession:
        return AcmeSession(self.settings, self.storage, stop)

    async def renewal_info(
        self, cert_pem: bytes, stop: threading.Event
    ) -> tuple[float | None, float] | None:
        session = self.session(stop)
        await self._run(stop, functools.partial(session.open, account=False))
        return await self._run(stop, session.renewal_time, cert_pem)

    async def issue(
        self, hosts: Sequence[str], *, challenge: str | None, stop: threading.Event
    ) -> Issued:
        """Order a certificate for `hosts` (one new key); AcmeError says why it failed."""
        key = generate_private_key()
        csr = make_csr(key, hosts)
        session = self.session(stop)
        deadline = time.monotonic() + self.order_deadline
        await self._run(stop, session.open)
        order = await self._run(stop, session.new_order, csr)
        assert session.account_key is not None
        default = self.settings.default_challenge
        try:
            plan = plan_challenges(
                order.authorizations,
                session.account_key,
                lambda host: challenge_type_for(host, challenge, default),
            )
        except (acme_errors.Error, jose.errors.Error) as e:
            raise AcmeError(f"ACME: {e}") from e
        http = [p for p in plan if p.type == HTTP01]
        records = records_for((p.host, p.validation) for p in plan if p.type == DNS01)
        reused = len(order.authorizations) - len(plan)
        log.info(
            "ACME order for %s: %d challenge(s) to answer (%s)%s",
            ", ".join(hosts),
            len(plan),
            ", ".join(f"{p.host} {p.type}" for p in plan) or "none",
            f", {reused} authorization(s) already valid" if reused else "",
        )
        dns_client = await asyncio.to_thread(self._dns_client) if records else None
        published = []
        try:
            for p in http:
                await self.http01.publish(p.token, p.validation)
            if dns_client is not None:
                for record in records:
                    # Noted before it is sent: a cancel during the update still deletes it
                    # (deleting a value that never got in is a no-op; each value is unique).
                    published.append(record)
                    await dns_client.add([record])
                assert self.settings.dns is not None
                await dns_client.wait_visible(records, self.settings.dns.propagation_timeout)
            await self._run(stop, session.answer, plan)
            await self._run(stop, session.wait_authorizations, order, deadline)
        except Dns01Error as e:
            raise AcmeError(str(e)) from e
        finally:
            for p in http:
                await self.http01.withdraw(p.token)
            if dns_client is not None and published:
                try:
                    await dns_client.delete(published)
                except Dns01Error as e:
                    log.warning("dns-01 clean-up failed, records left behind: %s", e)
        chain = await self._run(stop, session.finalize, order, deadline)
        return Issued(chain.encode(), private_key_to_pem(key))
