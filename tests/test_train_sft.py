"""gemmaforge sft: chat rendering and reply-only targets, packing without cross-attention, LoRA merged
at save and resumed from its adapters, held-out loss, bad input, a NaN loss."""

import json

import pytest
import torch
import torch.nn.functional as F
import yaml

import gemmaforge
from gemmaforge import Gemma, preset
from gemmaforge.chat import encode_chat, format_chat
from gemmaforge.cli import main
from gemmaforge.train.chats import Record, conversation
from gemmaforge.train.config import load_config
from gemmaforge.train.loop import train
from gemmaforge.train.packing import SequenceRows, rows_batch
from gemmaforge.train.recipes import SFT

from conftest import randomize
from post_training_data import chat, counting_chats, tiny_tokenizer, write_jsonl
from test_train_loop import metrics


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tok(tok_path):
    return gemmaforge.load_tokenizer(tok_path)


def sft_cfg(tmp_path, tok_path, name="run", **kw):
    data = tmp_path / "chats.jsonl"
    if not data.exists():
        write_jsonl(data, counting_chats(60))
    base = dict(model="tiny-gemma2", tokenizer=str(tok_path), data=str(data), out=str(tmp_path / name), seq_len=96,
                batch_size=4, max_steps=6, warmup_steps=1, lr=3e-3, min_lr=3e-4, eval_every=3, log_every=1,
                save_every=3, eval_batches=2, val_fraction=0.1, progress=False, tensorboard=False)
    base.update(kw)
    return load_config(None, base)


def test_targets_are_the_replies_and_their_end_of_turn(tok):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": " a b "}, {"role": "user", "content": "more"},
                {"role": "assistant", "content": "c"}]
    seq = conversation(tok, Record("x line 1", {"messages": messages}))
    assert tok.decode(seq.ids.tolist()) == format_chat(messages, add_generation_prompt=False)
    assert seq.ids.tolist() == encode_chat(tok, messages, add_generation_prompt=False)
    assert tok.decode(seq.ids[seq.targets].tolist()) == "a b<end_of_turn>c<end_of_turn>"


def test_pieces_tokenize_as_the_whole_string_with_the_real_tokenizer(embedded_gguf):
    tok = gemmaforge.load_tokenizer(embedded_gguf)
    for row in [chat("Write a haiku.", "Rain on the roof,\n\nquiet night."),
                chat("2+2?", "4", system="You are terse."), chat("¿Qué?", "  Nada.  ")]:
        seq = conversation(tok, Record("x", row))
        assert seq.ids.tolist() == encode_chat(tok, row["messages"], add_generation_prompt=False)
        prompt = encode_chat(tok, row["messages"][:-1])  # what generation is prompted with
        assert seq.ids[:len(prompt)].tolist() == prompt and not seq.targets[:len(prompt)].any()
        assert seq.targets[len(prompt):-1].all() and seq.ids[-2] == tok.end_of_turn_id


@pytest.mark.parametrize("name", ["tiny-gemma2", "tiny-gemma3"])
def test_a_packed_row_is_its_conversations_one_by_one(tok, name):
    model = randomize(Gemma(preset(name)))
    seqs = [conversation(tok, Record("x", r)) for r in counting_chats(3, seed=1)]
    packed = rows_batch([seqs, seqs[:1]], tok.pad_id)  # the second row is padded to the first's length
    assert packed.segment_ids[0].unique().tolist() == [0, 1, 2] and packed.segment_ids[1].unique().tolist() == [0, 1]
    starts = (packed.positions[0] == 0).nonzero().squeeze(1).tolist()
    assert starts == [0, len(seqs[0]), len(seqs[0]) + len(seqs[1])]  # positions restart per conversation
    nll = lambda b: F.cross_entropy(model(b.tokens, b.positions, segment_ids=b.segment_ids).flatten(0, 1),
                                    b.labels.flatten(), ignore_index=-100, reduction="sum")
    alone = sum(nll(rows_batch([[s]], tok.pad_id)) for s in seqs + seqs[:1])
    torch.testing.assert_close(nll(packed), alone, rtol=1e-5, atol=1e-4)
    n_targets = sum(int(s.targets[1:].sum()) for s in seqs + seqs[:1])
    assert int((packed.labels != -100).sum()) == n_targets


def test_rows_pack_greedily_and_cut_long_conversations(tok):
    seqs = [conversation(tok, Record("x", r)) for r in counting_chats(20)]
    rows = SequenceRows(seqs, 96, tok.pad_id, seed=3)
    assert sorted(i for row in rows.rows for i in row) == list(range(20)) and len(rows.rows) < 20
    assert all(sum(len(seqs[i]) for i in row) <= 96 for row in rows.rows)
    single = SequenceRows(seqs, 30, tok.pad_id, pack=False)
    assert single.num_samples == 20 and single.truncated == sum(len(s) > 30 for s in seqs) > 0
    assert single.batch([0, 1]).tokens.shape[1] <= 30


def test_sft_learns_reports_held_out_loss_and_exports(tmp_path, tok_path):
    from transformers import AutoModelForCausalLM

    cfg = sft_cfg(tmp_path, tok_path, max_steps=24, eval_every=12, save_every=12, log_every=4)
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    assert main(["sft", str(tmp_path / "sft.yaml")]) == 0
    curve, val = metrics(tmp_path / "run"), metrics(tmp_path / "run", "val")
    assert curve[-1]["ce"] < 0.6 * curve[0]["ce"] and val[-1]["loss"] < val[0]["loss"]
    assert val[-1]["tokens"] > 0 and [r["step"] for r in val] == [12, 24]
    out = tmp_path / "run" / "model"
    assert (out / "tokenizer.json").is_file()
    model = gemmaforge.load(out)
    tokens = torch.tensor([encode_chat(gemmaforge.load_tokenizer(out), [{"role": "user", "content": "count from c"}])])
    hf = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, rtol=1e-4, atol=1e-4)


def test_lora_trains_only_adapters_merges_at_save_and_resumes(tmp_path, tok_path, monkeypatch):
    import gemmaforge.train.loop as loop

    lora = dict(lora_rank=4, lora_alpha=8.0, lora_targets="q_proj,v_proj,down_proj", lr=1e-2)
    train(sft_cfg(tmp_path, tok_path, "whole", **lora), recipe=SFT())
    real_step = loop.train_step

    def crash_at_4(run, step):
        if step == 3:
            raise KeyboardInterrupt  # after the step-3 checkpoint
        return real_step(run, step)

    monkeypatch.setattr(loop, "train_step", crash_at_4)
    with pytest.raises(KeyboardInterrupt):
        train(sft_cfg(tmp_path, tok_path, "part", **lora), recipe=SFT())
    monkeypatch.setattr(loop, "train_step", real_step)
    train(sft_cfg(tmp_path, tok_path, "part", **lora), recipe=SFT())  # resumes from step 3's adapters
    whole, part = metrics(tmp_path / "whole"), metrics(tmp_path / "part")
    assert [r["loss"] for r in whole] == pytest.approx([r["loss"] for r in part], rel=1e-6)
    base = gemmaforge.load("tiny-gemma2")
    tuned = gemmaforge.load(tmp_path / "whole" / "model")
    changed = {n for n, p in tuned.state_dict().items() if not torch.equal(p, base.state_dict()[n])}
    assert changed and all(n.endswith(("q_proj.weight", "v_proj.weight", "down_proj.weight")) for n in changed)
    blob = torch.load(tmp_path / "whole" / "checkpoints" / "step-000006" / "trainer.pt", weights_only=True)
    assert blob["adapters"] and all(".lora_" in k for k in blob["adapters"])
    with pytest.raises(gemmaforge.GemmaforgeError, match="lora_rank"):
        train(sft_cfg(tmp_path, tok_path, "whole", max_steps=8), recipe=SFT())  # a full fine-tune cannot resume adapters
    other = dict(lora, lora_targets="q_proj,v_proj")  # same rank, other modules: the adapter keys differ
    with pytest.raises(gemmaforge.GemmaforgeError, match="adapters that do not match.*unexpected layers.0.mlp.down_proj"):
        train(sft_cfg(tmp_path, tok_path, "whole", max_steps=8, **other), recipe=SFT())


@pytest.mark.parametrize("lines,match", [
    (["{\"messages\": []}", "{not json"], "line 2 is not valid JSON"),
    ([json.dumps({"messages": [{"role": "user", "content": "hi"}]})], "line 1: the conversation has no assistant"),
    ([json.dumps({"text": "hi"})], "line 1 has no field 'messages'"),
    ([json.dumps({"messages": [{"role": "assistant", "content": "a"}]})], "line 1: message 0 has role 'assistant'"),
    (["[1, 2]"], "line 1 is a JSON list"),
])
def test_bad_chat_data_is_one_line_exit_2_and_writes_nothing(tmp_path, tok_path, capsys, lines, match):
    data = write_jsonl(tmp_path / "bad.jsonl", [json.dumps(r) for r in counting_chats(3)] * 0 + lines)
    cfg = sft_cfg(tmp_path, tok_path, data=str(data), val_data=str(data))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    assert main(["sft", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err
    assert list((tmp_path / "run").iterdir()) == []


def test_a_preset_without_a_tokenizer_is_refused(tmp_path, tok_path):
    with pytest.raises(gemmaforge.GemmaforgeError, match="set tokenizer"):
        train(sft_cfg(tmp_path, tok_path, tokenizer=None), recipe=SFT())


class NaNAfter(SFT):
    def objective(self, cfg, student, meta, train, device):
        inner = super().objective(cfg, student, meta, train, device)
        calls = {"n": 0}
        real = inner.loss

        def loss(batch):
            calls["n"] += 1
            out = real(batch)
            return out._replace(loss=out.loss * float("nan")) if calls["n"] > 4 else out

        inner.loss = loss
        return inner


def test_a_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tok_path):
    cfg = sft_cfg(tmp_path, tok_path, save_every=2, eval_every=100, micro_batch_size=2)  # 2 forwards a step
    with pytest.raises(gemmaforge.GemmaforgeError, match="loss is nan at step 3.*step-000002"):
        train(cfg, recipe=NaNAfter())
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["step-000002"] and not (tmp_path / "run" / "model").exists()
