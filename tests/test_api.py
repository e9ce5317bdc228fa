"""The package face: `import seap` then seap.prune / seap.load / seap.info / seap.evaluate, and a
`seap prune --out` folder accepted wherever a model or a plan is expected."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import TEXTS, tiny_folder

import seap
from seap.cli import main
from seap.errors import ArtifactError, ConfigError


def test_import_seap_is_light_and_lists_the_api():
    code = "import sys, seap; print('torch' in sys.modules, sorted(seap.__all__))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded, names = out.split(" ", 1)
    assert loaded == "False"  # nothing heavy until a name is used
    for name in ("prune", "load", "evaluate", "info", "PruneConfig", "CalibrationData", "EvalConfig", "Plan"):
        assert name in names and name in dir(seap)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        seap.nope  # noqa: B018


def test_prune_load_info_from_the_package_face(tmp_path):
    folder = tiny_folder(tmp_path, "llama")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(TEXTS * 4))
    cfg = seap.PruneConfig.from_method("seap-paper", ratio=0.5, protect_first=0, protect_last=0)
    res = seap.prune(str(folder), cfg, seap.CalibrationData((str(corpus),), batch_size=2), tmp_path / "out",
                     progress=False)
    out = tmp_path / "out"
    # The output folder stands for its model and for its plan.
    lm, direct = seap.load(out), seap.load(out / "model")
    ids = torch.tensor([[5, 9, 40, 7, 99, 3]])
    assert torch.equal(lm.model(ids).logits, direct.model(ids).logits)
    assert sum(p.numel() for p in lm.model.parameters()) == res.summary()["params_after"]
    assert seap.Plan.load(out).experts.keys() == res.plan.experts.keys()
    info = seap.info(out)
    assert info["kind"] == "prune output"
    assert info["plan"]["kind"] == "plan" and info["model"]["kind"] == "pruned model"
    assert info["model"]["ffn_widths"] == res.summary()["ffn_widths"]


def test_seap_info_accepts_a_prune_output_folder(tmp_path, capsys):
    folder = tiny_folder(tmp_path, "opt", num_hidden_layers=4)
    out = tmp_path / "o"
    assert main(["prune", "--model", str(folder), "--method", "magnitude", "--ratio", "0.3", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["info", str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["kind"] == "prune output" and data["model"]["method"] == "magnitude"
    assert main(["info", str(out)]) == 0
    assert "plan:\n  kind: plan" in capsys.readouterr().out
    with pytest.raises(ArtifactError, match="neither a plan folder"):
        seap.info(tmp_path)


def test_calibration_data_is_validated():
    assert seap.CalibrationData.of(None).tasks == ("default",)
    assert seap.CalibrationData.of(["piqa", "boolq"]).tasks == ("piqa", "boolq")
    assert seap.CalibrationData.of("piqa").tasks == ("piqa",)
    with pytest.raises(ConfigError, match="named twice"):
        seap.CalibrationData(("piqa", "piqa"))
    with pytest.raises(ConfigError, match="at least one task"):
        seap.CalibrationData(())
    with pytest.raises(ConfigError, match="`batch_size` must be >= 1"):
        seap.CalibrationData(batch_size=0)
