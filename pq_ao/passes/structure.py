"""Structure discovery: what reads and writes what in a decoder, read off the exported graph of one block.

The residual stream is followed from the block input: every segment is `x + W(..(norm(x)))`, one RMSNorm reading
the stream and one linear writing it back. The attention core (SDPA, or eager matmul-softmax-matmul) gives Q, K, V;
their linear ancestors are q/k/v, the linear reading the core's output is o_proj. The MLP is the other segment: the
linears reading its norm, and down_proj writing the stream. Module attribute names only label what the graph shows.
Anything else (LayerNorm, post-norms, fused QKV, a gate on the attention output, extra linears) is a
`StructureError` naming what was not found.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass

import torch
from torch import nn
from torch.fx import Node

from pq_ao.passes.capture import StructureError, capture_block, capture_module, trace_model

aten = torch.ops.aten


def _ops(*names: str) -> frozenset:
    """OpOverloads by 'op.overload' name, skipping any this torch build lacks."""
    out = []
    for name in names:
        op, overload = name.split(".")
        packet = getattr(aten, op, None)
        if packet is not None and hasattr(packet, overload):
            out.append(getattr(packet, overload))
    return frozenset(out)


# Ops that only move, cast or reshape data: a tensor seen through them is "the same" tensor.
_ALIAS = _ops(
    "to.dtype",
    "to.dtype_layout",
    "to.device",
    "_to_copy.default",
    "view.default",
    "reshape.default",
    "_unsafe_view.default",
    "transpose.int",
    "permute.default",
    "contiguous.default",
    "clone.default",
    "unsqueeze.default",
    "expand.default",
    "alias.default",
    "detach.default",
    "flatten.using_ints",
    "dropout.default",
    "type_as.default",
)
_HEAD_PRESERVING = _ALIAS | _ops("slice.Tensor", "repeat_interleave.self_int")  # V path (repeat_kv)
_RMSNORM = _ALIAS | _ops(
    "_assert_tensor_metadata.default",
    "pow.Tensor_Scalar",
    "mean.dim",
    "add.Tensor",
    "add.Scalar",
    "rsqrt.default",
    "mul.Tensor",
    "mul.Scalar",
    "div.Tensor",
    "sqrt.default",
    "rms_norm.default",
)
_SDPA = _ops("scaled_dot_product_attention.default")
_SOFTMAX = _ops("_softmax.default", "softmax.int")
_MATMUL = _ops("matmul.default", "bmm.default")
_SCORE_OPS = _ALIAS | _ops(
    "add.Tensor", "mul.Tensor", "mul.Scalar", "div.Tensor", "div.Scalar", "slice.Tensor"
)
_RSQRT = _ops("rsqrt.default", "rms_norm.default")
_WEIGHT_SCALE = _ops("mul.Tensor", "rms_norm.default")  # how an RMSNorm may use its weight
_LINEAR = _ops("linear.default")
_ADD = _ops("add.Tensor")


@dataclass(frozen=True)
class BlockStructure:
    """One decoder block: its qualified name, and module names relative to it, as found in its graph."""

    block: str  # qualified name of the block ("model.layers.3")
    attn_norm: str
    q_proj: str
    k_proj: str
    v_proj: str
    attn: str  # the module whose forward holds the attention core (R3 and the prefix live here)
    attention_op: str  # "sdpa" or "eager": where Q and K meet (R3 goes right before it)
    qk_rope: bool  # Q and K depend on the position inputs (RoPE'd) on their way there
    q_norm: str | None  # a module on the q path between q_proj and attention (Qwen3 per-head RMSNorm)
    k_norm: str | None
    o_proj: str
    mlp_norm: str
    mlp: str  # the module holding the MLP linears: mlp(mlp_norm output) is down_proj's output
    mlp_inputs: tuple[str, ...]  # linears reading mlp_norm (gate, up)
    down_proj: str
    head_dim: int
    n_heads: int
    n_kv_heads: int

    @property
    def qkv(self) -> tuple[str, str, str]:
        return self.q_proj, self.k_proj, self.v_proj

    @property
    def norm_readers(self) -> dict[str, tuple[str, ...]]:
        """norm -> the linears reading its output (their input side folds the norm weight and takes R1)."""
        return {self.attn_norm: self.qkv, self.mlp_norm: self.mlp_inputs}

    @property
    def residual_writers(self) -> tuple[str, str]:
        """The linears whose output is added to the residual stream (their output side takes R1^T)."""
        return self.o_proj, self.down_proj

    @property
    def linears(self) -> tuple[str, ...]:
        return (*self.qkv, self.o_proj, *self.mlp_inputs, self.down_proj)

    def module_names(self) -> tuple[str, ...]:
        extra = tuple(n for n in (self.q_norm, self.k_norm) if n)
        return (self.attn_norm, self.attn, self.mlp_norm, self.mlp, *self.linears, *extra)


@dataclass(frozen=True)
class ModelStructure:
    """Model-level names (qualified) and one BlockStructure per block (the same relative names in each)."""

    layers: str  # the ModuleList of blocks
    blocks: tuple[BlockStructure, ...]
    embed: str
    final_norm: str
    lm_head: str
    hidden_size: int
    tied: bool  # lm_head shared its weight with the embedding when discovered

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    @property
    def block(self) -> BlockStructure:
        """Block 0's structure; every block has the same relative names."""
        return self.blocks[0]

    def get(self, model: nn.Module, i: int, name: str) -> nn.Module:
        """Module `name` (a BlockStructure name) of block i."""
        return model.get_submodule(f"{self.blocks[i].block}.{name}")


# ---------------------------------------------------------------------------------------------------------------
# Graph reading


def _module_path(path: str) -> str:
    return re.sub(r"^L\['self'\]\.?", "", path)


class _Graph:
    def __init__(self, ep: torch.export.ExportedProgram):
        sig = ep.graph_signature
        self.nodes = list(ep.graph.nodes)
        self.params = dict(sig.inputs_to_parameters)
        self.user_inputs = [n for n in self.nodes if n.op == "placeholder" and n.name in set(sig.user_inputs)]

    @staticmethod
    def module(node: Node) -> str | None:
        stack = node.meta.get("nn_module_stack")
        return _module_path(list(stack.values())[-1][0]) if stack else None

    @staticmethod
    def is_op(node, ops) -> bool:
        return isinstance(node, Node) and node.op == "call_function" and node.target in ops

    def src(self, node: Node) -> Node:
        while self.is_op(node, _ALIAS):
            node = node.args[0]
        return node

    def aliases(self, node: Node) -> list[Node]:
        out, todo = [], [node]
        while todo:
            n = todo.pop()
            out.append(n)
            todo += [u for u in n.users if self.is_op(u, _ALIAS) and u.args[0] is n]
        return out

    def linear_name(self, node: Node) -> str:
        w = node.args[1]
        name = self.params.get(getattr(w, "name", None))
        if name is None:
            raise StructureError(f"linear node {node.name} does not read a module weight")
        return name.rsplit(".", 1)[0]

    def cone(self, node: Node) -> tuple[set[Node], set[Node]]:
        """(linears, other nodes) among the ancestors of node, not looking past a linear."""
        linears, seen, todo = set(), set(), [node]
        while todo:
            n = todo.pop()
            if n in seen or not isinstance(n, Node):
                continue
            seen.add(n)
            if self.is_op(n, _LINEAR):
                linears.add(n)
                continue
            todo += n.all_input_nodes
        return linears, seen - linears

    @staticmethod
    def shape(node: Node) -> tuple[int, ...]:
        val = node.meta.get("val")
        return tuple(val.shape) if isinstance(val, torch.Tensor) else ()


def _describe(g: _Graph, node: Node) -> str:
    target = getattr(node.target, "__name__", str(node.target))
    return f"{target} (module '{g.module(node) or ''}')"


def _check_rmsnorm(g: _Graph, root: nn.Module, path: str, exclude: set[Node]) -> Node:
    """Verify module `path` computes an RMSNorm whose only parameter, `weight`, scales its output; returns the
    norm's output node (the one read outside the module, not counting the residual aliases in `exclude`)."""
    mod = root.get_submodule(path) if path else root
    kind = type(mod).__name__
    nodes = [n for n in g.nodes if n.op == "call_function" and g.module(n) == path]
    foreign = sorted({_describe(g, n) for n in nodes if n.target not in _RMSNORM})
    if foreign or not any(n.target in _RSQRT for n in nodes):
        raise StructureError(f"norm '{path}' ({kind}) is not an RMSNorm: it computes {foreign or 'no rsqrt'}")
    params = {name for name, _ in mod.named_parameters()}
    if params - {"weight"}:
        raise StructureError(
            f"norm '{path}' ({kind}) has parameters {sorted(params)}; an RMSNorm has only a weight"
        )
    for n in nodes:
        for a in n.all_input_nodes:
            if a.op == "placeholder" and a.name in g.params and n.target not in _WEIGHT_SCALE:
                raise StructureError(
                    f"norm '{path}' ({kind}) uses its weight in {_describe(g, n)}, not as a plain scale (1 + w?)"
                )
    outs = [n for n in nodes if n not in exclude and any(g.module(u) != path for u in n.users)]
    if len(outs) != 1:
        raise StructureError(f"norm '{path}' ({kind}): expected one output, found {[n.name for n in outs]}")
    return outs[0]


def _norm_readers(g: _Graph, norm: str, out: Node) -> list[Node]:
    al = g.aliases(out)
    readers = [u for a in al for u in a.users if u not in al]
    bad = [u for u in readers if not g.is_op(u, _LINEAR) or u.args[0] not in al]
    if bad or not readers:
        raise StructureError(
            f"output of norm '{norm}' is read by {[_describe(g, u) for u in bad] or 'nothing'}; expected linears only"
        )
    return readers


def _residual_segments(g: _Graph, root: nn.Module) -> list[tuple[str, list[Node], Node]]:
    """Follow the stream from the block input: [(norm, its reader linears, writer linear)] per segment."""
    if not g.user_inputs:
        raise StructureError("the captured block has no hidden_states input")
    segments, cur = [], g.user_inputs[0]
    while True:
        al = g.aliases(cur)
        users = [u for a in al for u in a.users if u not in al]
        if any(u.op == "output" for u in users):
            break
        adds = []
        for u in users:
            if g.is_op(u, _ADD) and len(u.args) == 2:
                other = u.args[1] if u.args[0] in al else u.args[0]
                if isinstance(other, Node) and other not in al:
                    adds.append((u, g.src(other)))
        if len(adds) != 1 or not g.is_op(adds[0][1], _LINEAR):
            found = [_describe(g, w) for _, w in adds]
            raise StructureError(
                f"residual segment {len(segments)}: expected one residual add written by a linear, found {found}"
                f"{_residual_hint(g, adds)}"
            )
        add, writer = adds[0]
        norms = {g.module(u) for u in users if u is not add}
        if len(norms) != 1 or None in norms:
            raise StructureError(
                f"residual segment {len(segments)}: the stream is read by {sorted(map(str, norms))}, "
                "expected exactly one norm"
            )
        norm = norms.pop()
        out = _check_rmsnorm(g, root, norm, set(al))
        segments.append((norm, _norm_readers(g, norm, out), writer))
        cur = add
    return segments


def _residual_hint(g: _Graph, adds: list) -> str:
    """What the unsupported residual structure most likely is, in a user's words."""
    writers = [w for _, w in adds]
    if len(writers) == 1:
        module = g.module(writers[0]) or ""
        if "norm" in module:
            return (": a norm sits between the branch and the residual add (post-norm, as in OLMo 2 or Gemma 2), "
                    "which pq_ao does not support")
        if g.is_op(writers[0], _ADD):
            return (": the attention and MLP branches are summed before the residual add (parallel blocks, as in "
                    "Phi-2 or GPT-J), which pq_ao does not support")
        return (": the branch is scaled or transformed before the residual add (a residual multiplier, as in "
                "Granite), which pq_ao does not support")
    return ": pq_ao supports pre-norm blocks, x + attn(norm(x)) then h + mlp(norm(h))"


def _attention_core(g: _Graph) -> tuple[Node, Node, Node, Node, str]:
    """(q, k, v, output, kind) of the block's attention: one SDPA, or eager matmul -> softmax -> matmul."""
    sdpa = [n for n in g.nodes if g.is_op(n, _SDPA)]
    if len(sdpa) > 1:
        raise StructureError(
            f"found {len(sdpa)} scaled_dot_product_attention calls in one block, expected one"
        )
    if sdpa:
        q, k, v = sdpa[0].args[:3]
        return q, k, v, sdpa[0], "sdpa"
    soft = [n for n in g.nodes if g.is_op(n, _SOFTMAX)]
    if len(soft) != 1:
        raise StructureError(
            f"no attention found: no scaled_dot_product_attention and {len(soft)} softmax nodes"
        )
    n = soft[0].args[0]
    while not g.is_op(n, _MATMUL):
        if not g.is_op(n, _SCORE_OPS):
            raise StructureError(f"attention scores come from {_describe(g, n)}, not from a Q K^T matmul")
        n = n.args[0]
    q, k = n.args[0], n.args[1]
    probs = g.aliases(soft[0])
    outs = [u for p in probs for u in p.users if g.is_op(u, _MATMUL) and u.args[0] in probs]
    if len(outs) != 1:
        raise StructureError("attention probabilities do not feed exactly one matmul with V")
    return q, k, outs[0].args[1], outs[0], "eager"


def _single_linear(g: _Graph, node: Node, role: str) -> tuple[Node, set[Node]]:
    linears, others = g.cone(node)
    if len(linears) != 1:
        raise StructureError(f"attention {role} comes from {len(linears)} linears, expected one")
    return next(iter(linears)), others


def _check_v_path(g: _Graph, v: Node, v_lin: Node, head_dim: int) -> None:
    """V reaches attention through views only, head_dim staying the last dim: R2 fuses into v_proj/o_proj."""
    n = v
    while n is not v_lin:
        if not g.is_op(n, _HEAD_PRESERVING):
            raise StructureError(
                f"the value path from '{g.linear_name(v_lin)}' to attention goes through {_describe(g, n)}; "
                "the per-head v->o rotation (R2) needs views only"
            )
        if g.shape(n) and g.shape(n)[-1] != head_dim:
            raise StructureError(f"the value path changes head_dim at {n.name}: {g.shape(n)}")
        n = n.args[0]


def _check_o_path(g: _Graph, o_lin: Node, out: Node, n_heads: int, head_dim: int) -> None:
    """o_proj reads the attention output through views only, heads merged head-major (h * head_dim + d)."""
    n = o_lin.args[0]
    while n is not out:
        if not g.is_op(n, _ALIAS):
            raise StructureError(
                f"o_proj '{g.linear_name(o_lin)}' reads {_describe(g, n)}, not the attention output"
            )
        src_shape, dst_shape = g.shape(n.args[0]), g.shape(n)
        if dst_shape and dst_shape[-1] == n_heads * head_dim != head_dim and src_shape[-1:] == (head_dim,):
            if src_shape[-2] != n_heads:
                raise StructureError(f"o_proj input merges {src_shape} into {dst_shape}: not head-major")
        n = n.args[0]


def analyze_block(ep: torch.export.ExportedProgram, block: nn.Module, name: str = "") -> BlockStructure:
    """The BlockStructure of `block` (qualified name `name`), read from its exported graph `ep`."""
    g = _Graph(ep)
    segments = _residual_segments(g, block)
    if len(segments) != 2:
        raise StructureError(f"expected 2 residual segments (attention, MLP), found {len(segments)}")
    (attn_norm, attn_readers, o_lin), (mlp_norm, mlp_readers, down_lin) = segments

    q, k, v, out, kind = _attention_core(g)
    q_lin, q_nodes = _single_linear(g, q, "Q")
    k_lin, k_nodes = _single_linear(g, k, "K")
    v_lin, _ = _single_linear(g, v, "V")
    if len({q_lin, k_lin, v_lin}) != 3:
        raise StructureError(
            f"Q, K and V share the linear '{g.linear_name(q_lin)}' (fused QKV is not supported)"
        )
    if set(attn_readers) != {q_lin, k_lin, v_lin}:
        raise StructureError(
            f"linears reading '{attn_norm}' are {sorted(g.linear_name(n) for n in attn_readers)}, "
            f"expected exactly q/k/v {[g.linear_name(n) for n in (q_lin, k_lin, v_lin)]}"
        )
    attention = g.module(out) or ""

    head_dim, n_heads = g.shape(q)[-1], g.shape(q)[1]
    q_mod, k_mod, v_mod = (block.get_submodule(g.linear_name(n)) for n in (q_lin, k_lin, v_lin))
    n_kv = k_mod.out_features // head_dim
    if q_mod.out_features != n_heads * head_dim or v_mod.out_features != n_kv * head_dim:
        raise StructureError(
            f"head layout: q {q_mod.out_features}, v {v_mod.out_features} features for {n_heads} heads, "
            f"{n_kv} KV heads of {head_dim}"
        )
    _check_v_path(g, v, v_lin, head_dim)
    _check_o_path(g, o_lin, out, n_heads, head_dim)

    down_inputs, _ = g.cone(down_lin.args[0])
    if down_inputs != set(mlp_readers):
        raise StructureError(
            f"down_proj '{g.linear_name(down_lin)}' reads {sorted(g.linear_name(n) for n in down_inputs)}, "
            f"expected the linears reading '{mlp_norm}'"
        )
    known = {q_lin, k_lin, v_lin, o_lin, down_lin, *mlp_readers}
    extra = [g.linear_name(n) for n in g.nodes if g.is_op(n, _LINEAR) and n not in known]
    if extra:
        raise StructureError(f"unrecognised linears in the block: {extra}")

    def inner_module(nodes: set[Node], role: str) -> str | None:
        mods = {g.module(n) for n in nodes} - {None, attention}
        mods = {m for m in mods if m.startswith(attention + ".") or not attention}
        if len(mods) > 1:
            raise StructureError(f"several modules on the {role} path: {sorted(mods)}")
        return mods.pop() if mods else None

    mlp_names = [g.linear_name(n) for n in (*mlp_readers, down_lin)]
    mlp = ".".join(os.path.commonprefix([n.split(".")[:-1] for n in mlp_names]))
    if not mlp:
        raise StructureError(f"the MLP linears {mlp_names} are not held by one module")
    return BlockStructure(
        block=name,
        attn_norm=attn_norm,
        q_proj=g.linear_name(q_lin),
        k_proj=g.linear_name(k_lin),
        v_proj=g.linear_name(v_lin),
        attn=attention,
        attention_op=kind,
        qk_rope=all(set(g.user_inputs[1:]) & nodes for nodes in (q_nodes, k_nodes)),
        q_norm=inner_module(q_nodes, "Q"),
        k_norm=inner_module(k_nodes, "K"),
        o_proj=g.linear_name(o_lin),
        mlp_norm=mlp_norm,
        mlp=mlp,
        mlp_inputs=tuple(mlp_names[:-1]),
        down_proj=g.linear_name(down_lin),
        head_dim=head_dim,
        n_heads=n_heads,
        n_kv_heads=n_kv,
    )


def verify_blocks(model: nn.Module, blocks: str, s: BlockStructure) -> None:
    """Every block has the modules of block 0, same types and linear shapes."""
    layers = model.get_submodule(blocks)
    ref = {name: layers[0].get_submodule(name) for name in s.module_names()}
    for i, layer in enumerate(layers):
        for name, m0 in ref.items():
            try:
                m = layer.get_submodule(name)
            except AttributeError:
                raise StructureError(f"block {i} of '{blocks}' has no '{name}' (block 0 does)") from None
            shape, shape0 = (tuple(getattr(x, "weight", torch.empty(0)).shape) for x in (m, m0))
            if type(m) is not type(m0) or shape != shape0:
                raise StructureError(
                    f"block {i} '{name}' is {type(m).__name__} {shape}, block 0's is {type(m0).__name__} {shape0}"
                )


def _name_of(model: nn.Module, module: nn.Module | None, role: str) -> str:
    for name, m in model.named_modules():
        if m is module and name:
            return name
    raise StructureError(f"{type(model).__name__}: no {role} module found")


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return a is not None and b is not None and a.shape == b.shape and torch.equal(a, b)


def check_supported(model: nn.Module, prefix: bool) -> None:
    """Refuse, before anything is changed and in a user's words (StructureError), what pq_ao would quantize wrongly:
    GPT-2-style Conv1D projections, LayerNorm blocks, residual / embedding multipliers (Granite), and the attention
    variants of `check_attention`. Structures the graph analysis meets later get its own errors."""
    kinds = {type(m).__name__ for m in model.modules()}
    if "Conv1D" in kinds:
        raise StructureError("GPT-2-style Conv1D projections are not supported: pq_ao quantizes decoders whose "
                             "projections are nn.Linear (Llama, Qwen, Mistral families; README, Supported models)")
    if any(isinstance(m, nn.LayerNorm) for m in model.modules()):
        raise StructureError("LayerNorm (with mean subtraction) is not supported: the rotations and the norm folding "
                             "need RMSNorm (Llama, Qwen, Mistral families; README, Supported models)")
    config = getattr(model, "config", None)
    for name in ("residual_multiplier", "embedding_multiplier", "logits_scaling"):  # (attention scaling is read
        value = getattr(config, name, None)  # off the attention module itself)
        if value is not None and value != 1:
            raise StructureError(f"a {name.replace('_', ' ')} ({name}={value}, Granite-style scaling) is not "
                                 "supported")  # fmt: skip
    check_attention(model, prefix)


def check_attention(model: nn.Module, prefix: bool) -> None:
    """Refuse the attention variants PrefixAttention would compute differently from the model (StructureError naming
    the feature), before anything is changed:
    - attention logit softcapping (Gemma 2): PrefixAttention computes plain softmax attention;
    - with a prefix, sliding-window attention (Mistral v0.1, local layers of Gemma / Qwen layer_types): the prefix
      keys would stay visible to queries past the window, where the tokens they stand for would have left it.
    Scaled queries (`attn.scaling`, Gemma's query_pre_attn_scalar) and q/k norms are taken from the module itself."""
    config = getattr(model, "config", None)
    if config is None:
        return
    get_text = getattr(config, "get_text_config", None)
    cfg = get_text() if callable(get_text) else config
    cap = getattr(cfg, "attn_logit_softcapping", None)
    if cap:
        raise StructureError(f"attention logit softcapping (config.attn_logit_softcapping={cap}) is not supported: "
                             "pq_ao's attention computes plain softmax attention")  # fmt: skip
    if not prefix:
        return  # without a prefix the window reaches PrefixAttention through HF's mask
    window = getattr(cfg, "sliding_window", None)
    layer_types = getattr(cfg, "layer_types", None) or []
    active = window is not None and getattr(cfg, "use_sliding_window", True) is not False and (
        window < getattr(cfg, "max_position_embeddings", float("inf")) or "sliding_attention" in layer_types)
    if active:
        raise StructureError(
            f"sliding-window attention (config.sliding_window={window}, max_position_embeddings="
            f"{getattr(cfg, 'max_position_embeddings', None)}) is not supported with a prefix: the prefix would stay "
            "visible to queries past the window, which changes what the model computes. Quantize without the prefix "
            "(prefix=False), or use a checkpoint without a window")


def decoder(model: nn.Module) -> nn.Module:
    """The base decoder of a causal LM (no LM head): cheaper to run when only internals are observed."""
    get = getattr(model, "get_decoder", None)
    base = get() if callable(get) else None
    return base if base is not None else model


def find_structure(model: nn.Module, input_ids: torch.Tensor | None = None) -> ModelStructure:
    """Find the whole structure: capture block 0, analyse it, check every block matches, and find the
    embedding -> blocks -> final norm -> lm_head chain from one traced forward."""
    trace = trace_model(model, input_ids)
    layers = model.get_submodule(trace.blocks)
    block = analyze_block(capture_block(model, trace), layers[0], f"{trace.blocks}.0")
    verify_blocks(model, trace.blocks, block)

    embed = _name_of(model, model.get_input_embeddings(), "input embedding")
    lm_head = _name_of(model, model.get_output_embeddings(), "output embedding (lm_head)")
    if not _same(trace.io[embed][1], trace.block_input):
        raise StructureError(
            f"the first block's input is not the output of '{embed}' (scaled or positional embeddings?)"
        )
    head_in = trace.io[lm_head][0]
    norms = [
        name
        for name, (x, y) in trace.io.items()
        if name != lm_head and _same(x, trace.block_output) and _same(y, head_in)
    ]
    if not norms:
        raise StructureError(f"no final norm found between the last block and '{lm_head}'")
    final_norm = max(norms, key=len)
    norm_mod = model.get_submodule(final_norm)
    _check_rmsnorm(_Graph(capture_module(norm_mod, (trace.block_output,))), norm_mod, "", set())

    emb, head = model.get_submodule(embed), model.get_submodule(lm_head)
    hidden = emb.weight.shape[1]
    if not isinstance(head, nn.Linear) or head.in_features != hidden:
        raise StructureError(
            f"lm_head '{lm_head}' is {type(head).__name__}, expected nn.Linear from {hidden} features"
        )
    return ModelStructure(
        layers=trace.blocks,
        blocks=tuple(dataclasses.replace(block, block=f"{trace.blocks}.{i}") for i in range(len(layers))),
        embed=embed,
        final_norm=final_norm,
        lm_head=lm_head,
        hidden_size=hidden,
        tied=head.weight is emb.weight,
    )

