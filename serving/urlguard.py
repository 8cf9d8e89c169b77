"""Fetching images by URL safely: http(s) only, allowlisted hosts, public addresses, pinned DNS, size/time limits."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Sequence[str]]


class UrlFetchError(Exception):
    """A refused or failed download, with the HTTP status the API answers."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass(frozen=True)
class Target:
    """A checked URL: scheme, host name (lower case), port and the path with its query."""

    scheme: str
    host: str
    port: int
    path: str


def system_resolver(host: str, port: int) -> list[str]:
    """All addresses the system resolver gives for host (TCP), as strings."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def is_public_address(ip: IPAddress) -> bool:
    """True only for globally routable unicast addresses (IPv4-mapped and 6to4 IPv6 judged by their IPv4 part)."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None and not is_public_address(embedded):
            return False
    blocked = (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_reserved
               or ip.is_unspecified)
    return ip.is_global and not blocked


def host_allowed(host: str, allowlist: Sequence[str]) -> bool:
    """Exact host names, or ``*.example.com`` entries for strict subdomains; case-insensitive."""
    host = host.lower().rstrip(".")
    for entry in allowlist:
        entry = entry.lower().rstrip(".")
        if entry.startswith("*.") and host.endswith(entry[1:]) and len(host) > len(entry) - 1:
            return True
        if host == entry:
            return True
    return False


class UrlFetcher:
    """Downloads one image per call under the guard; the connection goes to the address that was checked."""

    def __init__(self, allowlist: Sequence[str], max_bytes: int, timeout_s: float, max_redirects: int = 3,
                 resolver: Resolver = system_resolver,
                 address_allowed: Callable[[IPAddress], bool] = is_public_address) -> None:
        self.allowlist = tuple(allowlist)
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.max_redirects = max_redirects
        self.resolver = resolver
        self.address_allowed = address_allowed

    def check_url(self, url: str) -> Target:
        """Scheme, credentials, host and allowlist checks (no network); raises UrlFetchError 422 or 403."""
        try:
            parts = urlsplit(url.strip())
            port = parts.port
        except ValueError as exc:
            raise UrlFetchError(422, f"malformed URL: {exc}") from None
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise UrlFetchError(422, f"only http and https URLs can be fetched, not {scheme or 'a relative URL'!r}")
        if parts.username is not None or parts.password is not None:
            raise UrlFetchError(422, "URLs with credentials are not fetched")
        host = (parts.hostname or "").rstrip(".")
        if not host:
            raise UrlFetchError(422, "the URL has no host")
        if not host_allowed(host, self.allowlist):
            raise UrlFetchError(403, f"host {host!r} is not on the URL allowlist")
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        return Target(scheme, host, port or (443 if scheme == "https" else 80), path)

    async def resolve(self, target: Target) -> str:
        """Resolve once; every address must be public, and the first one is used for the connection."""
        try:
            addresses = await asyncio.to_thread(self.resolver, target.host, target.port)
        except (OSError, UnicodeError) as exc:
            raise UrlFetchError(422, f"cannot resolve host {target.host!r}: {exc}") from None
        if not addresses:
            raise UrlFetchError(422, f"host {target.host!r} has no address")
        for address in addresses:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
            if not self.address_allowed(ip):
                raise UrlFetchError(403, f"host {target.host!r} resolves to {ip}, a loopback, private, link-local or "
                                         "otherwise non-public address")
        return addresses[0]

    async def fetch(self, url: str) -> bytes:
        """The body of ``url`` (at most max_bytes), following same-host redirects only, within timeout_s."""
        try:
            return await asyncio.wait_for(self._fetch(url), self.timeout_s)
        except asyncio.TimeoutError:
            raise UrlFetchError(504, f"fetching the image took longer than {self.timeout_s:g} s") from None

    async def _fetch(self, url: str) -> bytes:
        first = self.check_url(url)
        target = first
        async with httpx.AsyncClient(follow_redirects=False, trust_env=False, timeout=self.timeout_s) as client:
            for _ in range(self.max_redirects + 1):
                address = await self.resolve(target)
                location = await self._get(client, target, address)
                if isinstance(location, bytes):
                    return location
                url = urljoin(url, location)
                if not self._same_origin(url, first):
                    raise UrlFetchError(403, f"redirect to another origin refused: {url}")
                target = self.check_url(url)
        raise UrlFetchError(502, f"more than {self.max_redirects} redirects")

    @staticmethod
    def _same_origin(url: str, first: Target) -> bool:
        """Same scheme, host and port as the first URL (redirects elsewhere are refused)."""
        try:
            parts = urlsplit(url)
            scheme = parts.scheme.lower()
            port = parts.port or (443 if scheme == "https" else 80)
        except ValueError:
            return False
        host = (parts.hostname or "").rstrip(".")
        return (scheme, host, port) == (first.scheme, first.host, first.port)

    async def _get(self, client: httpx.AsyncClient, target: Target, address: str) -> bytes | str:
        """GET from the pinned address with the original Host header and TLS name; bytes, or a redirect location."""
        literal = f"[{address}]" if ":" in address else address
        default_port = 443 if target.scheme == "https" else 80
        host_header = target.host if target.port == default_port else f"{target.host}:{target.port}"
        request = client.build_request(
            "GET", f"{target.scheme}://{literal}:{target.port}{target.path}",
            headers={"Host": host_header, "Accept": "image/*"},
            extensions={"sni_hostname": target.host} if target.scheme == "https" else {})
        try:
            response = await client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise UrlFetchError(502, f"cannot fetch the image: {type(exc).__name__}: {exc}") from None
        try:
            if response.is_redirect:
                return response.headers["location"]
            if response.status_code != 200:
                raise UrlFetchError(502, f"the image server answered {response.status_code}")
            declared = response.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
                raise UrlFetchError(413, f"the image is larger than the limit of {self.max_bytes} bytes")
            chunks, received = [], 0
            async for chunk in response.aiter_bytes():
                received += len(chunk)
                if received > self.max_bytes:
                    raise UrlFetchError(413, f"the image is larger than the limit of {self.max_bytes} bytes")
                chunks.append(chunk)
            return b"".join(chunks)
        except httpx.HTTPError as exc:
            raise UrlFetchError(502, f"cannot fetch the image: {type(exc).__name__}: {exc}") from None
        finally:
            await response.aclose()
