"""Tests for seap.tasks: task formats against raw rows, limits, user files, embedded corpus."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from seap import tasks
from seap.errors import ConfigError, DataError
from seap.tasks import (
    DEFAULT_CORPORA,
    TASK_NAMES,
    TASKS,
    Corpus,
    corpus_from_rows,
    default_corpora,
    load_default_corpus,
    load_file_corpus,
    load_task_corpus,
    resolve_corpus,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(
    not DATA.is_dir(), reason=f"offline benchmark data not found at {DATA} (../shared/data)"
)


# ---------------------------------------------------------------- independent formatting
# Written out from lm-evaluation-harness's doc_to_text / gold target, not from seap.tasks.


def _gold_choice(row: dict) -> str:
    return dict(zip(row["choices"]["label"], row["choices"]["text"]))[row["answerKey"]]


def _winogrande_expected(row: dict) -> tuple[str, str]:
    s, option = row["sentence"], row["option" + row["answer"]]
    i = s.index("_")
    return s[:i] + option, " " + s[i + 1 :].strip()


EXPECTED = {
    "piqa": lambda r: (f"Question: {r['goal']}\nAnswer:", " " + [r["sol1"], r["sol2"]][r["label"]]),
    "boolq": lambda r: (
        f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:", " yes" if r["answer"] else " no"
    ),
    "arc_easy": lambda r: (f"Question: {r['question']}\nAnswer:", " " + _gold_choice(r)),
    "arc_challenge": lambda r: (f"Question: {r['question']}\nAnswer:", " " + _gold_choice(r)),
    "openbookqa": lambda r: (r["question_stem"], " " + _gold_choice(r)),
    "winogrande": _winogrande_expected,
    "gsm8k": lambda r: (f"Question: {r['question']}\nAnswer:", " " + r["answer"]),
}
# task -> (calibration split, other split)
SPLITS = {
    "piqa": ("train", "validation"),
    "boolq": ("train", "validation"),
    "arc_easy": ("train", "validation"),
    "arc_challenge": ("train", "validation"),
    "openbookqa": ("train", "validation"),
    "winogrande": ("train", "validation"),
    "gsm8k": ("train", "test"),
}


def _raw_rows(task: str, split: str) -> list[dict]:
    folder = DATA / task
    if (folder / f"{split}.parquet").is_file():
        return pq.read_table(folder / f"{split}.parquet").to_pylist()
    with open(folder / f"{split}.jsonl", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def test_task_registry() -> None:
    assert TASK_NAMES == ("piqa", "boolq", "arc_easy", "arc_challenge", "openbookqa",
                          "winogrande", "hellaswag", "gsm8k", "mmlu", "wikitext2")
    assert set(TASKS) == set(TASK_NAMES)
    for spec in TASKS.values():
        assert spec.calibration_split in spec.splits


@needs_data
@pytest.mark.parametrize("task", sorted(EXPECTED))
def test_local_task_first_row_and_limit(task: str) -> None:
    calib, other = SPLITS[task]
    # First raw row of the non-default split, read independently with pyarrow / json.
    raw = _raw_rows(task, other)
    full = load_task_corpus(task, data_dir=DATA, split=other)
    prompt, answer = EXPECTED[task](raw[0])
    assert full.prompts[0] == prompt
    assert full.texts[0] == prompt + answer
    assert len(full) == len(full.prompts) == len(raw)  # no row of the real data is skipped
    ext = ".jsonl" if task == "gsm8k" else ".parquet"
    assert full.source == f"local:{(DATA / task / other).resolve()}{ext}"

    # Default (calibration) split with a limit: every text is some raw row, formatted exactly.
    rows = _raw_rows(task, calib)
    expected = {EXPECTED[task](r) for r in rows}
    small = load_task_corpus(task, data_dir=DATA, limit=7, seed=3)
    assert small.name == task and len(small) == 7 and len(small.prompts) == 7
    for p, t in zip(small.prompts, small.texts):
        assert (p, t[len(p):]) in expected
        assert t[len(p):].startswith(" ")


@needs_data
def test_winogrande_reads_as_filled_sentence() -> None:
    rows = _raw_rows("winogrande", "validation")
    c = load_task_corpus("winogrande", data_dir=DATA, split="validation")
    for row, text in zip(rows, c.texts):
        filled = row["sentence"].replace("_", row["option" + row["answer"]])
        if "_  " in row["sentence"]:  # lm-eval strips the doubled space after the blank
            assert text.split() == filled.split()
        else:
            assert text == filled


@needs_data
def test_arc_numeric_labels() -> None:
    rows = _raw_rows("arc_easy", "train")
    row = next(r for r in rows if list(r["choices"]["label"]) == ["1", "2", "3", "4"])
    gold = row["choices"]["text"][int(row["answerKey"]) - 1]
    expected = (f"Question: {row['question']}\nAnswer:", " " + gold)
    assert TASKS["arc_easy"].to_example(row) == expected


@needs_data
def test_wikitext2_chunks() -> None:
    raw = "".join(pq.read_table(DATA / "wikitext2" / "test.parquet").column("text").to_pylist())
    c = load_task_corpus("wikitext2", data_dir=DATA)
    assert c.prompts == ()
    assert "".join(c.texts) == raw  # lossless, cut only at line ends
    assert c.texts[0].startswith(" = Robert Boulter = \n Robert Boulter is")
    lengths = sorted(len(t) for t in c.texts)
    assert lengths[-1] <= 2000
    assert 1200 <= lengths[len(lengths) // 2] <= 2000
    assert all(t.endswith(("\n", ". ")) for t in c.texts)  # line or sentence ends
    few = load_task_corpus("wikitext2", data_dir=DATA, limit=4, seed=1)
    assert len(few) == 4 and set(few.texts) <= set(c.texts)


@needs_data
def test_limit_determinism_local() -> None:
    a = load_task_corpus("piqa", data_dir=DATA, limit=10, seed=0)
    b = load_task_corpus("piqa", data_dir=DATA, limit=10, seed=0)
    c = load_task_corpus("piqa", data_dir=DATA, limit=10, seed=1)
    assert a == b
    assert a.texts != c.texts


# ---------------------------------------------------------------- in-memory rows


def test_hellaswag_format() -> None:
    row = {
        "activity_label": "Roof shingle removal",
        "ctx_a": "A man is sitting on a roof.",
        "ctx_b": "he",
        "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                    "is holding a rubik's cube.", "starts pulling up roofing on a roof."],
        "label": "3",
    }
    assert TASKS["hellaswag"].to_example(row) == (
        "Roof shingle removal: A man is sitting on a roof. He",
        " starts pulling up roofing on a roof.",
    )
    wikihow = {
        "activity_label": "Home and Garden",
        "ctx_a": "[header] How to clean a grill [title] Heat the grill.",
        "ctx_b": "",
        "endings": ["[step] Scrub the grates with a brush.", "x", "y", "z"],
        "label": "0",
    }
    # lm-eval keeps the space left where "[step]" was, so the target has two spaces.
    assert TASKS["hellaswag"].to_example(wikihow) == (
        "Home and Garden: How to clean a grill. Heat the grill.",
        "  Scrub the grates with a brush.",
    )


def test_hellaswag_unlabelled_rows_skipped(caplog: pytest.LogCaptureFixture) -> None:
    good = {"activity_label": "A", "ctx_a": "b.", "ctx_b": "c", "endings": ["d", "e"], "label": "1"}
    with caplog.at_level(logging.WARNING, logger="seap.tasks"):
        c = corpus_from_rows("hellaswag", [good, {**good, "label": ""}])
    assert c.texts == ("A: b. C e",)
    assert "skipped 1 of 2" in caplog.text
    with pytest.raises(DataError, match="no usable examples"):
        corpus_from_rows("hellaswag", [{**good, "label": ""}])


def test_mmlu_format() -> None:
    row = {"question": " What is 2 + 2? \n", "subject": "elementary_mathematics",
           "choices": ["3", "4", "5", "22"], "answer": 1}
    assert TASKS["mmlu"].to_example(row) == (
        "What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer:", " B"
    )
    c = corpus_from_rows("mmlu", [row, {**row, "answer": 7}])  # bad gold is skipped
    assert c.texts == ("What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer: B",)


def test_winogrande_edge_cases() -> None:
    to_example = TASKS["winogrande"].to_example
    row = {"sentence": "Ann helped Bo because _  was tired.", "option1": "Ann", "option2": "Bo",
           "answer": "2"}
    assert to_example(row) == ("Ann helped Bo because Bo", " was tired.")
    glued = {**row, "sentence": "Ann took Bo's car because _'s car broke.", "answer": "1"}
    assert to_example(glued) == ("Ann took Bo's car because Ann's", " car broke.")


def _gsm_rows(n: int) -> list[dict]:
    return [{"question": f"q{i}", "answer": f"a{i}\n#### {i}"} for i in range(n)]


def test_limit_determinism_in_memory() -> None:
    rows = _gsm_rows(50)
    a = corpus_from_rows("gsm8k", rows, limit=10, seed=0)
    assert a == corpus_from_rows("gsm8k", rows, limit=10, seed=0)
    assert a.texts != corpus_from_rows("gsm8k", rows, limit=10, seed=1).texts
    assert set(corpus_from_rows("gsm8k", rows, limit=5, seed=0).texts) <= set(a.texts)
    order = [int(p.split("\n")[0].removeprefix("Question: q")) for p in a.prompts]
    assert order == sorted(order)  # subset keeps dataset order
    assert len(corpus_from_rows("gsm8k", rows, limit=500)) == 50
    with pytest.raises(ConfigError, match="--limit"):
        corpus_from_rows("gsm8k", rows, limit=0)


# ---------------------------------------------------------------- local-folder errors


def _write_parquet(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def test_missing_data_dir(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist: pass --data-dir"):
        load_task_corpus("piqa", data_dir=tmp_path / "nope")


def test_missing_task_folder(tmp_path: Path) -> None:
    (tmp_path / "boolq").mkdir()
    with pytest.raises(DataError, match=r"has no piqa/ folder \(it has: boolq\)"):
        load_task_corpus("piqa", data_dir=tmp_path)


def test_missing_split(tmp_path: Path) -> None:
    row = {"goal": "g", "sol1": "a", "sol2": "b", "label": 0}
    _write_parquet(tmp_path / "piqa" / "validation.parquet", [row])
    with pytest.raises(DataError, match="no 'train' split.*validation.parquet") as err:
        load_task_corpus("piqa", data_dir=tmp_path)
    assert "--split with one of validation" in str(err.value)
    c = load_task_corpus("piqa", data_dir=tmp_path, split="validation")
    assert c.texts == ("Question: g\nAnswer: a",)


def test_hub_split_not_available() -> None:
    with pytest.raises(DataError, match="no labelled split 'test'.*train, validation"):
        load_task_corpus("piqa", split="test")  # rejected before any network access


def test_malformed_and_bad_layout_rows(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = [{"goal": "g", "sol1": "a", "sol2": "b", "label": 1},
            {"goal": "h", "sol1": "c", "sol2": "d", "label": -1}]
    _write_parquet(tmp_path / "piqa" / "train.parquet", rows)
    with caplog.at_level(logging.WARNING, logger="seap.tasks"):
        c = load_task_corpus("piqa", data_dir=tmp_path)
    assert c.texts == ("Question: g\nAnswer: b",) and "skipped 1 of 2" in caplog.text
    _write_parquet(tmp_path / "boolq" / "train.parquet", [{"q": "x"}])
    with pytest.raises(DataError, match="lacks columns"):
        load_task_corpus("boolq", data_dir=tmp_path)


def test_unknown_task() -> None:
    with pytest.raises(DataError, match="did you mean 'piqa'") as err:
        load_task_corpus("piqaa")
    assert "arc_challenge" in str(err.value) and ".jsonl" in str(err.value)
    with pytest.raises(DataError, match="unknown task or corpus 'nonsense'"):
        resolve_corpus("nonsense")
    with pytest.raises(DataError, match="science_qa"):
        resolve_corpus("default:nope")


# ---------------------------------------------------------------- user files


def test_txt_file(tmp_path: Path) -> None:
    f = tmp_path / "notes.txt"
    f.write_text("First block\nstill first.\n\n\n  Second block.  \n \nThird.\n", encoding="utf-8")
    c = resolve_corpus(str(f))
    assert c.texts == ("First block\nstill first.", "Second block.", "Third.")
    assert c.prompts == () and c.name == "notes" and c.source == f"file:{f.resolve()}"
    assert len(load_file_corpus(f, limit=2)) == 2


def test_jsonl_and_json_files(tmp_path: Path) -> None:
    rows = [{"text": "raw text"}, {"prompt": "Q: x?\nA:", "answer": " y"}, {"text": "  "}]
    f = tmp_path / "mix.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    c = load_file_corpus(f)
    assert c.texts == ("raw text", "Q: x?\nA: y") and c.prompts == ("Q: x?\nA:",)
    g = tmp_path / "mix.json"
    g.write_text(json.dumps(rows), encoding="utf-8")
    assert load_file_corpus(g).texts == c.texts


def test_file_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n", encoding="utf-8")
    with pytest.raises(DataError, match="holds no texts"):
        load_file_corpus(empty)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        load_file_corpus(bad)
    neither = tmp_path / "neither.jsonl"
    neither.write_text('{"text": "ok"}\n{"question": "q"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r'line 2 has neither "text" nor "prompt"/"answer"'):
        load_file_corpus(neither)
    with pytest.raises(DataError, match="does not exist"):
        resolve_corpus(str(tmp_path / "missing.jsonl"))
    csv = tmp_path / "x.csv"
    csv.write_text("a,b\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"unsupported corpus file.*\.txt.*\.jsonl.*\.json"):
        resolve_corpus(str(csv))
    with pytest.raises(DataError, match="corpus 'x'.*no texts"):
        Corpus(name="x", texts=(), source="test")


# ---------------------------------------------------------------- embedded corpus


def test_default_corpora() -> None:
    fams = default_corpora()
    assert tuple(fams) == DEFAULT_CORPORA == (
        "science_qa", "physical_commonsense", "reading_yesno", "math_word", "general_text")
    for name, c in fams.items():
        assert c.name == name and len(c) > 0 and c.source == f"embedded:{name}"
        assert all(t.strip() for t in c.texts)
    assert fams["general_text"].prompts == ()
    assert len(fams["science_qa"].prompts) == len(fams["science_qa"])
    merged = resolve_corpus("default")
    assert merged.name == "default"
    assert merged.texts == tuple(t for c in fams.values() for t in c.texts)
    assert merged.prompts == tuple(p for c in fams.values() for p in c.prompts)
    assert resolve_corpus("default:math_word") == load_default_corpus("math_word")
    assert len(resolve_corpus("default", limit=5, seed=2)) == 5
    assert tasks.load_default_corpus("science_qa").texts[0].startswith(
        tasks.load_default_corpus("science_qa").prompts[0])


def test_the_registry_is_the_one_task_list():
    """Every task list derives from TASKS: the suite, the scored tasks and their metrics, and each scored
    task's shipped lm-eval YAML names the task and lists the metric that enters the paper's average."""
    from importlib import resources

    from seap import EvalConfig
    from seap.tasks import ACCURACY_TASKS, EVAL_TASKS, PAPER_METRIC, SUITE

    assert SUITE == ("piqa", "boolq", "arc_easy", "arc_challenge", "openbookqa", "winogrande")
    assert EvalConfig().tasks == SUITE
    assert set(SUITE) <= set(ACCURACY_TASKS) == set(PAPER_METRIC)
    for name, spec in EVAL_TASKS.items():
        text = resources.files("seap.evaluation").joinpath("lm_eval_tasks", f"{name}.yaml").read_text()
        assert f"\ntask: {name}\n" in text
        if spec.metric:
            assert f"- metric: {spec.metric}\n" in text
        assert spec.name in TASKS and TASKS[spec.name] is spec
    assert EVAL_TASKS["wikitext"].data_folder == "wikitext2"


def _grams(text: str, n: int = 13) -> set[tuple[str, ...]]:
    words = re.findall(r"[a-z0-9]+", text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def test_the_embedded_corpus_shares_no_thirteen_words_with_a_scored_split():
    """The default calibration must not hold the items it is judged on: no run of 13 words of the embedded
    corpus occurs in a validation split of the scored tasks (their prompts and gold answers). 13 words is
    the contamination test of the GPT-3 paper: shorter runs match common phrases ("any part of the body
    except the hands" is in the corpus's football paragraph and in a BoolQ passage)."""
    from conftest import SHARED_DATA, has_shared_data

    if not has_shared_data():
        pytest.skip(f"no shared data at {SHARED_DATA}")
    ours = set().union(*(_grams(t) for t in resolve_corpus("default").texts))
    for task in (t for t in tasks.ACCURACY_TASKS if (SHARED_DATA / t).is_dir()):
        scored = resolve_corpus(task, data_dir=SHARED_DATA, split="validation")
        shared = ours & set().union(*(_grams(t) for t in scored.texts))
        assert not shared, f"{task}: {sorted(shared)[:3]}"
