"""`mulfree eval` on Hugging Face model dirs and on `mulfree quantize` outputs (not only our own dirs)."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mulfree.cli import main  # noqa: E402
from mulfree.data.text import train_tokenizer  # noqa: E402
from mulfree.evaluate import perplexity  # noqa: E402

TEXT = "Now is the winter of our discontent\nMade glorious summer by this sun of York;\n" * 60


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(TEXT, vocab_size=300))
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    (d / "text.txt").write_text(TEXT)
    return d


def _ppl(capsys) -> float:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["perplexity"]


def test_eval_reads_hugging_face_dirs(hf_dir, capsys):
    assert main(["eval", "--model", str(hf_dir), "--data", str(hf_dir / "text.txt"), "--window", "64"]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    ids = torch.tensor(tok(TEXT)["input_ids"])
    assert _ppl(capsys) == pytest.approx(perplexity(model, ids, 64, progress=False), rel=1e-3)


def test_eval_reads_quantized_dirs(hf_dir, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", "rtn", "--model", str(hf_dir), "--bits", "4", "--group-size", "32", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["eval", "--model", str(out), "--data", str(hf_dir / "text.txt"), "--window", "64"]) == 0
    quantized = _ppl(capsys)
    assert main(["eval", "--model", str(hf_dir), "--data", str(hf_dir / "text.txt"), "--window", "64"]) == 0
    assert quantized != _ppl(capsys)  # really the quantized weights


def test_eval_and_lm_eval_score_packed_dirs_on_the_engine(tmp_path, capsys):
    # a packed dir has no torch weights: eval and lm-eval score it through PackedLM (the packed engine behind
    # the torch interface), at the perplexity of the unpacked model within float rounding
    from test_serve_api import tiny_model_dir

    model = tiny_model_dir(tmp_path / "m")
    (tmp_path / "text.txt").write_text(TEXT)
    assert main(["pack", "--model", str(model), "--out", str(tmp_path / "p")]) == 0
    capsys.readouterr()
    args = ["--data", str(tmp_path / "text.txt"), "--window", "48", "--stride", "32"]
    assert main(["eval", "--model", str(model), *args]) == 0
    unpacked = _ppl(capsys)
    assert main(["eval", "--model", str(tmp_path / "p"), *args]) == 0
    assert _ppl(capsys) == pytest.approx(unpacked, rel=1e-4)
    pytest.importorskip("lm_eval")
    assert main(["lm-eval", "--model", str(tmp_path / "p"), "--tasks", "mulfree_shakespeare_cloze", "--limit", "2"]) == 0
    assert "mulfree_shakespeare_cloze" in capsys.readouterr().out
