import copy

import pytest
import torch

from pq_ao.hadamard import has_true_hadamard
from pq_ao.hf_compat import cache_kwarg, output_cache
from pq_ao.nn.attention import PrefixAttention
from pq_ao.nn.hadamard_linear import HadamardLinear
from pq_ao.passes import find_structure, fold_norms, rotate_model
from pq_ao.state import state_of

TINY = ("qwen2", "qwen3", "mistral", "llama_eager")  # tests/passes/conftest.py::make_tiny
VOCAB = 96


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def stories_structure(stories):
    return find_structure(stories[0])


def _check_equivalent(model, ids, seed=0, new_tokens=8, **kw):
    """Rotate a copy; logits (no cache), one cached decode step and greedy generation must match."""
    rotated = copy.deepcopy(model)
    fold_norms(rotated, kw.get("structure"))
    s = rotate_model(rotated, seed=seed, **kw)
    with torch.no_grad():
        for m in (model, rotated):
            m.generation_config.pad_token_id = 0
        ref, out = model(ids).logits, rotated(ids).logits
        assert _rel(out, ref) < 1e-4
        prompt, nxt = ids[:, :-1], ids[:, -1:]
        steps = []
        for m in (model, rotated):
            cache = output_cache(m(prompt, use_cache=True))
            steps.append(m(nxt, use_cache=True, **{cache_kwarg(m): cache}).logits)
        assert _rel(steps[1], steps[0]) < 1e-4
        gen = [m.generate(ids[:1, :4], max_new_tokens=new_tokens, do_sample=False) for m in (model, rotated)]
        assert torch.equal(gen[0], gen[1])
    return rotated, s


@pytest.mark.parametrize("kind", TINY)
def test_rotation_is_exact_tiny(tiny, kind):
    model = tiny(kind)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    rotated, s = _check_equivalent(model, ids, seed=3)
    b = s.block
    # the rotations were really applied
    assert not torch.allclose(rotated.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert not torch.allclose(
        rotated.get_submodule(f"{b.block}.{b.v_proj}").weight,
        model.get_submodule(f"{b.block}.{b.v_proj}").weight,
    )
    for blk in s.blocks:
        attn = rotated.get_submodule(f"{blk.block}.{blk.attn}")
        assert isinstance(attn, PrefixAttention) and attn.rotate_qk
        assert isinstance(rotated.get_submodule(f"{blk.block}.{blk.down_proj}"), HadamardLinear)
    rot = state_of(rotated).rotation
    assert rot["seed"] == 3 and rot["r1"]["size"] == model.config.hidden_size and rot["r2"]["seed"] == 4
    assert rot["r4"]["size"] == model.config.intermediate_size and rot["r3"]["online"]


def test_rotation_is_exact_stories(stories, stories_structure):
    model = stories[0]
    ids = torch.randint(3, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    rotated, _ = _check_equivalent(model, ids, structure=stories_structure)
    assert state_of(rotated).rotation["r4"]["K"] == 172  # intermediate 172 = Williamson 172 * 2**0


def test_rotation_uses_fallback_where_no_hadamard(tiny):
    model = tiny("llama_eager")  # hidden 90: no Hadamard of order 45 * 2**i dividing 90
    assert not has_true_hadamard(90)
    ids = torch.randint(0, VOCAB, (1, 10), generator=torch.Generator().manual_seed(1))
    rotated, _ = _check_equivalent(model, ids)
    assert state_of(rotated).rotation["r1"]["K"] == 45


@pytest.mark.parametrize("r3, r4", [(False, False), (True, False), (False, True)])
def test_rotation_without_online_parts(stories, stories_structure, r3, r4):
    ids = torch.randint(3, 512, (1, 12), generator=torch.Generator().manual_seed(2))
    rotated, s = _check_equivalent(stories[0], ids, online_r3=r3, online_r4=r4, structure=stories_structure)
    b = s.block
    assert isinstance(rotated.get_submodule(f"{b.block}.{b.down_proj}"), HadamardLinear) == r4
    assert rotated.get_submodule(f"{b.block}.{b.attn}").rotate_qk == r3


def test_seeds_give_different_rotations(stories, stories_structure):
    a, b = copy.deepcopy(stories[0]), copy.deepcopy(stories[0])
    for m in (a, b):
        fold_norms(m, stories_structure)
    rotate_model(a, stories_structure, seed=0)
    rotate_model(b, stories_structure, seed=1)
    assert not torch.allclose(a.model.embed_tokens.weight, b.model.embed_tokens.weight)
    with pytest.raises(ValueError, match="already rotated"):
        rotate_model(a)


@pytest.mark.slow
def test_rotation_is_exact_smollm2():
    from pq_ao.models import load_model

    model, tok = load_model("smollm2-135m", dtype=torch.float32)
    ids = tok("The quick brown fox jumps over the lazy dog because", return_tensors="pt").input_ids
    rotated, s = _check_equivalent(model, ids, new_tokens=4)
    assert state_of(rotated).rotation["r1"]["K"] == 36 and state_of(rotated).rotation["r4"]["K"] == 12
    assert s.tied and rotated.lm_head.weight is not rotated.model.embed_tokens.weight


def test_rotation_needs_folded_norms(stories, stories_structure):
    """fold_norms runs once, before rotate_model (R1 commutes with the norm only when its weight is ones)."""
    model = copy.deepcopy(stories[0])
    with pytest.raises(ValueError, match="fold the norms first"):
        rotate_model(model, stories_structure)
