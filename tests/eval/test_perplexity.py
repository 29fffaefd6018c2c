import math

import pytest
import torch
import torch.nn.functional as F

from pq_ao.eval import perplexity as ppl_mod
from pq_ao.eval.perplexity import perplexity, window_tokens


def test_matches_hand_computed_loss(stories):
    model, tok = stories
    res = perplexity(model, tok, "wikitext2", seqlen=64, batch_size=2, max_windows=3, progress=False)
    assert (res.n_windows, res.n_tokens, res.seqlen) == (3, 3 * 63, 64)

    from pq_ao import data

    ids = tok(data.load("wikitext2"), add_special_tokens=False)["input_ids"][: 3 * 64]
    losses = []
    with torch.no_grad():
        for w in torch.tensor(ids).view(3, 64):
            logits = model(w[None]).logits[0]
            losses.append(F.cross_entropy(logits[:-1].float(), w[1:]).item())  # mean over the 63 predictions
    expected = math.exp(sum(losses) / 3)
    assert res.ppl == pytest.approx(expected, rel=1e-5)
    assert res.nll == pytest.approx(math.log(expected), rel=1e-5)
    assert res.seconds > 0


def test_prefix_ids_go_in_front_and_are_not_scored(stories):
    model, tok = stories
    prefix = [1, 5, 9]
    res = perplexity(model, tok, seqlen=32, batch_size=2, max_windows=3, progress=False, prefix_ids=prefix)
    plain = perplexity(model, tok, seqlen=32, batch_size=2, max_windows=3, progress=False)
    assert (res.n_windows, res.n_tokens) == (plain.n_windows, plain.n_tokens)
    windows = window_tokens(tok, ppl_mod.data.load("wikitext2"), 32, 3)
    losses = []
    with torch.no_grad():
        for w in windows:
            logits = model(torch.cat([torch.tensor(prefix), w])[None]).logits[0, len(prefix) :]
            losses.append(F.cross_entropy(logits[:-1].float(), w[1:]).item())
    assert res.ppl == pytest.approx(math.exp(sum(losses) / 3), rel=1e-5)
    assert res.ppl != pytest.approx(plain.ppl, rel=1e-3)  # the prefix changes the context, so the score


def test_batch_size_does_not_change_the_result(stories):
    model, tok = stories
    one = perplexity(model, tok, seqlen=32, batch_size=1, max_windows=4, progress=False)
    four = perplexity(model, tok, seqlen=32, batch_size=4, max_windows=4, progress=False)
    assert one.ppl == pytest.approx(four.ppl, rel=1e-5)


def test_nll_chunks_cover_every_position():
    torch.manual_seed(0)
    logits = torch.randn(2, 1300, 50, dtype=torch.bfloat16)  # 1299 predictions: chunks of 512, 512, 275
    ids = torch.randint(0, 50, (2, 1300))
    expected = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, 50), ids[:, 1:].reshape(-1), reduction="sum"
    )
    assert ppl_mod._window_nll_sum(logits, ids) == pytest.approx(expected.item(), rel=1e-5)


def test_windows_are_plain_tokens_without_bos(stories):
    _, tok = stories
    text = "Once upon a time there was a little dog. " * 20
    ids = tok(text, add_special_tokens=False)["input_ids"]
    w = window_tokens(tok, text, seqlen=16)
    assert w.shape == (len(ids) // 16, 16)
    assert w.flatten().tolist() == ids[: w.numel()]  # non-overlapping, in order, tail dropped
    assert w[0, 0] != tok.bos_token_id
    assert window_tokens(tok, text, seqlen=16, max_windows=2).shape == (2, 16)


def test_seqlen_longer_than_the_text_is_an_error(stories, data_dir, write_file):
    model, tok = stories
    write_file(data_dir / "wikitext2" / "wiki.test.raw", " = Short = \n \n A few words . \n")
    with pytest.raises(ValueError, match="seqlen 512 is longer than the tokenized text"):
        perplexity(model, tok, seqlen=512, progress=False)
    with pytest.raises(ValueError, match="at least 2"):
        window_tokens(tok, "abc", seqlen=1)
    with pytest.raises(ValueError, match="max_windows must be positive"):
        window_tokens(tok, "abc", seqlen=2, max_windows=0)


def test_needs_a_text_dataset(stories):
    model, tok = stories
    with pytest.raises(ValueError, match="single-text dataset"):
        perplexity(model, tok, "piqa", progress=False)
