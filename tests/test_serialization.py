import json

import pytest
import torch

import pq_ao
from pq_ao import prefixquant_w4a4
from pq_ao.serialization import CONFIG_FILE


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model, tok = pq_ao.load_model("stories260k", dtype=torch.float32)
    pq_ao.quantize_(model, prefixquant_w4a4(n_samples=8, seqlen=128, grid_samples=2, grid_seqlen=128))
    path = tmp_path_factory.mktemp("q") / "model"
    pq_ao.save_quantized(model, path)
    return model, path


def test_round_trip_is_bit_exact(saved):
    model, path = saved
    loaded, tok = pq_ao.load_quantized(path)
    ids = torch.randint(3, 512, (2, 48), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a = model(input_ids=ids, use_cache=False).logits
        b = loaded(input_ids=ids, use_cache=False).logits
    assert torch.equal(a, b)
    assert tok is not None and loaded.pq_ao_prefix_ids == model.pq_ao_prefix_ids
    assert loaded.pq_ao_rotation == json.loads(json.dumps(model.pq_ao_rotation))
    with pytest.raises(ValueError, match="BOS"):  # the guard comes back too
        loaded(input_ids=torch.tensor([[tok.bos_token_id, 5, 6]]))


def test_no_pickle_on_disk(saved):
    _, path = saved
    assert sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")) == []
    assert (path / "model.safetensors").is_file() and (path / CONFIG_FILE).is_file()


def test_load_errors(saved, tmp_path):
    _, path = saved
    with pytest.raises(FileNotFoundError, match="not a pq_ao quantized model"):
        pq_ao.load_quantized(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in path.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    meta = json.loads((bad / CONFIG_FILE).read_text())
    meta["format"] = 99
    (bad / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format 99"):
        pq_ao.load_quantized(bad)
    with pytest.raises(ValueError, match="load it with pq_ao.load_quantized"):
        pq_ao.load_model(str(path))


def test_save_refuses_an_unquantized_model(tmp_path):
    model, _ = pq_ao.load_model("stories260k", dtype=torch.float32)
    with pytest.raises(ValueError, match="no IntxLinearWeight"):
        pq_ao.save_quantized(model, tmp_path / "x")
