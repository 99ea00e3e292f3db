"""The `moeserve` command line: help on every command, JSON output equal to the library, one-line errors."""
import json
import subprocess
import sys

import pytest

from moeserve.actors.cli import build_parser, main
from moeserve.cluster import DEMO_MODEL
from moeserve.kernels.generate import generate
from moeserve.kernels.load import load_model


def test_every_command_has_help():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"info", "generate", "quantize"} <= set(commands)
    nested = {f"{name} {action}": p for name, sub in commands.items() if sub._subparsers
              for action, p in sub._subparsers._group_actions[0].choices.items()}
    assert {"cluster up", "cluster generate"} <= set(nested)
    for name, sub in {**commands, **nested}.items():
        assert sub.description and len(sub.format_help()) > 200, name
        assert "examples:\n  moeserve " in sub.format_help(), f"{name}: no examples in --help"


def test_console_script_help_runs():
    out = subprocess.run([sys.executable, "-m", "moeserve.actors.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "generate" in out.stdout and "examples:" in out.stdout


def test_generate_json_equals_the_library(checkpoints, capsys):
    import torch
    path, _ = checkpoints("v3")
    assert main(["generate", "--model", str(path), "--prompt-ids", "1,2,3", "--max-tokens", "6", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = generate(load_model(path, torch.float32), [[1, 2, 3]], 6, stop_token_ids=[1])[0]
    assert printed["token_ids"] == expected.token_ids
    assert printed["logprobs"] == pytest.approx(expected.logprobs, rel=1e-5)
    assert printed["prompt_token_ids"] == [1, 2, 3] and printed["finish_reason"] in ("length", "stop")


def test_the_prompt_as_an_argument_is_the_prompt_option(capsys):
    """`moeserve generate "text"`, as a newcomer types it, generates what `--prompt "text"` does."""
    from moeserve.cluster import DEMO_MODEL
    argv = ["--model", str(DEMO_MODEL), "--max-tokens", "4", "--json"]
    assert main(["generate", "def fibonacci("] + argv) == 0
    positional = json.loads(capsys.readouterr().out)
    assert main(["generate", "--prompt", "def fibonacci("] + argv) == 0
    option = json.loads(capsys.readouterr().out)
    assert positional["prompt_token_ids"] == option["prompt_token_ids"] and len(option["prompt_token_ids"]) > 1
    assert positional["token_ids"] == option["token_ids"]
    assert main(["generate", "def f(", "--prompt", "def g("] + argv) == 2
    err = capsys.readouterr().err.strip()
    assert "give the prompt once" in err and "\n" not in err


def test_generate_stops_where_the_library_does(capsys):
    """--stop, --stop-token-ids and --include-stop-str-in-output mean what the library's SamplingParams fields do."""
    from moeserve.cluster import DEMO_MODEL, LLM, SamplingParams
    llm, prompt = LLM(DEMO_MODEL), "def fibonacci("
    free = llm.generate([prompt], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))[0].token_ids
    token = next(t for i, t in enumerate(free) if i >= 2 and free.index(t) == i and llm.tokenizer.decode([t]).strip())
    cases = [(["--stop", "):\n"], dict(stop=["):\n"]), "):\n"),
             (["--stop-token-ids", str(token)], dict(stop_token_ids=[token]), token),
             (["--stop-token-ids", str(token), "--include-stop-str-in-output"],
              dict(stop_token_ids=[token], include_stop_str_in_output=True), token)]
    for flags, fields, stop_reason in cases:
        assert main(["generate", prompt, "--max-tokens", "16", "--json", *flags]) == 0
        printed = json.loads(capsys.readouterr().out)
        expected = llm.generate([prompt], SamplingParams(max_tokens=16, temperature=0, **fields))[0]
        assert expected.finish_reason == "stop", flags
        assert (printed["token_ids"], printed["text"], printed["finish_reason"], printed["stop_reason"]) == \
            (expected.token_ids, expected.text, "stop", stop_reason), flags


def test_cluster_generate_prints_the_engines_text_for_its_prompt_argument(tmp_path):
    """`moeserve cluster generate "text" --config YAML`: the layout of the YAML (two expert groups, the faster to
    start) on a local Ray, in a process of its own that starts and stops it, prints the prompt and the single-process
    engine's greedy continuation; the request's flags (a stop string; token ids, a stop token and JSON) mean what they
    mean to `moeserve generate` and the library; `up` refuses a prompt."""
    from moeserve.cluster import DEMO_MODEL, LLM, SamplingParams
    config = tmp_path / "cluster.yaml"
    config.write_text("expert_groups: 2\nredundant_experts: 0\ntopology: {name: two-by-one, nodes: 2, "
                      "gpus_per_node: 1, nics_per_node: 1, planes: 1, intra_node_gbps: 10, nic_gbps: 1}\n")
    llm, prompt = LLM(DEMO_MODEL), "def fibonacci("
    free = llm.generate([prompt], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))[0]
    stop_text = free.text[len(free.text) // 2:][:3]  # ends the text in its middle
    stop_token = free.token_ids[5]
    by_text = llm.generate([prompt], SamplingParams(max_tokens=16, temperature=0, stop=[stop_text]))[0]
    ids = llm.encode(prompt)
    by_ids = llm.generate([ids], SamplingParams(max_tokens=16, temperature=0, stop_token_ids=[stop_token], logprobs=0,
                                                include_stop_str_in_output=True))[0]
    assert by_text.finish_reason == by_ids.finish_reason == "stop"

    def cluster_generate(*flags):  # the prompt comes after the options here, where a user may put it too
        out = subprocess.run([sys.executable, "-m", "moeserve.actors.cli", "cluster", "generate", "--config",
                              str(config), "--max-tokens", "16", *flags], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        assert "ready in" in out.stderr and "inter-node bytes measured" in out.stderr
        return out.stdout
    printed = cluster_generate(prompt, "--stop", stop_text)
    assert "expert-group-1" in printed and "expert-group-2" not in printed  # the YAML's layout
    assert printed.endswith(prompt + by_text.text + "\n"), (printed[-300:], by_text.text)
    printed = json.loads(cluster_generate("--prompt-ids", ",".join(map(str, ids)), "--stop-token-ids",
                                          str(stop_token), "--include-stop-str-in-output", "--json").splitlines()[-1])
    assert (printed["prompt_token_ids"], printed["token_ids"], printed["text"], printed["finish_reason"]) == \
        (ids, by_ids.token_ids, by_ids.text, "stop")
    assert printed["logprobs"] == pytest.approx(by_ids.logprobs, abs=1e-4)
    for argv in (["cluster", "up", prompt], ["cluster", "up", "--prompt-ids", "1,2"]):
        with pytest.raises(SystemExit) as refused:  # argparse's usage error
            main(argv)
        assert refused.value.code == 2


def test_info_reports_kv_bytes(capsys):
    assert main(["info", "--model", "tests/data/deepseek_v3_config.json", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kv_cache_bytes_per_token"]["bfloat16"] == 70_272 and info["routed_experts"] == 256


def test_info_without_a_model_describes_the_demo_model(capsys):
    """As `moeserve generate`, `info` defaults to the shipped demo model."""
    config = json.loads((DEMO_MODEL / "config.json").read_text())
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["hidden_size"], info["layers"], info["routed_experts"]) == \
        (config["hidden_size"], config["num_hidden_layers"], config["n_routed_experts"])
    # (kv_lora_rank + qk_rope_head_dim) values per token per layer, in BF16
    assert info["kv_cache_bytes_per_token"]["bfloat16"] == \
        (config["kv_lora_rank"] + config["qk_rope_head_dim"]) * config["num_hidden_layers"] * 2


@pytest.mark.parametrize("argv, message", [
    (["--prompt-ids", "1,2,5000"], "token id 5000 is outside the vocabulary [0, 211)"),
    (["--prompt-ids", "1", "--max-tokens", "0"], "max_tokens must be a positive integer"),
    (["--prompt", "hello"], "has no tokenizer.json"),
    (["--prompt-ids", "1", "--max-tokens", "600"], "exceed the model's context of 512"),
])
def test_bad_requests_are_one_line_errors(checkpoints, capsys, argv, message):
    path, _ = checkpoints("v3")
    capsys.readouterr()  # the fixture's progress, where this test is the first to write the checkpoint
    assert main(["generate", "--model", str(path)] + argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and err.startswith("moeserve: error:")


@pytest.mark.parametrize("argv", [
    ["generate", "def f(", "--max-tokens", "0"], ["generate", "def f(", "--max-tokens", "5000"],
    ["generate", "def f(", "--top-p", "2"], ["generate"], ["generate", "def f(", "--prompt-ids", "1,2"],
    ["cluster", "generate", "def f(", "--max-tokens", "0"],  # refused before Ray starts
    ["cluster", "generate", "def f(", "--top-p", "0"], ["cluster", "generate", "def f(", "--prompt-ids", "1,2"],
])
def test_a_refused_request_prints_nothing_but_its_error(capsys, argv):
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("moeserve: error:") and "\n" not in err.strip()


def test_missing_checkpoint_is_a_one_line_error(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt-ids", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a directory" in err and "\n" not in err
