"""CLI commands generate / chat / info / convert, run in-process on a tiny model with Gemma 3's real
tokenizer (random weights, so the text is gibberish; what is checked is that the CLI gives exactly
what the library gives, and that bad input is one line and exit code 2)."""

import importlib
import io
import json
import sys

import pytest
import torch

import gemmaforge
from gemmaforge import cli, load, load_tokenizer, preset
from gemmaforge.kv_cache import cache_bytes_per_token

from conftest import randomize

# Gemma 3's vocabulary, a tiny network; GGUF-representable (llama.cpp's query scale and local theta).
CONFIG = preset("tiny-gemma3").replace(vocab_size=262144, query_pre_attn_scalar=16, rope_local_theta=10000.0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, embedded_gguf):
    tok = load_tokenizer(embedded_gguf)
    d = tmp_path_factory.mktemp("tiny") / "model"
    gemmaforge.save_pretrained(randomize(gemmaforge.Gemma(CONFIG), seed=1), d)
    tok.save(d / "tokenizer.json")
    return d


@pytest.fixture(scope="module")
def lib(model_dir):
    """The library's own answers, for comparing the CLI against."""
    return load(model_dir), load_tokenizer(model_dir)


def run(args, stdin="", monkeypatch=None, capsys=None):
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def cmd(monkeypatch, capsys):
    return lambda *args, stdin="": run(args, stdin, monkeypatch, capsys)


# ---- generate -------------------------------------------------------------------------------------
def test_generate_quant_int8_prints_what_the_quantized_library_generates(cmd, model_dir, monkeypatch):
    import gemmaforge.quant as quant

    model, tok = load(model_dir), load_tokenizer(model_dir)
    quant.quantize(model, "int8")
    expected = gemmaforge.generate(model, tok, ["Hello there"], max_new_tokens=6)
    calls = []
    real = quant.quantize
    monkeypatch.setattr(quant, "quantize", lambda m, mode, **kw: calls.append((mode, kw)) or real(m, mode, **kw))
    code, out, err = cmd("generate", "--model", model_dir, "Hello there", "--max-new-tokens", 6, "--quant", "int8")
    assert code == 0, err
    assert calls == [("int8", {"head": "same"})]
    assert out == expected[0] + "\n"


@pytest.mark.parametrize("flag, expected", [("auto", False), ("on", True), ("off", False)])
def test_generate_compile_flag_reaches_the_engine(cmd, model_dir, monkeypatch, flag, expected):
    """auto: a 2-token CPU run does not pay for compiling; a long one leaves it to the Engine (None)."""
    import argparse

    from gemmaforge.commands.generate import COMPILE_PAYS_OFF_TOKENS, make_engine
    from gemmaforge.generation import engine

    seen, real = [], engine.FastForward
    monkeypatch.setattr(engine, "FastForward", lambda m, compile: seen.append(compile) or real(m, compile=False))
    code, out, err = cmd("generate", "--model", model_dir, "Hello there", "--max-new-tokens", 2, "--compile", flag)
    assert code == 0, err
    assert seen == [expected]
    if flag == "auto":
        make_engine(load(model_dir), argparse.Namespace(compile="auto"), new_tokens=COMPILE_PAYS_OFF_TOKENS)
        assert seen[-1] is None


def test_generate_prints_what_the_library_generates(cmd, model_dir, lib):
    code, out, err = cmd("generate", "--model", model_dir, "Hello there", "Once upon a time", "--max-new-tokens", 6)
    assert code == 0, err
    expected = gemmaforge.generate(*lib, ["Hello there", "Once upon a time"], max_new_tokens=6)
    assert out == "".join(c + "\n" for c in expected)
    assert all(c for c in expected)


def test_generate_reads_prompts_from_stdin_and_passes_sampling_flags(cmd, model_dir, lib):
    flags = ["--temperature", 0.9, "--top-k", 40, "--top-p", 0.9, "--min-p", 0.01, "--repetition-penalty", 1.1,
             "--seed", 3, "--max-new-tokens", 8]
    code, out, err = cmd("generate", "--model", model_dir, "--json", *flags, stdin="first\n\nsecond line\n")
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt"] for r in rows] == ["first", "second line"]
    expected = gemmaforge.generate(*lib, ["first", "second line"], temperature=0.9, top_k=40, top_p=0.9,
                                   min_p=0.01, repetition_penalty=1.1, seed=3, max_new_tokens=8)
    assert [r["completion"] for r in rows] == expected
    assert expected != gemmaforge.generate(*lib, ["first", "second line"], max_new_tokens=8)


def test_generate_chat_wraps_the_prompt_in_the_template(cmd, model_dir, lib):
    code, out, _ = cmd("generate", "--model", model_dir, "--chat", "--json", "Hi!", "--max-new-tokens", 5)
    assert code == 0
    completion = json.loads(out)["completion"]
    assert completion == gemmaforge.generate(*lib, "Hi!", chat=True, max_new_tokens=5)[0]
    assert completion != gemmaforge.generate(*lib, "Hi!", max_new_tokens=5)[0]


def test_generate_stop_string_is_cut_and_not_printed(cmd, model_dir, lib):
    free = gemmaforge.generate(*lib, "The end", max_new_tokens=16)[0]
    pairs = (free[i : i + 2] for i in range(3, len(free) - 2))
    stop = next(s for s in pairs if "\\" not in s and s.strip())  # a backslash would be unescaped
    code, out, _ = cmd("generate", "--model", model_dir, "--json", "The end", "--max-new-tokens", 16, "--stop", stop)
    assert code == 0
    assert json.loads(out)["completion"] == free[: free.index(stop)]


def test_generate_streams_to_a_terminal(model_dir, lib, monkeypatch, capsys):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    screen = Terminal()
    monkeypatch.setattr(sys, "stdout", screen)
    assert cli.main(["generate", "--model", str(model_dir), "Hello there", "--max-new-tokens", "6"]) == 0
    expected = gemmaforge.generate(*lib, "Hello there", max_new_tokens=6)[0]
    assert screen.getvalue() == "\033[2mHello there\033[0m" + expected + "\n"  # the prompt echoed, dimmed


def test_stop_flag_understands_escapes():
    from gemmaforge.commands.generate import unescape

    assert unescape(r"a\nb\tc\\n\q") == "a\nb\tc\\n\\q"


@pytest.mark.parametrize("args,stdin,message", [
    (["generate", "--top-p", "1.5", "x"], "", "invalid top_p=1.5"),
    (["generate", "--temperature", "-1", "x"], "", "invalid temperature=-1.0"),
    (["generate", "--max-new-tokens", "0", "x"], "", "invalid max_new_tokens=0"),
    (["generate", "--model", "/no/such/model.gguf", "x"], "", "does not exist"),
    (["generate", "--model", "{dir}", ""], "", "prompt 1 is empty"),
    (["generate", "--model", "{dir}"], "\n  \n", "only empty lines"),
    (["generate", "--model", "{dir}", "word " * 300], "", "but the model's context is 256"),
    (["generate", "--model", "tiny-gemma3", "x"], "", "has no tokenizer"),
    (["generate", "--model", "{dir}", "--dtype", "float8", "x"], "", "unknown dtype"),
    (["generate", "--model", "{bad}", "x"], "", "not a readable GGUF file"),
    (["info", "{bad}"], "", "not a readable GGUF file"),
    (["convert", "{dir}", "{dir}/../out", "--dtype", "q8_0"], "", "q8_0 is a GGUF type"),
    (["convert", "{dir}", "{dir}"], "", "already exists"),
])
def test_bad_input_is_one_line_and_exit_2(cmd, model_dir, tmp_path, args, stdin, message):
    bad = tmp_path / "corrupt.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 40)
    args = [a.format(dir=model_dir, bad=bad) for a in args]
    code, out, err = cmd(*args, stdin=stdin)
    assert code == 2
    assert err.startswith("gemmaforge: error: ") and err.count("\n") == 1, err
    assert message in err
    assert "Traceback" not in err


# ---- chat -----------------------------------------------------------------------------------------
def test_chat_keeps_history_resets_and_exits(cmd, model_dir, monkeypatch):
    calls = []

    def fake_stream(engine, tokenizer, messages, **kwargs):
        calls.append([dict(m) for m in messages])
        yield f"reply{len(calls)}"

    # importlib, not gemmaforge.generation: that attribute is the generate() function, not the package.
    monkeypatch.setattr(importlib.import_module("gemmaforge.generation"), "stream", fake_stream)
    code, out, err = cmd("chat", "--model", model_dir,
                         stdin="hello\nhow are you?\n/reset\n/bogus\nbye\n/exit\nnever read\n")
    assert code == 0, err
    assert out == "reply1\nreply2\nreply3\n"
    assert calls == [
        [{"role": "user", "content": "hello"}],
        [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "reply1"},
         {"role": "user", "content": "how are you?"}],
        [{"role": "user", "content": "bye"}],
    ]
    assert "unknown command /bogus" in err


def test_chat_system_text_leads_every_turn(cmd, model_dir, monkeypatch):
    seen = []

    def fake_stream(engine, tokenizer, messages, **kwargs):
        seen.append(messages[0])
        yield "ok"

    monkeypatch.setattr(importlib.import_module("gemmaforge.generation"), "stream", fake_stream)
    code, out, _ = cmd("chat", "--model", model_dir, "--system", "Answer in French.", stdin="hi\nagain\n")
    assert code == 0 and out == "ok\nok\n"
    assert seen == [{"role": "system", "content": "Answer in French."}] * 2


def test_chat_streams_the_models_reply(cmd, model_dir, lib):
    code, out, _ = cmd("chat", "--model", model_dir, "--max-new-tokens", 6, stdin="Hi\n")
    assert code == 0
    expected = "".join(gemmaforge.stream(*lib, [{"role": "user", "content": "Hi"}], max_new_tokens=6))
    assert out == expected + "\n"


def test_chat_drops_the_oldest_turns_when_the_context_is_full():
    from gemmaforge.commands.chat import fit_history

    history = [{"role": "user", "content": "a" * n} for n in (50, 0, 40, 0, 30)]
    kept = fit_history(history, lambda h: sum(len(m["content"]) for m in h), budget=75)
    assert kept == history[2:]


# ---- info -----------------------------------------------------------------------------------------
def test_info_json_counts_the_stored_tensors(cmd, model_dir, lib):
    code, out, _ = cmd("info", model_dir, "--json")
    assert code == 0
    facts = json.loads(out)
    model = lib[0]
    assert facts["stored_parameters"] == sum(p.numel() for p in model.parameters()) == facts["parameters"]
    assert facts["tensor_types"] == {"F32": len(model.state_dict())}
    assert facts["layers"] == {"total": 7, "local": 6, "global": 1, "sliding_window": 8, "pattern": "LLLLLGL"}
    assert facts["kv_cache"]["bytes_per_token"] == cache_bytes_per_token(CONFIG, 256, 2)


def test_info_reads_gguf_quant_types_from_the_header(cmd):
    code, out, _ = cmd("info")  # the embedded Q4_K_M model
    assert code == 0
    assert "gemma3" in out and "LLLLLG LLLLLG LLLLLG" in out and "82% less" in out
    tensors = next(line for line in out.splitlines() if line.startswith("tensors"))
    assert "Q4_K" in tensors and "Q6_K" in tensors


# ---- convert --------------------------------------------------------------------------------------
@torch.no_grad()
def test_convert_hf_to_gguf_and_back(cmd, model_dir, lib, tmp_path):
    model, tok = lib
    ids = torch.tensor([tok.encode("Round trips keep the weights.")])
    expected = model(ids)

    code, _, err = cmd("convert", model_dir, tmp_path / "m.gguf")
    assert code == 0, err
    assert torch.equal(load(tmp_path / "m.gguf")(ids), expected)  # f32: lossless
    text = "Tokenizer travels too:\n\n<table> 你好  spaces <start_of_turn>"
    assert load_tokenizer(tmp_path / "m.gguf").encode(text) == tok.encode(text)

    code, _, err = cmd("convert", tmp_path / "m.gguf", tmp_path / "hf", "--dtype", "bf16")
    assert code == 0, err
    back = load(tmp_path / "hf")(ids)
    assert (back - expected).abs().max() < 0.05 * expected.abs().max()  # bf16 weights
    assert load_tokenizer(tmp_path / "hf").encode(text) == tok.encode(text)

    code, _, err = cmd("convert", tmp_path / "m.gguf", tmp_path / "q8.gguf", "--dtype", "q8_0")
    assert code == 0, err
    q8 = load(tmp_path / "q8.gguf")(ids)
    assert not torch.equal(q8, expected)
    # 8-bit weights (0.4% per weight; random weights amplify it ~7x by the logits): close, not equal.
    # A wrong layout or scale would be off by the logits' whole size.
    assert (q8 - expected).abs().max() < 0.1 * expected.abs().max()


def test_generate_runs_a_quantized_gguf_as_stored_by_default(cmd, model_dir, tmp_path):
    """--quant auto (the default) keeps a Q8_0 file's quantization; --quant none / --dtype float32
    dequantize it; --quant gguf refuses a source that is no GGUF file (one line, exit 2)."""
    code, _, err = cmd("convert", model_dir, tmp_path / "q8.gguf", "--dtype", "q8_0")
    assert code == 0, err
    path = tmp_path / "q8.gguf"
    native, plain, tok = load(path), load(path, dtype=torch.float32), load_tokenizer(path)
    assert native.quantization.startswith("gguf Q8_0") and not getattr(plain, "quantization", None)
    for flags, model in (((), native), (("--quant", "gguf"), native), (("--quant", "none"), plain),
                         (("--dtype", "float32"), plain)):
        expected = gemmaforge.generate(model, tok, ["Hello there"], max_new_tokens=5)[0]
        code, out, err = cmd("generate", "--model", path, "Hello there", "--max-new-tokens", 5, *flags)
        assert code == 0, err
        assert out == expected + "\n", flags
    code, out, err = cmd("generate", "--model", model_dir, "Hi", "--max-new-tokens", 2, "--quant", "gguf")
    assert code == 2 and "not a GGUF file" in err and err.count("\n") == 1


def test_convert_replaces_only_with_force(cmd, tmp_path):
    out = tmp_path / "out"
    assert cmd("convert", "tiny-gemma3", out)[0] == 0
    (out / "stale.txt").write_text("from before")
    assert cmd("convert", "tiny-gemma3", out)[0] == 2
    assert cmd("convert", "tiny-gemma3", out, "--force", "--dtype", "bf16")[0] == 0
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


# ---- the Python API the commands are built on ---------------------------------------------------------
def feed_all(stream, tok, text, extra_ids=()):
    pieces = [stream.feed(i) for i in [*tok.encode(text, add_bos=False), *extra_ids]]
    return pieces + [stream.finish()]


def test_text_stream_cuts_a_stop_string_that_spans_tokens(lib):
    from gemmaforge.generation import TextStream

    tok = lib[1]
    text = "Question: what is 2+2?\nAnswer: 4\nQuestion: and 3+3?"
    assert len(tok.encode("\nQuestion:", add_bos=False)) > 1  # the stop string is several tokens
    stream = TextStream(tok, stop=["\nQuestion:"])
    pieces = feed_all(stream, tok, text)
    assert "".join(pieces) == "Question: what is 2+2?\nAnswer: 4"
    assert stream.done
    assert not any("\nQuest" in p for p in pieces)


def test_text_stream_holds_back_a_possible_stop_then_releases_it(lib):
    from gemmaforge.generation import TextStream

    tok = lib[1]
    stream = TextStream(tok, stop=["The cat sat"])
    pieces = feed_all(stream, tok, "The cat ran away")
    assert "".join(pieces) == "The cat ran away"
    assert pieces[0] == ""  # "The" could have become the stop string: held back


def test_text_stream_never_splits_a_character_and_drops_stop_ids(lib):
    from gemmaforge.generation import TextStream

    tok = lib[1]
    text = "龘 and 𓀀 are rare"  # spelled with byte tokens (byte fallback)
    stream = TextStream(tok, stop_ids=tok.stop_ids)
    pieces = feed_all(stream, tok, text, extra_ids=[tok.eos_id, *tok.encode(" after", add_bos=False)])
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_stream_equals_generate_with_and_without_stop_strings(lib):
    model, tok = lib
    free = gemmaforge.generate(model, tok, "Once", max_new_tokens=12)[0]
    assert "".join(gemmaforge.stream(model, tok, "Once", max_new_tokens=12)) == free
    stop = free[4:6]
    cut = gemmaforge.generate(model, tok, ["Once", "Once"], max_new_tokens=12, stop=stop)
    assert cut == [free[: free.index(stop)]] * 2
    assert "".join(gemmaforge.stream(model, tok, "Once", max_new_tokens=12, stop=stop)) == cut[0]


def test_api_errors_are_raised_at_the_call(lib):
    model, tok = lib
    with pytest.raises(gemmaforge.GemmaforgeError, match="did you mean 'temperature'"):
        gemmaforge.stream(model, tok, "x", temprature=0.5)
    with pytest.raises(gemmaforge.GemmaforgeError, match="prompt is empty"):
        gemmaforge.generate(model, tok, ["ok", ""])
    with pytest.raises(gemmaforge.GemmaforgeError, match="context is 256"):
        gemmaforge.stream(model, tok, "word " * 300)
    with pytest.raises(gemmaforge.GemmaforgeError, match="role"):
        gemmaforge.generate(model, tok, [{"role": "robot", "content": "hi"}])
