"""Where data goes: loopback vs remote destinations, and the --local-only guard that refuses remote connections."""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})


def is_loopback_host(host: str | None) -> bool:
    """True for ``localhost`` and loopback IP literals (127.0.0.0/8, ::1); a hostname is never resolved here."""
    if not host:
        return False
    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def data_location(url: str) -> str:
    """The privacy column for a model reached over HTTP: ``loopback <host:port>`` or ``cloud <host>``."""
    parsed = urlparse(url if "://" in url else f"http://{url}")
    host = parsed.hostname or ""
    if is_loopback_host(host):
        return f"loopback {host}:{parsed.port}" if parsed.port else f"loopback {host}"
    return f"cloud {host}"


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]").split("%")[0])
    except ValueError:
        return False
    return True


class RemoteConnectionBlocked(ConnectionRefusedError):
    """--local-only refused a connection (or a name lookup) that would leave this machine."""


class NetworkGuard:
    """Patches the socket module so only loopback and Unix-socket connections are possible; remembers attempts."""

    def __init__(self) -> None:
        self.blocked: list[str] = []
        self._lock = threading.Lock()
        self._saved: dict[str, Any] = {}
        self._reported = 0

    @property
    def active(self) -> bool:
        return bool(self._saved)

    def take_blocked(self) -> list[str]:
        """The destinations refused since the last call (they stay in ``blocked``)."""
        with self._lock:
            fresh = self.blocked[self._reported:]
            self._reported = len(self.blocked)
        return fresh

    def _refuse(self, destination: str) -> RemoteConnectionBlocked:
        with self._lock:
            self.blocked.append(destination)
        return RemoteConnectionBlocked(
            f"llmlab --local-only blocked a connection to {destination}: data must not leave this machine; "
            "drop --local-only to use remote models"
        )

    def _check_address(self, family: int, address: Any) -> None:
        if family == getattr(socket, "AF_UNIX", None):
            return
        if isinstance(address, tuple) and address and not is_loopback_host(str(address[0])):
            raise self._refuse(f"{address[0]}:{address[1]}" if len(address) > 1 else str(address[0]))

    def install(self) -> None:
        """Start refusing remote connections in this process (idempotent)."""
        if self.active:
            return
        guard = self
        original_connect: Callable[..., Any] = socket.socket.connect
        original_connect_ex: Callable[..., Any] = socket.socket.connect_ex
        original_getaddrinfo: Callable[..., Any] = socket.getaddrinfo

        def connect(sock: socket.socket, address: Any) -> Any:
            guard._check_address(sock.family, address)
            return original_connect(sock, address)

        def connect_ex(sock: socket.socket, address: Any) -> Any:
            guard._check_address(sock.family, address)
            return original_connect_ex(sock, address)

        def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
            name = host.decode() if isinstance(host, bytes) else host
            # looking up a name already sends it to a DNS server; IP literals resolve locally (connect checks them)
            if name and not is_loopback_host(str(name)) and not _is_ip_literal(str(name)):
                raise guard._refuse(str(name))
            return original_getaddrinfo(host, *args, **kwargs)

        self._saved = {"connect": original_connect, "connect_ex": original_connect_ex,
                       "getaddrinfo": original_getaddrinfo}
        socket.socket.connect = connect  # type: ignore[method-assign]
        socket.socket.connect_ex = connect_ex  # type: ignore[method-assign]
        socket.getaddrinfo = getaddrinfo

    def uninstall(self) -> None:
        """Restore the socket module."""
        if not self.active:
            return
        socket.socket.connect = self._saved["connect"]  # type: ignore[method-assign]
        socket.socket.connect_ex = self._saved["connect_ex"]  # type: ignore[method-assign]
        socket.getaddrinfo = self._saved["getaddrinfo"]
        self._saved = {}
