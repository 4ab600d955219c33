"""The --local-only network guard and the privacy labels, on real sockets (loopback only)."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmlab_fixtures.run.network import NetworkGuard, RemoteConnectionBlocked, data_location, is_loopback_host

TEST_NET = "192.0.2.1"  # RFC 5737 documentation address: never routed


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.8.9.10", True), ("localhost", True), ("::1", True), ("[::1]", True),
     ("0.0.0.0", False), ("10.0.0.1", False), ("api.openai.com", False), ("localhost.evil.com", False), ("", False),
     (None, False)],
)
def test_loopback_hosts(host: str | None, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


@pytest.mark.parametrize(
    ("url", "where"),
    [("http://127.0.0.1:11434", "loopback 127.0.0.1:11434"), ("127.0.0.1:8080", "loopback 127.0.0.1:8080"),
     ("https://api.openai.com/v1", "cloud api.openai.com"), ("http://localhost/v1", "loopback localhost")],
)
def test_data_location(url: str, where: str) -> None:
    assert data_location(url) == where


@pytest.fixture
def guard() -> Iterator[NetworkGuard]:
    network_guard = NetworkGuard()
    network_guard.install()
    yield network_guard
    network_guard.uninstall()


@pytest.fixture
def loopback_listener() -> Iterator[int]:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen()

    def accept_one() -> None:
        with contextlib.suppress(OSError):  # the server closes first when a test never connects
            server.accept()[0].close()

    accepted = threading.Thread(target=accept_one, daemon=True)
    accepted.start()
    yield server.getsockname()[1]
    server.close()


def test_guard_refuses_remote_addresses_and_names(guard: NetworkGuard) -> None:
    with pytest.raises(RemoteConnectionBlocked, match=rf"blocked a connection to {TEST_NET}:80"):
        socket.create_connection((TEST_NET, 80), timeout=1)
    with socket.socket() as sock, pytest.raises(RemoteConnectionBlocked):
        sock.connect_ex((TEST_NET, 443))
    with pytest.raises(RemoteConnectionBlocked, match=r"api\.openai\.com"):
        socket.getaddrinfo("api.openai.com", 443)
    assert guard.blocked == [f"{TEST_NET}:80", f"{TEST_NET}:443", "api.openai.com"]
    assert guard.take_blocked() == guard.blocked and guard.take_blocked() == []


def test_guard_lets_loopback_through(guard: NetworkGuard, loopback_listener: int) -> None:
    with socket.create_connection(("127.0.0.1", loopback_listener), timeout=5):
        pass
    assert socket.getaddrinfo("localhost", loopback_listener)
    assert guard.blocked == []


def test_uninstall_restores_the_socket_module() -> None:
    original = socket.socket.connect, socket.getaddrinfo
    network_guard = NetworkGuard()
    network_guard.install()
    assert socket.socket.connect is not original[0]
    network_guard.uninstall()
    assert (socket.socket.connect, socket.getaddrinfo) == original


LEAKY_MODULE = f'''
import socket

def test_phone_home():
    socket.create_connection(("{TEST_NET}", 80), timeout=1)
'''


def test_local_only_run_fails_loudly_when_something_calls_out(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_leak=LEAKY_MODULE)
    result = pytester.runpytest_subprocess("--local-only", "-p", "no:cacheprovider",
                                           f"--output-dir={pytester.path / 'run'}")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines([
        f"*RemoteConnectionBlocked: llmlab --local-only blocked a connection to {TEST_NET}:80*",
        f"note: --local-only: the network guard REFUSED connections to {TEST_NET}:80;*",
    ])


def test_local_only_run_with_xdist_reports_the_refusal_from_the_worker(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_leak=LEAKY_MODULE)
    result = pytester.runpytest_subprocess("--local-only", "-n", "2", "-p", "no:cacheprovider",
                                           f"--output-dir={pytester.path / 'run'}")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines([f"note: --local-only: the network guard REFUSED connections to {TEST_NET}:80;*"])


def test_local_only_benchmark_says_where_data_went(bench_pytester: pytest.Pytester, data_dir: Path) -> None:
    result = bench_pytester.runpytest_subprocess(
        "-k", "arc_easy", "--local-only", "--models=local:smollm2-135m,gpt-4o-mini", "--limit=2",
        f"--data-dir={data_dir}", f"--output-dir={bench_pytester.path / 'run'}", "-p", "no:cacheprovider",
    )
    result.assert_outcomes(passed=1, deselected=6)
    result.stdout.fnmatch_lines([
        "llmlab: --local-only dropped gpt-4o-mini",
        "data sent to*in-process",
        "note: --local-only: every model ran in-process or on a loopback server; the network guard refused all "
        "other connections and none was attempted",
    ])
