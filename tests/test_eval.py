"""seap eval: parity with the lm-eval CLI, task YAML localisation, perplexities, plan protocols."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval", reason="seap eval needs the eval extra: pip install -e '.[eval]'")
import pandas as pd  # noqa: E402  (a dependency of datasets / lm-eval)
from conftest import SHARED_DATA, byte_level_tokenizer, has_shared_data, tiny_folder  # noqa: E402

from seap.cli import main
from seap.errors import ConfigError, DataError
from seap.evaluation.harness import (PAPER_METRIC, TaskScore, localize_yaml, paper_average, scored_split,
                                     write_task_folder, yaml_source)
from seap.evaluation.perplexity import token_perplexity
from seap.evaluation.runner import EvalConfig, evaluate_model, evaluate_plan
from seap.model.loading import load_model

PARITY_TASKS = ("piqa", "arc_easy", "winogrande")


def _fixture_rows() -> dict[str, list[dict]]:
    """A few rows per task in the Hugging Face layout, for machines without ../shared/data."""
    return {
        "piqa": [{"goal": f"How do I open jar {i}?", "sol1": "Twist the lid.", "sol2": "Paint the lid.",
                  "label": i % 2} for i in range(6)],
        "arc_easy": [{"id": str(i), "question": f"Which is a planet ({i})?",
                      "choices": {"text": ["Mars", "Moon", "Sun", "Comet"], "label": ["A", "B", "C", "D"]},
                      "answerKey": "A"} for i in range(6)],
        "winogrande": [{"sentence": f"The cup fell off the table because _ was wobbly {i}.", "option1": "the cup",
                        "option2": "the table", "answer": "2"} for i in range(6)],
    }


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    if has_shared_data():
        return SHARED_DATA
    root = tmp_path_factory.mktemp("data")
    for task, rows in _fixture_rows().items():
        (root / task).mkdir()
        pd.DataFrame(rows).to_parquet(root / task / "validation.parquet")
    return root


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    return tiny_folder(tmp_path_factory.mktemp("llama"), "llama", max_position_embeddings=1024)


def test_same_acc_as_the_lm_eval_cli(tmp_path, data_dir, llama_folder):
    """The acceptance check: seap eval (HFLM around the in-memory model) == `lm-eval run` on the folder."""
    tasks_dir = tmp_path / "tasks"
    write_task_folder(PARITY_TASKS, data_dir, tasks_dir)
    out = tmp_path / "lm_eval_out"
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args", f"pretrained={llama_folder}",
           "--tasks", ",".join(PARITY_TASKS), "--include_path", str(tasks_dir), "--limit", "6", "--batch_size", "4",
           "--device", "cpu", "--output_path", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    cli = json.loads(next(out.rglob("results_*.json")).read_text())["results"]

    lm = load_model(str(llama_folder))
    cfg = EvalConfig(tasks=PARITY_TASKS, data_dir=str(data_dir), limit=6, batch_size=4, token_ppl=False)
    report = evaluate_model(lm, cfg)
    for task in PARITY_TASKS:
        for metric in ("acc", "acc_norm"):
            if f"{metric},none" in cli[task]:
                assert report.scores[task].metrics[metric] == pytest.approx(cli[task][f"{metric},none"], abs=1e-12)
        assert report.scores[task].n == 6
        # per-item correctness on the paper metric averages to the reported metric
        items = report.items[task]
        metric = PAPER_METRIC[task] if PAPER_METRIC[task] in report.scores[task].metrics else "acc"
        assert sum(items) / len(items) == pytest.approx(report.scores[task].metrics[metric])


def test_localized_yaml_reads_local_files_and_scores_what_exists(tmp_path, data_dir):
    text, split = localize_yaml(yaml_source("arc_challenge" if has_shared_data() else "arc_easy"),
                                "arc_challenge" if has_shared_data() else "arc_easy", data_dir)
    assert split == "validation"  # upstream scores test; the offline copies have validation only
    assert "dataset_path: parquet" in text and "test_split: null" in text and "validation.parquet" in text
    assert "dataset_name: null" in text
    assert scored_split("arc_easy", None) == "test" and scored_split("piqa", None) == "validation"
    with pytest.raises(DataError, match="no boolq/ folder"):
        localize_yaml(yaml_source("boolq"), "boolq", tmp_path)
    (tmp_path / "boolq").mkdir()
    (tmp_path / "boolq" / "train.parquet").write_bytes(b"")
    with pytest.raises(DataError, match="none of the splits"):
        localize_yaml(yaml_source("boolq"), "boolq", tmp_path)
    with pytest.raises(ConfigError, match="unknown evaluation task"):
        yaml_source("hellaswagg")


def test_shipped_yamls_match_upstream_prompts():
    """Prompt, target and choice templates are upstream's (only the dataset lines may differ)."""
    import yaml

    import lm_eval

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: ("function", loader.construct_scalar(node)))
    root = Path(lm_eval.__file__).parent / "tasks"
    upstream = {"piqa": "piqa/piqa.yaml", "arc_easy": "arc/arc_easy.yaml", "openbookqa": "openbookqa/openbookqa.yaml",
                "hellaswag": "hellaswag/hellaswag.yaml"}
    for task, rel in upstream.items():
        ours = yaml.load(yaml_source(task), Loader)
        theirs = yaml.load((root / rel).read_text(), Loader)
        for key in ("doc_to_text", "doc_to_target", "doc_to_choice", "output_type"):
            assert ours[key] == theirs[key], (task, key)
    boolq = yaml.load(yaml_source("boolq"), Loader)
    assert boolq["doc_to_text"] == "{{passage}}\nQuestion: {{question}}?\nAnswer:"
    assert boolq["doc_to_choice"] == ["no", "yes"]


@pytest.mark.skipif(not has_shared_data(), reason="needs ../shared/data/wikitext2")
def test_wikitext_documents_and_detokenizer_match_upstream():
    import datasets

    from lm_eval.tasks.wikitext import preprocess_wikitext as upstream

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src" / "seap" / "evaluation" / "lm_eval_tasks"))
    import seap_task_utils as ours

    rows = pd.read_parquet(SHARED_DATA / "wikitext2" / "test.parquet")
    pages = ours.wikitext_pages(datasets.Dataset.from_pandas(rows))
    assert "".join(pages["page"]) == "".join(rows["text"])  # lossless regrouping
    assert len(pages) == 62  # the article count of wikitext_document_level's wikitext-2 test split
    assert all(p.startswith(" = ") for p in pages["page"])
    for doc in pages.select(range(5)):
        assert ours.wikitext_detokenizer(doc) == upstream.wikitext_detokenizer(doc)
        assert ours.wikitext_results(doc, (-3.0,)) == upstream.process_results(doc, (-3.0,))


def test_token_perplexity_equals_the_models_own_loss(llama_folder):
    lm = load_model(str(llama_folder))
    text = "The quick brown fox jumps over the lazy dog. " * 20
    ppl = token_perplexity(lm.model, lm.tokenizer, text, window=64, batch_size=3, progress=False)
    ids = lm.tokenizer(text, add_special_tokens=False).input_ids
    losses = []
    with torch.no_grad():
        for w in range(len(ids) // 64):
            chunk = torch.tensor([ids[w * 64:(w + 1) * 64]])
            losses.append(float(lm.model(input_ids=chunk, labels=chunk).loss))
    assert ppl.windows == len(losses) and ppl.tokens == 63 * len(losses)
    assert ppl.perplexity == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)
    with pytest.raises(ConfigError, match="exceeds"):
        token_perplexity(lm.model, lm.tokenizer, text, window=4096)
    with pytest.raises(DataError, match="fewer than one"):
        token_perplexity(lm.model, lm.tokenizer, "short", window=64)


def test_paper_average_and_its_standard_error():
    scores = {"piqa": TaskScore("piqa", {"acc": 0.6, "acc_norm": 0.7}, {"acc": 0.02, "acc_norm": 0.03}, 100, "v"),
              "boolq": TaskScore("boolq", {"acc": 0.5}, {"acc": 0.04}, 100, "v")}
    mean, se = paper_average(scores)
    assert mean == pytest.approx((0.7 + 0.5) / 2)  # acc_norm for PIQA, acc for BoolQ
    assert se == pytest.approx(math.sqrt(0.03 ** 2 + 0.04 ** 2) / 2)


def test_task_experts_answer_their_own_task(tmp_path, data_dir, llama_folder):
    """Protocol `task`: each task is scored by its own expert, others by the default (generic) one."""
    from seap import CalibrationData, PruneConfig, collect
    from seap.model.fingerprints import fingerprint
    from seap.pruning.plan import build_plan
    from seap.pruning.surgery import sliced

    lm = load_model(str(llama_folder))
    stats = collect(lm, CalibrationData(("default:science_qa", "default:physical_commonsense"), limit=8), progress=False)
    stats = {"piqa": stats["default:physical_commonsense"], "other": stats["default:science_qa"]}
    plan = build_plan(lm.model, lm.adapter, PruneConfig(ratio=0.3), stats, base_model="tiny", revision=None,
                      fingerprint=fingerprint(lm.model, lm.adapter))
    cfg = EvalConfig(tasks=("piqa", "arc_easy"), data_dir=str(data_dir), limit=4, batch_size=4, token_ppl=False)
    report = evaluate_plan(lm, plan, cfg, experts="task")
    assert report.experts == {"piqa": "piqa", "arc_easy": "generic"}
    alone = evaluate_model(sliced(lm, plan, "piqa"), EvalConfig(tasks=("piqa",), data_dir=str(data_dir),
                                                                      limit=4, batch_size=4, token_ppl=False))
    assert report.scores["piqa"].metrics == alone.scores["piqa"].metrics
    # the base model stayed dense
    assert lm.adapter.d_ff(lm.adapter.layers(lm.model)[3]) == 64


def test_eval_cli_and_bad_input(tmp_path, capsys, data_dir, llama_folder):
    out = tmp_path / "ev"
    assert main(["eval", "--model", str(llama_folder), "--tasks", "piqa", "--limit", "3", "--batch-size", "2",
                 "--data-dir", str(data_dir), "--no-ppl", "--out", str(out)]) == 0
    data = json.loads((out / "eval.json").read_text())
    assert data["reports"][0]["tasks"]["piqa"]["n"] == 3
    assert "piqa (acc_norm)" in (out / "eval.md").read_text()
    capsys.readouterr()
    assert main(["eval", "--model", str(llama_folder), "--tasks", "piqa,sciq", "--out", str(tmp_path / "x")]) == 2
    assert "unknown accuracy task" in capsys.readouterr().err
    assert main(["eval", "--model", str(llama_folder), "--tasks", "piqa", "--data-dir", str(tmp_path / "nope"),
                 "--no-ppl", "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err
    assert not (tmp_path / "y").exists()


def test_byte_tokenizer_is_what_the_folder_holds(llama_folder):
    # guards the parity test: both sides must tokenise identically
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(llama_folder)("abc").input_ids == byte_level_tokenizer()("abc").input_ids


def test_eval_cli_with_a_plan_uses_its_generic_expert(tmp_path, capsys, data_dir, llama_folder):
    plan_out = tmp_path / "p"
    assert main(["prune", "--model", str(llama_folder), "--task", "default:science_qa",
                 "--task", "default:general_text", "--ratio", "0.3", "--limit", "6", "--out", str(plan_out)]) == 0
    out = tmp_path / "ev"
    ppl = ["--ppl-window", "64", "--ppl-windows", "1"] if has_shared_data() else ["--no-ppl"]  # WikiText is there
    assert main(["eval", "--model", str(llama_folder), "--plan", str(plan_out / "plan"), "--experts", "generic",
                 "--tasks", "piqa", "--limit", "3", "--data-dir", str(data_dir), *ppl, "--out", str(out)]) == 0
    rep = json.loads((out / "eval.json").read_text())["reports"][0]
    assert rep["experts"] == {"piqa": "generic"} and rep["meta"]["achieved_ratio"] == pytest.approx(0.3, abs=0.02)
    if has_shared_data():
        assert rep["token_perplexity"]["window"] == 64 and rep["token_perplexity"]["windows"] == 1
    capsys.readouterr()
    other = tiny_folder(tmp_path / "other", "llama", max_position_embeddings=1024, hidden_size=48)
    assert main(["eval", "--model", str(other), "--plan", str(plan_out / "plan"), "--tasks", "piqa",
                 "--no-ppl", "--out", str(tmp_path / "z")]) == 2
    assert "seap: error:" in capsys.readouterr().err
