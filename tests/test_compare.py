"""`gemmaforge compare`: LLM Comparator's JSON, the swapped-position averaging, retries of
unparsable judge answers, bad prompts files, and the HTML report rendered in headless Chromium."""

import json
import re
import shutil
import subprocess

import pytest

import gemmaforge
from gemmaforge import load_tokenizer, preset
from gemmaforge.compare import SCALE, comparison_json, parse, rate, read_prompts, summarize, write_outputs
from gemmaforge.compare.judge import PREFILL, Rating
from gemmaforge.compare.report import histogram_bin, outcome

from conftest import randomize


def _sections(judge_prompt):
    a = judge_prompt.split("[Response A]\n", 1)[1].split("\n[End of Response A]", 1)[0]
    b = judge_prompt.split("[Response B]\n", 1)[1].split("\n[End of Response B]", 1)[0]
    return a, b


def answer_xml(label, why="because"):
    return f"{PREFILL}{why}</explanation>\n  <verdict>{label}</verdict>\n</result>"


# ---- the judge's answers --------------------------------------------------------------------------
def test_parse_reads_llm_comparators_format():
    assert parse(answer_xml("A is much better", "A is more complete.")) == ("A is much better", "A is more complete.")
    assert parse("<result><explanation>x &amp; y</explanation><verdict> 'b is slightly better.' </verdict>") == \
        ("B is slightly better", "x & y")
    assert parse("<verdict>same</verdict>") == ("same", "")  # no explanation: still a verdict
    for bad in ("A is better", "<verdict>A is way better</verdict>", "<verdict>A is better", ""):
        assert parse(bad) is None
    assert SCALE == {"A is much better": 1.5, "A is better": 1.0, "A is slightly better": 0.5, "same": 0.0,
                     "B is slightly better": -0.5, "B is better": -1.0, "B is much better": -1.5}


def test_swapped_positions_are_negated_back_and_averaged():
    pairs = [("p1", "GOOD answer", "bad answer"), ("p2", "bad answer", "GOOD answer"), ("p3", "x", "y")]

    def judge(prompts, attempt):
        out = []
        for q in prompts:
            a, b = _sections(q)
            if "GOOD" in a:
                out.append(answer_xml("A is better"))
            elif "GOOD" in b:
                out.append(answer_xml("B is much better"))
            else:
                out.append(answer_xml("A is slightly better"))  # pure position bias: prefers the first
        return out

    ratings = rate(pairs, judge)
    assert [[r.is_flipped for r in rs] for rs in ratings] == [[False, True]] * 3
    # p1: A is better (+1) / shown swapped, "B is much better" means A -> +1.5; mean 1.25
    assert [r.score for r in ratings[0]] == [1.0, 1.5]
    assert [r.score for r in ratings[1]] == [-1.5, -1.0]
    assert [r.score for r in ratings[2]] == [0.5, -0.5]  # the position bias cancels
    data = comparison_json(read_items(pairs), [p[1] for p in pairs], [p[2] for p in pairs], ratings, ["a", "b"], {})
    assert [ex["score"] for ex in data["examples"]] == [1.25, -1.25, 0.0]
    s = summarize(data)
    assert s["counts"] == {"a": 1, "b": 1, "tie": 1, "unknown": 0} and s["win_rate_a"] == 0.5
    assert s["mean_score_a_shown_first"] == pytest.approx(0.0) and s["disagreements"][0]["index"] == 2


def read_items(pairs):
    from gemmaforge.compare import Item

    return [Item(p[0], ["t"]) for p in pairs]


def test_unparsable_answers_are_retried_then_recorded():
    calls = []

    def judge(prompts, attempt):
        calls.append((attempt, len(prompts)))
        out = []
        for q in prompts:
            a, _ = _sections(q)
            if a == "never":  # this answer always confuses the judge
                out.append("I cannot decide.")
            elif attempt == 0:
                out.append("<verdict>A wins</verdict>")  # not a label: asked again
            else:
                out.append(answer_xml("same"))
        return out

    ratings = rate([("p", "fine", "also fine"), ("q", "never", "ok")], judge, retries=2)
    assert calls == [(0, 4), (1, 4), (2, 1)]  # every call retried once; the one "never"-first call twice
    assert [(r.score, r.attempts) for r in ratings[0]] == [(0.0, 2), (0.0, 2)]
    unflipped, flipped = ratings[1]
    assert unflipped.score is None and unflipped.attempts == 3 and unflipped.raw == "I cannot decide."
    assert flipped.score == 0.0
    j = unflipped.as_json()
    assert j["score"] is None and j["rating_label"] is None and j["custom_fields"] == {
        "attempts": 3, "parsed": "no", "raw_output": "I cannot decide."}
    # an example with no parsable rating has score null (LLM Comparator's "unknown")
    none = [[Rating(False, None, None, None, 3, "?"), Rating(True, None, None, None, 3, "?")]]
    data = comparison_json(read_items([("p", "a", "b")]), ["a"], ["b"], none, ["a", "b"], {})
    assert data["examples"][0]["score"] is None and summarize(data)["counts"]["unknown"] == 1


def test_outcomes_and_bins_follow_the_web_app():
    assert [outcome(s) for s in (0.5, 0.25, 0.0, -0.25, -0.5, None)] == ["a", "tie", "tie", "tie", "b", "unknown"]
    assert [histogram_bin(s) for s in (-1.5, -1.25, -0.75, -0.25, 0.0, 0.25, 0.5, 0.75, 1.25, 1.5)] == \
        [0, 1, 2, 3, 3, 3, 4, 4, 5, 6]


# ---- the prompts file ---------------------------------------------------------------------------
def test_read_prompts(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "Hi", "tags": ["greet", "greet"]}\n\n{"prompt": "Bye", "tags": "end"}\n')
    items = read_prompts(f)
    assert [(i.prompt, i.tags) for i in items] == [("Hi", ["greet"]), ("Bye", ["end"])]


@pytest.mark.parametrize("content, message", [
    (None, "not found"),
    ('{"prompt": "ok"}\n{"prompt": "no end"\n', "line 2 is not JSON"),
    ('["a list"]\n', "line 1: expected an object"),
    ('{"prompt": ""}\n', "line 1: 'prompt' must be a non-empty string"),
    ('{"prompt": "x", "tags": [1]}\n', "'tags' must be a list of non-empty strings"),
    ('{"promt": "x"}\n', "unknown field 'promt'"),
    ("\n\n", "has no prompts"),
])
def test_malformed_prompts_file_is_one_line_and_exit_2(tmp_path, capsys, content, message):
    from gemmaforge import cli

    f = tmp_path / "p.jsonl"
    if content is not None:
        f.write_text(content)
    code = cli.main(["compare", "--model-a", "nope-a", "--model-b", "nope-b", "--judge", "nope-j",
                     "--prompts", str(f), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("gemmaforge: error: prompts file") and "\n" not in err
    assert message in err
    assert not (tmp_path / "out").exists()  # failed before loading any model or writing anything


# ---- the command end to end on a tiny model ----------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, embedded_gguf):
    """A tiny random network with Gemma 3's tokenizer: gibberish answers and judgements."""
    config = preset("tiny-gemma3").replace(vocab_size=262144, query_pre_attn_scalar=16, rope_local_theta=10000.0)
    d = tmp_path_factory.mktemp("cmp") / "model"
    gemmaforge.save_pretrained(randomize(gemmaforge.Gemma(config), seed=1), d)
    load_tokenizer(embedded_gguf).save(d / "tokenizer.json")
    return d


def test_cli_writes_llm_comparator_json_and_report(model_dir, tmp_path, capsys):
    from gemmaforge import cli

    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "Say hi.", "tags": ["chat"]}\n{"prompt": "Count to three.", "tags": ["math"]}\n'
                 '{"prompt": "Name a color."}\n')
    out = tmp_path / "out"
    code = cli.main(["compare", "--model-a", str(model_dir), "--model-b", str(model_dir), "--quant-b", "int8",
                     "--judge", str(model_dir), "--prompts", str(f), "--out", str(out), "--max-new-tokens", "6",
                     "--judge-max-new-tokens", "6", "--retries", "1", "--temperature", "1", "--seed", "3"])
    assert code == 0
    assert "A's win rate" in capsys.readouterr().out
    data = json.loads((out / "comparison.json").read_text())
    assert set(data) == {"metadata", "models", "examples", "rationale_clusters"}
    assert data["metadata"]["custom_fields_schema"] == [] and len(data["models"]) == 2
    assert data["models"][1]["name"].endswith("--quant int8")
    assert [ex["input_text"] for ex in data["examples"]] == ["Say hi.", "Count to three.", "Name a color."]
    assert [ex["tags"] for ex in data["examples"]] == [["chat"], ["math"], []]
    for ex in data["examples"]:
        assert set(ex) == {"input_text", "tags", "output_text_a", "output_text_b", "score",
                           "individual_rater_scores", "rationale_list", "custom_fields"}
        assert isinstance(ex["output_text_a"], str) and isinstance(ex["output_text_b"], str)
        assert [r["is_flipped"] for r in ex["individual_rater_scores"]] == [False, True]
        for r in ex["individual_rater_scores"]:
            assert set(r) == {"is_flipped", "score", "rating_label", "rationale", "custom_fields"}
            # 6 tokens of a random network never make a verdict: asked twice, then recorded as such
            assert r["score"] is None and r["custom_fields"]["attempts"] == 2 and r["custom_fields"]["parsed"] == "no"
        assert ex["score"] is None
    # the answers are what gemmaforge.generate gives (row i: seed + i, chat template)
    model, tok = gemmaforge.load(model_dir), load_tokenizer(model_dir)
    assert gemmaforge.generate(model, tok, ["Say hi.", "Count to three."], chat=True, temperature=1.0, seed=3,
                               max_new_tokens=6) == [ex["output_text_a"] for ex in data["examples"][:2]]
    page = (out / "report.html").read_text()
    assert "<script" not in page and "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert 'id="count-unknown">3<' in page and 'id="unparsable">6/6<' in page


# ---- the report in a real browser ----------------------------------------------------------------
def _known_data():
    """12 examples with known scores: A wins 5, B wins 3, 3 ties, 1 unknown; tags."""
    scores = [(1.5, 1.0), (1.0, 1.0), (0.5, 1.0), (1.5, 1.5), (0.5, 0.5),  # A
              (1.0, -1.0),  # a tie: the two orders disagree completely
              (-1.0, -1.0), (-0.5, -1.5), (-1.5, -1.5),  # B
              (0.0, 0.5), (0.0, 0.0),  # ties (0.25 and 0)
              (None, None)]  # unknown
    from gemmaforge.compare import Item

    items, ratings = [], []
    for i, (s1, s2) in enumerate(scores):
        items.append(Item(f"prompt {i} <b>&", ["even" if i % 2 == 0 else "odd"] + (["first"] if i < 3 else [])))
        ratings.append([Rating(False, s1, None if s1 is None else "x", "why A-first", 1, "raw"),
                        Rating(True, s2, None if s2 is None else "y", "why B-first", 1, "raw")])
    return comparison_json(items, [f"answer A{i}" for i in range(12)], [f"answer B{i}" for i in range(12)],
                           ratings, ["model-a", "model-b"], {"judge": "judge-model"})


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("headless Chromium is not installed (Debian: apt-get install -y chromium): the report's "
                "browser render is not checked")


def _browser(tmp_path, *args):
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
             f"--user-data-dir={tmp_path / 'profile'}"]
    return subprocess.run([_chromium(), *flags, *args], capture_output=True, text=True, timeout=120)


def test_report_renders_in_headless_chromium_with_the_numbers(tmp_path):
    browser = _chromium()
    assert browser
    s = write_outputs(tmp_path / "r", _known_data())
    assert s["counts"] == {"a": 5, "b": 3, "tie": 3, "unknown": 1}
    page = tmp_path / "r" / "report.html"
    result = _browser(tmp_path, "--dump-dom", page.as_uri())
    assert result.returncode == 0, result.stderr[-2000:]
    dom = result.stdout

    def by_id(name):
        m = re.search(rf'id="{name}"[^>]*>([^<]*)<', dom)
        assert m, name
        return m.group(1)

    # A's win rate: (5 + 3/2) / 11 = 59.1%; Wilson 95% interval of 6.5/11
    assert by_id("win-rate") == "59.1%" and by_id("win-rate-ci") == "31.6% – 81.9%"
    assert (by_id("count-a"), by_id("count-b"), by_id("count-tie"), by_id("count-unknown")) == ("5", "3", "3", "1")
    assert by_id("n-examples") == "12" and by_id("unparsable") == "2/24"
    counts = dict(re.findall(r'data-bin="(\d)"[^>]*>(\d+)<', dom))
    assert [int(counts[str(i)]) for i in range(7)] == s["histogram"] == [1, 2, 0, 3, 2, 2, 1]
    row = re.search(r'data-tag="first">(.*?)</tr>', dom).group(1)
    assert re.findall(r'class="n[^"]*">([^<]*)<', row)[:5] == ["3", "3", "0", "0", "0"]
    assert "prompt 5 &lt;b&gt;&amp;" in dom  # example 5 disagrees most (+1 vs -1), escaped
    assert re.search(r'data-index="5"', dom) and dom.index('data-index="5"') < dom.index('data-index="7"')
    shot = _browser(tmp_path, "--screenshot=" + str(tmp_path / "report.png"), "--window-size=1200,1600", page.as_uri())
    assert shot.returncode == 0 and (tmp_path / "report.png").stat().st_size > 10_000
