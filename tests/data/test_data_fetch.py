"""The SSRF-guarded downloader against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import socket

import pytest

from vlmtune.data import fetch
from vlmtune.data.fetch import FetchError, FetchPolicy, address_problem, fetch_image

FAST = FetchPolicy(allow_private_network=True, timeout_s=2, total_timeout_s=10, backoff_s=0.01)


@pytest.mark.parametrize(
    ("ip", "problem"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("192.168.0.1", "private"),
        ("169.254.1.1", "link-local"),
        ("224.0.0.1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("100.64.0.1", "not a public address"),
        ("::ffff:127.0.0.1", "loopback"),
        ("64:ff9b::a00:1", "private"),
        ("169.254.169.254", "metadata"),
        ("fd00:ec2::254", "metadata"),
        ("93.184.216.34", None),
        ("2606:4700::1111", None),
    ],
)
def test_address_policy(ip, problem):
    got = address_problem(ip)
    assert (got is None) if problem is None else (problem in got)


def test_private_flag_allows_private_but_never_metadata():
    assert address_problem("127.0.0.1", allow_private_network=True) is None
    assert "metadata" in address_problem("169.254.169.254", allow_private_network=True)


def test_loopback_server_is_refused_by_default_and_allowed_with_the_flag(mk, image_server):
    png = mk.png()
    image_server.routes["/a.png"] = image_server.Route(
        body=png, headers={"Content-Type": "image/png"}
    )
    with pytest.raises(
        FetchError, match="127.0.0.1 is a loopback address.*--allow-private-network"
    ):
        fetch_image(image_server.url("/a.png"), FetchPolicy(backoff_s=0.01))
    assert image_server.requests == []  # refused before connecting
    got = fetch_image(image_server.url("/a.png"), FAST)
    assert got.data == png and got.content_type == "image/png"


def test_every_resolved_address_is_checked(monkeypatch):
    def resolve(host, port, **kw):
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))
            for ip in ("93.184.216.34", "10.0.0.5")
        ]

    monkeypatch.setattr(fetch, "_getaddrinfo", resolve)
    with pytest.raises(FetchError, match="10.0.0.5 is a private address"):
        fetch_image("http://mixed.test/a.png")


def test_connection_goes_to_the_checked_ip_with_the_original_host(mk, image_server, monkeypatch):
    calls = []

    def resolve(host, port, **kw):  # a rebinding resolver would answer differently next time
        calls.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

    monkeypatch.setattr(fetch, "_getaddrinfo", resolve)
    image_server.routes["/a.png"] = image_server.Route(
        body=mk.png(), headers={"Content-Type": "image/png"}
    )
    fetch_image(image_server.url("/a.png", host="images.test"), FAST)
    assert calls == ["images.test"]
    assert image_server.requests == [("/a.png", f"images.test:{image_server.port}")]


@pytest.mark.parametrize(
    ("status", "body", "headers", "match"),
    [
        (404, b"nope", {"Content-Type": "text/plain"}, "HTTP 404"),
        (
            200,
            b"<html>",
            {"Content-Type": "text/html; charset=utf-8"},
            "content-type 'text/html' is not an image",
        ),
        (200, b"x" * 5000, {"Content-Type": "image/png"}, "over the download cap of 1,000 bytes"),
        # No Content-Length: the cap must hold while streaming too.
        (
            200,
            b"x" * 5000,
            {"Content-Type": "image/png", "Content-Length": ""},
            "over the download cap",
        ),
    ],
)
def test_http_failures(image_server, status, body, headers, match):
    image_server.routes["/x"] = image_server.Route(status, body, headers)
    policy = FetchPolicy(**{**FAST.__dict__, "max_bytes": 1000})
    with pytest.raises(FetchError, match=match):
        fetch_image(image_server.url("/x"), policy)
    assert len(image_server.requests) == 1  # not retried


def test_server_errors_are_retried_with_backoff(mk, image_server):
    png = mk.png()
    image_server.routes["/flaky"] = [
        image_server.Route(503, b"busy", {"Content-Type": "text/plain"}),
        image_server.Route(200, png, {"Content-Type": "image/png"}),
    ]
    assert fetch_image(image_server.url("/flaky"), FAST).data == png
    assert len(image_server.requests) == 2
    image_server.routes["/down"] = image_server.Route(500, b"", {"Content-Type": "text/plain"})
    with pytest.raises(FetchError, match="HTTP 500"):
        fetch_image(image_server.url("/down"), FAST)
    assert len(image_server.requests) == 2 + FAST.attempts


def test_redirects_are_followed_rechecked_and_limited(mk, image_server):
    png = mk.png()
    image_server.routes["/final.png"] = image_server.Route(
        body=png, headers={"Content-Type": "image/png"}
    )
    image_server.routes["/r1"] = image_server.Route(302, b"", {"Location": "/final.png"})
    assert fetch_image(image_server.url("/r1"), FAST).url.endswith("/final.png")
    image_server.routes["/meta"] = image_server.Route(
        301, b"", {"Location": "http://169.254.169.254/latest/meta-data/"}
    )
    with pytest.raises(FetchError, match="metadata"):
        fetch_image(image_server.url("/meta"), FAST)
    for i in range(5):
        image_server.routes[f"/loop{i}"] = image_server.Route(
            307, b"", {"Location": f"/loop{i + 1}"}
        )
    with pytest.raises(FetchError, match="too many redirects"):
        fetch_image(image_server.url("/loop0"), FAST)
    assert [p for p, _ in image_server.requests if p.startswith("/loop")] == [
        f"/loop{i}" for i in range(4)
    ]


def test_unsupported_scheme():
    with pytest.raises(FetchError, match="unsupported URL scheme"):
        fetch_image("ftp://example.com/a.png")


def test_unresolvable_host(monkeypatch):
    def resolve(host, port, **kw):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(fetch, "_getaddrinfo", resolve)
    with pytest.raises(FetchError, match="cannot resolve host 'nowhere.test'"):
        fetch_image("http://nowhere.test/a.png")
