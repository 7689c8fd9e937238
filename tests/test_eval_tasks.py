"""gemmaforge eval against lm-eval itself, on fixture sets in the original datasets' columns
(tests/eval_fixtures.py):

- every task's requests (prompts, few-shot selection, continuations, generation arguments) equal
  those of lm-eval's own task objects, built from its YAML configs pointed at the same files;
- with the same deterministic stand-in model on both sides, every per-sample record (arguments,
  responses, filtered responses, metrics, hashes) and every aggregated number (metrics, standard
  errors, MMLU's groups, n-samples, n-shot, versions) equal lm-eval's evaluate();
- on a tiny random Gemma with the real tokenizer, MMLU-style and ARC-style tasks give the same
  per-sample predictions through gemmaforge eval (Scorer) and lm-eval's HF backend (HFLM);
- the MBPP sandbox kills an infinite loop, a memory hog and a process that left its group;
- bad input: one line, exit code 2.
"""

import hashlib
import json
import math
import re
import sys
import types

import numpy as np
import pytest

from eval_fixtures import MBPP_PROBLEMS, SUBJECTS, lm_eval_files, write_dir, write_jsonl
from gemmaforge import cli
from gemmaforge.errors import GemmaforgeError
from gemmaforge.eval import harness, sandbox
from gemmaforge.eval.data import DataSource
from gemmaforge.eval.tasks import mmlu

lm_eval = pytest.importorskip("lm_eval")

SIMPLE = ["arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "boolq", "bbq", "gsm8k", "mbpp", "wikitext"]
MMLU_TASKS = [f"mmlu_{s}" for s in SUBJECTS]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_dir(tmp_path_factory.mktemp("eval_data"))


# ---- a deterministic stand-in model, the same function on both sides ------------------------------------------
def _h(*parts) -> int:
    return int(hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:8], 16)


def fake_ll(ctx, cont):
    h = _h(ctx, cont)
    return -(h % 10000) / 1000.0, h % 5 == 0


def fake_rolling(text):
    return -(0.5 * len(text) + _h(text) % 100 / 10)


def fake_generate(ctx, kwargs):
    if "[BEGIN]" in ctx:  # MBPP: right, wrong, right, not even Python
        text = re.findall(r"here is your task: (.*?) Your code", ctx)[-1]
        i = [p[0] for p in MBPP_PROBLEMS].index(text)
        code = MBPP_PROBLEMS[i][1]
        return [code, "def square(x):\n    return x + x", code + "\n", "def maxi(xs)\n  return"][i] + "\n"
    i = int(re.findall(r"Tom has (\d+) apples", ctx)[-1])
    g = 2 * i + 2
    return [f" He has {g} apples.\n#### {g}", f" The answer is {g}.", " I think 5.\n#### 7"][i % 3] + "\n\n"


class FakeScorer:
    def loglikelihood(self, pairs):
        return [fake_ll(c, x) for c, x in pairs]

    def loglikelihood_rolling(self, texts):
        return [fake_rolling(t) for t in texts]

    def generate_until(self, requests):
        return [fake_generate(c, kw) for c, kw in requests]


def fake_lm():
    from lm_eval.api.model import LM

    class FakeLM(LM):
        def loglikelihood(self, requests):
            return [fake_ll(*r.args) for r in requests]

        def loglikelihood_rolling(self, requests):
            return [fake_rolling(r.args[0]) for r in requests]

        def generate_until(self, requests):
            return [fake_generate(*r.args) for r in requests]

    return FakeLM()


# ---- lm-eval's own tasks on the fixture files --------------------------------------------------------------------
@pytest.fixture(scope="module")
def task_manager(tmp_path_factory):
    from lm_eval.tasks import TaskManager

    mp = pytest.MonkeyPatch()
    # lm-eval's MBPP imports HF evaluate's code_eval (a hub download): a stand-in that execs the
    # program in-process, as code_eval does, on the fixture's harmless programs.
    class CodeEval:
        def compute(self, references, predictions, k):
            passed = []
            for ref, preds in zip(references, predictions):
                try:
                    exec(preds[0] + "\n" + ref, {})
                    passed.append(1.0)
                except BaseException:
                    passed.append(0.0)
            return {"pass@1": float(np.mean(passed))}, {}

    stub = types.ModuleType("evaluate")
    stub.load = lambda *a, **k: CodeEval()
    mp.setitem(sys.modules, "evaluate", stub)
    yield TaskManager(), tmp_path_factory.mktemp("hf_cache")
    mp.undo()


def lm_task(task_manager, root, name, num_fewshot=None, seed=1234):
    from lm_eval.api.task import ConfigurableTask

    tm, cache = task_manager
    files = lm_eval_files(root, name)
    cfg = tm._factory._load_full_config(tm._entry(name), {
        "dataset_path": "json", "dataset_name": None, "dataset_kwargs": {"data_files": files, "cache_dir": str(cache)}})
    for key in ("tag", "group", "task_list"):
        cfg.pop(key, None)
    task = ConfigurableTask(config=cfg)
    if num_fewshot is not None:  # as simple_evaluate
        if task.get_config("num_fewshot") != 0:
            task.set_config("num_fewshot", num_fewshot)
    elif task.get_config("num_fewshot") is None:
        task.set_config("num_fewshot", 0)
    task.set_fewshot_seed(seed)
    return task


def lm_task_dict(task_manager, root, names, num_fewshot=None):
    from lm_eval.api.group import Group
    from lm_eval.config.group import AggMetricConfig

    tasks = {n: lm_task(task_manager, root, n, num_fewshot) for n in names}
    groups = {}
    subjects = [n for n in names if n.startswith("mmlu_")]
    if subjects:
        agg = lambda: [AggMetricConfig(metric="acc", weight_by_size=True)]
        top = Group("mmlu", aggregate_metric_list=agg(), metadata={"version": 2})
        for cat, alias in mmlu.CATEGORIES.items():
            members = [n for n in subjects if mmlu.SUBJECTS[n[5:]] == cat]
            if members:
                g = Group(f"mmlu_{cat}", alias=alias, aggregate_metric_list=agg(), metadata={"version": 2})
                for n in members:
                    g.add(tasks[n])
                top.add(g)
                groups[g.name] = g
        groups["mmlu"] = top
    return {"tasks": tasks, "groups": groups}


# ---- 1. requests ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_fewshot", [None, 0, 1, 3])
@pytest.mark.parametrize("name", SIMPLE + MMLU_TASKS[:2])
def test_requests_are_lm_evals(task_manager, root, name, num_fewshot):
    if name == "mbpp" and num_fewshot == 1 or name.startswith("mmlu") and num_fewshot is None:
        pytest.skip("covered by the other counts")
    task = lm_task(task_manager, root, name, num_fewshot)
    task.build_all_requests()
    want = {}
    for inst in task.instances:
        want.setdefault(inst.doc_id, []).append((inst.idx, inst.request_type, inst.arguments))
    p = harness.plan([name], DataSource(root), num_fewshot=num_fewshot)
    (run,) = p.tasks
    assert run.num_fewshot == task.config.num_fewshot
    assert len(run.docs) == len(want) == len(task.eval_docs)
    for (doc_id, doc), reqs in zip(run.docs, run.requests):
        assert doc == dict(task.eval_docs[doc_id])
        got = [(r.idx, r.request_type, r.arguments) for r in reqs]
        assert got == sorted(want[doc_id], key=lambda x: x[0])


def test_mmlu_prompt_is_the_documented_one(root):
    p = harness.plan(["mmlu_anatomy"], DataSource(root), num_fewshot=1)
    ctx, cont = p.tasks[0].requests[0][2].arguments
    assert ctx == ("The following are multiple choice questions (with answers) about anatomy.\n\n"
                   "dev question 0 about anatomy?\nA. anatomy 0 a\nB. b0\nC. c 0\nD. d 00\nAnswer: A\n\n"
                   "test question 0 about anatomy?\nA. anatomy 0 a\nB. b0\nC. c 0\nD. d 00\nAnswer:")
    assert cont == " C"


@pytest.mark.parametrize("limit", [2, 0.5])
def test_limit_keeps_the_first_documents_and_their_shots(task_manager, root, limit):
    task = lm_task(task_manager, root, "arc_easy", 2)
    task.build_all_requests(limit=harness.sample_size(len(task.eval_docs), limit))
    p = harness.plan(["arc_easy"], DataSource(root), num_fewshot=2, limit=limit)
    assert [r.arguments for rs in p.tasks[0].requests for r in rs] == [i.arguments for i in task.instances]


def test_parquet_and_jsonl_give_the_same_requests(root, tmp_path):
    pq_root = write_dir(tmp_path / "pq", "parquet")
    a = harness.plan(SIMPLE + ["mmlu"], DataSource(root), num_fewshot=2)
    b = harness.plan(SIMPLE + ["mmlu"], DataSource(pq_root), num_fewshot=2)
    assert [r.arguments for r in a.requests()] == [r.arguments for r in b.requests()]


# ---- 2. results and samples against lm-eval's evaluate ---------------------------------------------------------
def _same(a, b, path=""):
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return
    if isinstance(a, (float, np.floating)) or isinstance(b, (float, np.floating)):
        assert a == pytest.approx(b, rel=1e-12, abs=1e-12), path
    elif isinstance(a, dict):
        assert set(a) == set(b), (path, set(a) ^ set(b))
        for k in a:
            _same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


@pytest.mark.parametrize("num_fewshot", [None, 2])
def test_results_and_samples_equal_lm_evals(task_manager, root, num_fewshot):
    from lm_eval.evaluator import evaluate

    names = SIMPLE + MMLU_TASKS
    want = evaluate(fake_lm(), lm_task_dict(task_manager, root, names, num_fewshot), bootstrap_iters=100000,
                    log_samples=True, confirm_run_unsafe_code=True)
    out = harness.evaluate(FakeScorer(), SIMPLE + ["mmlu"], DataSource(root), num_fewshot=num_fewshot)
    got = out.results
    for key in ("results", "groups", "n-samples", "n-shot", "versions", "higher_is_better"):
        _same(got[key], want[key], key)
    assert {k: sorted(v) for k, v in got["group_subtasks"].items()} == \
        {k: sorted(v) for k, v in want["group_subtasks"].items()}
    assert got["results"]["mbpp"]["pass_at_1,none"] == 0.5  # the sandbox agrees with exec on every program
    for name in names:
        assert len(out.samples[name]) == len(want["samples"][name])
        for ours, theirs in zip(out.samples[name], want["samples"][name]):
            _same(json.loads(harness.sample_json(ours)), json.loads(json.dumps(
                {**theirs, "arguments": {f"gen_args_{i}": {f"arg_{j}": a for j, a in enumerate(arg)}
                                         for i, arg in enumerate(theirs["arguments"])},
                 "resps": lm_eval.utils.sanitize_list(theirs["resps"]),
                 "filtered_resps": lm_eval.utils.sanitize_list(theirs["filtered_resps"]),
                 "target": str(theirs["target"])}, default=lm_eval.utils.handle_non_serializable)), name)


def test_markdown_table_and_output_files(root, tmp_path):
    out = harness.evaluate(FakeScorer(), ["mmlu", "arc_challenge", "gsm8k", "wikitext"], DataSource(root), limit=3)
    table = harness.markdown_table(out.results)
    lines = table.splitlines()
    assert lines[0].startswith("| Task | Gemma 2 2B / 9B / 27B (report) |")
    assert "| mmlu | 51.3 / 71.3 / 75.2 (5-shot, top-1) | none | 0 | acc |" in table
    assert any(line.startswith("|  - stem |") for line in lines) and any(line.startswith("|   - anatomy |") for line in lines)
    assert "| gsm8k | 23.9 / 68.6 / 74.0 (5-shot, maj@1) | flexible-extract | 5 | exact_match |" in table
    assert "| word_perplexity |" in table and "N/A" in table
    paths = harness.write_outputs(out, tmp_path / "o")
    assert json.loads(paths[0].read_text())["results"]["arc_challenge"]["acc,none"] == \
        out.results["results"]["arc_challenge"]["acc,none"]
    lines = (tmp_path / "o" / "samples_gsm8k.jsonl").read_text().splitlines()
    assert len(lines) == 2 * 3  # two filters x three documents
    first = json.loads(lines[0])
    assert set(first) >= {"doc_id", "doc", "target", "arguments", "resps", "filtered_resps", "filter", "metrics",
                          "doc_hash", "prompt_hash", "target_hash", "exact_match"}


def test_hf_cache_is_read_offline(monkeypatch, root):
    """Without --data, rows come from datasets.load_dataset with offline mode forced on."""
    datasets = pytest.importorskip("datasets")
    calls = []

    def load_dataset(path, name=None, split=None):
        calls.append((path, name, split, datasets.config.HF_DATASETS_OFFLINE))
        return [json.loads(x) for x in (root / "arc_easy" / f"{split}.jsonl").read_text().splitlines()]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    p = harness.plan(["arc_easy"], DataSource(None), num_fewshot=1)
    assert calls == [("allenai/ai2_arc", "ARC-Easy", "test", True), ("allenai/ai2_arc", "ARC-Easy", "train", True)]
    assert p.requests() == harness.plan(["arc_easy"], DataSource(root), num_fewshot=1).requests()

    def missing(*a, **k):
        raise FileNotFoundError("not cached")

    monkeypatch.setattr(datasets, "load_dataset", missing)
    with pytest.raises(GemmaforgeError, match="not in the HF datasets cache.*pass --data DIR"):
        harness.plan(["piqa"], DataSource(None))


# ---- 3. a real model: gemmaforge's Scorer against lm-eval's HF backend -------------------------------------------
@pytest.fixture(scope="module")
def tiny(embedded_gguf):
    transformers = pytest.importorskip("transformers")
    import gemmaforge
    from conftest import CONFIGS, randomize
    from test_model_hf import hf_model

    config = CONFIGS["gemma3"].replace(vocab_size=262144, sliding_window=16, max_position_embeddings=1024)
    model = randomize(gemmaforge.Gemma(config), seed=5)
    tok = gemmaforge.load_tokenizer(embedded_gguf)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(embedded_gguf.parent), gguf_file=embedded_gguf.name)
    return model, tok, hf_model(model), hf_tok


def test_mmlu_and_arc_predictions_equal_lm_evals_hf_backend(task_manager, root, tiny):
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM

    from gemmaforge.eval.scorer import Scorer

    model, tok, hf, hf_tok = tiny
    names = ["mmlu_anatomy", "mmlu_philosophy", "arc_easy"]
    hflm = HFLM(pretrained=hf, tokenizer=hf_tok, batch_size=4, max_length=1024)
    want = evaluate(hflm, lm_task_dict(task_manager, root, names, 2), log_samples=True)
    out = harness.evaluate(Scorer(model, tok, batch_size=8, progress=False), names, DataSource(root), num_fewshot=2)
    worst = 0.0
    for name in names:
        for ours, theirs in zip(out.samples[name], want["samples"][name], strict=True):
            assert ours["arguments"] == [tuple(a) for a in theirs["arguments"]]
            a = [ll for ll, _ in ours["filtered_resps"]]
            b = [ll for ll, _ in theirs["filtered_resps"]]
            worst = max(worst, max(abs(x - y) for x, y in zip(a, b)))
            assert int(np.argmax(a)) == int(np.argmax(b))  # the same prediction
            assert int(np.argmax(np.array(a) / [len(c) for _, c in ours["arguments"]])) == \
                int(np.argmax(np.array(b) / [len(c) for _, c in ours["arguments"]]))
            for m in ("acc", "acc_norm"):
                assert ours.get(m) == theirs.get(m)
        for k, v in want["results"][name].items():
            if k.startswith("acc"):
                assert out.results["results"][name][k] == pytest.approx(v, abs=1e-12)
    print(f"max |log-likelihood difference| vs HFLM: {worst:.2e}")
    assert worst < 1e-4


def test_cli_writes_what_the_harness_computes(root, tiny, tmp_path, monkeypatch, capsys):
    import gemmaforge
    from gemmaforge.eval.scorer import Scorer

    model, tok, _, _ = tiny
    d = tmp_path / "model"
    gemmaforge.save_pretrained(model, d)
    tok.save(d / "tokenizer.json")
    # (generation tasks go through the same harness; with the fake model above they are checked against
    # lm-eval, and Scorer.generate_until against HFLM in test_eval_scorer.py: not repeated here, slow on CPU)
    code = cli.main(["eval", "--model", str(d), "--tasks", "arc_challenge,wikitext", "--data", str(root),
                     "--limit", "2", "--num-fewshot", "1", "--output", str(tmp_path / "out"), "--batch-size", "4"])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    assert "| arc_challenge | 55.4 / 68.4 / 71.4 (25-shot, acc_norm) | none | 1 | acc |" in stdout
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    direct = harness.evaluate(Scorer(gemmaforge.load(d), gemmaforge.load_tokenizer(d), batch_size=4, progress=False),
                              ["arc_challenge", "wikitext"], DataSource(root), num_fewshot=1, limit=2)
    _same(saved["results"], json.loads(json.dumps(direct.results["results"])))
    assert saved["config"]["limit"] == 2 and saved["n-samples"]["wikitext"] == {"original": 3, "effective": 2}
    for name in ("arc_challenge", "wikitext"):
        lines = (tmp_path / "out" / f"samples_{name}.jsonl").read_text().splitlines()
        assert lines == [harness.sample_json(s) for s in direct.samples[name]]


# ---- 4. the sandbox ------------------------------------------------------------------------------------------
def test_sandbox_pass_and_fail_follow_code_eval():
    programs = ["def f(x):\n    return 2 * x\nassert f(2) == 4", "assert 1 == 2", "def f(:\n  pass",
                "exit()", "import sys\nsys.exit(0)", "print('noise' * 1000)\nimport os\nos.system('true')",
                "x = input()"]
    verdicts = sandbox.run_programs(programs, sandbox.Limits(timeout_s=3.0), workers=2)
    assert [v.passed for v in verdicts] == [True] + [False] * 6
    assert "AssertionError" in verdicts[1].result and "SyntaxError" in verdicts[2].result


def test_sandbox_kills_an_infinite_loop():
    import time

    start = time.monotonic()
    v = sandbox.run_program("while True:\n    pass", sandbox.Limits(timeout_s=1.0))
    assert not v.passed and v.result == "timed out" and time.monotonic() - start < 4
    # The alarm cleared by the program: the CPU-time limit (timeout + 2 s) ends it.
    v = sandbox.run_program("import signal\nsignal.setitimer(signal.ITIMER_REAL, 0)\nwhile True:\n    pass",
                            sandbox.Limits(timeout_s=1.0, wall_s=30))
    assert not v.passed and v.result.startswith("killed")
    assert time.monotonic() - start < 15


def test_sandbox_stops_a_memory_hog():
    v = sandbox.run_program("x = []\nwhile True:\n    x.append(bytearray(1 << 24))",
                            sandbox.Limits(timeout_s=10.0, memory_bytes=256 << 20))
    assert not v.passed and "MemoryError" in v.result


def test_sandbox_kills_the_whole_process_tree(tmp_path):
    """A sleeping program that cleared its alarm and started a child in a new session: past the wall
    limit everything goes (process group, and on Linux the PID namespace for the escaped child)."""
    import os
    import time

    marker = "gemmaforge-sandbox-test-" + os.urandom(4).hex()
    program = ("import os, sys, signal, time\nsignal.setitimer(signal.ITIMER_REAL, 0)\n"
               f"os.posix_spawn(sys.executable, [sys.executable, '-c', 'import os, time; os.setsid(); "
               f"time.sleep(120)', '{marker}'], dict(os.environ))\ntime.sleep(120)\n")
    start = time.monotonic()
    v = sandbox.run_program(program, sandbox.Limits(timeout_s=1.0, wall_s=2.0))
    assert v.result == "timed out" and time.monotonic() - start < 10

    def alive():
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if pid != str(os.getpid()) and marker.encode() in open(f"/proc/{pid}/cmdline", "rb").read():
                    found.append(pid)
            except OSError:
                pass
        return found

    if not os.path.isdir("/proc"):
        pytest.skip("no /proc to look for the child")
    if not sandbox._unshare_prefix():
        pytest.skip("no PID namespace here: a child that called setsid escapes the group kill (documented)")
    deadline = time.monotonic() + 5
    while alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive()


def test_sandbox_has_no_network():
    if not sandbox._unshare_prefix():
        pytest.skip("network namespaces are not available here (documented: no network isolation)")
    v = sandbox.run_program("import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=2)")
    assert not v.passed and "unreachable" in v.result.lower()
    assert "no network" in sandbox.isolation()


# ---- 5. bad input: one line, exit code 2 -----------------------------------------------------------------------
@pytest.fixture
def eval_cli(capsys):
    def run(*args):
        code = cli.main(["eval", *map(str, args)])
        out, err = capsys.readouterr()
        return code, err.strip()

    return run


def test_unknown_task_lists_the_known_ones(eval_cli, root):
    code, err = eval_cli("--tasks", "arc_easy,hellaswg", "--data", root)
    assert code == 2 and "\n" not in err
    assert "unknown task 'hellaswg'" in err and "hellaswag" in err and "mmlu_<subject>" in err


def test_missing_data_file_says_the_path_and_format(eval_cli, tmp_path):
    code, err = eval_cli("--tasks", "piqa", "--data", tmp_path)
    assert code == 2 and "\n" not in err
    assert f"{tmp_path}/piqa/validation.parquet or {tmp_path}/piqa/validation.jsonl" in err
    assert "baber/piqa" in err and "goal, sol1, sol2, label" in err
    code, err = eval_cli("--tasks", "piqa", "--data", tmp_path / "nope")
    assert code == 2 and "is not a directory" in err


def test_missing_fewshot_split_is_named(eval_cli, tmp_path):
    write_jsonl(tmp_path / "gsm8k" / "test.jsonl", [{"question": "q", "answer": "#### 1"}])
    code, err = eval_cli("--tasks", "gsm8k", "--data", tmp_path)  # 5-shot by default: needs train
    assert code == 2 and "no train data for gsm8k" in err and "gsm8k/train.jsonl" in err


def test_missing_columns_are_named(eval_cli, tmp_path):
    write_jsonl(tmp_path / "arc_easy" / "test.jsonl", [{"question": "q", "choices": {"text": ["a"], "label": ["A"]}}])
    code, err = eval_cli("--tasks", "arc_easy", "--data", tmp_path)
    assert code == 2 and "\n" not in err
    assert "test.jsonl row 1 lacks column 'answerKey'" in err and "question, choices, answerKey" in err


def test_bad_jsonl_line_is_named(eval_cli, tmp_path):
    (tmp_path / "boolq").mkdir()
    (tmp_path / "boolq" / "validation.jsonl").write_text('{"question": "q"}\nnot json\n')
    code, err = eval_cli("--tasks", "boolq", "--data", tmp_path)
    assert code == 2 and "validation.jsonl line 2 is not valid JSON" in err


@pytest.mark.parametrize("limit", ["0", "-3"])
def test_limit_zero(eval_cli, root, limit):
    code, err = eval_cli("--tasks", "arc_easy", "--data", root, "--limit", limit)
    assert code == 2 and "\n" not in err and f"--limit {limit} selects no documents" in err


def test_too_many_fewshot_examples(eval_cli, root):
    code, err = eval_cli("--tasks", "mmlu_anatomy", "--data", root, "--num-fewshot", "6")
    assert code == 2 and "6 few-shot examples asked for but dev has only 5" in err
    code, err = eval_cli("--tasks", "piqa", "--data", root, "--num-fewshot", "6")
    assert code == 2 and "lower --num-fewshot" in err


def test_mmlu_subjects_missing_from_the_data_are_skipped(root):
    p = harness.plan(["mmlu"], DataSource(root))
    assert sorted(t.spec.name for t in p.tasks) == sorted(MMLU_TASKS)
    assert len(p.skipped) == 57 - len(SUBJECTS)
