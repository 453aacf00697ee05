"""Exposition: numbers printed the way Go prints them, escaping of help texts and labels
in both formats."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_parse

from supervisor.exporter.exposition import Family, go_float, render_openmetrics, render_text
from tests.stats.helpers import parse


@pytest.mark.parametrize(
    ("number", "text"),
    [
        (0.0, "0"),
        (-0.0, "0"),
        (1.0, "1"),
        (-1.0, "-1"),
        (200.0, "200"),
        (0.25, "0.25"),
        (999999.0, "999999"),
        (100000.5, "100000.5"),
        (1e6, "1e+06"),
        (1.5e6, "1.5e+06"),
        (123456789.0, "1.23456789e+08"),
        (2.0**53, "9.007199254740992e+15"),
        (0.0001, "0.0001"),
        (0.00001, "1e-05"),
        (1.5e-7, "1.5e-07"),
        (1e21, "1e+21"),
        (float("inf"), "+Inf"),
        (float("-inf"), "-Inf"),
        (float("nan"), "NaN"),
    ],
)
def test_numbers_are_printed_like_go(number: float, text: str) -> None:
    # strconv.FormatFloat(f, 'g', -1, 64), what client_golang's text format uses.
    assert go_float(number) == text


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_go_numbers_read_back_exactly(number: float) -> None:
    text = go_float(number)
    assert float(text) == number or (number == 0 and float(text) == 0)
    assert re.fullmatch(r"-?\d+(\.\d+)?(e[+-]\d{2,3})?", text), text
    mantissa = text.lstrip("-").split("e")[0]
    if "e" in text:  # Go's %e form: one digit before the point, exponent outside [-4, 6)
        assert re.fullmatch(r"\d(\.\d+)?", mantissa) and mantissa[0] != "0"
        assert not -4 <= int(text.split("e")[1]) < 6


def test_labels_and_help_are_escaped() -> None:
    family = Family("mtg_x", "gauge", 'a "help"\\ with\nnewline', [((("k", 'v"\\\n'),), 1.0)])
    text = render_text([family]).decode()
    assert '# HELP mtg_x a "help"\\\\ with\\nnewline\n' in text
    assert 'mtg_x{k="v\\"\\\\\\n"} 1\n' in text
    parsed = parse(text)
    assert parsed["mtg_x"] == {(("k", 'v"\\\n'),): 1.0}
    families = list(om_parse(render_openmetrics([family]).decode()))
    assert families[0].documentation == 'a "help"\\ with\nnewline'
    assert families[0].samples[0].labels == {"k": 'v"\\\n'}
