import json

import pytest
import torch

import pq_ao
from pq_ao import prefixquant_w4a4
from pq_ao.serialization import CONFIG_FILE
from pq_ao.state import state_of


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
    assert tok is not None and state_of(loaded).prefix_ids == state_of(model).prefix_ids
    assert state_of(loaded).rotation == json.loads(json.dumps(state_of(model).rotation))
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


def test_the_state_is_saved_and_loaded_as_a_whole(saved):
    """config.json's quantization_config holds the model's PrefixQuantState (config, rotation, prefix ids, source,
    report), and loading gives back an equal state."""
    model, path = saved
    on_disk = json.loads((path / "config.json").read_text())["quantization_config"]
    assert on_disk["quant_method"] == "pq_ao" and on_disk["prefix_ids"] == state_of(model).prefix_ids
    assert on_disk["source"] == "stories260k" and on_disk["report"]["blocks"]
    loaded, _ = pq_ao.load_quantized(path)
    got, want = state_of(loaded), state_of(model)
    assert got.config.name == want.config.name and got.config.seed == want.config.seed
    assert got.report.to_dict() == json.loads(json.dumps(want.report.to_dict(), default=str)) | {
        "prefix": got.report.to_dict()["prefix"]}  # JSON turns the outlier-count keys into strings and back
    assert got.report.prefix.outlier_token_counts == want.report.prefix.outlier_token_counts
    assert got.report.summary() == want.report.summary()


def test_a_format_1_directory_still_loads(saved, tmp_path):
    """Format 1 kept the state in pq_ao_config.json and none in config.json."""
    import shutil

    model, path = saved
    old = tmp_path / "old"
    shutil.copytree(path, old)
    state = state_of(model)
    meta = json.loads((old / CONFIG_FILE).read_text())
    meta.update(format=1, pq_ao=state.config.to_dict(), prefix_ids=state.prefix_ids, rotation=state.rotation)
    del meta["digests"], meta["buffer_dtypes"]  # format 1 recorded neither
    (old / CONFIG_FILE).write_text(json.dumps(meta))
    config = json.loads((old / "config.json").read_text())
    del config["quantization_config"]
    (old / "config.json").write_text(json.dumps(config))
    loaded, _ = pq_ao.load_quantized(old)
    assert state_of(loaded).prefix_ids == state.prefix_ids and state_of(loaded).config.name == state.config.name
    ids = torch.randint(3, 512, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_cast_model_round_trips_bit_exactly(saved, tmp_path, dtype):
    """Quantized in fp32, cast with .to(dtype), saved, loaded: the same logits (issue 18: .to() also casts the
    rotary inv_freq, a non-persistent buffer the load rebuilt in fp32; logits were off by up to 12)."""
    import copy

    model = copy.deepcopy(saved[0]).to(dtype)
    pq_ao.save_quantized(model, tmp_path / "m")
    loaded, _ = pq_ao.load_quantized(tmp_path / "m")
    ids = torch.randint(3, 512, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)



def _copy(path, tmp_path):
    import shutil

    dst = tmp_path / "edited"
    shutil.copytree(path, dst)
    return dst


def _edit_json(path, fn):
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


@pytest.mark.parametrize("edit, names", [
    ("flip", "model.safetensors changed"),
    ("a_bits", "linears['model.layers.0.self_attn.q_proj'] changed"),
    ("kv_bits", "attention['model.layers.1.self_attn'] changed"),
    ("rotate_qk", "attention['model.layers.0.self_attn'] changed"),
    ("prefix", "quantization_config['prefix_ids'] changed"),
    ("layers", "config.json changed"),
])
def test_an_edited_checkpoint_is_refused_naming_what_changed(saved, tmp_path, edit, names):
    """Issue 18: flipped bytes in the weights, or edits of the JSON, loaded silently and changed the function."""
    _, path = saved
    d = _copy(path, tmp_path)
    if edit == "flip":
        data = bytearray((d / "model.safetensors").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (d / "model.safetensors").write_bytes(bytes(data))
    elif edit == "a_bits":
        _edit_json(d / CONFIG_FILE, lambda m: m["linears"]["model.layers.0.self_attn.q_proj"].update(a_bits=8))
    elif edit == "kv_bits":
        _edit_json(d / CONFIG_FILE, lambda m: m["attention"]["model.layers.1.self_attn"]["k_quant"].update(bits=8))
    elif edit == "rotate_qk":
        _edit_json(d / CONFIG_FILE, lambda m: m["attention"]["model.layers.0.self_attn"].update(rotate_qk=False))
    elif edit == "prefix":
        _edit_json(d / "config.json", lambda c: c["quantization_config"].update(prefix_ids=[]))
    else:
        _edit_json(d / "config.json", lambda c: c.update(num_hidden_layers=c["num_hidden_layers"] + 1))
    with pytest.raises(ValueError, match=names.replace("[", "\\[").replace("]", "\\]")):
        pq_ao.load_quantized(d)


def test_fields_are_checked_against_the_tensors_without_digests(saved, tmp_path):
    """With verify=False (or a directory written by hand) the fields still have to fit the tensors."""
    _, path = saved
    d = _copy(path, tmp_path)
    _edit_json(d / "config.json", lambda c: c.update(num_hidden_layers=c["num_hidden_layers"] + 1))
    with pytest.raises(ValueError, match="num_hidden_layers=6, the checkpoint holds 5"):
        pq_ao.load_quantized(d, verify=False)
    d2 = _copy(path, tmp_path / "b")
    _edit_json(d2 / "config.json", lambda c: c["quantization_config"].update(prefix_ids=[]))
    with pytest.raises(ValueError, match="prefix_len=.*prefix_ids has 0 tokens"):
        pq_ao.load_quantized(d2, verify=False)
    d3 = _copy(path, tmp_path / "c")
    _edit_json(d3 / CONFIG_FILE, lambda m: m["linears"]["model.layers.0.mlp.up_proj"].update(w_bits=8))
    with pytest.raises(ValueError, match="w_bits=8 does not fit its codes"):
        pq_ao.load_quantized(d3, verify=False)
