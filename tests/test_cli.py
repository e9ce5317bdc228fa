"""Every --method through the CLI on a tiny OPT folder (MHA heads, biases), then info and reload."""

import json

import pytest
import torch
from conftest import tiny_folder

from seap.cli import main
from seap.config import PRESETS
from seap.models import load_model


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
