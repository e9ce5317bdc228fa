"""Is a prompt of a kind the router was fitted on? (docs/design.md §2.5)

A classifier must pick some class for any input, so prompts of kinds it never saw reach a task
expert unless they are caught apart. The router's feature (the mean input embedding) averages the
prompt's form away: a 700-token article and a 150-token passage have similar means. The test here
looks at the form instead (length, digits, line breaks, symbols, case) and asks whether the prompt
looks like the prompts of the class it is routed to: the Mahalanobis distance of its form to that
class (the class's own mean and covariance), against the `quantile` of that class's own training
prompts' distances.

Why the routed class and a threshold per class: a GSM8K word problem routed to the BoolQ expert is
far from BoolQ's form (below: one line break where BoolQ prompts have two), but close to ARC's
questions, so a test against "the nearest class" lets it through. Measured on the bundled models
(train splits for the fit, the six validation splits and 300 GSM8K / XSum prompts held out), with
the eight features of version 2: at quantile 0.998 the
routed-class test keeps more known prompts on their own expert than the nearest-class test did at
0.995 (SmolLM2 0.9332 vs 0.9322; Gemma 3 0.9345 vs 0.9331) and catches more GSM8K (0.29 vs 0.24;
0.33 vs 0.29), for 1 point of XSum (0.987 vs 0.997; 0.927 vs 0.937).

Why the count of line breaks besides their share: a prompt template fixes how many line breaks a
prompt has (a BoolQ prompt: passage, question, answer, so two; an ARC question one), whatever its
length, while the share mixes that count with the length. A GSM8K question routed to BoolQ has
one. With the count added (router version 3), measured as above, validation accuracy is the same
(SmolLM2 0.9334, Gemma 3 0.9348) and GSM8K goes to the generic expert 0.57 / 0.61 of the time
(0.29 / 0.33 at version 2), XSum 1.00 / 1.00 (0.99 / 0.93). The GSM8K questions still missed are
those routed to ARC, whose questions share their template and line breaks.

Why a vocabulary test besides the form (router version 4): those GSM8K questions cost quality where
they land. Under the 50% ARC expert the gold solution's NLL is 2.702 per token against the generic
expert's 2.522 (+0.179 +- 0.012, the 128 questions routed away; benchmarks/RESULTS.md, "Prompts of
unseen kinds"). The form cannot catch them: ARC's training prompts include numeric questions, so its
0.998 quantile of form distances is wide. Their words can: each task class also gets a unigram model
of its training prompts' tokens (add-0.1 smoothing over the vocabulary), and a prompt whose mean
token log-probability under the class it is routed to is below the `vocab_quantile` of that class's
held-out training prompts (a seeded fifth, not counted in the model) is unfamiliar too. Measured on
SmolLM2 with the routers fitted as `seap route fit` fits them (benchmarks/unknown_prompts.py
--shares): the form alone at 0.998 routes 93.34% of the validation prompts to their own expert and
57% of GSM8K to the generic one; with the vocabulary test at 0.005, 92.38% and 69% (XSum 100% in
both). Tightening the form alone reaches the same GSM8K share only at 0.98, where 91.57% of the
validation prompts keep their expert; at 0.99, 92.72% and 64%. Gemma 3: 93.48% and 61% for the form
alone, 92.76% and 73% with the vocabulary test, 92.76% and 66% for the form alone at 0.99.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

FORM_FEATURES = ("log tokens", "digit tokens", "newline tokens", "symbol tokens", "uppercase chars",
                 "chars per token", "log digit tokens", "log math signs", "log newline tokens")


def form_features(tokenizer, ids: Sequence[Sequence[int]]) -> torch.Tensor:
    """[N, 9] float64: the form of each prompt (length, digits, line breaks, symbols, case)."""
    text: dict[int, str] = {}
    rows = []
    for row in ids:
        for i in set(row) - text.keys():  # decode each distinct id once (setdefault would decode every token)
            text[i] = tokenizer.decode([i])
        toks = [text[i] for i in row]
        n = max(len(toks), 1)
        chars = "".join(toks)
        digits = sum(any(c.isdigit() for c in t) for t in toks)
        newlines = sum("\n" in t for t in toks)
        rows.append([math.log1p(len(toks)), digits / n, newlines / n,
                     sum(not any(c.isalnum() for c in t) for t in toks) / n,
                     sum(c.isupper() for c in chars) / max(len(chars), 1), len(chars) / n,
                     math.log1p(digits), math.log1p(sum(c in "$%+=*/" for c in chars)), math.log1p(newlines)])
    return torch.tensor(rows, dtype=torch.float64).reshape(len(rows), len(FORM_FEATURES))


@dataclass
class VocabularyTest:
    """Per task class: the smoothed unigram log-probabilities of its training prompts' tokens (those
    seen: `ids`/`logp` per class, `unseen` for the rest) and the threshold below which a prompt's mean
    token log-probability is unfamiliar to the class."""

    classes: tuple[str, ...]
    ids: list[torch.Tensor]  # per class: the token ids its training prompts hold
    logp: list[torch.Tensor]  # per class: their log-probabilities
    unseen: torch.Tensor  # [K] the log-probability of a token the class never showed
    thresholds: torch.Tensor  # [K]
    quantile: float
    vocab_size: int
    alpha: float = 0.1

    def scores(self, ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """[N, K] mean token log-probability of each prompt under each class (an empty prompt: NaN)."""
        flat = torch.tensor([i for row in ids for i in row], dtype=torch.long).clamp(0, self.vocab_size - 1)
        owner = torch.repeat_interleave(torch.arange(len(ids)), torch.tensor([len(r) for r in ids], dtype=torch.long))
        lengths = torch.tensor([len(r) for r in ids], dtype=torch.float64)
        out = torch.empty(len(ids), len(self.classes), dtype=torch.float64)
        for k in range(len(self.classes)):
            table = torch.full((self.vocab_size,), float(self.unseen[k]), dtype=torch.float64)
            table[self.ids[k]] = self.logp[k]
            out[:, k] = torch.zeros(len(ids), dtype=torch.float64).index_add_(0, owner, table[flat]) / lengths
        return out

    @classmethod
    def fit(cls, by_class: Mapping[str, Sequence[Sequence[int]]], vocab_size: int, quantile: float,
            seed: int = 0, alpha: float = 0.1) -> VocabularyTest:
        """Each class's unigram model from four fifths of its prompts (seeded), its threshold the `quantile`
        of the held-out fifth's scores (a model's own prompts would score too well)."""
        if not 0.0 < quantile < 0.5:
            raise ValueError(f"quantile must be in (0, 0.5), got {quantile}")
        classes = tuple(by_class)
        ids, logp, unseen, held = [], [], [], []
        for c in classes:
            rows = list(by_class[c])
            random.Random(seed).shuffle(rows)
            cut = max(1, len(rows) - max(1, len(rows) // 5))
            counts = Counter(i for row in rows[:cut] for i in row)
            total = sum(counts.values()) + alpha * vocab_size
            ids.append(torch.tensor(sorted(counts), dtype=torch.long))
            logp.append(torch.tensor([math.log((counts[i] + alpha) / total) for i in sorted(counts)],
                                     dtype=torch.float64))
            unseen.append(math.log(alpha / total))
            held.append(rows[cut:] or rows)
        test = cls(classes, ids, logp, torch.tensor(unseen, dtype=torch.float64),
                   torch.zeros(len(classes), dtype=torch.float64), quantile, vocab_size, alpha)
        test.thresholds = torch.stack([torch.quantile(test.scores(held[k])[:, k], quantile)
                                       for k in range(len(classes))])
        return test


@dataclass
class OodTest:
    """Per task class: the mean and inverse covariance of its training prompts' form features, and
    the `quantile` of their own distances to it (the class's threshold)."""

    classes: tuple[str, ...]  # the task classes (not the background)
    centroids: torch.Tensor  # [K, F]
    precision: torch.Tensor  # [K, F, F] inverse covariance per class
    thresholds: torch.Tensor  # [K]
    quantile: float
    vocabulary: VocabularyTest | None = None  # over the same classes

    def evidence(self, tokenizer, ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """[N, K, 2] per prompt and class: the form's distance and (NaN without the vocabulary test) the
        mean token log-probability; what `unfamiliar` reads."""
        d = self.distances(form_features(tokenizer, ids))
        v = self.vocabulary.scores(ids) if self.vocabulary is not None else torch.full_like(d, float("nan"))
        return torch.stack([d, v], dim=-1)

    def distances(self, f: torch.Tensor) -> torch.Tensor:
        """[N, K] Mahalanobis distance of each prompt's form to each class."""
        diff = f.double()[:, None, :] - self.centroids.double()[None]  # [N, K, F]
        return torch.einsum("nkf,kfg,nkg->nk", diff, self.precision.double(), diff).clamp_min(0).sqrt()

    def unfamiliar(self, evidence: torch.Tensor, label: str) -> bool:
        """Is a prompt (its [K, 2] row of `evidence`) farther from class `label`'s form than that class's
        threshold, or (with the vocabulary test) less likely under its words? A label without a model
        (none here for the background class) is never unfamiliar."""
        if label not in self.classes:
            return False
        k = self.classes.index(label)
        far = bool(evidence[k, 0] > self.thresholds[k])
        return far or (self.vocabulary is not None and bool(evidence[k, 1] < self.vocabulary.thresholds[k]))

    @classmethod
    def fit(cls, by_class: Mapping[str, torch.Tensor], quantile: float) -> OodTest:
        if not 0.0 < quantile <= 1.0:
            raise ValueError(f"quantile must be in (0, 1], got {quantile}")
        classes = tuple(by_class)
        centroids = torch.stack([by_class[c].double().mean(0) for c in classes])
        # A floor of 0.1% of each feature's variance over all classes: a feature constant within a class
        # (no line breaks in any PIQA goal) must not make every small departure from it infinitely far.
        floor = torch.diag(1e-3 * torch.cat(list(by_class.values())).double().var(0).clamp_min(1e-12))
        precision = []
        for c in classes:
            f = by_class[c].double()
            cov = torch.cov(f.T) if len(f) > 1 else torch.zeros(f.shape[1], f.shape[1], dtype=torch.float64)
            precision.append(torch.linalg.inv(cov + floor))
        test = cls(classes, centroids, torch.stack(precision), torch.zeros(len(classes), dtype=torch.float64),
                   quantile)
        test.thresholds = torch.stack([torch.quantile(test.distances(by_class[c])[:, k], quantile)
                                       for k, c in enumerate(classes)])
        return test
