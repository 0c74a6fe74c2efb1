"""Download one image over HTTP(S) without becoming an SSRF proxy.

A dataset is untrusted input: its URLs could point at the cloud metadata service, a
database on localhost or a router's admin page. So every host is resolved here, every
address it resolves to is checked, and the connection goes to the checked address
(the Host header and TLS SNI keep the name), which a second DNS answer cannot change
(DNS rebinding). Redirects are followed by hand, each target checked the same way.
Environment proxies are ignored on purpose: a proxy would connect on our behalf to
an address we never checked.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from vlmtune.data.errors import RowError

MAX_DOWNLOAD_BYTES = 20 * 1024 * 1024
_REDIRECTS = (301, 302, 303, 307, 308)
_RETRY_STATUSES = (408, 425, 429, 500, 502, 503, 504)
_METADATA = frozenset(
    {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_CHUNK = 64 * 1024


class FetchError(RowError):
    """A download that failed; ``retryable`` says whether trying again could help."""

    def __init__(self, message: str, *, category: str, retryable: bool = False) -> None:
        super().__init__(message, category=category)
        self.retryable = retryable


@dataclass(frozen=True)
class FetchPolicy:
    allow_private_network: bool = False
    timeout_s: float = 10.0  # per connect / read
    total_timeout_s: float = 60.0  # per URL, all redirects and retries included
    max_bytes: int = MAX_DOWNLOAD_BYTES
    max_redirects: int = 3
    attempts: int = 3
    backoff_s: float = 0.5  # doubled after each failed attempt
    user_agent: str = "vlmtune-data-inline/0.1"


@dataclass(frozen=True)
class Fetched:
    data: bytes
    content_type: str
    url: str  # after redirects


# Indirection so tests can point a hostname at 127.0.0.1 without touching real DNS.
_getaddrinfo = socket.getaddrinfo


def address_problem(ip: str, allow_private_network: bool = False) -> str | None:
    """Why connecting to ``ip`` is refused, or None if it is allowed."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])  # drop an IPv6 zone id
    if isinstance(addr, ipaddress.IPv6Address):
        embedded = addr.ipv4_mapped or (
            ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF) if addr in _NAT64 else None
        )
        if embedded is not None:
            addr = embedded
    # The metadata service hands out credentials: refused even with the private-network flag.
    if addr in _METADATA:
        return f"{addr} is a cloud metadata address"
    if allow_private_network:
        return None
    for label, hit in (
        # Most specific first: Python counts link-local and 0.0.0.0/8 as "private" too.
        ("loopback", addr.is_loopback),
        ("link-local", addr.is_link_local),
        ("unspecified", addr.is_unspecified),
        ("multicast", addr.is_multicast),
        ("reserved", addr.is_reserved),
        ("private", addr.is_private),
    ):
        if hit:
            return f"{addr} is a {label} address"
    if not addr.is_global:
        return f"{addr} is not a public address"
    return None


def resolve_checked(host: str, port: int, policy: FetchPolicy) -> list[str]:
    """Every address ``host`` resolves to, all checked; raises if any one is refused."""
    try:
        infos = _getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise FetchError(f"cannot resolve host {host!r} ({exc})", category="DNS failure") from None
    ips = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not ips:
        raise FetchError(f"host {host!r} has no address", category="DNS failure")
    for ip in ips:
        problem = address_problem(ip, policy.allow_private_network)
        if problem:
            flag = "" if "metadata" in problem else " (pass --allow-private-network to allow it)"
            raise FetchError(
                f"refused: host {host!r} resolves to {problem}{flag}",
                category="refused address (SSRF guard)",
            )
    return ips


class _PinnedHTTP(http.client.HTTPConnection):
    """An HTTP connection to a pre-checked IP; Host stays the URL's host."""

    def __init__(self, host: str, port: int, ip: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._ip = ip

    def connect(self) -> None:
        self.sock = socket.create_connection((self._ip, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """An HTTPS connection to a pre-checked IP; SNI and certificate use the URL's host."""

    def __init__(self, host: str, port: int, ip: str, timeout: float) -> None:
        self._tls = ssl.create_default_context()
        super().__init__(host, port, timeout=timeout, context=self._tls)
        self._ip = ip

    def connect(self) -> None:
        raw = socket.create_connection((self._ip, self.port), self.timeout)
        try:
            self.sock = self._tls.wrap_socket(raw, server_hostname=self.host)
        except BaseException:
            raw.close()
            raise


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise FetchError("timed out", category="download timed out", retryable=False)
    return left


def _connect(url: str, policy: FetchPolicy, deadline: float) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise FetchError(
            f"unsupported URL scheme {parts.scheme!r} (only http and https are downloaded)",
            category="unsupported URL scheme",
        )
    host = parts.hostname
    if not host:
        raise FetchError("URL has no host", category="malformed URL")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise FetchError("URL has an invalid port", category="malformed URL") from None
    cls = _PinnedHTTPS if parts.scheme == "https" else _PinnedHTTP
    last: Exception | None = None
    for ip in resolve_checked(host, port, policy):
        conn = cls(host, port, ip, min(policy.timeout_s, _remaining(deadline)))
        try:
            conn.connect()
            return conn
        except OSError as exc:
            conn.close()
            last = exc
    raise FetchError(
        f"cannot connect to {host}:{port} ({last})", category="connection failed", retryable=True
    )


def _get_once(url: str, policy: FetchPolicy, deadline: float) -> Fetched | str:
    """One GET: the body, or the redirect target URL (a ``str``)."""
    conn = _connect(url, policy, deadline)
    try:
        parts = urlsplit(url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        conn.request("GET", target, headers={"User-Agent": policy.user_agent, "Accept": "image/*"})
        resp = conn.getresponse()
        if resp.status in _REDIRECTS:
            location = resp.getheader("Location")
            if not location:
                raise FetchError(f"HTTP {resp.status} without a Location", category="bad redirect")
            return urljoin(url, location)
        if resp.status != 200:
            raise FetchError(
                f"HTTP {resp.status} {resp.reason}".rstrip(),
                category=f"HTTP {resp.status}",
                retryable=resp.status in _RETRY_STATUSES,
            )
        ctype = (resp.getheader("Content-Type") or "").split(";", 1)[0].strip().lower()
        if not ctype.startswith("image/"):
            raise FetchError(
                f"content-type {ctype or '(none)'!r} is not an image", category="not an image"
            )
        length = resp.getheader("Content-Length")
        if length and length.isdigit() and int(length) > policy.max_bytes:
            raise _too_big(int(length), policy)
        chunks, size = [], 0
        while True:
            if conn.sock is not None:
                conn.sock.settimeout(min(policy.timeout_s, _remaining(deadline)))
            chunk = resp.read(_CHUNK)
            if not chunk:
                break
            size += len(chunk)
            if size > policy.max_bytes:
                raise _too_big(size, policy)
            chunks.append(chunk)
        return Fetched(b"".join(chunks), ctype, url)
    finally:
        conn.close()


def _too_big(size: int, policy: FetchPolicy) -> FetchError:
    return FetchError(
        f"body is over the download cap of {policy.max_bytes:,} bytes (at least {size:,})",
        category="download too large",
    )


def fetch_image(url: str, policy: FetchPolicy | None = None) -> Fetched:
    """GET ``url`` behind the SSRF guard, with retries, a size cap and checked redirects.

    Raises ``FetchError`` (a ``RowError``) with a readable reason. The body is only
    checked to be an ``image/*`` response; decoding it is the caller's job.
    """
    policy = policy or FetchPolicy()
    deadline = time.monotonic() + policy.total_timeout_s
    current = url
    for hop in range(policy.max_redirects + 1):
        result = _with_retries(current, policy, deadline)
        if isinstance(result, Fetched):
            return result
        if hop == policy.max_redirects:
            break
        current = result
    raise FetchError(
        f"too many redirects (more than {policy.max_redirects})", category="too many redirects"
    )


def _with_retries(url: str, policy: FetchPolicy, deadline: float) -> Fetched | str:
    for attempt in range(1, policy.attempts + 1):
        try:
            return _get_once(url, policy, deadline)
        except FetchError as exc:
            if not exc.retryable or attempt == policy.attempts:
                raise
        except (OSError, http.client.HTTPException) as exc:
            # Timeouts, resets, truncated bodies: transient until proven otherwise.
            if attempt == policy.attempts:
                raise FetchError(
                    f"download failed after {attempt} attempts ({type(exc).__name__}: {exc})",
                    category="download failed",
                ) from None
        time.sleep(min(policy.backoff_s * 2 ** (attempt - 1), _remaining(deadline)))
    raise AssertionError("unreachable")
