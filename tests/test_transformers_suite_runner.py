"""The comparison of `make test-contracts` (tests/contracts/run_transformers_suite.py): what counts against GAP."""

import importlib.util
from pathlib import Path
from xml.sax.saxutils import escape

_spec = importlib.util.spec_from_file_location(
    "run_transformers_suite", Path(__file__).parent / "contracts" / "run_transformers_suite.py"
)
suite = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(suite)


def _junit(path: Path, cases: str) -> Path:
    path.write_text(f'<?xml version="1.0"?><testsuites><testsuite name="pytest">{cases}</testsuite></testsuites>')
    return path


_TRACEBACK = """self = <GapSuiteTest testMethod=test_x>
    def test_x(self):
>       model(**inputs)

transformers_tests/test_modeling_common.py:812: in test_x
    model(**inputs)
modeling_gap.py:549: in forward
    h_bar = outputs.last_hidden_state
E   AttributeError: 'tuple' object has no attribute 'last_hidden_state'
modeling_gap.py:549: AttributeError"""


def test_a_test_passing_on_stock_but_failing_on_gap_is_reported_with_its_reason_and_source_line(tmp_path):
    stock = suite.read_junit(_junit(tmp_path / "s.xml", '<testcase name="test_x"/><testcase name="test_y"/>'))
    gap = suite.read_junit(_junit(tmp_path / "g.xml", (
        '<testcase name="test_x"><failure message="AttributeError: \'tuple\' object has no attribute '
        f'\'last_hidden_state\'">{escape(_TRACEBACK)}</failure></testcase><testcase name="test_y"/>'
    )))
    verdict = suite.compare(stock, gap, allowed={})
    assert verdict["regressions"] == [{
        "test": "test_x", "outcome": "failed",
        "reason": "AttributeError: 'tuple' object has no attribute 'last_hidden_state'", "where": "modeling_gap.py:549",
    }]
    allowed = suite.compare(stock, gap, allowed={"test_x": "hard-codes the stock class name"})
    assert allowed["regressions"] == []
    assert allowed["allowed"][0]["allowed_because"] == "hard-codes the stock class name"


def test_a_skip_or_a_teardown_error_on_gap_counts_against_gap_and_a_stock_failure_does_not(tmp_path):
    stock = suite.read_junit(_junit(tmp_path / "s.xml", (
        '<testcase name="test_skip"/><testcase name="test_teardown"/>'
        '<testcase name="test_broken_on_stock"><failure message="boom">x.py:1: boom</failure></testcase>'
    )))
    gap = suite.read_junit(_junit(tmp_path / "g.xml", (
        '<testcase name="test_skip"><skipped message="not supported"/></testcase>'
        '<testcase name="test_teardown"/><testcase name="test_teardown"><error message="leak"/></testcase>'
        '<testcase name="test_broken_on_stock"/>'
    )))
    verdict = suite.compare(stock, gap, allowed={})
    assert [(r["test"], r["outcome"]) for r in verdict["regressions"]] == [
        ("test_skip", "skipped"), ("test_teardown", "failed")
    ]
    assert [r["test"] for r in verdict["pass_only_on_gap"]] == ["test_broken_on_stock"]
