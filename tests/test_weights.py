"""Checkpoint loading: sharded files, the original santacoder layout, strict errors, dtypes."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from checkpoints import random_state, tiny_config, write_checkpoint
from santacli import Engine
from santacli.config import ModelConfig
from santacli.errors import BackendError, CheckpointError, ConfigError, ModelNotFoundError
from santacli.model import select_backend


def ids_for(engine, n=20):
    return torch.randint(0, engine.tokenizer.vocab_size, (n,), generator=torch.Generator().manual_seed(0)).tolist()


def test_sharded_checkpoint_loads_identically(tmp_path, tiny_checkpoint):
    sharded = tmp_path / "sharded"
    shutil.copytree(tiny_checkpoint, sharded)
    from safetensors.torch import load_file

    state = load_file(str(sharded / "model.safetensors"))
    (sharded / "model.safetensors").unlink()
    keys = sorted(state)
    halves = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    weight_map = {}
    for name, part in halves.items():
        save_file({k: state[k] for k in part}, str(sharded / name))
        weight_map.update(dict.fromkeys(part, name))
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    a, b = Engine.load(str(tiny_checkpoint)), Engine.load(str(sharded))
    ids = ids_for(a)
    assert torch.equal(a.logits(ids), b.logits(ids))


def test_original_santacoder_layout_matches_converted_twin(tmp_path, tokenizer):
    cfg = tiny_config(vocab_size=tokenizer.get_vocab_size())
    state = random_state(cfg, seed=4)
    fused = write_checkpoint(tmp_path / "fused", tokenizer=tokenizer, state=state)
    original: dict[str, torch.Tensor] = {}
    d, hd = cfg["n_embd"], cfg["n_embd"] // cfg["n_head"]
    for key, t in state.items():
        if key.endswith("attn.c_attn.weight"):
            p = key.removesuffix("c_attn.weight")
            original[p + "q_attn.weight"] = t[:d].t().contiguous()  # Conv1D stores (in, out)
            original[p + "kv_attn.weight"] = t[d:].t().contiguous()
        elif key.endswith("attn.c_attn.bias"):
            p = key.removesuffix("c_attn.bias")
            original[p + "q_attn.bias"], original[p + "kv_attn.bias"] = t[:d], t[d:]
        elif key.endswith(("attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")):
            original[key] = t.t().contiguous()
        else:
            original[key] = t
    original["transformer.h.0.attn.masked_bias"] = torch.tensor(-1e4)  # old GPT-2 buffer, ignored
    assert original["transformer.h.0.attn.kv_attn.weight"].shape == (d, 2 * hd)
    orig = tmp_path / "orig"
    orig.mkdir()
    save_file(original, str(orig / "model.safetensors"))
    orig_cfg = {k: v for k, v in cfg.items() if k not in ("model_type", "multi_query", "architectures")}
    orig_cfg |= {"model_type": "gpt2", "attention_head_type": "multiquery",
                 "architectures": ["GPT2LMHeadCustomModel"]}
    (orig / "config.json").write_text(json.dumps(orig_cfg))
    shutil.copy(fused / "tokenizer.json", orig / "tokenizer.json")
    a, b = Engine.load(str(fused)), Engine.load(str(orig))
    assert b.config.original_santacoder_layout
    ids = ids_for(a)
    assert torch.equal(a.logits(ids), b.logits(ids))


def _broken_copy(tmp_path, tiny_checkpoint, edit):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    from safetensors.torch import load_file

    state = load_file(str(broken / "model.safetensors"))
    edit(state)
    save_file(state, str(broken / "model.safetensors"))
    return broken


def test_missing_unexpected_and_misshaped_tensors_listed_in_one_error(tmp_path, tiny_checkpoint):
    def edit(state):
        del state["transformer.h.1.mlp.c_fc.bias"]
        state["transformer.h.0.attn.extra.weight"] = torch.zeros(2)
        state["transformer.ln_f.weight"] = torch.zeros(3)

    with pytest.raises(CheckpointError) as info:
        Engine.load(str(_broken_copy(tmp_path, tiny_checkpoint, edit)))
    message = str(info.value)
    assert "\n" not in message
    assert "missing: transformer.h.1.mlp.c_fc.bias" in message
    assert "unexpected: transformer.h.0.attn.extra.weight" in message
    assert "wrong shape: transformer.ln_f.weight (3,) != (64,)" in message


def test_corrupted_file(tmp_path, tiny_checkpoint):
    broken = tmp_path / "corrupt"
    shutil.copytree(tiny_checkpoint, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="safetensors"):
        Engine.load(str(broken))
    (broken / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="safetensors"):
        Engine.load(str(broken))


def test_pickle_only_checkpoint_says_how_to_convert(tmp_path, tiny_checkpoint):
    folder = tmp_path / "bin"
    folder.mkdir()
    shutil.copy(tiny_checkpoint / "config.json", folder)
    shutil.copy(tiny_checkpoint / "tokenizer.json", folder)
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="save_pretrained"):
        Engine.load(str(folder))


def test_missing_shard_and_missing_config(tmp_path, tiny_checkpoint):
    folder = tmp_path / "idx"
    shutil.copytree(tiny_checkpoint, folder)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"gone\.safetensors"):
        Engine.load(str(folder))
    (folder / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"config\.json"):
        Engine.load(str(folder))


def test_tokenizer_larger_than_embedding_is_rejected(tmp_path, tokenizer):
    folder = write_checkpoint(tmp_path / "m", tokenizer=tokenizer, vocab_size=100)
    with pytest.raises(CheckpointError, match="does not belong"):
        Engine.load(str(folder))


def test_padding_vocabulary_rows_are_never_sampled(tmp_path, tokenizer):
    vocab = tokenizer.get_vocab_size()
    cfg = tiny_config(vocab_size=vocab + 20)
    state = random_state(cfg)
    # Make the padding rows irresistible: a correct engine still never picks them.
    state["transformer.ln_f.weight"].zero_()
    bias = state["transformer.ln_f.bias"]
    state["transformer.wte.weight"][vocab:] = 50 * bias
    folder = write_checkpoint(tmp_path / "m", tokenizer=tokenizer, state=state, vocab_size=vocab + 20)
    engine = Engine.load(str(folder))
    assert engine.logits([5, 6]).argmax(-1).min().item() >= vocab  # the raw model prefers padding
    out = engine.generate([5, 6], max_new_tokens=10, temperature=0.7, seed=1, stop_at_eos=False)
    assert max(out) < vocab


def test_dtype_device_and_backend_selection():
    cpu = torch.device("cpu")
    assert select_backend("auto", cpu, torch.float32) == "sdpa"
    assert select_backend("eager", cpu, torch.bfloat16) == "eager"
    with pytest.raises(BackendError, match=r"needs a CUDA"):
        select_backend("flash", cpu, torch.bfloat16)
    with pytest.raises(BackendError, match="unknown attention"):
        select_backend("fast", cpu, torch.float32)
    from santacli.weights import choose_device, choose_dtype

    assert choose_dtype(None, cpu) == torch.float32
    assert choose_dtype("bfloat16", cpu) == torch.bfloat16
    with pytest.raises(BackendError):
        choose_dtype("int3", cpu)
    if not torch.cuda.is_available():
        with pytest.raises(BackendError, match="no CUDA"):
            choose_device("cuda")


def test_config_validation():
    base = tiny_config()
    assert ModelConfig.from_dict({**base, "hidden_size": 32, "n_embd": None} | {"n_embd": 32}).n_embd == 32
    alias = {k: v for k, v in base.items() if k not in ("n_embd", "n_layer", "n_head", "n_positions")}
    alias |= {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 128}
    assert ModelConfig.from_dict(alias).n_layer == 2
    for bad, match in (({"activation_function": "swish9"}, "activation_function"),
                       ({"model_type": "llama"}, "llama"),
                       ({"n_head": 5}, "divisible"),
                       ({"multi_query": "yes"}, "multi_query"),
                       ({"add_cross_attention": True}, "cross")):
        with pytest.raises(ConfigError, match=match):
            ModelConfig.from_dict({**base, **bad})


def test_unknown_model_names(tmp_path):
    with pytest.raises(ModelNotFoundError, match="unknown model"):
        Engine.load("definitely not a model")
    with pytest.raises(ModelNotFoundError, match="unknown model"):
        Engine.load(str(tmp_path / "nowhere"))


def test_tensor_files_read_every_dtype_exactly_and_convert(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from santacli import tensorfile
    from santacli.tensorfile import TensorFiles

    g = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(7, 5, generator=g),
        "bf16": torch.randn(3, 4, generator=g).to(torch.bfloat16),
        "f16": torch.randn(6, generator=g).to(torch.float16),
        "i8": torch.randint(-128, 127, (4, 4), generator=g).to(torch.int8),
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(2.5),
    }
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    files = TensorFiles([path])
    reference = load_file(str(path))
    assert set(files.entries) == set(tensors)
    for name, expected in reference.items():
        for mapped in (True, False):  # a view of the memory map, or read into owned memory
            got = files.read(name, mapped=mapped)
            assert got.dtype == expected.dtype and got.shape == expected.shape and torch.equal(got, expected), name
    assert files.read("f32", dtype=torch.bfloat16).equal(reference["f32"].to(torch.bfloat16))
    assert files.read("bf16", dtype=torch.float32).equal(reference["bf16"].float())
    # Converting reads go through a small reused buffer: 3 fp32 values at a time, 35 in all.
    monkeypatch.setattr(tensorfile, "_CONVERT_CHUNK", 12)
    assert files.read("f32", dtype=torch.float16).equal(reference["f32"].half())
    assert files.read("scalar", dtype=torch.bfloat16).equal(reference["scalar"].bfloat16())
    assert files.read("empty", dtype=torch.bfloat16).shape == (0, 3)
    assert not files.entries["i8"].is_float and files.entries["bf16"].is_float


def test_non_float_weights_are_rejected_before_reading(tmp_path, tiny_checkpoint):
    broken = tmp_path / "ints"
    shutil.copytree(tiny_checkpoint, broken)
    from safetensors.torch import load_file

    state = load_file(str(broken / "model.safetensors"))
    state["transformer.ln_f.bias"] = state["transformer.ln_f.bias"].to(torch.int32)
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"floating point: transformer\.ln_f\.bias"):
        Engine.load(str(broken))


@pytest.mark.parametrize("entry", ["../outside.safetensors", "/etc/passwd.safetensors", "sub/../../x.safetensors",
                                   "model.bin", 7])
def test_shard_index_entries_stay_inside_the_folder(tmp_path, entry):
    import json as _json

    from santacli.hub import weight_files

    (tmp_path / "model.safetensors.index.json").write_text(_json.dumps({"weight_map": {"wte.weight": entry}}))
    with pytest.raises(CheckpointError, match="inside the model folder"):
        weight_files(tmp_path)


def test_scratch_reads_reuse_one_region(tmp_path):
    from santacli.tensorfile import TensorFiles

    tensors = {"a": torch.arange(6.0).view(2, 3), "b": torch.full((2,), 7.0), "big": torch.arange(10.0),
               "none": torch.zeros(0)}
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    files = TensorFiles([path])
    a = files.read("a", mapped=False, scratch=True)
    assert torch.equal(a, tensors["a"])
    b = files.read("b", mapped=False, scratch=True)  # the same memory: a is no longer valid, as documented
    assert torch.equal(b, tensors["b"]) and b.data_ptr() == a.data_ptr()
    big = files.read("big", mapped=False, scratch=True)  # grows the region; a and b keep the old one alive
    assert torch.equal(big, tensors["big"]) and torch.equal(b, tensors["b"])
    assert files.read("none", mapped=False, scratch=True).shape == (0,)


@pytest.mark.parametrize("stored", [torch.float32, torch.float16, torch.bfloat16])
def test_int8_load_quantizes_every_layer_from_the_file(tmp_path, tokenizer, stored):
    """Each weight is read as stored into the reused region and quantized before the next is
    read: every int8 layer equals quantizing its own weight (none sees another's memory)."""
    from safetensors.torch import load_file

    from santacli.quantize import Int8Linear, quantize_rows

    folder = write_checkpoint(tmp_path / "m", tokenizer=tokenizer, dtype=stored)
    state = load_file(str(folder / "model.safetensors"))
    model = Engine.load(str(folder), quantize="int8").model
    layers = {name: m for name, m in model.named_modules() if isinstance(m, Int8Linear)}
    assert len(layers) == 4 * model.config.n_layer + 1
    for name, layer in layers.items():
        key = "transformer.wte.weight" if name == "lm_head" else f"{name}.weight"
        q, scale, row_sum = quantize_rows(state[key])
        assert torch.equal(layer.weight, q) and torch.equal(layer.scale, scale), name
        assert torch.equal(layer.row_sum, row_sum), name
        if name != "lm_head":
            assert torch.equal(layer.bias, state[f"{name}.bias"].float()), name
