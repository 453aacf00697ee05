"""The real command: a short atheris campaign over every target, and the seed writer.

The campaign runs on a copy of the repository's corpus, with its findings in a temporary
folder, so neither ``fuzz/corpus/`` nor ``fuzz/findings/`` changes. It is marked
``fuzz_campaign`` (selected by tests/run.sh, not by a plain ``pytest``).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fuzz import CORPUS, TARGETS
from fuzz.replay import replay_corpus

REPO = Path(__file__).resolve().parents[2]
SECONDS = 24  # 2 s per target
LINE = re.compile(
    r"^(?P<target>\S+)\s+executed\s+(?P<executed>\d+)\s+cov\s+(?P<cov>\d+)\s+.*"
    r"findings (?P<findings>\d+)$"
)


def _fuzz(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fuzz", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.fuzz_campaign
def test_a_short_campaign_over_every_target(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    findings = tmp_path / "findings"
    shutil.copytree(CORPUS, corpus)
    before = {p.relative_to(corpus): p.read_bytes() for p in corpus.rglob("*") if p.is_file()}

    done = _fuzz(
        "run",
        f"--seconds={SECONDS}",
        f"--corpus={corpus}",
        f"--findings={findings}",
        timeout=SECONDS + 60,
    )

    assert done.returncode == 0, done.stdout + done.stderr
    lines = {m["target"]: m for m in map(LINE.match, done.stdout.splitlines()) if m}
    assert set(lines) == set(TARGETS), done.stdout
    for target, line in lines.items():
        assert int(line["executed"]) > 0, f"{target} executed nothing:\n{done.stdout}"
        assert int(line["cov"]) > 0, f"{target} reported no coverage:\n{done.stdout}"
        assert line["findings"] == "0", done.stdout
    assert "done, 0 finding(s)" in done.stdout
    assert [p for p in findings.rglob("*") if p.is_file()] == []
    # Without --merge the corpus is only read.
    after = {p.relative_to(corpus): p.read_bytes() for p in corpus.rglob("*") if p.is_file()}
    assert after == before


def test_the_seeds_parse_per_target(tmp_path: Path) -> None:
    done = _fuzz("seed", str(tmp_path), timeout=120)
    assert done.returncode == 0, done.stderr
    for target in TARGETS:
        count, errors = replay_corpus(target, tmp_path)
        assert count >= 3, f"{target}: {count} seed(s)"
        assert errors == []
    again = _fuzz("seed", str(tmp_path), timeout=120)
    assert again.returncode == 0, again.stderr
    assert re.findall(r" (\d+) new seed", again.stdout) == ["0"] * len(TARGETS)


def test_the_seeds_reach_past_the_checks() -> None:
    """Signed hellos verify at the harnesses' clock, and the DNS answers carry addresses."""
    import dns.message

    from fuzz import seeds
    from fuzz.targets import NOW, SECRET_HEX
    from mtgworkers.protocol import faketls
    from mtgworkers.protocol.secret import Secret

    secret = Secret.parse(SECRET_HEX)
    for record in seeds.hellos()[:3]:
        parsed = faketls.read_client_hello(record, eof=True)
        assert parsed is not None
        faketls.verify_client_hello(parsed[0], secret, NOW, 3.0)
    _, a, aaaa = seeds.dns_answers()[0]
    assert dns.message.from_wire(a).answer and dns.message.from_wire(aaaa).answer


def test_the_command_line_refuses_unknown_targets() -> None:
    done = _fuzz("replay", "--target=nope", timeout=60)
    assert done.returncode == 2
    assert "unknown target(s): nope" in done.stderr


def test_seed_without_a_folder_writes_nothing() -> None:
    before = sorted(p.name for p in (CORPUS / "config").iterdir())
    done = _fuzz("seed", "--target=config", timeout=60)
    assert done.returncode == 0, done.stderr
    assert "would go to" in done.stdout and "nothing written" in done.stdout
    assert sorted(p.name for p in (CORPUS / "config").iterdir()) == before
