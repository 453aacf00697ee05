"""The command lines of the runner and of its helper processes, as their callers build them."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest
from docopt import DocoptExit, docopt

from bench import baseline_relay, fakedc, idleflood, loadgen, mtprotoproxy_launcher, run, tlssite

SECRET = "ee" + "11" * 16 + b"localhost".hex()


def test_runner_defaults_leave_the_presets_alone() -> None:
    args = run.parse_args([])
    assert args.command == "run"
    assert (args.duration, args.warmup, args.repeats, args.max_sessions) == (None,) * 4
    assert (args.load_procs, args.dc_procs, args.max_workers, args.out) == (None,) * 4
    assert args.compare is None and args.compare_label == "compare"
    assert not (args.no_proxy or args.no_readme or args.keep_tmp)


def test_runner_options_are_typed_in_either_spelling() -> None:
    argv = ["--duration", "2.5", "smoke", "--repeats=3", "--max-sessions", "900", "--out", "o.json"]
    argv += ["--compare", "{python} x --port {port}", "--compare-label=other", "--no-readme"]
    args = run.parse_args(argv)
    assert args.command == "smoke"
    assert args.duration == 2.5 and args.repeats == 3 and args.max_sessions == 900
    assert args.out == Path("o.json")
    assert args.compare == "{python} x --port {port}" and args.compare_label == "other"
    assert args.no_readme and not args.keep_tmp
    settings = run.settings_for(args)
    assert settings.duration == 2.5 and settings.max_sessions_cap == 900
    assert run.parse_args(["list"]).command == "list"


@pytest.mark.parametrize(
    "argv", [["--repeats", "two"], ["--duration=fast"], ["bogus"], ["--no-such-option"]]
)
def test_runner_rejects_bad_input_with_its_usage(argv: list[str]) -> None:
    with pytest.raises(DocoptExit) as caught:
        run.parse_args(argv)
    assert "Usage:" in str(caught.value)


def test_fakedc_command_line_of_the_harness() -> None:
    argv = ["--secret", SECRET, "--obfs2-ports", "1,2", "--tls-ports", "3"]
    opts = docopt(str(fakedc.__doc__), argv=argv)
    assert opts["--host"] == "127.0.0.1" and opts["--secret"] == SECRET
    assert fakedc._ports(opts, "--obfs2-ports") == [1, 2]
    assert fakedc._ports(opts, "--tls-ports") == [3]
    assert fakedc._ports(docopt(str(fakedc.__doc__), argv=argv[:2]), "--tls-ports") == []
    with pytest.raises(DocoptExit):
        fakedc._ports({"--tls-ports": "1,x"}, "--tls-ports")
    with pytest.raises(DocoptExit):
        docopt(str(fakedc.__doc__), argv=["--tls-ports", "3"])  # --secret is required


def test_baseline_relay_takes_repeated_dc_addresses() -> None:
    argv = ["--listen", "127.0.0.1:5", "--dc", "127.0.0.1:6", "--dc=[::1]:7"]
    opts = docopt(str(baseline_relay.__doc__), argv=argv)
    assert baseline_relay._address(opts["--listen"]) == ("127.0.0.1", 5)
    assert [baseline_relay._address(dc) for dc in opts["--dc"]] == [("127.0.0.1", 6), ("::1", 7)]
    with pytest.raises(DocoptExit):
        docopt(str(baseline_relay.__doc__), argv=argv[:2])  # at least one --dc
    with pytest.raises(DocoptExit):
        baseline_relay._address("127.0.0.1:port")


def test_idleflood_defaults() -> None:
    opts = docopt(str(idleflood.__doc__), argv=["--port", "9", "--connections", "40"])
    assert (opts["--host"], opts["--port"], opts["--connections"]) == ("127.0.0.1", "9", "40")
    assert opts["--seconds"] is None
    assert docopt(str(idleflood.__doc__), argv=["--port=9"])["--connections"] == "1200"


def test_launcher_command_line_of_the_readme() -> None:
    argv = ["--script", "/x/mtprotoproxy.py", "--port", "1", "--dc-port", "2", "--secret", SECRET]
    opts = docopt(str(mtprotoproxy_launcher.__doc__), argv=argv)
    ports = [mtprotoproxy_launcher._int(opts, n) for n in ("--port", "--dc-port", "--workers")]
    assert ports == [1, 2, 1]
    assert opts["--script"] == "/x/mtprotoproxy.py"
    with pytest.raises(DocoptExit):
        mtprotoproxy_launcher._int({"--port": "x"}, "--port")


@pytest.mark.parametrize(
    ("module", "argv"),
    [
        (loadgen, ["--counters", "/tmp/board"]),
        (loadgen, []),
        (tlssite, ["--listen", "127.0.0.1:8"]),
    ],
)
def test_other_helpers_parse_their_callers_argv(module: ModuleType, argv: list[str]) -> None:
    opts = docopt(str(module.__doc__), argv=argv)
    assert [opts[a] for a in argv[::2]] == argv[1::2]
