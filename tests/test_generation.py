"""GRIFFIN at the product surface: XSum loading and ROUGE, batched summaries, the classification-mode
lm-eval model, and the generate / bench / eval command lines."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import SHARED_DATA, has_shared_data, tiny_folder

from seap.cli import main
from seap.errors import DataError
from seap.evaluation.generation import evaluate_xsum, load_xsum, rouge_scores
from seap.inference.decoding import cut_at_stop, generate_texts
from seap.inference.griffin import GriffinSelection, classification_mode
from seap.model.loading import load_model

ARTICLES = [
    "The council voted to close the old bridge after engineers found cracks in its supports.",
    "A local bakery won a national prize for its sourdough, beating two hundred other entries.",
    "Heavy rain flooded several streets in the town centre on Tuesday night.",
    "Scientists said the new telescope had taken its first clear pictures of a distant galaxy.",
    "The football club announced that its manager would leave at the end of the season.",
]


def write_xsum(root, shots=1, rows=None):
    (root / "xsum").mkdir(parents=True, exist_ok=True)
    rows = rows if rows is not None else [
        {"article": f"###\nArticle: {a}\n\nSummarize the above article in 1 sentence.\n",
         "summary_gt": a.split(",")[0], "max_tokens": 6, "stop": ["###"]} for a in ARTICLES]
    path = root / "xsum" / f"xsum_{shots}shot.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_folder(tmp_path_factory.mktemp("gen"), "llama", max_position_embeddings=1024)


def test_rouge_matches_a_hand_count():
    # pred/ref share 5 of 6 unigrams, 3 of 5 bigrams, and an LCS of 5 ("the cat on the mat")
    got = rouge_scores(["the cat sat on the mat", "nothing alike"], ["the cat lay on the mat", "the cat"])
    assert got["rouge1"] == pytest.approx([5 / 6, 0.0])
    assert got["rouge2"] == pytest.approx([3 / 5, 0.0])
    assert got["rougeL"] == pytest.approx([5 / 6, 0.0])


def test_cut_at_stop_takes_the_earliest_stop():
    assert cut_at_stop("a summary.\n###\nArticle: more", ["###", "Article"]) == "a summary.\n"
    assert cut_at_stop("no stop here", ["###"]) == "no stop here"


def test_stop_strings_end_decoding_without_changing_the_text(folder):
    lm = load_model(str(folder))
    prompts = ["Hello there", "A longer prompt, yes", "x"]
    full, _ = generate_texts(lm, prompts, 16, selection=GriffinSelection(lm.adapter, 0.5))
    stop = [full[0][5:7], full[1][9:10]]  # strings that occur mid-way in the unstopped outputs
    cut, out = generate_texts(lm, prompts, 16, selection=GriffinSelection(lm.adapter, 0.5), stop=stop)
    assert cut == [cut_at_stop(t, stop) for t in full] and len(cut[0]) < len(full[0])


def test_load_xsum_errors_and_limit(tmp_path):
    with pytest.raises(DataError, match="no XSum prompts"):
        load_xsum(tmp_path, 1)
    write_xsum(tmp_path)
    assert len(load_xsum(tmp_path, 1, limit=2)) == 2
    (tmp_path / "xsum" / "xsum_0shot.jsonl").write_text('{"article": "x"\n')
    with pytest.raises(DataError, match="not JSON lines"):
        load_xsum(tmp_path, 0)
    write_xsum(tmp_path, 0, rows=[{"article": "x"}])
    with pytest.raises(DataError, match="summary_gt"):
        load_xsum(tmp_path, 0)


@pytest.mark.skipif(not has_shared_data(), reason="needs ../shared/data")
def test_shared_xsum_prompts_are_helm_rows():
    rows = load_xsum(SHARED_DATA, 1, limit=20)
    assert len(rows) == 20
    for r in rows:
        assert r["article"].rstrip().endswith(("in 1 sentence.", "in 1 sentences."))  # HELM writes "1 sentences"
        assert "###" in r["stop"] and r["summary_gt"].strip()


def test_batched_summaries_equal_each_alone_and_scores_are_their_rouge(tmp_path, folder):
    write_xsum(tmp_path)
    lm = load_model(str(folder))
    batched = evaluate_xsum(lm, data_dir=tmp_path, shots=1, limit=None, batch_size=3, density=0.5, progress=False)
    alone = evaluate_xsum(lm, data_dir=tmp_path, shots=1, limit=None, batch_size=1, density=0.5, progress=False)
    assert batched.n == 5 and batched.items == alone.items
    assert batched.meta["kept_fraction"] == pytest.approx(0.5, abs=0.02)
    assert batched.meta["union_fraction"] >= 0.5
    for key, values in batched.items.items():
        assert batched.rouge[key] == pytest.approx(sum(values) / len(values))
    sample = batched.samples[0]
    assert rouge_scores([sample["prediction"]], [sample["reference"]])["rougeL"][0] == batched.items["rougeL"][0]
    dense = evaluate_xsum(lm, data_dir=tmp_path, shots=1, limit=None, batch_size=3, progress=False)
    full = evaluate_xsum(lm, data_dir=tmp_path, shots=1, limit=None, batch_size=3, density=1.0, progress=False)
    assert [s["prediction"] for s in dense.samples] == [s["prediction"] for s in full.samples]


def test_classification_mode_lm_scores_like_a_direct_computation(folder):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from seap.evaluation.generation import make_classification_lm
    from seap.evaluation.harness import make_lm

    lm = load_model(str(folder))
    ctx, cont = "Question: Is water wet?\nAnswer:", " yes it is"
    req = Instance(request_type="loglikelihood", doc={}, arguments=(ctx, cont), idx=0)
    (got, _), = make_classification_lm(lm, 0.5).loglikelihood([req], disable_tqdm=True)
    (dense, _), = make_lm(lm.model, lm.tokenizer, batch_size=1).loglikelihood([req], disable_tqdm=True)
    # lm-eval scores ctx + cont[:-1]: the mode prunes the FFN of that input's last position only
    c, t = lm.tokenizer.encode(ctx), lm.tokenizer.encode(cont)
    ids = torch.tensor([c + t])
    with torch.no_grad(), classification_mode(lm.model, lm.adapter, 0.5):
        logits = lm.model(input_ids=ids[:, :-1]).logits[0, -len(t):]
    want = F.log_softmax(logits.float(), -1).gather(-1, torch.tensor(t)[:, None]).sum().item()
    assert got == pytest.approx(want, abs=1e-4) and abs(got - dense) > 1e-4


G = "griffin@0.5"  # the paper's pure GRIFFIN (--griffin-short none): exactly half of every layer
PURE = ["--griffin-short", "none"]


def test_generate_and_bench_cli_with_griffin(tmp_path, capsys, folder):
    args = ["generate", "--model", str(folder), "--json", "--max-new-tokens", "5", "Hello there", "A longer prompt, yes"]
    assert main(args) == 0
    dense = json.loads(capsys.readouterr().out)
    assert main(args + ["--griffin", "1.0"]) == 0
    full = json.loads(capsys.readouterr().out)
    assert [r["text"] for r in full] == [r["text"] for r in dense] and full[0]["expert"] == "griffin@1+density64"
    assert set(dense[0]) == set(full[0]) == {"prompt", "expert", "text", "chat_template", "kept_fraction",
                                             "confidence", "reason"}  # one row shape on every path
    assert dense[0]["kept_fraction"] == full[0]["kept_fraction"] == 1.0 and dense[0]["confidence"] is None
    assert main(args + ["--griffin", "0.5", *PURE]) == 0
    half = json.loads(capsys.readouterr().out)
    assert half[0]["kept_fraction"] == pytest.approx(0.5, abs=0.02) and half[0]["expert"] == G
    assert main(args + ["--griffin", "0.5"]) == 0  # the default: short prompts keep more (d + (1 - d) n0/(n + n0))
    fixed = json.loads(capsys.readouterr().out)
    assert fixed[0]["expert"] == "griffin@0.5+density64" and fixed[0]["kept_fraction"] > 0.8
    assert main(args + ["--griffin", "0.5", "--griffin-shared", *PURE]) == 0
    shared = json.loads(capsys.readouterr().out)
    assert shared[0]["expert"] == "griffin@0.5-shared" and shared[0]["kept_fraction"] == half[0]["kept_fraction"]
    assert main(args + ["--griffin", "1.5"]) == 2
    assert "density" in capsys.readouterr().err

    out = tmp_path / "b"
    assert main(["bench", "--model", str(folder), "--griffin", "0.5", *PURE, "--batch", "1", "--batch", "2",
                 "--prompt-len", "8", "--gen-len", "3", "--warmup", "0", "--repeats", "1", "--out", str(out)]) == 0
    rows = json.loads((out / "bench.json").read_text())["rows"]
    by = {(r["model"], r["batch"]): r for r in rows}
    assert set(by) == {("dense", 1), ("dense", 2), (G, 1), (G, 2)}
    for b in (1, 2):
        g, d = by[(G, b)], by[("dense", b)]
        assert 0.5 <= g["union_fraction"] <= 1 and d.get("union_fraction") is None
        assert g["bytes_limit"] > 1 == d["bytes_limit"]  # a step reads fewer bytes than dense
    assert by[(G, 1)]["union_fraction"] == pytest.approx(0.5, abs=0.02)
    # a bigger batch reads the union of more experts: no more saving than at batch 1
    assert by[(G, 2)]["bytes_limit"] <= by[(G, 1)]["bytes_limit"]
    assert f"| {G} | 1 |" in (out / "bench.md").read_text()
    # one shared expert per batch: a batch of two reads no more than one prompt's share
    assert main(["bench", "--model", str(folder), "--griffin", "0.5", "--griffin-shared", *PURE, "--batch", "2",
                 "--prompt-len", "8", "--gen-len", "3", "--warmup", "0", "--repeats", "1", "--out", str(out)]) == 0
    g = {r["model"]: r for r in json.loads((out / "bench.json").read_text())["rows"]}["griffin@0.5-shared"]
    assert g["union_fraction"] == by[(G, 1)]["union_fraction"]


def test_eval_cli_xsum_with_griffin(tmp_path, capsys, folder):
    pytest.importorskip("lm_eval")
    write_xsum(tmp_path)
    out = tmp_path / "ev"
    assert main(["eval", "--model", str(folder), "--tasks", "", "--data-dir", str(tmp_path), "--xsum", "4",
                 "--gen-batch-size", "2", "--griffin", "0.5", *PURE, "--out", str(out)]) == 0
    report = json.loads((out / "eval.json").read_text())["reports"][0]
    assert report["label"] == G and "not measured" in report["meta"]["perplexity"]
    gen = report["generation"]
    assert gen["n"] == 4 and gen["meta"]["density"] == 0.5 and gen["meta"]["shots"] == 1
    assert gen["rouge"]["rougeL"] == pytest.approx(sum(gen["items"]["rougeL"]) / 4)
    assert "XSum R-1 / R-2 / R-L" in (out / "eval.md").read_text() and gen["meta"]["batch_experts"] == "per sequence"
    assert main(["eval", "--model", str(folder), "--tasks", "", "--data-dir", str(tmp_path), "--xsum", "4",
                 "--gen-batch-size", "2", "--griffin", "0.5", "--griffin-shared", "--out", str(out)]) == 0
    report = json.loads((out / "eval.json").read_text())["reports"][0]
    assert report["label"] == "griffin@0.5-shared+density64" and report["generation"]["meta"]["batch_experts"] == "shared"
    assert report["generation"]["meta"]["union_fraction"] == report["generation"]["meta"]["kept_fraction"]
    capsys.readouterr()
    assert main(["eval", "--model", str(folder), "--tasks", "", "--xsum", "4", "--no-ppl",
                 "--out", str(tmp_path / "no")]) == 2
    assert "--data-dir" in capsys.readouterr().err
    assert main(["eval", "--model", str(folder), "--tasks", "", "--xsum", "4", "--data-dir", str(tmp_path),
                 "--plan", str(tmp_path), "--routed", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "not routed" in capsys.readouterr().err


def test_generate_applies_the_chat_template_unless_raw(tmp_path, capsys):
    from conftest import byte_level_tokenizer
    from transformers import AutoTokenizer

    folder = tiny_folder(tmp_path, "llama", max_position_embeddings=1024)
    tok = byte_level_tokenizer()
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    tok.save_pretrained(folder)
    templated = AutoTokenizer.from_pretrained(folder).apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True)
    assert templated == "<|user|>What is the capital of France?\n<|assistant|>"
    base = ["generate", "--model", str(folder), "--json", "--max-new-tokens", "6"]
    assert main(base + ["What is the capital of France?"]) == 0
    chat = json.loads(capsys.readouterr().out)[0]
    assert main(base + ["--raw", templated]) == 0  # the template by hand, sent raw: the same input
    by_hand = json.loads(capsys.readouterr().out)[0]
    assert main(base + ["--raw", "What is the capital of France?"]) == 0
    raw = json.loads(capsys.readouterr().out)[0]
    assert chat["chat_template"] and not raw["chat_template"] and chat["text"] == by_hand["text"]
    assert chat["prompt"] == "What is the capital of France?"
    assert main(base + ["--griffin", "0.5", "What is the capital of France?"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["chat_template"]
    # a model without a template: auto sends the text raw, --chat is refused in one line
    plain = tiny_folder(tmp_path / "plain", "llama", max_position_embeddings=1024)
    assert main(["generate", "--model", str(plain), "--json", "--max-new-tokens", "2", "hi"]) == 0
    assert not json.loads(capsys.readouterr().out)[0]["chat_template"]
    assert main(["generate", "--model", str(plain), "--chat", "--max-new-tokens", "2", "hi"]) == 2
    assert "no chat template" in capsys.readouterr().err
