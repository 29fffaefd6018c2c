"""`passes/capture.py`: the decoder blocks, block 0's call and the tensors around the blocks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pq_ao.passes import StructureError, capture_block, find_blocks, trace_model


def test_finds_the_block_list_and_traces_one_forward(stories):
    model = stories[0]
    assert find_blocks(model) == "model.layers"
    trace = trace_model(model)
    assert trace.blocks == "model.layers"
    assert trace.block_input.shape[-1] == model.config.hidden_size
    emb = model.get_input_embeddings()
    name = next(n for n, m in model.named_modules() if m is emb)
    assert torch.equal(trace.io[name][1], trace.block_input)  # the embedding's output enters block 0


def test_block_zero_exports_with_its_linears(stories):
    ep = capture_block(stories[0])
    linears = [n for n in ep.graph.nodes if n.op == "call_function" and "linear" in str(n.target)]
    assert len(linears) == 7  # q, k, v, o, gate, up, down


def test_a_model_without_repeated_blocks_is_refused():
    with pytest.raises(StructureError, match="no nn.ModuleList of repeated decoder blocks"):
        find_blocks(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
