"""Every --method through the CLI on a tiny OPT folder (MHA heads, biases), then info and reload."""

import json

import pytest
import torch
from conftest import tiny_folder

from seap.cli import main
from seap.config import PRESETS
from seap.model.loading import load_model


@pytest.fixture(scope="module")
def opt_folder(tmp_path_factory):
    return tiny_folder(tmp_path_factory.mktemp("opt"), "opt", num_hidden_layers=8)


@pytest.mark.parametrize("method", list(PRESETS))
def test_every_method_on_tiny_opt(tmp_path, capsys, opt_folder, method):
    out = tmp_path / "o"
    assert main(["prune", "--model", str(opt_folder), "--method", method, "--ratio", "0.4", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "total parameters:" in text and "heads kept per layer" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["achieved_ratio"] == pytest.approx(0.4, abs=0.01)
    assert summary["params_after"] < summary["params_before"]
    lm = load_model(str(out / "model"))
    # The reloaded parameter count is the one the summary reported.
    assert sum(p.numel() for p in lm.model.parameters()) == summary["params_after"]
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    assert torch.isfinite(lm.model(ids).logits).all()
    assert main(["info", str(out / "model"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == method and info["ffn_widths"] == summary["ffn_widths"]


def test_config_errors_name_fields_and_the_cli_shows_flags(capsys):
    """Validation lives in the configs, whose errors name fields; the command line shows its own flags."""
    from seap import CalibrationData, PruneConfig
    from seap.errors import ConfigError

    with pytest.raises(ConfigError, match="`refit_choice` obs needs `reconstruct` refit or sequential"):
        PruneConfig().with_(refit_choice="obs")
    with pytest.raises(ConfigError, match="`batch_size` must be >= 1"):
        CalibrationData(batch_size=0)
    from seap import EvalConfig, RouterConfig
    from seap.evaluation.bench import BenchConfig

    with pytest.raises(ConfigError, match="`xsum_shots` 0 or 1"):
        EvalConfig(xsum_shots=2)
    with pytest.raises(ConfigError, match="`batch_sizes` must be >= 1"):
        BenchConfig(batch_sizes=(0,))
    with pytest.raises(ConfigError, match="`ood_quantile` must be in"):
        RouterConfig(ood_quantile=0.1)
    for argv, want in ((["prune", "--reconstruct", "none", "--refit-choice", "obs"],
                        "--refit-choice obs needs --reconstruct refit or sequential"),
                       (["prune", "--multiple", "0"], "--multiple must be a positive integer"),
                       (["collect", "--batch-size", "0"], "--batch-size must be >= 1"),
                       (["prune", "--task", "piqa", "--task", "piqa"], "named twice"),
                       (["eval", "--batch-size", "0"], "--batch-size must be >= 1"),
                       (["eval", "--tasks", "nope"], "--tasks: unknown accuracy task(s) ['nope']"),
                       (["bench", "--batch", "0"], "--batch must be >= 1"),
                       (["bench", "--repeats", "0"], "--repeats must be >= 1 and --warmup >= 0"),
                       (["route", "fit", "--plan", "x", "--threshold", "1.5"], "router --threshold must be in [0, 1)")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("seap: error: ") and want in err and "`" not in err, err


def test_prune_config_is_composed_and_reads_flat_records():
    """The presets are PruneConfig values of validated parts; flat keywords route to their part; a plan's
    record reads back as the same config, and so does the flat record of plans written before."""
    from dataclasses import replace

    from seap import AllocationConfig, PruneConfig, RefitConfig, ScoreConfig
    from seap.errors import ConfigError

    assert all(isinstance(p, PruneConfig) and p.method == name for name, p in PRESETS.items())
    cfg = PruneConfig.from_method("flap", ratio=0.3, ridge=0.1, reconstruct="refit", protect_first=1)
    assert cfg.score == ScoreConfig("wifv", bias_compensation=True)
    assert cfg.allocation == AllocationConfig("adaptive", protect_first=1)
    assert cfg.refit == RefitConfig("refit", ridge=0.1)
    assert PruneConfig.from_dict(cfg.to_dict()) == cfg
    flat = {"ratio": 0.3, "method": "flap", "score": "wifv", "allocation": "adaptive", "heads": "auto",
            "bias_compensation": True, "protect_first": 1, "protect_last": None, "k": 1.2, "x0": 0.3,
            "rho_max": 0.9, "robust": False, "multiple": None, "seed": 0, "generic": False, "lm_weight": 3.0,
            "task_weight": 2.0, "schedule": None, "reconstruct": "refit", "ridge": 0.1, "refit_bias": None,
            "refit_choice": "score"}
    assert PruneConfig.from_dict(flat) == cfg  # a plan.json written before the configs were composed
    # each part validates its own fields, once: the ridge only in RefitConfig
    with pytest.raises(ConfigError, match="`ridge` must be >= 0"):
        replace(cfg.refit, ridge=-1)
    with pytest.raises(ConfigError, match="`ridge` must be >= 0"):
        cfg.with_(ridge=-1)
    with pytest.raises(ConfigError, match="unknown pruning setting 'ridg'"):
        cfg.with_(ridg=0.1)
    with pytest.raises(ConfigError, match="must be a ScoreConfig"):
        PruneConfig(score="wifn")
    assert cfg.with_(score=ScoreConfig("magnitude")).score.name == "magnitude"
