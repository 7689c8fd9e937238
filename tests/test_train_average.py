"""gemmaforge average: weighted linear means, task arithmetic and WARP-style slerp of task vectors."""

import math

import pytest
import torch

import gemmaforge
from gemmaforge import Gemma, preset
from gemmaforge.cli import main
from gemmaforge.train.averaging import average, slerp

from conftest import randomize
from post_training_data import tiny_tokenizer


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A base and three 'fine-tunes' of it, as HF directories with one tokenizer."""
    root = tmp_path_factory.mktemp("avg")
    tok = tiny_tokenizer(root / "tok")
    base = randomize(Gemma(preset("tiny-gemma2")), seed=0)
    paths = {}
    for i, name in enumerate(["base", "a", "b", "c"]):
        m = randomize(Gemma(preset("tiny-gemma2")), seed=0)
        if name != "base":
            g = torch.Generator().manual_seed(10 + i)
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.01)
        gemmaforge.save_pretrained(m, root / name)
        (root / name / "tokenizer.json").write_bytes(tok.read_bytes())
        paths[name] = str(root / name)
    return paths, base


def _state(path):
    return gemmaforge.load(path).state_dict()


def test_weighted_linear_mean(tmp_path, models):
    paths, _ = models
    out = tmp_path / "mean"
    assert main(["average", paths["a"], paths["b"], "--weights", "1,3", "--out", str(out)]) == 0
    got, a, b = _state(out), _state(paths["a"]), _state(paths["b"])
    for k in got:
        torch.testing.assert_close(got[k], 0.25 * a[k] + 0.75 * b[k])
    assert (out / "tokenizer.json").is_file()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)  # an ordinary HF directory


def test_task_arithmetic_with_a_base(models):
    paths, _ = models
    model, _ = average([paths["a"]], weights=[0.5], base=paths["base"])  # WARP's interpolation to the init
    a, base = _state(paths["a"]), _state(paths["base"])
    for k, t in model.state_dict().items():
        torch.testing.assert_close(t, base[k] + 0.5 * (a[k] - base[k]))


def test_slerp_keeps_the_task_vector_norm_and_matches_the_formula(models):
    g = torch.Generator().manual_seed(0)
    d1, d2 = torch.randn(50, generator=g), torch.randn(50, generator=g)
    omega = math.acos(float(torch.dot(d1, d2) / (d1.norm() * d2.norm())))
    want = math.sin(0.7 * omega) / math.sin(omega) * d1 + math.sin(0.3 * omega) / math.sin(omega) * d2
    torch.testing.assert_close(slerp(d1, d2, 0.3), want)
    u1, u2 = d1 / d1.norm(), d2 / d2.norm()
    assert slerp(u1, u2, 0.5).norm() == pytest.approx(1.0, abs=1e-5)  # the linear mean would be shorter
    assert (0.5 * (u1 + u2)).norm() < 0.9
    torch.testing.assert_close(slerp(d1, 2 * d1, 0.5), 1.5 * d1)  # parallel: the linear limit

    paths, _ = models
    model, _ = average([paths["a"], paths["b"]], method="slerp", base=paths["base"])
    a, b, base = _state(paths["a"]), _state(paths["b"]), _state(paths["base"])
    for k, t in model.state_dict().items():
        torch.testing.assert_close(t, base[k] + slerp(a[k] - base[k], b[k] - base[k], 0.5), rtol=1e-5, atol=1e-6)
    three, _ = average([paths["a"], paths["b"], paths["c"]], method="slerp", base=paths["base"], weights=[1, 1, 2])
    c = _state(paths["c"])
    k = "layers.0.attn.q_proj.weight"
    d = slerp(slerp(a[k] - base[k], b[k] - base[k], 0.5), c[k] - base[k], 0.5)
    torch.testing.assert_close(three.state_dict()[k], base[k] + d, rtol=1e-5, atol=1e-6)


def test_presets_are_sources_too(tmp_path):
    out = tmp_path / "p"
    assert main(["average", "tiny-gemma3", "tiny-gemma3", "--out", str(out)]) == 0
    torch.testing.assert_close(_state(out)["final_norm.weight"], gemmaforge.load("tiny-gemma3").state_dict()["final_norm.weight"])


@pytest.mark.parametrize("args,match", [
    (["{a}", "tiny-gemma3", "--out", "{out}"], "averaging needs models with the same config"),
    (["{a}", "{b}", "--method", "slerp", "--out", "{out}"], "give --base"),
    (["{a}", "{b}", "--weights", "1", "--out", "{out}"], "2 sources"),
    (["{a}", "{b}", "--weights", "1,x", "--out", "{out}"], "numbers separated by commas"),
    (["{a}", "--out", "{out}"], "at least two sources"),
    (["{a}", "{b}", "--out", "{a}", "--force"], "is also a source"),
    (["{a}", "{b}", "--out", "{a}"], "exists"),
    (["{a}", "/no/such/model", "--out", "{out}"], "does not exist"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, models, capsys, args, match):
    paths, _ = models
    out = tmp_path / "out"
    argv = [x.format(a=paths["a"], b=paths["b"], out=out) for x in args]
    assert main(["average", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err
    assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_different_tokenizers_are_refused(tmp_path, models):
    paths, _ = models
    other = tmp_path / "other"
    gemmaforge.save_pretrained(gemmaforge.load(paths["b"]), other)
    (other / "tokenizer.json").write_bytes(tiny_tokenizer(tmp_path / "t2", extra=["ab"]).read_bytes())
    with pytest.raises(gemmaforge.GemmaforgeError, match="different tokenizer"):
        average([paths["a"], str(other)])
