"""Command line: mtg v2's commands and flags, parsed with docopt-ng.

``run``, ``simple-run``, ``generate-secret``, ``access`` and ``doctor`` behave like mtg's
commands of the same names (docs/mtg-compat.md (b)). Each command has its own usage text because the
commands reuse short flags with different meanings (``-p`` is the fronting port for
simple-run and the advertised port for access), which one docopt pattern cannot express.

Exit codes: 0 success (also ``--help``/``--version``), 1 a command failed (the reason is
printed as ``mtgworkers: error: <reason>`` on stderr), 2 the command line is wrong (the
reason and the usage text on stderr).

``run`` and ``simple-run`` start the supervisor (``supervisor.run``), which forks the
worker processes; SIGHUP makes ``run`` re-read its config file.

Modules with heavy imports (config, supervisor, secret) are imported inside the commands, so
``--help`` and ``--version`` stay fast and work on a half-installed tree.
"""

from __future__ import annotations

import asyncio
import io
import ipaddress
import json
import os
import platform
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from docopt import DocoptExit, docopt

from mtgworkers import __version__, links

if TYPE_CHECKING:
    from mtgworkers.config import Config
    from mtgworkers.protocol.secret import Secret

__all__ = [
    "CliError",
    "access_document",
    "deprecation_message",
    "main",
    "render_access",
    "version_string",
]

PROG = "mtgworkers"

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2

MAIN_DOC = f"""\
{PROG}: Telegram MTProto proxy (FakeTLS, domain fronting), compatible with mtg v2.

Usage:
  {PROG} <command> [<args>...]
  {PROG} (-h | --help)
  {PROG} (-v | --version)

Commands:
  run              Run proxy.
  simple-run       Run proxy without config file.
  generate-secret  Generate new proxy secret.
  access           Print access information.
  doctor           Check that proxy can run correctly.

Options:
  -h, --help     Show this help and exit.
  -v, --version  Show the version and exit.

Run '{PROG} <command> --help' for the options of a command.
"""

RUN_DOC = f"""\
Run proxy.

Usage:
  {PROG} run [options] <config>

Arguments:
  <config>  Path to the configuration file (TOML, mtg v2 keys).

Options:
  -h, --help  Show this help and exit.
"""

SIMPLE_RUN_DOC = f"""\
Run proxy without config file.

Usage:
  {PROG} simple-run [options] [--socks5-proxy=URL]... [--dc-override=SPEC]... <bind-to> <secret>

Arguments:
  <bind-to>  A host:port to bind proxy to (IP literal, e.g. 0.0.0.0:443 or [::]:443).
  <secret>   Proxy secret (hex or base64 'ee' secret).

Options:
  -h, --help                            Show this help and exit.
  -d, --debug                           Run in debug mode.
  -c N, --concurrency=N                 Max number of concurrent connections to proxy.
                                        [default: 8192]
  -b SIZE, --tcp-buffer=SIZE            Deprecated and ignored.
  -i PREF, --prefer-ip=PREF             IP preference: prefer-ipv6, prefer-ipv4, only-ipv6
                                        or only-ipv4. [default: prefer-ipv6]
  -p PORT, --domain-fronting-port=PORT  A port to access for domain fronting.
                                        [default: 443]
  --domain-fronting-ip=IP               An IP address to use for domain fronting instead of
                                        resolving the hostname via DNS.
  -n IP, --doh-ip=IP                    IP address of DNS-over-HTTPS to use. [default: 1.1.1.1]
  -t DURATION, --timeout=DURATION       Network timeout to use (TCP connect, HTTP and relay
                                        idle). [default: 10s]
  -s URL, --socks5-proxy=URL            Socks5 proxy to use for network access
                                        (repeatable).
  -a SIZE, --antireplay-cache-size=SIZE
                                        A size of anti-replay cache to use. [default: 1MB]
  --dc-override=SPEC                    DC=HOST:PORT: use HOST:PORT instead of the built-in
                                        addresses of Telegram DC number DC (repeatable; several
                                        for one DC are tried in the given order).
  --workers=N                           Number of worker processes, 0 = one per CPU.
                                        [default: 0]
  --no-pacing                           Send records to clients as fast as they come,
                                        without the doppelganger's timing (faster, but
                                        easier to tell from a website).
"""

GENERATE_SECRET_DOC = f"""\
Generate new proxy secret.

Usage:
  {PROG} generate-secret [options] <hostname>

Arguments:
  <hostname>  Hostname for domain fronting (the SNI clients will send).

Options:
  -h, --help  Show this help and exit.
  -x, --hex   Print secret in hex encoding.
"""

ACCESS_DOC = f"""\
Print access information.

Usage:
  {PROG} access [options] <config>

Arguments:
  <config>  Path to the configuration file.

Options:
  -h, --help        Show this help and exit.
  -i IP, --ipv4=IP  Public IPv4 address for proxy. By default it is taken from public-ipv4
                    in the config, else resolved via a remote website.
  -I IP, --ipv6=IP  Public IPv6 address for proxy. By default it is taken from public-ipv6
                    in the config, else resolved via a remote website.
  -p N, --port=N    Port number. By default the port of bind-to in the config.
  -x, --hex         Print secret in hex encoding.
  --qr              Print each t.me link with its QR code for the terminal instead of
                    the JSON document.
"""

DOCTOR_DOC = f"""\
Check that proxy can run correctly.

Usage:
  {PROG} doctor [options] [--ntp-server=HOST]... [--ip-echo-url=URL]... <config>

Arguments:
  <config>  Path to the configuration file.

Options:
  -h, --help             Show this help and exit.
  --json                 Print one JSON object instead of the text report.
  --probe                Probe the running proxy and fail if it does not answer. Without
                         it the proxy is probed only when something answers there.
  --no-probe             Do not probe the running proxy.
  --probe-address=ADDR   host:port of the running proxy. By default bind-to of the config
                         (0.0.0.0 and :: as the loopback address).
  --ntp-server=HOST      NTP server as host[:port] (repeatable; replaces [doctor]
                         ntp-servers).
  --ip-echo-url=URL      IP echo service to detect public addresses (repeatable; replaces
                         [doctor] ip-echo-urls).
  --ca-file=PATH         Extra CA certificates (PEM) to trust (replaces [doctor] ca-file).
  --timeout=DURATION     Timeout of each network operation (replaces [doctor] timeout).
  --deadline=DURATION    Stop all checks after this long. [default: 60s]
"""

# simple-run flags by the config key they fill, to turn a config error back into the
# flag the user typed: "network.timeout.tcp: ..." -> "incorrect timeout: ...".
_SIMPLE_RUN_FLAGS = {
    "bind-to": "bind-to",
    "secret": "secret",
    "concurrency": "concurrency",
    "prefer-ip": "prefer-ip",
    "domain-fronting.port": "domain-fronting-port",
    "domain-fronting.ip": "domain-fronting-ip",
    "network.doh-ip": "doh-ip",
    "network.timeout.tcp": "timeout",
    "network.timeout.http": "timeout",
    "network.timeout.idle": "timeout",
    "network.proxies": "socks5-proxy",
    "defense.anti-replay.max-size": "antireplay-cache-size",
    "dc-overrides": "dc-override",
    "supervisor.workers": "workers",
}


class CliError(Exception):
    """A command cannot do its job; the message is printed after ``mtgworkers: error:``."""


class _UsageError(Exception):
    """The command line does not match the usage text."""

    def __init__(self, message: str, usage: str, command: str | None) -> None:
        super().__init__(message)
        self.usage = usage
        self.command = command


def version_string() -> str:
    """``mtgworkers <version> (python <x.y.z>)``, printed by ``--version``."""
    return f"{PROG} {__version__} (python {platform.python_version()})"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); return the exit code.

    Never raises SystemExit itself (docopt's help exits are turned into return values);
    KeyboardInterrupt during ``run`` ends with 0 like mtg's SIGINT handling.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        return _dispatch(args)
    except _UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        print(exc.usage.strip("\n"), file=sys.stderr)
        hint = f"{PROG} {exc.command} --help" if exc.command else f"{PROG} --help"
        print(f"Run '{hint}' for more information.", file=sys.stderr)
        return EXIT_USAGE
    except CliError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_OK


def _dispatch(argv: list[str]) -> int:
    top = _parse(MAIN_DOC, argv, command=None, options_first=True)
    if top is None:
        return EXIT_OK
    if top["--version"]:
        print(version_string())
        return EXIT_OK
    name = top["<command>"]
    try:
        doc, handler, positionals = _COMMANDS[name]
    except KeyError:
        raise _UsageError(f"unknown command {name!r}", _usage_of(MAIN_DOC), None) from None
    args = _parse(doc, [name, *top["<args>"]], command=name, positionals=positionals)
    if args is None:
        return EXIT_OK
    return handler(args)


def _parse(
    doc: str,
    argv: list[str],
    *,
    command: str | None,
    options_first: bool = False,
    positionals: Sequence[str] = (),
) -> Mapping[str, Any] | None:
    """docopt, with its exits turned into None (help printed) or _UsageError."""
    try:
        return docopt(doc, argv, default_help=True, options_first=options_first)
    except DocoptExit as exc:
        message = _describe_docopt_error(str(exc), command, argv, positionals)
        raise _UsageError(message, _usage_of(doc), command) from None
    except SystemExit as exc:
        # docopt printed the help text and called sys.exit().
        if exc.code in (None, 0):
            return None
        raise


def _usage_of(doc: str) -> str:
    usage = doc[doc.index("Usage:") :]
    return usage.split("\n\n", 1)[0]


_UNMATCHED = "Warning: found unmatched (duplicate?) arguments"
_OPTION_RE = re.compile(r"Option\((?:'([^']*)'|None), (?:'([^']*)'|None)")
_ARGUMENT_RE = re.compile(r"Argument\(None, '([^']*)'\)")


def _describe_docopt_error(
    text: str, command: str | None, argv: list[str], positionals: Sequence[str]
) -> str:
    """A one-line reason from docopt's error text (which is written for developers)."""
    first = text.split("\n", 1)[0].strip()
    if not first or first.lower().startswith("usage:"):
        return "missing command" if command is None and not argv else "invalid arguments"
    if not first.startswith(_UNMATCHED):
        return first  # e.g. "--port requires argument"
    options = [long or short for short, long in _OPTION_RE.findall(first)]
    arguments = _ARGUMENT_RE.findall(first)
    if command is not None and arguments[:1] == [command]:
        # Nothing matched at all: usually too few positional arguments.
        given = len(arguments) - 1
        if given < len(positionals):
            return "missing argument " + " ".join(positionals[given:])
        return "invalid arguments"
    if options:
        return "unknown or repeated option " + ", ".join(options)
    if arguments:
        return "unexpected argument " + " ".join(arguments)
    return "invalid arguments"


# ---------------------------------------------------------------------------
# generate-secret


def cmd_generate_secret(args: Mapping[str, Any]) -> int:
    """Print a new secret for ``<hostname>`` (base64, or hex with ``--hex``)."""
    from mtgworkers.protocol.secret import Secret, SecretError

    try:
        secret = Secret.generate(args["<hostname>"])
    except SecretError as exc:
        raise CliError(f"cannot generate secret: {exc}") from None
    print(secret.hex() if args["--hex"] else secret.base64())
    return EXIT_OK


# ---------------------------------------------------------------------------
# run / simple-run


def cmd_run(args: Mapping[str, Any]) -> int:
    """Load the config file, set up logging, warn about deprecated keys and serve."""
    from mtgworkers import config, logs

    cfg, data, base_dir = load_config_source(args["<config>"])
    logs.setup(cfg.debug)
    log = logs.get_logger("")
    for key in cfg.deprecated:
        log.warning(deprecation_message(key), extra={"option": key})
    for warning in config.warnings(cfg):
        log.warning(warning)
    log.debug("configuration", extra={"configuration": cfg.to_json_dict()})
    return _serve(cfg, os.path.abspath(args["<config>"]), (data, base_dir))


def cmd_simple_run(args: Mapping[str, Any]) -> int:
    """Build a config from the flags (mtg's simple-run rules) and serve."""
    from mtgworkers import config, logs

    data = simple_run_config(args)
    try:
        cfg = config.parse(data)
    except config.ConfigError as exc:
        raise CliError(_simple_run_error(str(exc))) from None
    logs.setup(cfg.debug)
    log = logs.get_logger("")
    if args["--tcp-buffer"] is not None:
        log.warning("Option tcp-buffer is deprecated and ignored.", extra={"option": "tcp-buffer"})
    log.debug("configuration", extra={"configuration": cfg.to_json_dict()})
    return _serve(cfg, None, (data, None))


def simple_run_config(args: Mapping[str, Any]) -> dict[str, Any]:
    """The config, in the TOML file's shape, that simple-run's flags describe.

    Values stay strings where the config file has strings, so config.parse() validates
    them exactly as it validates a file. Raises CliError for flags that must be numbers
    but are not, or a malformed ``--dc-override``.
    """
    timeout = args["--timeout"]
    data: dict[str, Any] = {
        "debug": bool(args["--debug"]),
        "secret": args["<secret>"],
        "bind-to": args["<bind-to>"],
        "concurrency": _integer_flag("concurrency", args["--concurrency"]),
        "prefer-ip": args["--prefer-ip"],
        "allow-fallback-on-unknown-dc": True,
        "domain-fronting": {
            "port": _integer_flag("domain-fronting-port", args["--domain-fronting-port"])
        },
        "network": {
            "doh-ip": args["--doh-ip"],
            "proxies": list(args["--socks5-proxy"]),
            "timeout": {"tcp": timeout, "http": timeout, "idle": timeout},
        },
        "defense": {
            "anti-replay": {"enabled": True, "max-size": args["--antireplay-cache-size"]},
            "doppelganger": {"pacing": not args["--no-pacing"]},
        },
    }
    if args["--domain-fronting-ip"] is not None:
        data["domain-fronting"]["ip"] = args["--domain-fronting-ip"]
    workers = _integer_flag("workers", args["--workers"])
    if workers:
        data["supervisor"] = {"workers": workers}
    overrides = parse_dc_overrides(args["--dc-override"])
    if overrides:
        data["dc-overrides"] = overrides
    return data


def parse_dc_overrides(specs: Sequence[str]) -> dict[str, list[str]]:
    """``["2=1.2.3.4:443", "2=[2001:db8::1]:443"]`` -> ``{"2": ["1.2.3.4:443", ...]}``.

    The result has the shape of the ``[dc-overrides]`` table of a config file; several
    specs for one DC accumulate in the given order. Only the ``DC=`` part is checked here
    (the address is validated by config.parse). Raises CliError for a malformed spec.
    """
    overrides: dict[str, list[str]] = {}
    for spec in specs:
        dc, sep, address = spec.partition("=")
        if not sep or not address or not re.fullmatch(r"-?[0-9]+", dc.strip()):
            raise CliError(f"incorrect dc-override: {spec!r} is not DC=HOST:PORT")
        overrides.setdefault(str(int(dc)), []).append(address.strip())
    return overrides


def _integer_flag(name: str, value: str) -> int:
    try:
        return int(value, 10)
    except ValueError:
        raise CliError(f"incorrect {name}: {value!r} is not an integer") from None


def _simple_run_error(message: str) -> str:
    for key in sorted(_SIMPLE_RUN_FLAGS, key=len, reverse=True):
        if message.startswith(key) and message[len(key) : len(key) + 1] in (":", "[", "."):
            detail = message[len(key) :].lstrip("[].-0123456789").removeprefix(":").strip()
            return f"incorrect {_SIMPLE_RUN_FLAGS[key]}: {detail or message}"
    return f"invalid configuration: {message}"


def _serve(cfg: Config, config_path: str | None, source: tuple[dict[str, Any], str | None]) -> int:
    """Run the supervisor and its workers; its start-up failures become CliError.

    ``source`` is what ``cfg`` was parsed from (decoded TOML data and the directory that
    relative paths are resolved against): the workers parse it again with their own code.
    """
    import supervisor

    try:
        return supervisor.run(cfg, config_path, source)
    except supervisor.SupervisorError as exc:
        raise CliError(str(exc)) from None


def deprecation_message(key: str) -> str:
    """The start-up warning for a deprecated config key (``doh-ip`` -> use ``dns``), from
    the table of :mod:`mtgworkers.config.deprecations`; ``key`` is the full dotted key or
    its last component."""
    from mtgworkers.config import deprecations

    return deprecations.deprecation_message(key)


def load_config(path: str) -> Config:
    """config.load() with the file checks and errors a user can act on (CliError)."""
    return load_config_source(path)[0]


def load_config_source(path: str) -> tuple[Config, dict[str, Any], str]:
    """:func:`load_config`, with the decoded file and its directory (what the supervisor
    hands its workers, which parse it with their own code)."""
    if not os.path.exists(path):
        raise CliError(f"config file {path} does not exist")
    if os.path.isdir(path):
        raise CliError(f"config file {path} is a directory")

    from mtgworkers import config

    try:
        data, base_dir = config.read(path)
        return config.parse(data, base_dir=base_dir), data, base_dir
    except config.ConfigError as exc:
        message = str(exc)
        # File and TOML errors already say "cannot read/parse ... <path>"; key errors do not.
        if not message.startswith("cannot "):
            message = f"invalid config {path}: {message}"
        raise CliError(message) from None


# ---------------------------------------------------------------------------
# access


def cmd_access(args: Mapping[str, Any]) -> int:
    """Print the JSON document with the proxy links, like ``mtg access``."""
    cfg = load_config(args["<config>"])
    port = cfg.bind_to.port
    if args["--port"] is not None:
        port = _integer_flag("port", args["--port"])
        if not 1 <= port <= 65535:
            raise CliError(f"incorrect port: {port} is not in 1..65535")

    from mtgworkers.doctor.sni import of_family

    # an address of the wrong family is dropped, as mtg does (Go's To4())
    ipv4 = of_family(_ip_flag("ipv4", args["--ipv4"]) or cfg.public_ipv4, 4)
    ipv6 = of_family(_ip_flag("ipv6", args["--ipv6"]) or cfg.public_ipv6, 6)
    if ipv4 is None or ipv6 is None:
        # The detection of doctor and of the start-up check: [doctor] ip-echo-urls first.
        from mtgworkers.doctor import sni

        timeout = cfg.network.timeout.http or cfg.doctor.timeout
        found = asyncio.run(sni.public_addresses(ipv4, ipv6, sni.echo_urls(cfg), timeout))
        ipv4, ipv6 = found.ipv4, found.ipv6
    render = render_access_qr if args["--qr"] else render_access
    sys.stdout.write(render(cfg.secret, port, ipv4, ipv6, use_hex=bool(args["--hex"])))
    return EXIT_OK


def render_access_qr(
    secret: Secret, port: int, ipv4: str | None, ipv6: str | None, *, use_hex: bool = False
) -> str:
    """For each known address: a caption, the t.me link and its QR code drawn with Unicode
    half blocks (scannable from a terminal). Raises CliError when ``segno`` is missing."""
    try:
        import segno
    except ImportError:
        raise CliError("--qr needs the 'segno' package (pip install segno)") from None
    document = access_document(secret, port, ipv4, ipv6, use_hex=use_hex)
    out = io.StringIO()
    for family, label in (("ipv4", "IPv4"), ("ipv6", "IPv6")):
        if family not in document:
            continue
        link = document[family]["tme_url"]
        out.write(f"{label} {document[family]['ip']} port {port}:\n{link}\n")
        segno.make(link, error="m").terminal(out=out, compact=True)
        out.write("\n")
    if not out.tell():
        out.write("no public address known: pass --ipv4/--ipv6 or set public-ipv4/public-ipv6\n")
    return out.getvalue()


def _ip_flag(name: str, value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise CliError(f"incorrect {name}: {value!r} is not an IP address") from None


def _qr_code_url(data: str) -> str:
    query = links.form_encode({"qzone": "4", "format": "svg", "data": data})
    return f"https://api.qrserver.com/v1/create-qr-code?{query}"


def _links(ip: str, port: int, secret_text: str) -> dict[str, Any]:
    tg_url = links.tg_url(ip, port, secret_text)
    tme_url = links.tme_url(ip, port, secret_text)
    return {
        "ip": ip,
        "port": port,
        "tg_url": tg_url,
        "tg_qrcode": _qr_code_url(tg_url),
        "tme_url": tme_url,
        "tme_qrcode": _qr_code_url(tme_url),
    }


def access_document(
    secret: Secret, port: int, ipv4: str | None, ipv6: str | None, *, use_hex: bool = False
) -> dict[str, Any]:
    """The ``access`` document as a dict in mtg's key order.

    A family without an address (None) is left out, as mtg does.
    """
    secret_text = secret.hex() if use_hex else secret.base64()
    document: dict[str, Any] = {}
    if ipv4:
        document["ipv4"] = _links(ipv4, port, secret_text)
    if ipv6:
        document["ipv6"] = _links(ipv6, port, secret_text)
    document["secret"] = {"hex": secret.hex(), "base64": secret.base64()}
    return document


def render_access(
    secret: Secret, port: int, ipv4: str | None, ipv6: str | None, *, use_hex: bool = False
) -> str:
    """access_document() as Go's json.Encoder writes it: 2-space indent, no HTML escaping,
    trailing newline."""
    document = access_document(secret, port, ipv4, ipv6, use_hex=use_hex)
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


# ---------------------------------------------------------------------------
# doctor


def cmd_doctor(args: Mapping[str, Any]) -> int:
    """Run doctor's checks; print the report (text or JSON); 0 if all passed, else 1."""
    from mtgworkers import config, doctor

    cfg = load_config(args["<config>"])
    try:
        options = doctor.Options(
            ntp_servers=doctor.parse_ntp_servers(args["--ntp-server"]),
            ip_echo_urls=tuple(config.parse_echo_url(url) for url in args["--ip-echo-url"]),
            ca_file=config.parse_ca_file(args["--ca-file"]) if args["--ca-file"] else None,
            timeout=config.parse_duration(args["--timeout"]) if args["--timeout"] else None,
            deadline=config.parse_duration(args["--deadline"]) or doctor.DEFAULT_DEADLINE,
            probe=True if args["--probe"] else False if args["--no-probe"] else None,
            probe_address=(
                doctor.parse_probe_address(args["--probe-address"])
                if args["--probe-address"]
                else None
            ),
        )
    except (ValueError, config.ConfigError) as exc:
        raise CliError(f"incorrect doctor option: {exc}") from None
    if args["--probe"] and args["--no-probe"]:
        raise CliError("--probe and --no-probe contradict each other")
    try:
        report = asyncio.run(doctor.run(cfg, options))
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError: unusable CA file
        raise CliError(f"cannot run doctor: {exc}") from None
    sys.stdout.write(report.render_json() if args["--json"] else report.render())
    return report.exit_code


_Handler = Callable[[Mapping[str, Any]], int]

_COMMANDS: dict[str, tuple[str, _Handler, tuple[str, ...]]] = {
    "run": (RUN_DOC, cmd_run, ("<config>",)),
    "simple-run": (SIMPLE_RUN_DOC, cmd_simple_run, ("<bind-to>", "<secret>")),
    "generate-secret": (GENERATE_SECRET_DOC, cmd_generate_secret, ("<hostname>",)),
    "access": (ACCESS_DOC, cmd_access, ("<config>",)),
    "doctor": (DOCTOR_DOC, cmd_doctor, ("<config>",)),
}
