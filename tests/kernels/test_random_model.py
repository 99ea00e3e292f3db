"""tools/random_model.py: the untrained models that benchmarks run on are DeepSeek-V3 checkpoints, read by
transformers as we read them."""
import json
import subprocess
import sys
from pathlib import Path

import torch

from moeserve.kernels.load import load_model
from tests.tiny import rel_err

ROOT = Path(__file__).resolve().parents[2]


def random_model(*args: str):
    return subprocess.run([sys.executable, "tools/random_model.py", *args], cwd=ROOT, capture_output=True, text=True)


def test_a_random_model_has_the_sizes_asked_for_and_matches_transformers(tmp_path):
    import transformers
    out = tmp_path / "model"
    done = random_model("--out", str(out), "--dim", "256", "--inter-dim", "384", "--moe-inter-dim", "48",
                        "--experts", "24", "--activated", "6", "--groups", "6", "--limited-groups", "3")
    assert done.returncode == 0, done.stderr
    config = json.loads((out / "config.json").read_text())
    assert (config["hidden_size"], config["intermediate_size"], config["moe_intermediate_size"]) == (256, 384, 48)
    assert (config["n_routed_experts"], config["num_experts_per_tok"], config["n_group"], config["topk_group"]) == \
        (24, 6, 6, 3)
    ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours = load_model(out, dtype=torch.float32)
    tokens = torch.randint(0, ours.args.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_err(ours.logits(ours(tokens)), ref(tokens).logits) < 1e-4


def test_routing_a_model_cannot_do_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "model"
    uneven = random_model("--out", str(out), "--experts", "30")
    assert uneven.returncode == 2 and "must split evenly into --groups" in uneven.stderr
    too_many = random_model("--out", str(out), "--activated", "20")
    assert too_many.returncode == 2 and "--activated (20) must be at most" in too_many.stderr
    no_experts = random_model("--out", str(out), "--activated", "0")
    assert no_experts.returncode == 2 and "'0': a whole number, 1 or more" in no_experts.stderr
    assert not out.exists()
