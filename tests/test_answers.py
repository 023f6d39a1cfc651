"""Answer extraction and matching (gap_pipeline/answers.py)."""

import json
import textwrap

import pytest

from gap_pipeline.answers import (
    AnswerChecker,
    CheckerLoadError,
    DefaultAnswerChecker,
    answers_match,
    extract_answer,
    gold_answer,
    load_checker,
    normalize_options,
)

SHAPES = {"A": "circle", "B": "triangle", "C": "square"}
NUMS = ["10", "12", "14"]

# (response, options, expected extraction, gold, expected match)
CASES = [
    ("B", None, "B", "B", True),
    ("The answer is (C).", None, "(C)", "C", True),
    ("Answer: D", None, "D", "A", False),
    (r"Thus $x = \boxed{\frac{3}{4}}$.", None, r"\frac{3}{4}", "0.75", True),
    ("<answer>12 cm</answer>", None, "12 cm", "12", True),
    (
        "The bar for 2019 is 35 and the bar for 2020 is 42.\n"
        "The difference is 42 - 35 = 7.\nTherefore, the answer is 7.",
        None, "7", "7", True,
    ),
    (
        "The bar for 2019 is 35 and the bar for 2020 is 42.\n"
        "Adding the 10 from the legend gives 17.\nTherefore, the answer is 17.",
        None, "17", "7", False,
    ),
    ("Each side is 12 cm, so the total length is 120 cm.\nAnswer: 120", None, "120", "12", False),
    ("<answer>BB</answer>", None, "BB", "B", False),
    (r"The ratio is therefore $\boxed{15}$.", None, "15", "1.5", False),
    ("Apple", None, "Apple", "A", False),
    ("Looking at the shape with three corners, the answer is triangle.", SHAPES, "triangle", "B", True),
    ("The share grew from 30% in 2010 to 45% in 2020.\nAnswer: 45%", None, "45%", "45", True),
    ("Answer: 45%", None, "45%", "0.45", True),
    ("Adding the districts gives about 1,250,000 people.\nAnswer: 1,250,000", None, "1,250,000", "1250000", True),
    (r"So the angle is $\boxed{45^\circ}$.", None, r"45^\circ", "45", True),
    (r"The perimeter is \boxed{12\text{ cm}}", None, r"12\text{ cm}", "12", True),
    (
        "<think>Maybe the answer is 5. Wait, recount: there are 6 birds.</think>\nThe answer is 6.",
        None, "6", "6", True,
    ),
    (r"First guess \boxed{3}, but after checking the axis: \boxed{4}", None, "4", "4", True),
    ("Answer: B) 45 degrees", None, "B) 45 degrees", "B", True),
    ("**Final Answer:** (D) 2.5", None, "(D) 2.5", "D", True),
    ("Looking at the image, the cat sits left of the dog.\nAnswer: Yes.", None, "Yes", "yes", True),
    ("<answer> Blue </answer>", None, "Blue", "blue", True),
    (r"Hence $\boxed{-\dfrac{1}{2}}$", None, r"-\dfrac{1}{2}", "-0.5", True),
    ("The answer is 3.1416", None, "3.1416", "3.14", True),
    ("The answer is 3.2", None, "3.2", "3.14", False),
    ("Counting the dots row by row gives 101.\nThe answer is 101.", None, "101", "100", False),
    ("There are 3 red and 4 blue balls, so 3 + 4 = 7 balls in total.", None, "7", "7", True),
    (
        "Comparing the options, (A) is too small and (C) is too large,\nso the best fit is (B).",
        None, "B", "B", True,
    ),
    ("The answer is C.", NUMS, "C", "14", True),
    ("Reading the y-axis, the value is 12.\nThe answer is 12", NUMS, "12", "C", False),
    ("Let me think step by step.\n<answer>The answer is 42", None, "42", "42", True),
    (r"\boxed{x = 12}", None, "x = 12", "12", True),
    ("I cannot determine this from the image.", None, None, "B", False),
    ("The unit price is 2.50 and we buy 5.\nAnswer: $12.50", None, "12.50", "12.5", True),
    ("After checking each choice in turn, option B is correct.", None, "B", "B", True),
    ("The correct option is (A) because the curve rises.", None, "(A) because the curve rises", "A", True),
    ("A triangle has three sides and 3 corners, so the answer is 3.", None, "3", "3", True),
    ("A careful count of the flock gives 9 birds.", None, "9", "9", True),
    ("We need to determine which option is correct.\nThe chart peaks in June.\nSo B.", SHAPES, "B", "B", True),
    ("<answer>(B)</answer>", SHAPES, "(B)", "triangle", True),
    ("<answer>The answer is 7</answer> and some trailing 8", None, "7", "7", True),
    ("The speed is 5 m/s.\nAnswer: 5 m/s", None, "5 m/s", "5", True),
]


@pytest.mark.parametrize("response,options,extracted,gold,match", CASES)
def test_extract_and_match_table(response, options, extracted, gold, match):
    assert extract_answer(response, options=options) == extracted
    assert answers_match(extract_answer(response, options=options), gold, options=options) is match
    row = {"options": options} if options is not None else {}
    assert DefaultAnswerChecker()(response, gold, row) is match


def test_table_size():
    assert len(CASES) >= 30


# (pred, gold, options, expected)
PAIRS = [
    ("B", "B", None, True),
    ("(B)", "B", None, True),
    ("B.", "(B)", None, True),
    ("Option B", "B", None, True),
    ("b", "B", None, True),
    ("B", "BB", None, False),
    ("Apple", "A", None, False),
    ("A) Apple", "A", None, True),
    ("apple", "A", {"A": "Apple", "B": "Pear"}, True),
    ("pear", "A", {"A": "Apple", "B": "Pear"}, False),
    ("B", "12", {"A": "10", "B": "12"}, True),
    ("12", "120", None, False),
    ("1.5", "15", None, False),
    ("15", "1.5", None, False),
    ("3.0", "3", None, True),
    ("3.02", "3", None, False),
    ("1,234", "1234", None, True),
    ("1,5", "15", None, False),
    ("3/4", "0.75", None, True),
    (r"\frac{3}{4}", "3/4", None, True),
    ("0.7", "3/4", None, False),
    ("45%", "45", None, True),
    ("45", "0.45", None, False),
    ("45%", "0.45%", None, False),
    ("12 cm", "12", None, True),
    ("12cm", r"12\text{ cm}", None, True),
    ("12 and 13", "12", None, False),
    ("0", "0", None, True),
    ("0.000001", "0", None, True),
    ("0.01", "0", None, False),
    ("−5", "-5", None, True),
    ("New  York", "new york", None, True),
    (r"\text{Blue}", "blue.", None, True),
    ("twelve", "12", None, False),
    (None, "12", None, False),
    ("", "12", None, False),
]


@pytest.mark.parametrize("pred,gold,options,expected", PAIRS)
def test_answers_match_pairs(pred, gold, options, expected):
    assert answers_match(pred, gold, options=options) is expected


def test_tolerance_parameters():
    assert answers_match("3.2", "3.14", rel_tol=0.05)
    assert not answers_match("101", "100")
    assert answers_match("101", "100", integer_exact=False)
    assert not answers_match("0.5", "0.4", abs_tol=0.05)
    assert answers_match("0.44", "0.4", abs_tol=0.05)


def test_normalize_options_forms():
    assert normalize_options(["x", "y"]) == {"A": "x", "B": "y"}
    assert normalize_options({"(a)": "x", "B.": "y"}) == {"A": "x", "B": "y"}
    assert normalize_options("A. circle\n(B) square\nC) line") == {"A": "circle", "B": "square", "C": "line"}
    assert normalize_options(None) == {}


def test_default_checker_reads_options_from_row():
    checker = DefaultAnswerChecker()
    assert isinstance(checker, AnswerChecker)
    row = {"choices": ["circle", "triangle", "square"]}
    assert checker("The shape is a triangle.\nAnswer: triangle", "B", row)
    assert not checker("Answer: square", "B", row)
    assert checker("Answer: B", "triangle", row)
    assert not checker("Answer: B", "triangle", None)


def _write_module(tmp_path, name, body):
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(body))
    return path


def test_load_checker_valid_paths(tmp_path, monkeypatch):
    _write_module(
        tmp_path,
        "my_checkers",
        """
        def exact(response, gold, row=None):
            return response.strip() == gold

        class Lenient:
            def __init__(self, prefix="ok"):
                self.prefix = prefix
            def __call__(self, response, gold, row=None):
                return response.startswith(self.prefix)
        """,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = load_checker("my_checkers:exact")
    assert fn("42 ", "42", {}) and not fn("41", "42", {})
    assert load_checker("my_checkers.exact") is fn
    inst = load_checker("my_checkers:Lenient")
    assert inst("ok then", "x", None) and not inst("no", "x", None)
    assert load_checker("my_checkers:Lenient", prefix="no")("no", "x", None)
    assert isinstance(load_checker(None), DefaultAnswerChecker)
    assert isinstance(load_checker("default", rel_tol=0.1), DefaultAnswerChecker)
    assert load_checker("gap_pipeline.answers:DefaultAnswerChecker")("Answer: 7", "7", {})
    # A file path works without the module being importable.
    (tmp_path / "elsewhere").mkdir()
    path = _write_module(tmp_path / "elsewhere", "file_checker_xyz", "def check(r, g, row=None):\n    return r == g\n")
    assert load_checker(f"{path}:check")("a", "a", None)


def test_load_checker_invalid_paths(tmp_path, monkeypatch):
    with pytest.raises(CheckerLoadError, match="no_such_module_gap.*importing module"):
        load_checker("no_such_module_gap:check")
    with pytest.raises(ImportError):  # CheckerLoadError is an ImportError
        load_checker("no_such_module_gap.check")
    with pytest.raises(CheckerLoadError, match="has no attribute 'missing'"):
        load_checker("gap_pipeline.answers:missing")
    with pytest.raises(CheckerLoadError, match="not callable"):
        load_checker("gap_pipeline.answers:FALLBACK_LETTERS")
    with pytest.raises(CheckerLoadError, match="no callable named"):
        load_checker("justaname")
    with pytest.raises(CheckerLoadError, match="does not exist"):
        load_checker(str(tmp_path / "nope.py") + ":check")
    _write_module(tmp_path, "broken_checker_mod", "import not_installed_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(CheckerLoadError, match="not_installed_dependency_xyz"):
        load_checker("broken_checker_mod:check")


def test_a_gold_answer_is_one_string_by_one_rule():
    from gap_pipeline.answers import AnswerError, normalize_gold

    assert normalize_gold(["blue"], "row 0") == "blue"  # not "['blue']", which no prediction could match
    assert normalize_gold(" blue ", "row 0") == "blue"
    assert [normalize_gold(v, "row 0") for v in (3, 2.5, [7], -1.0)] == ["3", "2.5", "7", "-1.0"]
    assert [normalize_gold(v, "row 0") for v in (None, "", " ", [], float("nan"))] == [None] * 5
    with pytest.raises(AnswerError, match=r"row 4: the gold answer is a list of 2 answers \(\['a', 'b'\]\); give one"):
        normalize_gold(["a", "b"], "row 4")
    row = {"messages": [{"role": "assistant", "content": "<answer>x</answer>"}], "answer": ["blue"]}
    assert gold_answer(row, 0) == "blue"
    assert gold_answer({**row, "answer": []}, 0) == "x"  # no answer in the field: the <answer> block


def test_gold_answers_of_mixed_types_load_as_strings(tmp_path):
    from gap_pipeline.answers import AnswerError
    from gap_pipeline.evaluate import load_items

    rows = [{"id": f"r{i}", "messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
             "answer": answer} for i, answer in enumerate(("blue", 3, ["red"], 2.5))]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    items, problems = load_items(path)  # one numeric answer among strings was an Arrow type error
    assert problems == [] and [item.gold for item in items] == ["blue", "3", "red", "2.5"]
    path.write_text(path.read_text() + json.dumps({**rows[0], "answer": ["a", "b"]}) + "\n")
    with pytest.raises(AnswerError, match=f"{path}, line 5: the gold answer is a list of 2 answers"):
        load_items(path)
