"""lm-eval bridge: request scoring against a direct computation, and the offline tasks end to end."""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval")

from mulfree.data.text import load_corpus, train_tokenizer
from mulfree.lmeval import MulfreeLM, build_offline_tasks, run_lm_eval
from mulfree.models.mmfree import MMFreeConfig, MMFreeForCausalLM


@pytest.fixture(scope="module")
def lm_and_tok():
    text = load_corpus().val_text
    tok = train_tokenizer(text[:200_000], vocab_size=300)
    model = MMFreeForCausalLM(MMFreeConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2))
    return model.eval(), tok, text


def test_loglikelihood_equals_direct_computation(lm_and_tok):
    model, tok, _ = lm_and_tok
    lm = MulfreeLM(model, tok, max_length=64)
    ctx, cont = tok.encode("To be, or not").ids, tok.encode(" to be").ids
    logp, _ = lm._score(ctx, cont)
    with torch.no_grad():
        logits, _ = model(torch.tensor(ctx + cont)[None])
    ref = F.log_softmax(logits[0], -1)[torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1), torch.tensor(cont)].sum()
    assert abs(logp - float(ref)) < 1e-4


def test_offline_tasks_run_through_lm_eval(lm_and_tok, tmp_path):
    model, tok, text = lm_and_tok
    task_dir = build_offline_tasks(tmp_path, text, n=40)
    results = run_lm_eval(model, tok, ["mulfree_shakespeare_cloze", "mulfree_shakespeare_mc", "mulfree_shakespeare_bpb"],
                          task_dir, limit=4, max_length=128)
    assert 0.0 <= results["mulfree_shakespeare_mc"]["acc"] <= 1.0
    assert results["mulfree_shakespeare_cloze"]["perplexity"] > 1.0
    # An untrained model spreads probability evenly: about log2(vocab)/bytes-per-token bits per byte.
    assert results["mulfree_shakespeare_bpb"]["bits_per_byte"] > 1.0


def test_hub_task_offline_is_one_line(lm_and_tok, tmp_path, monkeypatch):
    import lm_eval
    import lm_eval.tasks

    from mulfree.errors import MulfreeError

    class Manager:  # lm-eval's full task index takes ~15 s to build: a stand-in that knows arc_easy
        def __init__(self, include_path=None, include_defaults=True):
            self.all_tasks = ["arc_easy"] if include_defaults else []

    def offline(**kwargs):
        raise ConnectionError("Couldn't reach 'allenai/ai2_arc' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", Manager)
    monkeypatch.setattr(lm_eval, "simple_evaluate", offline)
    model, tok, _ = lm_and_tok
    with pytest.raises(MulfreeError, match="arc_easy need a download of their Hub dataset") as err:
        run_lm_eval(model, tok, ["arc_easy"], tmp_path)
    assert "mulfree_shakespeare_mc" in str(err.value)


def test_an_interrupted_run_continues_from_its_request_cache(lm_and_tok, tmp_path, monkeypatch):
    """Every scored request is stored as it is scored: after a Ctrl-C half-way the same run scores only the rest
    and gives the uninterrupted results (before, an interrupted lm-eval started over)."""
    from mulfree.lmeval import cached_requests

    model, tok, text = lm_and_tok
    task_dir = build_offline_tasks(tmp_path / "tasks", text, n=40)
    tasks = ["mulfree_shakespeare_cloze", "mulfree_shakespeare_mc", "mulfree_shakespeare_bpb"]
    whole = run_lm_eval(model, tok, tasks, task_dir, limit=4, max_length=128)
    calls = []
    score = MulfreeLM._score

    def counted(self, ctx, cont):
        calls.append(1)
        if stop_at is not None and len(calls) == stop_at:
            raise KeyboardInterrupt
        return score(self, ctx, cont)

    monkeypatch.setattr(MulfreeLM, "_score", counted)
    stop_at, db = None, tmp_path / "req_rank0.db"
    run_lm_eval(model, tok, tasks, task_dir, limit=4, max_length=128, cache=tmp_path / "all_rank0.db")
    total, calls[:] = len(calls), []
    stop_at = total // 2
    with pytest.raises(KeyboardInterrupt):
        run_lm_eval(model, tok, tasks, task_dir, limit=4, max_length=128, cache=db)
    assert cached_requests(db) >= total // 2 - 1
    stop_at, calls[:] = None, []
    assert run_lm_eval(model, tok, tasks, task_dir, limit=4, max_length=128, cache=db) == whole
    assert 0 < len(calls) <= total - (total // 2 - 1)  # only what was not scored before the interrupt
    db.write_bytes(b"not a database")  # a torn or foreign file is dropped, not a traceback
    assert cached_requests(db) == 0 and not db.exists()
