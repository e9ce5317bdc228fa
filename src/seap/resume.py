"""Resuming the layer-by-layer pass (docs/design.md §2.9): per-layer statistics and the latest
hidden-state checkpoint of one run, keyed by its settings, written atomically."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ._io import atomic_path, write_json
from .stats import ChannelStats
from .weights import LayerWeights, UnitWeights

log = logging.getLogger(__name__)

RESUME_VERSION = 1


class Resume:
    """A folder of per-layer statistics and the latest hidden-state checkpoint of one run (by key)."""

    def __init__(self, folder: Path, key: str):
        self.folder = folder / f".layerwise-{key}"
        self.key = key

    def save_layer(self, i: int, done: dict, w: LayerWeights) -> None:
        tensors = {}
        for t, (f, a) in enumerate(done.values()):  # corpora by position: names may hold '/' or '.'
            for kind, s in (("ffn", f), ("attn", a)):
                if s is None:
                    continue
                tensors.update({f"{t}/{kind}/mean": s.mean, f"{t}/{kind}/m2": s.m2, f"{t}/{kind}/sumsq": s.sumsq,
                                f"{t}/{kind}/count": torch.tensor([s.count], dtype=torch.int64)})
        for kind, u in (("ffn", w.ffn), ("attn", w.attn)):
            tensors[f"weights/{kind}/col_sq"] = u.col_sq
            tensors[f"weights/{kind}/col_absmean"] = u.col_absmean
            if u.in_norm is not None:
                tensors[f"weights/{kind}/in_norm"] = u.in_norm
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.folder / f"layer-{i:05d}.safetensors") as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))

    def save_hidden(self, next_layer: int, hidden: dict[str, list[torch.Tensor]]) -> None:
        tensors = {f"{t}/{b}": h.detach().cpu().contiguous() for t, hs in enumerate(hidden.values())
                   for b, h in enumerate(hs)}
        with atomic_path(self.folder / "hidden.safetensors") as tmp:
            save_file(tensors, str(tmp))
        write_json(self.folder / "state.json", {"key": self.key, "next_layer": next_layer})

    def load(self, n_layers: int, tasks: list[str]):
        state_path = self.folder / "state.json"
        if not state_path.is_file():
            return None
        try:
            state = json.loads(state_path.read_text())
            start = int(state["next_layer"])
            if state.get("key") != self.key or not 0 < start < n_layers:
                return None
            raw = load_file(str(self.folder / "hidden.safetensors"))
            hidden = {t: [raw[f"{j}/{b}"] for b in range(sum(k.startswith(f"{j}/") for k in raw))]
                      for j, t in enumerate(tasks)}
            per_layer = [self._layer(i, tasks) for i in range(start)]
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as err:
            log.warning("could not resume from %s (%s): starting over", self.folder, err)
            return None
        return start, hidden, per_layer

    def _layer(self, i: int, tasks: list[str]) -> dict:
        raw = load_file(str(self.folder / f"layer-{i:05d}.safetensors"))

        def cs(t: int, kind: str) -> ChannelStats | None:
            if f"{t}/{kind}/mean" not in raw:
                return None
            return ChannelStats(int(raw[f"{t}/{kind}/count"][0]), raw[f"{t}/{kind}/mean"], raw[f"{t}/{kind}/m2"],
                                raw[f"{t}/{kind}/sumsq"])

        def uw(kind: str) -> UnitWeights:
            return UnitWeights(raw[f"weights/{kind}/col_sq"], raw[f"weights/{kind}/col_absmean"],
                               raw.get(f"weights/{kind}/in_norm"))

        return {"ffn": {t: cs(j, "ffn") for j, t in enumerate(tasks)},
                "attn": {t: cs(j, "attn") for j, t in enumerate(tasks)},
                "weights": LayerWeights(uw("ffn"), uw("attn"))}

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
