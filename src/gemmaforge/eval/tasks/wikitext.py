"""WikiText-2 (EleutherAI/wikitext_document_level, wikitext-2-raw-v1), lm-eval's
``wikitext/wikitext.yaml``: each page, detokenized (lm-eval's ``wikitext_detokenizer``), scored
whole by rolling log-likelihood windows; word_perplexity = exp(-sum ll / words), byte_perplexity =
exp(-sum ll / bytes), bits_per_byte = -sum ll / bytes / ln 2, where words (``re.split(r"\\s+")``)
and UTF-8 bytes are counted on the page *before* detokenization, as lm-eval does. Test split.

Columns: page.
"""

import re

from .spec import LOGLIKELIHOOD_ROLLING, Metric, TaskSpec


def wikitext_detokenizer(doc):
    string = doc["page"]
    # contractions
    string = string.replace("s '", "s'")
    string = re.sub(r"/' [0-9]/", r"/'[0-9]/", string)
    # number separators
    string = string.replace(" @-@ ", "-")
    string = string.replace(" @,@ ", ",")
    string = string.replace(" @.@ ", ".")
    # punctuation
    for p in (":", ";", ".", "!", "?", ","):
        string = string.replace(f" {p} ", f"{p} ")
    # double brackets
    string = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", string)
    string = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", string)
    string = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", string)
    string = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', string)
    string = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", string)
    # miscellaneous
    string = string.replace("= = = =", "====")
    string = string.replace("= = =", "===")
    string = string.replace("= =", "==")
    string = string.replace(" " + chr(176) + " ", chr(176))
    string = string.replace(" \n", "\n")
    string = string.replace("\n ", "\n")
    string = string.replace(" N ", " 1 ")
    string = string.replace(" 's", "'s")
    return string


def process_results(doc, results):
    (loglikelihood,) = results
    words = len(re.split(r"\s+", doc["page"]))  # counted on the original page, as lm-eval
    n_bytes = len(doc["page"].encode("utf-8"))
    return {"word_perplexity": (loglikelihood, words), "byte_perplexity": (loglikelihood, n_bytes),
            "bits_per_byte": (loglikelihood, n_bytes)}


WIKITEXT = TaskSpec(
    name="wikitext", output_type=LOGLIKELIHOOD_ROLLING, dataset_path="EleutherAI/wikitext_document_level",
    dataset_name="wikitext-2-raw-v1", columns=("page",),
    doc_to_text=lambda doc: "", doc_to_target=wikitext_detokenizer,
    training_split="train", validation_split="validation", test_split="test",
    metrics=(Metric("word_perplexity", "weighted_perplexity", False),
             Metric("byte_perplexity", "weighted_perplexity", False),
             Metric("bits_per_byte", "bits_per_byte", False)),
    process_results=process_results, version=2.0,
    templates={"doc_to_text": "", "doc_to_target": "preprocess_wikitext.wikitext_detokenizer",
               "process_results": "preprocess_wikitext.process_results"},
)
