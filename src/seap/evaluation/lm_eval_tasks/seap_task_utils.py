"""Document functions of seap's lm-evaluation-harness task YAMLs (the upstream ones, restated).

lm-eval imports this file by path from the YAMLs' `!function` tags, so it must not import seap.
"""

import re


# -- winogrande: the context is the sentence up to the blank with each option filled in; the
# scored continuation is the rest of the sentence (partial evaluation).
def winogrande_text(doc):
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_target(doc):
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def winogrande_choice(doc):
    idx = doc["sentence"].index("_")
    return [doc["sentence"][:idx] + opt for opt in (doc["option1"], doc["option2"])]


# -- hellaswag
def _hellaswag_clean(text):
    text = text.strip()
    text = text.replace(" [title]", ". ")  # brackets are artefacts of the WikiHow part
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_docs(dataset):
    def one(doc):
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {
            "query": _hellaswag_clean(doc["activity_label"] + ": " + ctx),
            "choices": [_hellaswag_clean(e) for e in doc["endings"]],
            "gold": int(doc["label"]),
        }

    return dataset.map(one)


# -- wikitext: raw rows -> one document per article (top-level " = Title = " heading)
_ARTICLE = re.compile(r"^ = [^=].* = \n$")


def wikitext_pages(dataset):
    import datasets

    pages, current = [], []
    for line in dataset["text"]:
        if _ARTICLE.match(line) and any(s.strip() for s in current):
            pages.append("".join(current))
            current = []
        current.append(line)
    if any(s.strip() for s in current):
        pages.append("".join(current))
    return datasets.Dataset.from_dict({"page": pages})


def wikitext_detokenizer(doc):
    string = doc["page"]
    string = string.replace("s '", "s'")
    string = re.sub(r"/' [0-9]/", r"/'[0-9]/", string)
    string = string.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    for p in (":", ";", ".", "!", "?", ","):
        string = string.replace(f" {p} ", f"{p} ")
    string = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", string)
    string = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", string)
    string = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", string)
    string = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', string)
    string = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", string)
    string = string.replace("= = = =", "====").replace("= = =", "===").replace("= =", "==")
    string = string.replace(" " + chr(176) + " ", chr(176))
    string = string.replace(" \n", "\n").replace("\n ", "\n")
    string = string.replace(" N ", " 1 ").replace(" 's", "'s")
    return string


def wikitext_results(doc, results):
    (loglikelihood,) = results
    words = len(re.split(r"\s+", doc["page"]))  # counted before detokenisation, as upstream
    n_bytes = len(doc["page"].encode("utf-8"))
    return {"word_perplexity": (loglikelihood, words), "byte_perplexity": (loglikelihood, n_bytes),
            "bits_per_byte": (loglikelihood, n_bytes)}
