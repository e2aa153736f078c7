"""JSON as whylook writes it: the values ``json`` would write, in a fixed line layout."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from whylook._io import json_text, write_json

_scalars = (st.none() | st.booleans() | st.integers()
            | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8))
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=30,
)


@settings(max_examples=200, deadline=None)
@given(_values)
def test_the_text_reads_back_as_json_dumps_wrote_it(value: object) -> None:
    assert json.loads(json_text(value)) == json.loads(json.dumps(value))


def test_layout_one_line_per_key_and_per_record(tmp_path: Path) -> None:
    explanation = {
        "schema": "whylook.explanation/1",
        "learning_order": [{"pair": ["0", "7"], "separated_at_step": 4},
                           {"pair": ["1", "2"], "separated_at_step": 9}],
        "settings": {"k": 32, "grid": [7, 7], "deep": {"b": 1, "a": [1, {"x": 2}]}},
        "classes": ["0", "1", "2", "7"],
        "empty": {},
    }
    text = write_json(tmp_path / "e.json", explanation).read_text()
    assert text == (
        "{\n"
        '  "classes": ["0", "1", "2", "7"],\n'
        '  "empty": {},\n'
        '  "learning_order": [\n'
        '    {"pair": ["0", "7"], "separated_at_step": 4},\n'
        '    {"pair": ["1", "2"], "separated_at_step": 9}\n'
        "  ],\n"
        '  "schema": "whylook.explanation/1",\n'
        '  "settings": {\n'
        '    "deep": {"a": [1, {"x": 2}], "b": 1},\n'
        '    "grid": [7, 7],\n'
        '    "k": 32\n'
        "  }\n"
        "}\n"
    )
    assert json.loads(text) == explanation


def test_values_json_refuses_are_refused_and_nothing_is_written(tmp_path: Path) -> None:
    for bad in ({"a": math.nan}, {"a": [{"b": math.inf}]}):
        with pytest.raises(ValueError, match="not JSON compliant"):
            write_json(tmp_path / "bad.json", bad)
    assert list(tmp_path.iterdir()) == []


def test_a_path_that_cannot_be_written_is_a_one_line_error(tmp_path: Path) -> None:
    from whylook._io import write_json
    from whylook.errors import WhylookError

    afile = tmp_path / "afile.txt"
    afile.write_text("keep me")
    for target in (afile / "x.json", afile / "sub" / "x.json", tmp_path):
        with pytest.raises(WhylookError, match="choose a location you can write") as info:
            write_json(target, {"a": 1})
        assert "\n" not in str(info.value)
        assert str(target) in str(info.value)
    assert afile.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile.txt"]  # no temporary left
