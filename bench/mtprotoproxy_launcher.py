"""Run alexbers/mtprotoproxy against the benchmark's loopback fake DC (for ``--compare``).

mtprotoproxy keeps its Telegram DC addresses in module constants and looks up its public
IP on the internet at start. This launcher loads its script as a module, points every DC at
``127.0.0.1:DC_PORT``, replaces the IP look-up with 127.0.0.1, refuses every HTTP request
(they would only serve middle proxies, which are off without an ad tag), sets the mask host
to a closed local port, writes a config for the benchmark secret (TLS mode only) and runs
its ``main()``. Nothing leaves the machine.

    python -m bench run --compare-label mtprotoproxy --compare \
      "{python} bench/mtprotoproxy_launcher.py --script /path/to/mtprotoproxy.py \
       --port {port} --dc-port {dc_port} --secret {secret}"

Works with the upstream script of 2020 and later, and with the PyPI release 1.0.6 (2019),
whose ``asyncio.start_server(loop=...)`` calls are adapted for Python >= 3.10 here.

Usage:
  mtprotoproxy_launcher.py --port=PORT --dc-port=PORT --secret=HEX [options]
  mtprotoproxy_launcher.py (-h | --help)

Options:
  --script=PATH   path of mtprotoproxy.py (default: from PATH)
  --port=PORT     port mtprotoproxy listens on
  --dc-port=PORT  port of the fake DC every Telegram DC is pointed at
  --secret=HEX    the benchmark's ee hex secret
  --workers=N     mtprotoproxy worker processes [default: 1]
  -h --help       show this help
"""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import inspect
import shutil
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

from docopt import DocoptExit, docopt


def _drop_loop_argument(func: Any) -> Any:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        kwargs.pop("loop", None)  # removed from asyncio in Python 3.10
        return func(*args, **kwargs)

    return wrapper


def _refuse(*args: Any, **kwargs: Any) -> Any:
    raise OSError("network access is disabled by the benchmark launcher")


async def _refuse_async(*args: Any, **kwargs: Any) -> Any:
    raise OSError("network access is disabled by the benchmark launcher")


def _uvloop_with_a_loop() -> None:
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    asyncio.set_event_loop(asyncio.new_event_loop())


def find_script(path: str | None) -> Path:
    """The mtprotoproxy.py to run: --script, or the one pip installed on PATH."""
    if path:
        return Path(path)
    for name in ("mtprotoproxy.py", "mtprotoproxy"):
        found = shutil.which(name)
        if found:
            return Path(found)
    raise SystemExit("mtprotoproxy.py not found: pass --script PATH")


def write_config(directory: Path, port: int, key_hex: str, host: str, workers: int) -> Path:
    config = directory / "config.py"
    lines = [
        f"PORT = {port}",
        f"USERS = {{'bench': '{key_hex}'}}",
        "MODES = {'classic': False, 'secure': False, 'tls': True}",
        "TLS_ONLY = True",
        "SECURE_ONLY = True",
        f"TLS_DOMAIN = '{host}'",
        "MASK = True",
        "MASK_HOST = '127.0.0.1'",
        "MASK_PORT = 9",  # nothing listens there; the benchmark never needs fronting
        "AD_TAG = ''",
        "USE_MIDDLE_PROXY = False",
        "PREFER_IPV6 = False",
        "LISTEN_ADDR_IPV4 = '127.0.0.1'",
        "LISTEN_ADDR_IPV6 = ''",
        "STATS_PRINT_PERIOD = 86400",
        "CLIENT_HANDSHAKE_TIMEOUT = 10",
    ]
    if workers > 1:
        lines.append(f"WORKERS = {workers}")  # honoured only by versions that have it
    config.write_text("\n".join(lines) + "\n")
    return config


def _int(opts: dict[str, Any], name: str) -> int:
    try:
        return int(opts[name])
    except ValueError:
        raise DocoptExit(f"{name}: {opts[name]!r} is not an integer") from None


def main(argv: list[str] | None = None) -> int:
    opts = docopt(str(__doc__), argv=sys.argv[1:] if argv is None else list(argv))
    port, dc_port, workers = (_int(opts, name) for name in ("--port", "--dc-port", "--workers"))

    raw = bytes.fromhex(opts["--secret"])
    key_hex, host = raw[1:17].hex(), raw[17:].decode()
    script = find_script(opts["--script"])
    spec = importlib.util.spec_from_file_location("mtprotoproxy", script)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {script}")
    module: Any = importlib.util.module_from_spec(spec)
    sys.modules["mtprotoproxy"] = module
    spec.loader.exec_module(module)

    module.TG_DATACENTERS_V4 = ["127.0.0.1"] * 5
    module.TG_DATACENTERS_V6 = ["::1"] * 5
    module.TG_DATACENTER_PORT = dc_port

    def loopback_ip_info() -> None:
        module.my_ip_info = {"ipv4": "127.0.0.1", "ipv6": None}

    module.init_ip_info = loopback_ip_info
    if hasattr(module, "make_https_req"):
        module.make_https_req = _refuse_async
    urllib.request.urlopen = _refuse
    asyncio.start_server = _drop_loop_argument(asyncio.start_server)
    asyncio.start_unix_server = _drop_loop_argument(asyncio.start_unix_server)

    workdir = Path(tempfile.mkdtemp(prefix="mtprotoproxy-bench-"))
    config = write_config(workdir, port, key_hex, host, workers)
    sys.argv = [str(script), str(config)]
    sys.path.insert(0, str(workdir))
    if "init_config()" in inspect.getsource(module.main):
        module.main()  # newer versions set themselves up inside main()
    else:  # older releases: set up here, and give their get_event_loop() a loop to find
        module.try_setup_uvloop = _uvloop_with_a_loop
        module.init_config()
        module.init_ip_info()
        module.main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
