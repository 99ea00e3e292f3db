"""Reading checkpoints: sharded, filtered by name, and every kind of broken input as one clear error."""
import json
import shutil

import pytest
import torch

from moeserve.kernels.args import ModelArgs
from moeserve.kernels.checkpoint import Checkpoint, hf_to_local, local_to_hf, routed_expert_of
from moeserve.kernels.errors import CheckpointError, ConfigError, InputError
from moeserve.kernels.experts import LocalExperts
from moeserve.kernels.load import load_model
from tests.tiny import CONFIGS, write_checkpoint


@pytest.mark.parametrize("name", ["model.layers.4.self_attn.kv_b_proj.weight", "lm_head.weight",
                                  "model.layers.61.mlp.experts.9.up_proj.weight", "model.layers.61.eh_proj.weight",
                                  "model.layers.61.shared_head.head.weight", "model.layers.61.embed_tokens.weight",
                                  "model.layers.2.mlp.gate.e_score_correction_bias", "model.norm.weight"])
def test_names_map_both_ways(name):
    assert local_to_hf(hf_to_local(name, 61), 61) == name


def test_names_follow_the_reference_model():
    assert hf_to_local("model.layers.3.mlp.experts.17.up_proj.weight", 61) == "layers.3.ffn.experts.17.w3.weight"
    assert hf_to_local("model.layers.61.shared_head.norm.weight", 61) == "mtp.0.norm.weight"
    assert hf_to_local("model.layers.61.self_attn.wkv_b.weight", 61).startswith("mtp.0.block.")
    assert routed_expert_of("model.layers.3.mlp.experts.17.up_proj.weight") == (3, 17)
    assert routed_expert_of("model.layers.3.mlp.shared_experts.up_proj.weight") is None


def test_sharded_checkpoint_loads_the_same_model(tmp_path, checkpoints):
    single, ref = checkpoints("v3")
    ref.save_pretrained(tmp_path, max_shard_size="20KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 3 and (tmp_path / "model.safetensors.index.json").exists()
    tokens = torch.randint(0, 200, (1, 17))
    with torch.no_grad():
        a, b = load_model(single, torch.float32), load_model(tmp_path, torch.float32)
        assert torch.equal(a.logits(a(tokens)), b.logits(b(tokens)))


def test_select_reads_only_the_named_tensors(checkpoints):
    ckpt = Checkpoint(checkpoints("v3")[0])
    experts = dict(ckpt.tensors(select=lambda n: routed_expert_of(n) in {(2, 0), (2, 5)}))
    assert sorted(experts) == sorted(f"model.layers.2.mlp.experts.{e}.{p}_proj.weight"
                                     for e in (0, 5) for p in ("gate", "up", "down"))
    attention_side = ckpt.names(select=lambda n: routed_expert_of(n) is None)
    assert not any(".mlp.experts." in n for n in attention_side) and "lm_head.weight" in attention_side


def test_a_process_holding_some_experts_loads_only_those(checkpoints):
    path, _ = checkpoints("v3")
    args = Checkpoint(path).args
    model = load_model(path, torch.float32, make_experts=lambda layer: LocalExperts(
        args.n_routed_experts, args.dim, args.moe_inter_dim, held={1, 2}))
    experts = model.layers[2].ffn.experts
    assert [i for i, e in enumerate(experts) if e is not None] == [1, 2]
    full = load_model(path, torch.float32).layers[2].ffn.experts
    assert torch.equal(experts[2].w3.weight, full[2].w3.weight)


def test_real_v3_and_rope_parameters_forms_read_the_same(tmp_path):
    config = json.loads(open("tests/data/deepseek_v3_config.json").read())
    old = ModelArgs.from_config(config)
    new_form = dict(config)
    scaling = new_form.pop("rope_scaling")
    new_form["rope_parameters"] = {**scaling, "rope_type": "yarn", "rope_theta": new_form.pop("rope_theta")}
    assert ModelArgs.from_config(new_form) == old
    assert (old.rope_type, old.rope_factor, old.original_seq_len, old.n_dense_layers) == ("yarn", 40.0, 4096, 3)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.pop("kv_lora_rank"), "missing key 'kv_lora_rank'"),
    (lambda c: c.update(model_type="llama"), "model_type 'llama' is not supported"),
    (lambda c: c.update(n_group=5), "not divisible by n_group"),
    (lambda c: c.update(num_experts_per_tok=99), "num_experts_per_tok"),
    (lambda c: c.update(scoring_func="relu"), "scoring_func 'relu'"),
    (lambda c: c.update(quantization_config={"quant_method": "awq"}), "quant_method: 'awq'"),
])
def test_bad_config_names_the_key(tmp_path, checkpoints, edit, message):
    src, _ = checkpoints("v3")
    shutil.copytree(src, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    edit(config)
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=message):
        load_model(tmp_path / "ckpt")


def test_shape_mismatch_between_config_and_weights_is_an_error(tmp_path, checkpoints):
    src, _ = checkpoints("v3")
    shutil.copytree(src, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config["kv_lora_rank"] = 32
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"has shape \(24,\) but config.json implies \(32,\)"):
        load_model(tmp_path / "ckpt")


def test_corrupt_and_truncated_files_are_clear_errors(tmp_path, checkpoints):
    src, ref = checkpoints("v2-lite")
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    shards = sorted((tmp_path / "sharded").glob("*.safetensors"))
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(tmp_path / "sharded")
    shards[1].write_bytes(b"\x13\x37" * 500)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(tmp_path / "sharded")
    shards[1].unlink()
    with pytest.raises(CheckpointError, match="missing; download every shard"):
        load_model(tmp_path / "sharded")


def test_missing_tensor_is_named_in_its_checkpoint_form(tmp_path):
    path, _ = write_checkpoint(tmp_path, CONFIGS["v2-lite"])
    from safetensors.torch import load_file, save_file
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.4.down_proj.weight"]
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="missing tensor 'model.layers.1.mlp.experts.4.down_proj.weight'"):
        load_model(path)


def test_a_16_bit_dtype_that_kills_the_cpu_is_refused_with_what_to_do(monkeypatch):
    """A probe dying of SIGILL (a VM that reports AMX but does not run it) becomes an error naming the two ways
    out; with ONEDNN_MAX_CPU_ISA set there is no probe."""
    import moeserve.kernels.load as load
    monkeypatch.setattr(load, "_PROBE", "import os, signal; os.kill(os.getpid(), signal.SIGILL)")
    load._probe_cpu_matmul.cache_clear()
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    with pytest.raises(InputError, match="dtype float32, or start with ONEDNN_MAX_CPU_ISA"):
        load.check_cpu_dtype(torch.bfloat16)
    load.check_cpu_dtype(torch.float32)  # 32-bit: never probed
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    load.check_cpu_dtype(torch.bfloat16)
    load._probe_cpu_matmul.cache_clear()


def test_loading_a_model_imports_no_compiler_stack():
    """load_model builds the model on the meta device, where an embedding's random init or an arange runs through
    torch's Python references, which import torch._dynamo: 2-3 s of CPU in every process that loads a model (each
    of a cluster's attention shards, every `LLM`). A fresh interpreter, so that no other test's import counts."""
    import subprocess
    import sys
    code = ("import sys, torch\nfrom moeserve.cluster import DEMO_MODEL\nfrom moeserve.kernels.load import load_model\n"
            "model = load_model(DEMO_MODEL, torch.float32)\n"
            "assert model.embed.weight.device.type == 'cpu' and model.inv_freq.device.type == 'cpu'\n"
            "print(sorted(m for m in sys.modules if m.startswith('torch._dynamo')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
