"""seap bench: the lean decode loop equals generate(), bytes accounting, a smoke run (no timing asserts)."""

import json

import pytest
import torch
from conftest import FAMILIES, make_loaded, tiny_folder

from seap import PruneConfig
from seap.cli import main
from seap.errors import ConfigError
from seap.evaluation.bench import (BenchConfig, repeat_batch, bench_models, decode_step_bytes, decode_weight_bytes,
                        kv_bytes_per_position, speed_markdown, speed_table, text_prompts)
from seap.inference.decoding import greedy
from seap.model.fingerprints import fingerprint
from seap.pruning.plan import build_plan
from seap.pruning.surgery import sliced, weight_bytes


def _plan(lm, ratio=0.5):
    cfg = PruneConfig.from_method("magnitude", ratio=ratio, heads="none")
    return build_plan(lm.model, lm.adapter, cfg, {"t": None}, base_model="tiny", revision=None,
                      fingerprint=fingerprint(lm.model, lm.adapter))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_decode_equals_generate(family):
    lm = make_loaded(family, vocab_size=128)
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    out = greedy(lm.model, ids, 6)
    tokens, t_prefill, t_decode, kv = out.tokens, out.prefill_s, out.decode_s, out.kv_cache_bytes
    ref = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6,
                            do_sample=False, pad_token_id=0)
    assert torch.equal(tokens, ref[:, ids.size(1):])
    assert t_prefill > 0 and t_decode > 0
    # the cache holds keys and values for every position but the last generated token
    assert kv == (ids.size(1) + 5) * ids.size(0) * kv_bytes_per_position(lm.model, lm.adapter)


def test_bytes_accounting_is_independent_of_the_code_under_test():
    lm = make_loaded("llama", vocab_size=128)  # tied embeddings: the LM head reads the table
    m = lm.model
    total = sum(p.numel() for p in m.parameters()) * 4
    assert weight_bytes(m) == total
    assert decode_weight_bytes(m) == total
    untied = make_loaded("llama", vocab_size=128, tie_word_embeddings=False).model
    emb = untied.get_input_embeddings().weight.numel() * 4
    assert decode_weight_bytes(untied) == sum(p.numel() for p in untied.parameters()) * 4 - emb
    # 6 layers x (k + v) x 2 KV heads x head_dim 8 x 4 bytes
    assert kv_bytes_per_position(m, lm.adapter) == 6 * 2 * 2 * 8 * 4
    pruned = sliced(lm, _plan(lm), None)
    removed = sum(3 * 32 * (64 - lm.adapter.d_ff(layer)) for layer in lm.adapter.layers(pruned.model)) * 4
    assert decode_weight_bytes(pruned.model) == total - removed
    assert decode_step_bytes(m, lm.adapter, 2, 10) == total + 2 * 10 * kv_bytes_per_position(m, lm.adapter)


def test_bench_models_reports_ratios_to_the_dense_model():
    lm = make_loaded("gemma3", vocab_size=128)
    pruned = sliced(lm, _plan(lm), None)
    cfg = BenchConfig(prompt_len=8, gen_len=4, batch_sizes=(1, 2), warmup=0, repeats=2)
    speeds = bench_models({"dense": lm, "pruned": pruned}, cfg, progress=False)
    rows = speed_table(speeds, "dense")
    assert [(r["model"], r["batch"]) for r in rows] == [("dense", 1), ("dense", 2), ("pruned", 1), ("pruned", 2)]
    for r in rows:
        assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0
        assert len(speeds[r["model"]].results[r["batch"]].decode_runs) == 2
    dense1 = rows[0]
    assert dense1["decode_ratio"] == 1.0 and dense1["bytes_limit"] == 1.0
    pruned1 = rows[2]
    assert pruned1["bytes_limit"] == pytest.approx(
        speeds["dense"].decode_bytes[1] / speeds["pruned"].decode_bytes[1])
    assert pruned1["bytes_limit"] > 1
    assert "| pruned | 1 |" in speed_markdown(rows)


def test_bench_config_validation():
    with pytest.raises(ConfigError, match="`gen_len` >= 2"):
        BenchConfig(gen_len=1)
    with pytest.raises(ConfigError, match="`batch_sizes` must be >= 1"):
        BenchConfig(batch_sizes=(0,))
    with pytest.raises(ConfigError, match="unknown `decode_path`"):
        BenchConfig(decode_path="vllm")


def test_bench_cli_dense_vs_pruned_folder(tmp_path, capsys):
    folder = tiny_folder(tmp_path, "llama")
    assert main(["prune", "--model", str(folder), "--method", "magnitude", "--ratio", "0.5",
                 "--out", str(tmp_path / "p")]) == 0
    out = tmp_path / "b"
    assert main(["bench", "--model", str(folder), "--compare", str(tmp_path / "p" / "model"),
                 "--plan", f"{tmp_path / 'p' / 'plan'}", "--batch", "1", "--prompt-len", "8", "--gen-len", "3",
                 "--warmup", "0", "--repeats", "1", "--out", str(out)]) == 0
    data = json.loads((out / "bench.json").read_text())
    names = [r["model"] for r in data["rows"]]
    assert names[:2] == ["dense", "model"] and names[2].startswith("magnitude@0.5:") and len(names) == 3
    # the folder and the plan applied in memory are the same model: same bytes
    assert data["rows"][1]["bytes_limit"] == pytest.approx(data["rows"][2]["bytes_limit"])
    capsys.readouterr()
    assert main(["bench", "--model", str(folder), "--plan", str(tmp_path / "nope"), "--out", str(tmp_path / "c")]) == 2
    assert "not a plan folder" in capsys.readouterr().err


def test_text_prompts_take_the_first_tokens_of_long_enough_texts(tmp_path, capsys):
    from seap.model.loading import load_model

    lm = load_model(str(tiny_folder(tmp_path, "llama")))
    texts = ["abcdefghij", "short", "0123456789xyz"]
    pool = text_prompts(lm.tokenizer, texts, 8)
    assert pool.tolist() == [lm.tokenizer("abcdefgh")["input_ids"], lm.tokenizer("01234567")["input_ids"]]
    # repeats walk through the pool, wrapping around
    assert repeat_batch(pool, 3, 1, "cpu").tolist() == [pool[1].tolist(), pool[0].tolist(), pool[1].tolist()]
    with pytest.raises(ConfigError, match="reaches 20 tokens"):
        text_prompts(lm.tokenizer, texts, 20)
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n\n".join(t * 3 for t in texts))
    assert main(["bench", "--model", str(tmp_path / "tiny-llama"), "--griffin", "0.5", "--prompts", str(prompts),
                 "--batch", "2", "--prompt-len", "8", "--gen-len", "3", "--warmup", "0", "--repeats", "1",
                 "--out", str(tmp_path / "b")]) == 0
    data = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert data["config"]["prompts"] == str(prompts)
    assert [r["model"] for r in data["rows"]] == ["dense", "griffin@0.5+density64"]
    assert data["config"]["chat_template"] is False


def test_chat_prompts_for_the_bench_end_where_the_answer_starts():
    from conftest import byte_level_tokenizer

    tok = byte_level_tokenizer()
    tok.chat_template = "{% for m in messages %}<u>{{ m['content'] }}{% endfor %}<a>"
    pool = text_prompts(tok, ["a long enough prompt text", "tiny"], 12, chat=True)
    want = tok("<u>a long enough prompt text<a>", add_special_tokens=False)["input_ids"][-12:]
    assert pool.tolist() == [want]  # "tiny" wrapped is 11 tokens: too short for 12
