"""Topology spec validation, fat-tree arithmetic, and the cost model against the published figures."""
import pytest
from pydantic import ValidationError

from moeserve.topology.cost import cost_report, decode_tpot_ms, load_architecture
from moeserve.topology.spec import PRESETS, TopologySpec, fat_tree_size, load_topology


def test_fat_tree_sizes():
    assert fat_tree_size(64) == (2048, 96)                 # k^2/2 endpoints, 3k/2 switches
    assert fat_tree_size(64, planes=8) == (16_384, 768)    # DeepSeek's multi-plane fat-tree
    assert fat_tree_size(64, layers=3) == (65_536, 5_120)  # k^3/4, 5k^2/4


@pytest.mark.parametrize("change, message", [
    (dict(planes=3), "must be 1 or equal nics_per_node"),
    (dict(nic_gbps=0), "greater than 0"),
    (dict(intra_node_gbps=-1), "greater than 0"),
    (dict(planes_down=[9]), "planes_down names plane 9"),
    (dict(planes_down=list(range(8))), "every plane is down"),
    (dict(nics_per_node=0), "need scale-out NICs"),
])
def test_invalid_specs_say_what_is_wrong(change, message):
    base = PRESETS["h800-mpft"].model_dump()
    with pytest.raises(ValidationError, match=message):
        TopologySpec(**{**base, **change})


def test_yaml_topology_and_presets(tmp_path):
    (tmp_path / "t.yaml").write_text("nodes: 2\ngpus_per_node: 4\nnics_per_node: 4\nplanes: 4\n"
                                     "intra_node_gbps: 100\nnic_gbps: 25\n")
    spec = load_topology(str(tmp_path / "t.yaml"))
    assert spec.num_gpus == 8 and spec.plane_of(3) == 3
    assert load_topology("gb200-nvl72").num_gpus == 72
    with pytest.raises(ValueError, match="neither a preset"):
        load_topology("h900")


@pytest.mark.parametrize("model, kv", [("deepseek-v3", 70_272), ("qwen2.5-72b", 327_680),
                                       ("llama3.1-405b", 516_096)])
def test_kv_cache_bytes_per_token_match_the_paper(model, kv):
    assert load_architecture(model).kv_bytes_per_token() == kv


@pytest.mark.parametrize("model, gflops, tolerance", [("deepseek-v3", 250, 0.01), ("deepseek-v2", 155, 0.01),
                                                      ("llama3.1-405b", 2448, 0.015)])
def test_training_flops_per_token_match_the_paper(model, gflops, tolerance):
    assert load_architecture(model).train_flops_per_token(4096) / 1e9 == pytest.approx(gflops, rel=tolerance)


@pytest.mark.parametrize("model, gflops", [("qwen2.5-72b", 394), ("llama3.1-405b", 2448)])
def test_dense_figures_of_the_paper_follow_the_classic_estimate(model, gflops):
    """The paper's dense figures are 6 x (12 L h^2 + V h), rounded to whole GFLOPs; the config-exact count differs."""
    arch = load_architecture(model)
    assert round(arch.classic_train_flops_per_token() / 1e9) == gflops
    report = cost_report(arch, PRESETS["h800-mpft"])
    assert round(report["train_gflops_per_token_classic"]) == gflops


def test_parameter_counts_of_deepseek_v3():
    report = cost_report(load_architecture("deepseek-v3"), PRESETS["h800-mpft"])
    assert report["total_params"] / 1e9 == pytest.approx(671, rel=0.005)
    assert report["active_params"] / 1e9 == pytest.approx(37, rel=0.02)


def test_decode_tpot_matches_the_paper():
    v3 = load_architecture("deepseek-v3")
    ib = cost_report(v3, PRESETS["h800-mpft"], hidden_override=7000)
    assert round(ib["tpot_ms"], 2) == 14.76 and round(ib["tokens_per_s"]) in (67, 68)
    assert round(cost_report(v3, PRESETS["h800-mpft"])["tpot_ms"], 2) == 15.11  # exact hidden 7168
    nvl = cost_report(v3, PRESETS["gb200-nvl72"], hidden_override=7000)
    assert round(nvl["tpot_ms"], 2) == 0.82 and 1150 < nvl["tokens_per_s"] < 1250
    assert decode_tpot_ms(7000, 61, 32, 9, 50.0) == pytest.approx(2 * 61 * 3 * 32 * 9 * 7000 / 50e9 * 1e3)
