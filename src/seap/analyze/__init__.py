"""`seap analyze`: the evidence behind SEAP, measured on your own model, as numbers and pictures.

- clusters: do tasks separate in hidden-state space? (silhouette per layer, PCA / t-SNE maps)
- heatmap: do tasks use their own FFN channels, consistently across two halves of their data?
- sensitivity: how much does pruning each layer hurt, and the logistic schedule fitted to it
  (`seap prune --schedule sensitivity.json`)
- plans: per-layer widths of plans and the overlap (Jaccard) of their task experts

Each analysis returns an `Analysis` (numbers, Markdown) and, given `out`, writes
<out>/<name>.json, <name>.md and PNG figures. Figures need matplotlib (the `plots` extra);
clusters needs scikit-learn (the `eval` extra).
"""

from .clusters import ClusterConfig, analyze_clusters
from .common import Analysis
from .heatmap import HeatmapConfig, analyze_heatmap
from .plans import analyze_plans
from .schedule import load_schedule
from .sensitivity import SensitivityConfig, analyze_sensitivity, fit_logistic

__all__ = ["Analysis", "ClusterConfig", "HeatmapConfig", "SensitivityConfig", "analyze_clusters",
           "analyze_heatmap", "analyze_sensitivity", "analyze_plans", "fit_logistic", "load_schedule"]
