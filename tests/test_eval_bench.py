"""The evaluation benchmark (eval/bench.py, `gemmaforge bench eval`) runs both sides on a tiny model and
reports identical scores; timings are not checked."""

import pytest

lm_eval = pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")


def test_bench_eval_reports_identical_scores_on_a_tiny_model(embedded_gguf):
    import gemmaforge
    from conftest import CONFIGS, randomize
    from gemmaforge.eval import bench
    from test_model_hf import hf_model

    config = CONFIGS["gemma3"].replace(vocab_size=262144, sliding_window=16, max_position_embeddings=1024)
    model = randomize(gemmaforge.Gemma(config), seed=7)
    tok = gemmaforge.load_tokenizer(embedded_gguf)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(embedded_gguf.parent), gguf_file=embedded_gguf.name)
    r = bench.run_benchmark(questions=5, repeats=1, batch_size=8, model=model, tokenizer=tok,
                            hf_model=hf_model(model), hf_tokenizer=hf_tok)
    assert r["documents"] == 5 and r["loglikelihood_requests"] == 20
    assert r["identical_scores"] and r["identical_predictions"]
    assert set(r["scores"]["gemmaforge"]) == {"mmlu", "mmlu_stem", "mmlu_elementary_mathematics",
                                             "mmlu_high_school_mathematics"}
    assert r["max_loglikelihood_difference"] < 1e-4
    assert r["samples_per_s"]["gemmaforge"] > 0 and r["ratio"] > 0
    text = bench.format_report(r)
    assert "identical scores and per-sample predictions: yes" in text


def test_bench_data_are_mmlu_rows():
    from gemmaforge.eval import bench

    rows = bench.make_rows(7)
    assert len(rows["dev"]) == 10 and len(rows["test"]) == 7
    for r in rows["test"]:
        assert set(r) == {"question", "subject", "choices", "answer"} and len(set(r["choices"])) == 4
        assert r["subject"] in bench.SUBJECTS and 0 <= r["answer"] < 4
    assert bench.make_rows(7) == rows  # deterministic
