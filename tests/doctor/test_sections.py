"""Each doctor section against loopback servers: what it reports, and when it fails."""

from __future__ import annotations

import asyncio
import re
import resource
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trustme

from mtgworkers.doctor import checks
from mtgworkers.doctor.checks import Context
from mtgworkers.doctor.report import Section, Status
from mtgworkers.protocol import proxyproto
from tests.doctor.conftest import HOST, KEY, World, run
from tests.doctor.servers import (
    EchoServer,
    PlainServer,
    Recorder,
    SNTPResponder,
    Socks5Server,
    TLSSite,
    closed_port,
    self_signed_context,
    site_context,
)
from tests.doctor.servers import _pipe as pipe

Step = Callable[[Context, Section], Awaitable[None]]


def section_of(
    world: World, step: Step, overrides: dict[str, Any] | None = None, **options: Any
) -> Section:
    config = world.config(overrides)

    async def main() -> Section:
        ctx = Context.create(config, **options)
        section = Section("test", "Test")
        await step(ctx, section)
        return section

    result: Section = run(main())
    return result


def lines(section: Section) -> list[tuple[Status, str]]:
    return [(check.status, check.message) for check in section.checks]


# -- time skewness ---------------------------------------------------------------------------


def ntp_at(world: World, offset: float = 0.0, *, silent: bool = False) -> str:
    responder = world.start(SNTPResponder(offset, silent=silent))
    return f"127.0.0.1:{responder.port}"


def test_time_in_sync(world: World) -> None:
    section = section_of(world, checks.check_time)
    [(status, message)] = lines(section)
    assert status is Status.OK
    assert re.fullmatch(
        r"Time drift is -?[0-9.]+(µs|ms|ns|s), but tolerate-time-skewness is 10s", message
    )
    figures = section.checks[0].figures
    assert abs(figures["offset"]) < 0.5 and figures["tolerance"] == 10.0


def test_time_drift_warning_band(world: World) -> None:
    server = ntp_at(world, 4.0)  # 40% of 10s: mtg warns (and the check fails)
    section = section_of(world, checks.check_time, {"doctor": {"ntp-servers": [server]}})
    [(status, message)] = lines(section)
    assert status is Status.WARNING
    assert re.fullmatch(
        r"Time drift is (3\.9|4\.0)[0-9]*s, but tolerate-time-skewness is 10s\. Please check ntp\.",
        message,
    )


def test_time_drift_failure_band(world: World) -> None:
    server = ntp_at(world, -8.0)
    section = section_of(world, checks.check_time, {"doctor": {"ntp-servers": [server]}})
    [(status, message)] = lines(section)
    assert status is Status.FAILURE
    assert re.fullmatch(
        r"Time drift is -(7\.9|8\.0)[0-9]*s, but tolerate-time-skewness is 10s\. "
        r"You will get many rejected connections!",
        message,
    )


def test_time_one_server_down_is_only_noted(world: World) -> None:
    down = f"127.0.0.1:{closed_port()}"
    good = ntp_at(world, 0.0)
    section = section_of(world, checks.check_time, {"doctor": {"ntp-servers": [down, good]}})
    statuses = [status for status, _ in lines(section)]
    assert statuses == [Status.OK, Status.INFO]
    assert section.checks[1].message.startswith(f"no answer from NTP server {down}: ")
    assert section.passed


def test_time_median_ignores_one_wrong_server(world: World) -> None:
    servers = [ntp_at(world, 0.0), ntp_at(world, 0.0), ntp_at(world, 3600.0)]
    section = section_of(world, checks.check_time, {"doctor": {"ntp-servers": servers}})
    assert section.checks[0].status is Status.OK
    assert set(section.checks[0].figures["servers"]) == set(servers)


def test_time_all_servers_down_names_them(world: World) -> None:
    silent = ntp_at(world, silent=True)
    refused = f"127.0.0.1:{closed_port()}"
    responder_requests = world.ntp.requests
    section = section_of(
        world, checks.check_time, {"doctor": {"ntp-servers": [silent, refused], "timeout": "0.6s"}}
    )
    [(status, message)] = lines(section)
    assert status is Status.ERROR
    assert message.startswith("cannot access ntp pool: no NTP server answered: ")
    assert f"{silent}: no answer after 3 attempts" in message
    assert f"{refused}: connection refused" in message
    assert world.ntp.requests == responder_requests  # only the configured servers are asked


# -- DC connectivity -------------------------------------------------------------------------


def test_all_dcs_reachable_in_order(world: World) -> None:
    section = section_of(world, checks.check_dc_connectivity)
    assert [message.split(" (")[0] for _, message in lines(section)] == [
        f"DC {dc}" for dc in (1, 2, 3, 4, 5, 203)
    ]
    assert all(status is Status.OK for status, _ in lines(section))
    assert section.checks[0].figures["address"] == f"127.0.0.1:{world.dc.port}"


def test_one_dc_down_and_a_fallback_address(world: World) -> None:
    down = closed_port()
    overrides = {
        "dc-overrides": {
            "4": [f"127.0.0.1:{down}"],
            "2": [f"127.0.0.1:{down}", f"127.0.0.1:{world.dc.port}"],
        }
    }
    section = section_of(world, checks.check_dc_connectivity, overrides)
    by_dc = {check.figures["dc"]: check for check in section.checks}
    assert by_dc[4].status is Status.FAILURE
    assert by_dc[4].message == f"DC 4: cannot dial to 127.0.0.1:{down}: connection refused"
    assert by_dc[2].status is Status.OK
    assert by_dc[2].figures["address"] == f"127.0.0.1:{world.dc.port}"
    assert len(by_dc[2].figures["failed"]) == 1
    assert [check.status for dc, check in by_dc.items() if dc not in (2, 4)] == [Status.OK] * 4


def test_prefer_ip_filters_overrides(world: World) -> None:
    overrides = {"prefer-ip": "only-ipv4", "dc-overrides": {"5": [f"[::1]:{world.dc.port}"]}}
    section = section_of(world, checks.check_dc_connectivity, overrides)
    by_dc = {check.figures["dc"]: check for check in section.checks}
    assert by_dc[5].message == "DC 5: no suitable addresses after IP version filtering"
    assert by_dc[1].status is Status.OK


def test_dcs_through_a_socks5_proxy_with_password(world: World) -> None:
    socks = world.start(Socks5Server(("user", "s3cret")))
    config = world.config(
        {"network": {"proxies": [f"socks5://user:s3cret@127.0.0.1:{socks.port}"]}}
    )
    proxy = config.network.proxies[0]

    async def main() -> Section:
        section = Section("p", "P")
        await checks.check_dc_connectivity(Context.create(config), section, proxy)
        return section

    section = run(main())
    assert all(check.status is Status.OK for check in section.checks), lines(section)
    assert socks.targets == [("127.0.0.1", world.dc.port)] * 6
    assert "s3cret" not in repr(lines(section))


def test_dcs_through_a_dead_socks5_proxy(world: World) -> None:
    port = closed_port()
    config = world.config({"network": {"proxies": [f"socks5://127.0.0.1:{port}"]}})

    async def main() -> Section:
        section = Section("p", "P")
        await checks.check_dc_connectivity(
            Context.create(config), section, config.network.proxies[0]
        )
        return section

    section = run(main())
    assert [check.status for check in section.checks] == [Status.FAILURE] * 6
    assert f"via socks5://127.0.0.1:{port}" in section.checks[0].message


# -- fronting --------------------------------------------------------------------------------


def fronting(world: World, port: int, **overrides: Any) -> dict[str, Any]:
    return {"domain-fronting": {"ip": "127.0.0.1", "port": port}, **overrides}


def test_fronting_valid_certificate(world: World) -> None:
    section = section_of(world, checks.check_fronting)
    [(status, message), alpn, post_quantum] = lines(section)
    assert status is Status.OK
    assert message.startswith(
        f"127.0.0.1:{world.site.port} is reachable: TLSv1.3, ALPN h2, certificate for "
        f"{HOST} issued by "
    )
    figures = section.checks[0].figures
    assert figures["tls_version"] == "TLSv1.3" and figures["alpn"] == "h2"
    assert HOST in figures["certificate"]["dns_names"]
    assert alpn == (
        Status.OK,
        f"127.0.0.1:{world.site.port} serves TLS 1.3 with ALPN h2 (HTTP/2), as big sites do",
    )
    assert post_quantum == (
        Status.OK,
        f"127.0.0.1:{world.site.port} negotiates post-quantum X25519MLKEM768, as big sites do "
        "(offered without its key share, it asked for it with a HelloRetryRequest)",
    )
    assert section.checks[2].figures == {
        "signal": "post-quantum",
        "group": "X25519MLKEM768",
        "negotiates": True,
        "answer": "hello_retry_request",
    }


def face_of(world: World, site: Any) -> tuple[Section, int]:
    site = world.start(site)
    section = section_of(world, checks.check_fronting, fronting(world, site.port))
    assert section.checks[0].status is Status.OK, lines(section)
    return section, site.port


def test_a_site_without_post_quantum_key_exchange_is_a_warning(world: World) -> None:
    section, port = face_of(world, TLSSite(site_context(world.ca, HOST, alpn=("h2",))))
    [_, alpn, (status, message)] = lines(section)
    assert alpn[0] is Status.OK
    assert status is Status.WARNING
    assert message == (
        f"127.0.0.1:{port} does not negotiate post-quantum X25519MLKEM768: offered first, it "
        "chose x25519 at once. Censors were reported in June 2026 to use this as a signal: big "
        "real sites negotiate X25519MLKEM768, and a site that does not looks less like one. "
        f"Fix: {checks.PQ_FIX}"
    )
    figures = section.checks[2].figures
    assert figures["negotiates"] is False and figures["chosen"] == "x25519"
    assert not section.passed


def test_a_site_without_h2_is_a_warning(world: World) -> None:
    site = TLSSite(site_context(world.ca, HOST), post_quantum=True)
    section, port = face_of(world, site)
    [_, (status, message), post_quantum] = lines(section)
    assert (status, post_quantum[0]) == (Status.WARNING, Status.OK)
    assert message.startswith(
        f"127.0.0.1:{port} serves TLSv1.3 with ALPN http/1.1 to a client that offers h2: big "
        "sites answer with TLS 1.3 and h2"
    )
    assert section.checks[1].figures == {
        "signal": "alpn",
        "tls_version": "TLSv1.3",
        "alpn": "http/1.1",
        "expected": False,
    }
    assert site.retries == 1  # only doctor's post-quantum hello got the retry request


def test_a_tls12_site_shows_both_signals(world: World) -> None:
    context = site_context(world.ca, HOST, alpn=("h2",))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    section, port = face_of(world, TLSSite(context))
    [_, alpn, post_quantum] = lines(section)
    assert alpn == (
        Status.WARNING,
        f"127.0.0.1:{port} serves TLSv1.2 with ALPN h2 to a client that offers h2: big sites "
        "answer with TLS 1.3 and h2, so a censor probing this proxy sees a site that looks "
        "less like one. Pick a fronting domain that serves HTTP/2 over TLS 1.3",
    )
    assert post_quantum[0] is Status.WARNING
    assert "it answers TLS version 0x0303 (not TLS 1.3)" in post_quantum[1]


def test_a_site_that_refuses_the_post_quantum_hello(world: World) -> None:
    """A front that passes TLS clients on but answers doctor's raw hello with an alert."""

    class Refusing(TLSSite):
        async def _front(self, reader: asyncio.StreamReader, writer: Any) -> None:
            first = await reader.read(5)
            rest = await reader.readexactly(int.from_bytes(first[3:5], "big"))
            if b"\x11\xec" in rest:
                writer.write(b"\x15\x03\x03\x00\x02\x02\x28")
                await writer.drain()
                writer.close()
                return
            up_reader, up_writer = await asyncio.open_connection(self.host, self._inner.port)
            up_writer.write(first + rest)
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    site = Refusing(site_context(world.ca, HOST, alpn=("h2",)), post_quantum=True)
    section, port = face_of(world, site)
    assert lines(section)[2] == (
        Status.WARNING,
        f"127.0.0.1:{port}: cannot tell whether it negotiates X25519MLKEM768: the site "
        "answered with TLS alert 40 (level 2)",
    )


def test_fronting_without_the_ca_file_is_a_bad_certificate(world: World) -> None:
    section = section_of(world, checks.check_fronting, {"doctor": {"ca-file": None}})
    [(status, message)] = lines(section)
    assert status is Status.FAILURE
    assert message == (
        f"127.0.0.1:{world.site.port}: bad certificate: unable to get local issuer certificate"
    )


def test_fronting_wrong_name(world: World) -> None:
    site = world.start(TLSSite(site_context(world.ca, "other.test")))
    [(status, message)] = lines(
        section_of(world, checks.check_fronting, fronting(world, site.port))
    )
    assert status is Status.FAILURE
    assert message == (
        f"127.0.0.1:{site.port}: name mismatch: the certificate is not valid for {HOST}"
    )


def test_fronting_self_signed(world: World) -> None:
    site = world.start(TLSSite(self_signed_context(trustme.CA())))
    [(status, message)] = lines(
        section_of(world, checks.check_fronting, fronting(world, site.port))
    )
    assert status is Status.FAILURE
    assert re.fullmatch(
        rf"127\.0\.0\.1:{site.port}: bad certificate: self.signed certificate", message
    )


def test_fronting_plain_tcp_is_not_tls(world: World) -> None:
    site = world.start(PlainServer())
    [(status, message)] = lines(
        section_of(world, checks.check_fronting, fronting(world, site.port))
    )
    assert status is Status.FAILURE
    assert message.startswith(f"127.0.0.1:{site.port}: not TLS (")


def test_fronting_silent_tcp_is_not_tls(world: World) -> None:
    site = world.start(PlainServer(b""))
    [(status, message)] = lines(
        section_of(world, checks.check_fronting, fronting(world, site.port))
    )
    assert (status, message) == (
        Status.FAILURE,
        f"127.0.0.1:{site.port}: not TLS: no TLS answer within 1s",
    )


def test_fronting_closed_port_is_unreachable(world: World) -> None:
    port = closed_port()
    [(status, message)] = lines(section_of(world, checks.check_fronting, fronting(world, port)))
    assert (status, message) == (
        Status.FAILURE,
        f"127.0.0.1:{port}: unreachable: cannot dial to 127.0.0.1:{port}: connection refused",
    )


def test_fronting_to_the_proxy_itself_is_a_loop(world: World) -> None:
    data = world.data()
    bind_port = int(data["bind-to"].rsplit(":", 1)[1])
    overrides = {"bind-to": f"0.0.0.0:{bind_port}", **fronting(world, bind_port)}
    [(status, message)] = lines(section_of(world, checks.check_fronting, overrides))
    assert status is Status.FAILURE
    assert "fronting would loop" in message


def test_fronting_by_host_name_uses_the_configured_resolver(world: World) -> None:
    overrides = {"domain-fronting": {"ip": None, "port": world.site.port}}
    queries = len(world.dns.queries)
    [(status, _), *_] = lines(section_of(world, checks.check_fronting, overrides))
    assert status is Status.OK
    assert (HOST, "A") in world.dns.queries[queries:]


def test_fronting_with_proxy_protocol_sends_a_v2_header_first(world: World) -> None:
    recorder = world.start(Recorder())
    overrides = {"domain-fronting": {"port": recorder.port, "proxy-protocol": True}}
    [(status, message)] = lines(section_of(world, checks.check_fronting, overrides))
    assert (status, message) == (  # the recorder does not speak TLS
        Status.FAILURE,
        f"127.0.0.1:{recorder.port}: not TLS: no TLS answer within 1s",
    )
    [first] = recorder.received
    header = proxyproto.parse_header(first)
    assert isinstance(header, tuple)
    parsed, length = header
    assert parsed.dst == ("127.0.0.1", recorder.port)
    assert first[length : length + 3] == b"\x16\x03\x01"  # then the TLS ClientHello


# -- SNI-DNS ---------------------------------------------------------------------------------


def test_sni_dns_match_both_families(world: World) -> None:
    assert lines(section_of(world, checks.check_sni_dns)) == [
        (Status.OK, f"IP address 127.0.0.1 matches secret hostname {HOST}"),
        (Status.OK, f"IP address ::1 matches secret hostname {HOST}"),
    ]


def test_sni_dns_mismatch_on_one_family_fails(world: World) -> None:
    section = section_of(world, checks.check_sni_dns, {"public-ipv6": "::2"})
    assert lines(section) == [
        (Status.OK, f"IP address 127.0.0.1 matches secret hostname {HOST}"),
        (Status.FAILURE, f'Hostname {HOST} is resolved to "127.0.0.1", "::1" addresses, not ::2'),
    ]
    assert not section.passed


def test_sni_dns_nxdomain(world: World) -> None:
    secret = "ee" + KEY.hex() + b"missing.test".hex()
    assert lines(section_of(world, checks.check_sni_dns, {"secret": secret})) == [
        (Status.ERROR, "cannot resolve DNS name of missing.test: NXDOMAIN")
    ]


def test_sni_dns_public_ipv4_bypasses_detection(world: World) -> None:
    before = len(world.echo.requests)
    section = section_of(world, checks.check_sni_dns, {"public-ipv6": None})
    assert lines(section)[0] == (Status.OK, f"IP address 127.0.0.1 matches secret hostname {HOST}")
    assert section.checks[0].figures["public_ipv4_source"] == "config"
    # only IPv6 was asked for, over IPv6, which this IPv4-only echo URL cannot give
    assert len(world.echo.requests) == before
    assert lines(section)[1] == (
        Status.INFO,
        "no public IPv6 address (not in config, not detected): IPv6 not checked",
    )


def test_sni_dns_autodetects_both_families(world: World) -> None:
    echo6 = world.start(EchoServer("::1"))
    overrides = {
        "public-ipv4": None,
        "public-ipv6": None,
        "doctor": {"ip-echo-urls": [world.echo.url, echo6.url]},
    }
    section = section_of(world, checks.check_sni_dns, overrides)
    assert [status for status, _ in lines(section)] == [Status.OK, Status.OK]
    assert section.checks[0].figures["public_ipv4_source"] == "detected"
    assert section.checks[0].figures["public_ipv6"] == "::1"
    assert echo6.requests and b"user-agent: curl/8.5.0" in echo6.requests[-1].lower()


def test_sni_dns_autodetects_over_https_with_the_ca_file(world: World) -> None:
    echo = world.start(EchoServer(tls=site_context(world.ca, "127.0.0.1")))
    overrides = {"public-ipv4": None, "public-ipv6": None, "doctor": {"ip-echo-urls": [echo.url]}}
    section = section_of(world, checks.check_sni_dns, overrides)
    assert section.checks[0].status is Status.OK
    assert echo.requests


def test_sni_dns_cannot_detect(world: World) -> None:
    overrides = {
        "public-ipv4": None,
        "public-ipv6": None,
        "doctor": {"ip-echo-urls": [f"http://127.0.0.1:{closed_port()}/"]},
    }
    assert lines(section_of(world, checks.check_sni_dns, overrides)) == [
        (
            Status.ERROR,
            "cannot detect public IP address: cannot detect automatically and "
            "public-ipv4/public-ipv6 are not set in config",
        )
    ]


def test_command_line_echo_urls_win(world: World) -> None:
    overrides = {"public-ipv4": None, "public-ipv6": None}
    bad = f"http://127.0.0.1:{closed_port()}/"
    section = section_of(world, checks.check_sni_dns, overrides, ip_echo_urls=[bad])
    assert section.checks[0].status is Status.ERROR


# -- host limits -----------------------------------------------------------------------------


def limits(
    world: World,
    proc: Path,
    nofile: tuple[int, int] = (1024, 1 << 20),
    *,
    concurrency: int = 4096,
    running: int | None = None,
) -> list[tuple[Status, str]]:
    config = world.config({"concurrency": concurrency})

    async def main() -> Section:
        section = Section("h", "H")
        await checks.check_host_limits(
            Context.create(config),
            section,
            proc=str(proc),
            getrlimit=lambda _: nofile,
            listener_pids=lambda port: [4242] if running is not None else [],
            nofile_of=lambda pid: running,
        )
        return section

    return lines(run(main()))


def write_proc(proc: Path, somaxconn: str | None, migrate: str | None) -> Path:
    for name, value in (
        ("sys/net/core/somaxconn", somaxconn),
        ("sys/net/ipv4/tcp_migrate_req", migrate),
    ):
        path = proc / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if value is None:
            path.unlink(missing_ok=True)
        else:
            path.write_text(value)
    return proc


def test_host_limits_all_fine(world: World, tmp_path: Path) -> None:
    found = limits(world, write_proc(tmp_path, "4096", "1"))
    assert [status for status, _ in found] == [Status.OK] * 3
    assert "8256 needed (2 per session + 64)" in found[0][1]


def test_host_limits_problems_and_their_fixes(world: World, tmp_path: Path) -> None:
    found = limits(world, write_proc(tmp_path, "128", "0"), (1024, 4096), running=1024)
    assert [status for status, _ in found] == [
        Status.FAILURE,
        Status.FAILURE,
        Status.WARNING,
        Status.INFO,
    ]
    assert found[0][1].startswith(
        "open files limit 4096 is below the 8256 needed for concurrency 4096"
    )
    assert "LimitNOFILE=" in found[0][1]
    assert "(pid 4242) has an open files limit of 1024, 8256 needed" in found[1][1]
    assert "sysctl -w net.core.somaxconn=4096" in found[2][1]
    assert "sysctl -w net.ipv4.tcp_migrate_req=1" in found[3][1]


def test_host_limits_old_kernel_and_unlimited_files(world: World, tmp_path: Path) -> None:
    infinity = resource.RLIM_INFINITY
    found = limits(world, write_proc(tmp_path, None, None), (infinity, infinity))
    assert found[0][0] is Status.OK and "unlimited" in found[0][1]
    assert found[1] == (Status.INFO, "cannot read net.core.somaxconn (not Linux?)")
    assert found[2][0] is Status.INFO and "Linux < 5.14" in found[2][1]


# -- CA file --------------------------------------------------------------------------------


def test_unusable_ca_file_is_reported_before_anything_runs(world: World, tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    config = world.config()
    with pytest.raises(OSError):
        Context.create(config, ca_file=str(junk))
    asyncio.run(asyncio.sleep(0))  # nothing left running
