import copy

import torch

from pq_ao.passes import find_structure, fold_norms


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_fold_norms_is_exact_and_unties(tiny):
    model = tiny("qwen2")  # tied embeddings, randomised norm weights
    ids = torch.randint(0, 96, (2, 10))
    ref = _logits(model, ids)
    emb = model.model.embed_tokens.weight.detach().clone()
    s = fold_norms(model)
    assert _rel(_logits(model, ids), ref) < 1e-6
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert torch.equal(model.model.embed_tokens.weight, emb)  # embedding untouched (no mean-centring either)
    assert not model.config.tie_word_embeddings
    for i in range(s.n_blocks):
        for norm in s.block.norm_readers:
            assert torch.equal(s.get(model, i, norm).weight, torch.ones(96))
    assert torch.equal(model.model.norm.weight, torch.ones(96))
    model.tie_weights()  # HF must not re-tie
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert _rel(_logits(model, ids), ref) < 1e-6


def test_fold_norms_is_idempotent_and_leaves_qk_norms(tiny):
    model = tiny("qwen3")
    q_norm = model.model.layers[0].self_attn.q_norm.weight.detach().clone()
    s = find_structure(model)
    fold_norms(model, s)
    once = copy.deepcopy(model.state_dict())
    fold_norms(model, s)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in once.items())
    assert torch.equal(model.model.layers[0].self_attn.q_norm.weight, q_norm)
    assert not torch.equal(q_norm, torch.ones_like(q_norm))


def test_untied_model_saves_and_reloads(stories_copy, tmp_path):
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 512, (1, 8))
    fold_norms(stories_copy)
    stories_copy.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert back.lm_head.weight is not back.model.embed_tokens.weight
    assert torch.equal(_logits(back, ids), _logits(stories_copy, ids))
