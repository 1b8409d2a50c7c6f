"""Text -> tokenizer.json -> token file -> a Llama trains on it (loss and held-out loss fall).

The tokenizer is a tiny BPE trained here with ``tokenizers`` on generated text:
nothing is downloaded.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from common.spec import JobSpec, SpecError
from tests.helpers.trainer_helpers import run_sweep
from trainer import data

WORDS = ("the cat dog bird sees runs eats a small big red blue fish tree house near under over quickly "
         "slowly and then").split()


def sentences(seed: int, n: int) -> list[str]:
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        subject, verb, obj = rnd.choice(WORDS[:4]), rnd.choice(WORDS[4:7]), rnd.choice(WORDS[9:14])
        out.append(f"the {subject} {verb} a {obj} {rnd.choice(WORDS[14:17])} the {rnd.choice(WORDS[14:16])}.")
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("text")
    plain = root / "stories.txt"
    plain.write_text("\n\n".join(" ".join(sentences(i, 3)) for i in range(150)) + "\n")
    jsonl = root / "more.jsonl"
    jsonl.write_text("".join(json.dumps({"text": " ".join(sentences(1000 + i, 2))}) + "\n" for i in range(60)))
    held_out = root / "held.txt"
    held_out.write_text("\n\n".join(" ".join(sentences(5000 + i, 3)) for i in range(40)) + "\n")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([str(plain)], trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(root / "tokenizer.json"))
    return root


def test_prepare_streams_documents_with_a_separator_and_mixes_by_weight(corpus):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(corpus / "tokenizer.json"))
    out = corpus / "mixed.bin"
    code = data.main(["prepare", f"{corpus / 'stories.txt'}:1", f"{corpus / 'more.jsonl'}:2.5",
                      "--tokenizer", str(corpus / "tokenizer.json"), "--out", str(out)])
    assert code == 0
    info = json.loads((corpus / "mixed.bin.json").read_text())
    sep = tok.token_to_id("</s>")
    assert info["separator_id"] == sep and info["dtype"] == "uint16"
    tokens = torch.frombuffer(bytearray(out.read_bytes()), dtype=torch.uint16).to(torch.int64)
    assert tokens.numel() == info["tokens"]
    assert int((tokens == sep).sum()) == info["documents"]
    # weight 2.5: every JSONL document twice, plus about half of them a third time
    assert 150 + 2 * 60 + 10 < info["documents"] < 150 + 3 * 60 - 10
    # the first document decodes back to its text: a separator ends it
    first_end = int((tokens == sep).nonzero()[0])
    decoded = tok.decode(tokens[:first_end].tolist())
    assert decoded.strip() in ((corpus / "stories.txt").read_text().split("\n\n")[0].strip(),
                               json.loads((corpus / "more.jsonl").read_text().splitlines()[0])["text"])
    # interleaved, not concatenated: JSONL documents appear within the first fifth of the file
    a = data.main(["prepare", str(corpus / "more.jsonl"), "--tokenizer", str(corpus / "tokenizer.json"),
                   "--out", str(corpus / "jsonl-only.bin")])
    assert a == 0
    first_jsonl = torch.frombuffer(bytearray((corpus / "jsonl-only.bin").read_bytes()), dtype=torch.uint16)[:8]
    window = tokens[: tokens.numel() // 5].tolist()
    probe = first_jsonl.tolist()
    assert any(window[i:i + 8] == probe for i in range(len(window) - 8))
    # the same inputs give the same file
    again = corpus / "again.bin"
    data.main(["prepare", f"{corpus / 'stories.txt'}:1", f"{corpus / 'more.jsonl'}:2.5",
               "--tokenizer", str(corpus / "tokenizer.json"), "--out", str(again)])
    assert again.read_bytes() == out.read_bytes()


def test_prepare_refuses_bad_input_by_name(corpus, capsys):
    bad = corpus / "bad.jsonl"
    bad.write_text('{"body": "x"}\n')
    assert data.main(["prepare", str(bad), "--tokenizer", str(corpus / "tokenizer.json"),
                      "--out", str(corpus / "x.bin")]) == 2
    assert "bad.jsonl:1: no string field 'text'" in capsys.readouterr().err
    assert data.main(["prepare", str(corpus / "stories.txt"), "--tokenizer", str(corpus / "tokenizer.json"),
                      "--separator", "<nope>", "--out", str(corpus / "x.bin")]) == 2
    assert "--separator: '<nope>' is not a token" in capsys.readouterr().err


def test_eval_fields_are_validated():
    with pytest.raises(SpecError, match=r"^data.eval_path: is required when eval_every > 0"):
        JobSpec.from_dict({"data": {"eval_every": 5}})
    with pytest.raises(SpecError, match=r"^data.eval_batches: must be in \[1, 10000\]"):
        JobSpec.from_dict({"data": {"eval_batches": 0}})


@pytest.mark.timeout(300)
def test_a_llama_learns_from_tokenized_text_and_its_held_out_loss_falls(corpus, tmp_path):
    tokenizer = str(corpus / "tokenizer.json")
    assert data.main(["prepare", str(corpus / "stories.txt"), str(corpus / "more.jsonl"),
                      "--tokenizer", tokenizer, "--out", str(tmp_path / "train.bin")]) == 0
    assert data.main(["prepare", str(corpus / "held.txt"), "--tokenizer", tokenizer,
                      "--out", str(tmp_path / "held.bin")]) == 0
    steps = 30
    spec = {
        "name": "text", "seed": 1, "steps": steps, "global_batch_size": 8, "micro_batch_size": 2,
        "model": {"arch": "llama", "layers": 2, "d_model": 32, "heads": 4, "kv_heads": 2, "ffn_dim": 64,
                  "vocab_size": 300, "seq_len": 24, "dropout": 0.0, "tie_embeddings": True},
        "data": {"kind": "tokens", "path": str(tmp_path / "train.bin"), "eval_path": str(tmp_path / "held.bin"),
                 "eval_every": 10, "eval_batches": 2},
        "optimizer": {"lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 3},
        "parallelism": {"dp": 1, "pp": 1, "zero_stage": 0}, "resources": {"workers": 1},
    }
    runs = [{"name": "dp1pp1", "dp": 1, "pp": 1, "zero": 0, "shares": [8]},
            {"name": "dp2pp2", "dp": 2, "pp": 2, "zero": 1, "shares": [4, 4]}]
    sweep = run_sweep(tmp_path, spec, runs, nproc=4, timeout_s=240)
    records = sorted(sweep["dp1pp1"][0], key=lambda r: r["step"])
    losses = [r["loss"] for r in records]
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:3]) / 3, losses
    evals = [(r["step"], r["eval_loss"], r["eval_perplexity"]) for r in records if "eval_loss" in r]
    assert [s for s, _, _ in evals] == [10, 20, 30]
    assert evals[-1][1] < evals[0][1] and all(abs(p - torch.tensor(l).exp().item()) < 1e-3 * p for _, l, p in evals)
    # the evaluation of another layout is the same number (every rank reports it)
    for rank, recs in sweep["dp2pp2"].items():
        got = [r["eval_loss"] for r in sorted(recs, key=lambda r: r["step"]) if "eval_loss" in r]
        assert got == pytest.approx([l for _, l, _ in evals], rel=1e-5), rank


def test_tenax_data_prepare_is_the_same_command(corpus, tmp_path):
    from cli.main import main as tenax

    args = [str(corpus / "more.jsonl"), "--tokenizer", str(corpus / "tokenizer.json")]
    assert tenax(["data", "prepare", *args, "--out", str(tmp_path / "a.bin")]) == 0
    assert data.main(["prepare", *args, "--out", str(tmp_path / "b.bin")]) == 0
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()
