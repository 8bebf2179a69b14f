"""Tasks: the 26-task pool on the real benchmark files, splits, prompt rendering, answer parsing, user files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from dlp_lora.config import SplitConfig
from dlp_lora.tasks import (
    TASKS,
    Example,
    Task,
    get_task,
    load_examples,
    load_splits,
    parse_answer,
    pool_table,
    task_names,
)
from dlp_lora.tasks.loaders import resolve_data_dir, user_file
from dlp_lora.tasks.prompts import (
    LETTERS,
    MCQ_INSTRUCTION,
    extract_number,
    mcq_example,
    mcq_prompt,
    normalize_text,
    parse_choice,
)


def _has_benchmark_data() -> bool:
    try:
        resolve_data_dir()
    except FileNotFoundError:
        return False
    return True


needs_data = pytest.mark.skipif(
    not _has_benchmark_data(),
    reason="benchmark data not found: resolve_data_dir() raised FileNotFoundError "
    "(set DLP_LORA_DATA or put the data in ../shared/data)",
)


def _write_rows(path: Path, rows: list, jsonl: bool = True) -> Path:
    text = "\n".join(json.dumps(r) for r in rows) + "\n" if jsonl else json.dumps(rows)
    path.write_text(text, encoding="utf-8")
    return path


def _user_task(path: Path, name: str = "mine") -> Task:
    return Task(name=name, kind="qa", source=str(path), metric="exact", load=user_file(name, path))


def _synthetic_task(tmp_path: Path, n: int, name: str = "synthetic") -> Task:
    rows = [{"input": f"question number {i}?", "output": f"answer {i}"} for i in range(n)]
    return _user_task(_write_rows(tmp_path / f"{name}.jsonl", rows), name)


# ---------------------------------------------------------------- the pool (no data needed)


def test_pool_has_26_tasks_17_mcq_and_9_qa():
    names = task_names()
    assert len(names) == len(set(names)) == 26
    kinds = [get_task(n).kind for n in names]
    assert kinds.count("mcq") >= 17 and kinds.count("qa") >= 9
    # Registry order: every multiple-choice task before every QA task.
    assert kinds == sorted(kinds)
    for name in names:
        task = get_task(name)
        assert task.name == name and task is TASKS[name]
        assert (task.metric == "choice") == (task.kind == "mcq")
        assert task.max_new_tokens >= 1


def test_task_headline_per_metric():
    load = lambda root: []  # noqa: E731
    assert Task("a", "mcq", "s", "choice", load).headline == "accuracy"
    assert Task("b", "qa", "s", "squad", load).headline == "f1"
    assert Task("c", "qa", "s", "numeric", load).headline == "em"
    assert Task("d", "qa", "s", "exact", load).headline == "em"


def test_task_rejects_bad_kind_and_kind_metric_mismatch():
    load = lambda root: []  # noqa: E731
    with pytest.raises(ValueError, match="kind must be mcq|qa, got 'essay'"):
        Task("t", "essay", "s", "exact", load)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mcq tasks use the 'choice' metric.*kind='mcq', metric='exact'"):
        Task("t", "mcq", "s", "exact", load)
    with pytest.raises(ValueError, match="kind='qa', metric='choice'"):
        Task("t", "qa", "s", "choice", load)


def test_example_validation():
    with pytest.raises(ValueError, match="example t/0: prompt and answer must be non-empty"):
        Example(uid="t/0", task="t", prompt="  ", answer="x", references=("x",))
    with pytest.raises(ValueError, match="example t/1: prompt and answer must be non-empty"):
        Example(uid="t/1", task="t", prompt="q", answer="\n", references=("x",))
    with pytest.raises(ValueError, match="example t/2: expected at least one reference"):
        Example(uid="t/2", task="t", prompt="q", answer="x", references=())
    with pytest.raises(ValueError, match=r"gold 'C' is not among choices \('A', 'B'\)"):
        Example(uid="t/3", task="t", prompt="q", answer="C", references=("C",), choices=("A", "B"))
    with pytest.raises(ValueError, match="3 option texts for 2 choices"):
        Example(
            uid="t/4", task="t", prompt="q", answer="A", references=("A",), choices=("A", "B"), options=("x", "y", "z")
        )


def test_get_task_by_name_or_task_and_unknown_name(tmp_path):
    assert get_task("squad") is TASKS["squad"]
    mine = _synthetic_task(tmp_path, 3, name="mine")
    assert get_task(mine) is mine  # a user Task passes through unchanged
    with pytest.raises(
        ValueError,
        match=r"unknown task 'no_such_task'; known tasks: \[.*'arc_challenge'.*"
        r"'bbh_dyck_languages'\]",
    ):
        get_task("no_such_task")
    with pytest.raises(ValueError, match="unknown task 'mine'"):
        get_task("mine")  # user tasks are passed as Task objects, never looked up by name


# ---------------------------------------------------------------- data directory


def test_resolve_data_dir_argument_env_and_errors(tmp_path, monkeypatch):
    env_dir = tmp_path / "env"
    env_dir.mkdir()
    monkeypatch.setenv("DLP_LORA_DATA", str(env_dir))
    assert resolve_data_dir() == env_dir
    assert resolve_data_dir(tmp_path) == tmp_path  # the argument wins over the environment

    missing = tmp_path / "missing"
    with pytest.raises(
        FileNotFoundError,
        match=rf"no benchmark data directory at {re.escape(str(missing))};"
        r" pass --data-dir DIR or set DLP_LORA_DATA",
    ):
        resolve_data_dir(missing)
    monkeypatch.setenv("DLP_LORA_DATA", str(missing))
    with pytest.raises(FileNotFoundError, match=rf"{re.escape(str(missing))}; pass --data-dir"):
        resolve_data_dir()
    a_file = _write_rows(tmp_path / "rows.jsonl", [{"input": "q", "output": "a"}])
    with pytest.raises(FileNotFoundError, match="pass --data-dir"):
        resolve_data_dir(a_file)


# ---------------------------------------------------------------- prompts


def test_mcq_prompt_exact_rendering():
    got = mcq_prompt("  Which one is red? ", ["an apple ", " the sky"])
    assert got == "Which one is red?\nA. an apple\nB. the sky\nAnswer with the correct option."
    assert got.endswith(MCQ_INSTRUCTION)


def test_mcq_example_answer_is_gold_option_text_scored_by_letter():
    ex = mcq_example("t/7", "t", "Pick the prime.", [4, 6, 7], gold=2)
    assert ex.prompt == "Pick the prime.\nA. 4\nB. 6\nC. 7\nAnswer with the correct option."
    assert (ex.uid, ex.task, ex.answer, ex.references, ex.choices) == ("t/7", "t", "7", ("C",), ("A", "B", "C"))
    assert (ex.question, ex.options, ex.gold_index) == ("Pick the prime.", ("4", "6", "7"), 2)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("red apple", "B"),
        ("Red apple.", "B"),
        ("red", "A"),
        ("red, I think", "A"),  # longest matching option wins
        ("B", "B"),
        ("(C) blue", "C"),
        ("blue", "C"),
        ("green", ""),
    ],
)
def test_parse_choice_reads_option_texts(text, expected):
    assert parse_choice(text, ("A", "B", "C"), ("red", "red apple", "blue")) == expected


def test_mcq_prompt_and_example_errors():
    with pytest.raises(ValueError, match="expected 2 to 26 options, got 1"):
        mcq_prompt("q", ["only"])
    with pytest.raises(ValueError, match="expected 2 to 26 options, got 27"):
        mcq_prompt("q", [str(i) for i in range(27)])
    with pytest.raises(ValueError, match="expected 2 to 26 options, got 1"):
        mcq_example("t/0", "t", "q", ["only"], gold=0)
    with pytest.raises(ValueError, match="t/1: gold option index 2 out of range for 2 options"):
        mcq_example("t/1", "t", "q", ["a", "b"], gold=2)
    with pytest.raises(ValueError, match="t/2: gold option index -1 out of range for 2 options"):
        mcq_example("t/2", "t", "q", ["a", "b"], gold=-1)


# ---------------------------------------------------------------- answer normalisers


@pytest.mark.parametrize(
    "text,expected",
    [
        ("B", "B"),
        ("(B)", "B"),
        ("B.", "B"),
        ("The answer is C", "C"),
        ("Answer: D", "D"),
        ("  (A) because it is red", "A"),
        ("B. the sky", "B"),
        # Case-sensitive on purpose: a lower-case 'a' is the English article, not an option.
        ("b", ""),
        ("a", ""),
        ("no letter here", ""),
        ("", ""),
        ("E", ""),  # E is not among the allowed choices A-D
        ("BC", ""),  # a letter inside a word is not a choice
    ],
)
def test_parse_choice(text, expected):
    assert parse_choice(text, ("A", "B", "C", "D")) == expected


@pytest.mark.parametrize(
    "text,expected",
    [
        ("#### 1,234", "1234"),
        ("3.0", "3"),
        ("the answer is -7.", "-7"),
        ("1,000.0", "1000"),
        ("2.50", "2.5"),
        ("first 3 then 4 and finally 12", "12"),  # without '####', the last number wins
        ("worked 5 + 6 = 11\n#### 11 (not 99)", "11"),  # with '####', the first number after it
        ("no digits at all", ""),
        ("", ""),
        ("#### none", ""),
    ],
)
def test_extract_number(text, expected):
    assert extract_number(text) == expected


def test_extract_number_keeps_every_digit_of_large_integers():
    assert extract_number("#### 12345678901234567891") == "12345678901234567891"


@pytest.mark.parametrize(
    "text,expected",
    [
        ("The Eiffel Tower!", "eiffel tower"),
        ("  an   apple,  a  pear ", "apple pear"),
        ("Theory of the Atom", "theory of atom"),  # articles only as whole words
        ("U.S.A.", "usa"),
        ("", ""),
    ],
)
def test_normalize_text_squad_rules(text, expected):
    assert normalize_text(text) == expected


def test_parse_answer_per_metric():
    load = lambda root: []  # noqa: E731
    choice = Task("c", "mcq", "s", "choice", load)
    assert parse_answer(choice, "(B) for sure", ("A", "B")) == "B"
    assert parse_answer(choice, "C", ("A", "B")) == ""  # C is not an option of this example
    assert parse_answer(choice, "F") == "F"  # no choices given: any letter
    numeric = Task("n", "qa", "s", "numeric", load)
    assert parse_answer(numeric, "3 + 4 = 7\n#### 7") == "7"
    for metric in ("squad", "exact"):
        task = Task("q", "qa", "s", metric, load)  # type: ignore[arg-type]
        assert parse_answer(task, "  Denver Broncos \nThey won 24-10.") == "Denver Broncos"


# ---------------------------------------------------------------- user files


def test_user_file_json_list_and_jsonl(tmp_path):
    rows = [{"input": "What is 2+2?", "output": "4"}, {"input": "Capital of France?", "output": "Paris"}]
    for path in (_write_rows(tmp_path / "rows.json", rows, jsonl=False), _write_rows(tmp_path / "rows.jsonl", rows)):
        examples = user_file("mine", path)("ignored root")
        assert [(e.uid, e.task, e.prompt, e.answer, e.references, e.choices) for e in examples] == [
            ("mine/0", "mine", "What is 2+2?", "4", ("4",), ()),
            ("mine/1", "mine", "Capital of France?", "Paris", ("Paris",), ()),
        ]


def test_user_file_jsonl_skips_blank_lines(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"input": "a?", "output": "b"}\n\n   \n{"input": "c?", "output": "d"}\n')
    assert [e.answer for e in user_file("mine", path)("")] == ["b", "d"]


def test_user_file_errors(tmp_path):
    where = re.escape(str(tmp_path))
    missing = _write_rows(tmp_path / "missing.jsonl", [{"input": "q", "output": "a"}, {"input": "q2"}])
    with pytest.raises(ValueError, match=rf"{where}/missing\.jsonl: row 1: expected .*non-empty strings"):
        user_file("t", missing)("")
    blank = _write_rows(tmp_path / "blank.json", [{"input": "q", "output": "   "}], jsonl=False)
    with pytest.raises(ValueError, match=rf"{where}/blank\.json: row 0: expected"):
        user_file("t", blank)("")
    not_text = _write_rows(tmp_path / "num.jsonl", [{"input": "q", "output": 4}])
    with pytest.raises(ValueError, match=rf"{where}/num\.jsonl: row 0: expected"):
        user_file("t", not_text)("")
    not_dict = _write_rows(tmp_path / "list.jsonl", [["q", "a"]])
    with pytest.raises(ValueError, match=rf"{where}/list\.jsonl: row 0: expected"):
        user_file("t", not_dict)("")
    bad_line = tmp_path / "bad.jsonl"
    bad_line.write_text('{"input": "q", "output": "a"}\n{"input": "q2", "output": \n')
    with pytest.raises(ValueError, match=rf"{where}/bad\.jsonl:2: not valid JSON"):
        user_file("t", bad_line)("")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match=rf"{where}/empty\.jsonl: no rows"):
        user_file("t", empty)("")
    with pytest.raises(FileNotFoundError, match=rf"expected a data file at {where}/absent\.json"):
        user_file("t", tmp_path / "absent.json")("")


def test_user_file_malformed_json_list_names_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"input": "q", "output": "a"}, {"input": ]')
    with pytest.raises(ValueError, match=re.escape(str(path))):
        user_file("t", path)("")


def test_user_task_loads_without_benchmark_data(tmp_path, monkeypatch):
    monkeypatch.setenv("DLP_LORA_DATA", str(tmp_path / "no_benchmarks_here"))
    assert len(load_examples(_synthetic_task(tmp_path, 4))) == 4


# ---------------------------------------------------------------- splits (synthetic tasks, no data needed)


def test_load_examples_dedupes_by_prompt_keeping_the_first(tmp_path):
    rows = [
        {"input": "same?", "output": "first"},
        {"input": "other?", "output": "x"},
        {"input": "same?", "output": "second"},
    ]
    task = _user_task(_write_rows(tmp_path / "dup.jsonl", rows))
    got = load_examples(task, tmp_path)
    assert [(e.prompt, e.answer) for e in got] == [("same?", "first"), ("other?", "x")]


def test_user_task_named_like_a_builtin_loads_its_own_rows(tmp_path):
    # The built-in loader cache is keyed by name: a user task called "squad" must not be served SQuAD.
    task = _synthetic_task(tmp_path, 4, name="squad")
    assert [e.answer for e in load_examples(task, tmp_path)] == ["answer 0", "answer 1", "answer 2", "answer 3"]


def test_split_sizes_follow_the_config(tmp_path):
    task = _synthetic_task(tmp_path, 50)
    s = load_splits(task, tmp_path, SplitConfig(train_cap=10, dev_size=3, test_size=7))
    assert (len(s.train), len(s.dev), len(s.test), len(s.gate)) == (10, 3, 7, 30)  # the gate takes what is left
    assert len(load_splits(task, tmp_path, SplitConfig(train_cap=10, dev_size=3, test_size=7, gate_size=4)).gate) == 4
    # Defaults on 50 examples: test = min(200, 30% = 15), dev = min(50, 10% = 5), train = the other 30.
    s = load_splits(task, tmp_path, SplitConfig())
    assert (len(s.train), len(s.dev), len(s.test), len(s.gate)) == (30, 5, 15, 0)
    assert {e.uid for e in s.train + s.dev + s.test} == {f"synthetic/{i}" for i in range(50)}  # nothing lost
    s = load_splits(task, tmp_path, SplitConfig(dev_size=0, test_size=1))
    assert (len(s.train), len(s.dev), len(s.test)) == (49, 0, 1)


def test_three_examples_split_and_fewer_raise(tmp_path):
    s = load_splits(_synthetic_task(tmp_path, 3), tmp_path)
    assert (len(s.train), len(s.dev), len(s.test)) == (2, 0, 1)
    with pytest.raises(ValueError, match="task 'two': need at least 3 distinct examples to split, found 2"):
        load_splits(_synthetic_task(tmp_path, 2, name="two"), tmp_path)
    # Three rows but only two distinct prompts: duplicates do not count.
    rows = [{"input": "a?", "output": "1"}, {"input": "b?", "output": "2"}, {"input": "a?", "output": "3"}]
    with pytest.raises(ValueError, match="need at least 3 distinct examples to split, found 2"):
        load_splits(_user_task(_write_rows(tmp_path / "d.jsonl", rows), "dups"), tmp_path)


def test_split_seed_changes_the_split_and_name_too(tmp_path):
    task = _synthetic_task(tmp_path, 60)
    first = load_splits(task, tmp_path, SplitConfig(seed=0))
    again = load_splits(task, tmp_path, SplitConfig(seed=0))
    other = load_splits(task, tmp_path, SplitConfig(seed=1))
    assert [e.uid for e in first.test] == [e.uid for e in again.test]
    assert [e.uid for e in first.test] != [e.uid for e in other.test]
    renamed = _synthetic_task(tmp_path, 60, name="renamed")  # same rows, the seed is derived from the name
    assert [e.uid.split("/")[1] for e in load_splits(renamed, tmp_path).test] != [
        e.uid.split("/")[1] for e in first.test
    ]


# ---------------------------------------------------------------- the real benchmark files


def _check_mcq(ex: Example) -> None:
    k = len(ex.choices)
    assert k >= 2 and ex.choices == tuple(LETTERS[:k]), ex.uid
    assert ex.references == (ex.choices[ex.gold_index],) and ex.answer == ex.options[ex.gold_index], ex.uid
    assert len(ex.options) == k and all(ex.options), ex.uid
    assert ex.prompt.endswith("\n" + MCQ_INSTRUCTION) and "\nA. " in ex.prompt, ex.uid
    assert all(f"\n{letter}. " in ex.prompt for letter in ex.choices), ex.uid


def _check_qa(task: Task, ex: Example) -> None:
    assert ex.choices == () and ex.references and all(r.strip() for r in ex.references), ex.uid
    if task.metric == "numeric":  # the training target reads back as the reference number
        assert extract_number(ex.references[0]) != "", ex.uid
        assert extract_number(ex.answer) == extract_number(ex.references[0]), ex.uid
    else:  # a one-line target, read back unchanged and listed among the references
        assert parse_answer(task, ex.answer) == ex.answer and ex.answer in ex.references, ex.uid


@needs_data
@pytest.mark.parametrize("name", task_names())
def test_builtin_loader_on_real_files(name):
    task = get_task(name)
    examples = load_examples(task)
    assert len(examples) > 100
    if name == "bbh_snarks":
        assert len(examples) == 123  # 124 rows, one truncated mid-option in the source is dropped
    assert len({e.uid for e in examples}) == len({e.prompt for e in examples}) == len(examples)
    for ex in examples:
        assert ex.task == name and ex.uid.startswith(f"{name}/")
        _check_mcq(ex) if task.kind == "mcq" else _check_qa(task, ex)


@needs_data
@pytest.mark.parametrize("name", task_names())
def test_builtin_splits_disjoint_deterministic_and_capped(name):
    task = get_task(name)
    cfg = SplitConfig(train_cap=40, dev_size=10, test_size=30, gate_size=20)
    s = load_splits(task, cfg=cfg)
    again = load_splits(task, cfg=cfg)
    parts = (s.train, s.dev, s.test, s.gate)
    for key in ("uid", "prompt"):
        sets = [{getattr(e, key) for e in part} for part in parts]
        assert sum(map(len, sets)) == sum(map(len, parts)) == len(set().union(*sets)), key
    assert [[e.uid for e in p] for p in parts] == [
        [e.uid for e in p] for p in (again.train, again.dev, again.test, again.gate)
    ]
    assert (len(s.train), len(s.dev), len(s.test), len(s.gate)) == (40, 10, 30, 20)  # every task has > 100 examples
    reseeded = load_splits(task, cfg=SplitConfig(train_cap=40, dev_size=10, test_size=30, seed=1))
    assert [e.uid for e in reseeded.test] != [e.uid for e in s.test]


@needs_data
def test_pool_table_lists_every_task():
    table = pool_table()
    rows = [line for line in table.splitlines() if re.match(r"^\| \d+ \|", line)]
    assert len(rows) == 26
    assert [row.split("|")[2].strip() for row in rows] == task_names()
    assert "| squad | qa |" in table and "| bbh_snarks | mcq | bbh/snarks.json | 123 |" in table
    assert "26 tasks: 17 multiple choice, 9 question answering." in table.split("## Replaced tasks")[0]


@needs_data
@pytest.mark.parametrize("name", [n for n in task_names() if get_task(n).kind == "mcq"])
def test_no_answer_position_artifact(name):
    """No letter may carry most answers: TruthfulQA MC1 always lists the right answer first, so its options
    are shuffled per example; without that, "always A" would score 100%. (BoolQ's 62% "true" is its base rate.)"""
    from collections import Counter

    counts = Counter(ex.answer for ex in load_examples(get_task(name)))
    assert max(counts.values()) / sum(counts.values()) < 0.65, counts
