import pytest
import torch
from torch import nn

from pq_ao.passes import StructureError, check_attention, find_blocks, find_structure


def _expect_common(s, hidden, n_blocks):
    b = s.block
    assert s.layers == "model.layers" and s.n_blocks == n_blocks
    assert [x.block for x in s.blocks] == [f"model.layers.{i}" for i in range(n_blocks)]
    assert (s.embed, s.final_norm, s.lm_head, s.hidden_size) == (
        "model.embed_tokens",
        "model.norm",
        "lm_head",
        hidden,
    )
    assert b.attn_norm == "input_layernorm" and b.mlp_norm == "post_attention_layernorm"
    assert b.qkv == ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    assert b.attn == "self_attn" and b.mlp == "mlp" and b.qk_rope
    assert b.residual_writers == ("self_attn.o_proj", "mlp.down_proj")
    assert sorted(b.mlp_inputs) == ["mlp.gate_proj", "mlp.up_proj"]
    return b


def test_structure_stories(stories):
    s = find_structure(stories[0])
    b = _expect_common(s, 64, 5)
    assert (b.head_dim, b.n_heads, b.n_kv_heads) == (8, 8, 4)
    assert b.q_norm is None and b.attention_op == "sdpa" and s.tied


@pytest.mark.parametrize(
    "kind, heads, q_norm, op, tied",
    [
        ("qwen2", (16, 6, 2), None, "sdpa", True),
        ("qwen3", (16, 4, 2), "self_attn.q_norm", "sdpa", False),
        ("mistral", (32, 4, 2), None, "sdpa", False),
        ("llama_eager", (16, 3, 1), None, "eager", False),
    ],
)
def test_structure_tiny(tiny, kind, heads, q_norm, op, tied):
    model = tiny(kind)
    s = find_structure(model)
    b = _expect_common(s, model.config.hidden_size, 2)
    assert (b.head_dim, b.n_heads, b.n_kv_heads) == heads
    assert b.q_norm == q_norm and b.k_norm == (q_norm and "self_attn.k_norm")
    assert b.attention_op == op and s.tied == tied


def test_structure_bf16_and_restores_attention_implementation(tiny):
    model = tiny("qwen2").to(torch.bfloat16)
    model.config._attn_implementation = (
        "flex_attention"  # not exportable here: captured as SDPA, then restored
    )
    s = find_structure(model)
    assert s.block.attention_op == "sdpa" and model.config._attn_implementation == "flex_attention"


@pytest.mark.slow
def test_structure_smollm2(smollm2):
    s = find_structure(smollm2[0])
    b = _expect_common(s, 576, 30)
    assert (b.head_dim, b.n_heads, b.n_kv_heads) == (64, 9, 3) and s.tied


# ---- clear errors on structures the passes do not handle ---------------------------------------------------


class _GemmaNorm(nn.Module):
    """x / rms(x) * (1 + w): the weight is not a plain scale."""

    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)


def _swap_all(model, attr, make):
    for layer in model.model.layers:
        parent, _, name = attr.rpartition(".")
        owner = layer.get_submodule(parent) if parent else layer
        setattr(owner, name, make(getattr(owner, name)))


@pytest.mark.parametrize(
    "attr, make, match",
    [
        ("input_layernorm", lambda m: nn.LayerNorm(64), r"'input_layernorm' \(LayerNorm\) is not an RMSNorm"),
        (
            "post_attention_layernorm",
            lambda m: _GemmaNorm(64),
            r"'post_attention_layernorm'.*not as a plain scale",
        ),
        (
            "self_attn.o_proj",
            lambda m: nn.Identity(),
            r"residual segment 0: expected one residual add written by a linear",
        ),
        (
            "self_attn.o_proj",
            lambda m: nn.Sequential(m, nn.RMSNorm(64)),
            r"written by a linear, found \[.rms_norm.default \(module 'self_attn.o_proj.1'",
        ),
        (
            "mlp.act_fn",
            lambda m: nn.Sequential(nn.Linear(172, 172), m),
            r"down_proj 'mlp.down_proj' reads \['mlp.act_fn.0', 'mlp.up_proj'\]",
        ),
    ],
    ids=["layernorm", "one_plus_w_norm", "missing_o_proj", "post_norm", "extra_linear"],
)
def test_unknown_structure_errors(stories_copy, attr, make, match):
    _swap_all(stories_copy, attr, make)
    with pytest.raises(StructureError, match=match):
        find_structure(stories_copy)


def test_blocks_must_match(stories_copy):
    class OtherLinear(nn.Linear):
        pass

    up = stories_copy.model.layers[3].mlp.up_proj
    stories_copy.model.layers[3].mlp.up_proj = OtherLinear(up.in_features, up.out_features, bias=False)
    with pytest.raises(StructureError, match=r"block 3 'mlp.up_proj' is OtherLinear"):
        find_structure(stories_copy)


def test_no_blocks():
    with pytest.raises(StructureError, match="no nn.ModuleList of repeated decoder blocks"):
        find_blocks(nn.Sequential(nn.Linear(4, 4)))


def test_final_norm_must_be_rmsnorm(stories_copy):
    stories_copy.model.norm = nn.LayerNorm(64)
    with pytest.raises(StructureError, match=r"norm '' \(LayerNorm\) is not an RMSNorm"):
        find_structure(stories_copy)


def test_sliding_window_with_a_prefix_is_refused(tiny):
    """A Mistral-style window shorter than the context: with the prefix installed the model would compute another
    function past the window (issue 18: relative logit error 0.42), so quantize_ refuses it before touching the
    model; without a prefix the window reaches the attention through HF's mask, and it is accepted."""
    import pq_ao

    model = tiny("mistral")  # sliding_window 6 < max_position_embeddings 64
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(3, 96, (2, 16))
    with pytest.raises(StructureError, match="sliding-window attention .* not supported with a prefix"):
        pq_ao.quantize_(model, pq_ao.prefixquant_w4a4(calibration=ids, n_samples=2, grid_samples=1))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # untouched
    pq_ao.quantize_(model, pq_ao.quarot_w4a4(calibration=ids, n_samples=2, grid_samples=1))  # no prefix: fine
    no_window = tiny("mistral")
    no_window.config.sliding_window = None
    check_attention(no_window, prefix=True)


def test_logit_softcapping_is_refused(tiny):
    model = tiny("llama_eager")
    model.config.attn_logit_softcapping = 50.0
    with pytest.raises(StructureError, match="softcapping"):
        check_attention(model, prefix=False)


def _tiny_family(family, **kw):
    import transformers

    base = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2, vocab_size=100)
    cfg = getattr(transformers, f"{family}Config")(**(base | kw))
    return getattr(transformers, f"{family}ForCausalLM")(cfg).eval()


@pytest.mark.parametrize("make, match", [
    (lambda: __import__("transformers").GPT2LMHeadModel(__import__("transformers").GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=64)), "GPT-2-style Conv1D"),
    (lambda: _tiny_family("Phi"), "LayerNorm \\(with mean subtraction\\)"),
    (lambda: _tiny_family("Granite", num_key_value_heads=2, residual_multiplier=0.5), "residual multiplier"),
    (lambda: _tiny_family("Olmo2"), "post-norm, as in OLMo 2"),
])
def test_unsupported_architectures_are_named_in_words(make, match):
    """Issue 18: the error names the unsupported feature, not a graph node."""
    import pq_ao

    ids = torch.randint(3, 90, (2, 16))
    with pytest.raises(StructureError, match=match):
        pq_ao.quantize_(make(), pq_ao.prefixquant_w4a4(calibration=ids, n_samples=2, grid_samples=1))
