"""Tasks: the registry of benchmark tasks (`specs`) and the calibration corpora built from them
(`corpus`; `loading` for the benchmark tasks, `files` for the user's and the embedded ones). Everything public is importable from `seap.tasks`."""

from .corpus import DEFAULT_CORPORA, Corpus
from .files import default_corpora, load_default_corpus, load_file_corpus
from .loading import check_corpus_spec, corpus_from_rows, load_rows, load_task_corpus, local_file, resolve_corpus, task_spec
from .specs import ACCURACY_TASKS, EVAL_TASKS, PAPER_METRIC, SUITE, TASK_NAMES, TASKS, TaskSpec

__all__ = ["ACCURACY_TASKS", "DEFAULT_CORPORA", "EVAL_TASKS", "PAPER_METRIC", "SUITE", "TASK_NAMES", "TASKS",
           "Corpus", "TaskSpec", "check_corpus_spec", "corpus_from_rows", "default_corpora", "load_default_corpus", "load_file_corpus",
           "load_rows", "load_task_corpus", "local_file", "resolve_corpus", "task_spec"]
