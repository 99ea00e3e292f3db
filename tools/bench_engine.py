"""Benchmark: moeserve's engine against `transformers` generate, same checkpoint, same prompts, same machine.

    python tools/bench_engine.py [--model DIR] [--json out.json]

Measures, in float32 on the CPU (greedy decoding):
- batch 1: decode tokens/s for a 64-token prompt and 128 new tokens, ours with and without MTP speculation
  (median of 5 interleaved runs each, each run a prompt of its own);
- 32 concurrent requests with mixed prompt lengths (16-200 tokens), each generating 64 tokens (EOS ignored): equal
  work, tokens/s. transformers runs them as one left-padded batch (its native way to batch requests). Each side
  first runs another workload of the same kind, untimed; then 3 new workloads, each run by both sides in turn;
  medians. Also where that time goes: our steps that compute prompt tokens against transformers' padded prefill
  (its generate of one token on the same prompts), and a step of only decodes against one of its decode steps.
Every timed run has prompts not seen before, so that our prefix cache (which transformers lacks) saves
nothing.
Results print as a Markdown table of ratios.
"""
import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from moeserve.cluster import DEMO_MODEL, LLM, SamplingParams
from moeserve.cluster.tokenizer import Tokenizer


REPEATS = 5
REPEATS_32 = 3
NEW_TOKENS_32 = 64


def corpus_prompts(tokenizer: Tokenizer, n: int, rng: random.Random, lo: int, hi: int) -> list[list[int]]:
    """Snippets of the standard library's source, tokenised, of random lengths in [lo, hi]."""
    import sysconfig
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    prompts = []
    while len(prompts) < n:
        ids = tokenizer.encode(rng.choice(files).read_text(errors="replace"))
        length = rng.randint(lo, hi)
        if len(ids) > length + 1:
            start = rng.randrange(len(ids) - length)
            prompts.append(ids[start:start + length])
    return prompts


class StealMeter:
    """The share of this machine's CPU time the hypervisor gave to others while a benchmark ran (Linux's
    /proc/stat `steal`); high values mean the numbers measured the neighbours as much as the code."""

    def __init__(self):
        self.start = self._read()

    @staticmethod
    def _read():
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        except (OSError, ValueError):
            return None
        return fields[7] if len(fields) > 7 else None, sum(fields)

    def share(self):
        end = self._read()
        if self.start is None or end is None or self.start[0] is None or end[1] == self.start[1]:
            return None
        return (end[0] - self.start[0]) / (end[1] - self.start[1])

    def report(self) -> str:
        share = self.share()
        return "host steal during the run: not measurable here" if share is None else \
            f"host steal during the run: {share:.1%} of CPU time"

    def finish(self, results: dict, json_path: Optional[Path]) -> None:
        """Print the steal share, record it with the results, and write them as JSON if asked."""
        print(self.report())
        results["host_steal_share"] = self.share()
        if json_path:
            json_path.write_text(json.dumps(results, indent=1) + "\n")


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


class PhaseTimer:
    """Wall time of an engine's steps, split into the steps that compute prompt tokens (with the decodes that run
    beside them) and the steps that only decode: where a workload's time goes."""

    def __init__(self, engine):
        self.reset()
        step, scheduler = engine.step, engine.scheduler

        def timed_step(*args, **kwargs):
            prompts = bool(scheduler.waiting) or any(seq.is_prefilling for seq in scheduler.running)
            start = time.perf_counter()
            outputs = step(*args, **kwargs)
            elapsed = time.perf_counter() - start
            if prompts:
                self.prefill_s += elapsed
            else:
                self.decode_s += elapsed
                self.decode_steps += 1
            return outputs
        engine.step = timed_step

    def reset(self) -> None:
        self.prefill_s, self.decode_s, self.decode_steps = 0.0, 0.0, 0

    def decode_step_s(self) -> float:
        return self.decode_s / max(self.decode_steps, 1)


def hf_generate(model, prompts: list[list[int]], max_new: int, pad_id: int):
    """One left-padded batch through transformers generate, greedy, exactly max_new tokens each."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=max_new, min_new_tokens=max_new,
                              do_sample=False, pad_token_id=pad_id)[:, width:]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=DEMO_MODEL)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, help="also write the results here")
    a = p.parse_args()
    import transformers
    torch.set_num_threads(a.threads)
    rng = random.Random(0)
    tok = Tokenizer(a.model)
    hf = transformers.AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    results = {}
    steal = StealMeter()

    # batch 1: the three runs interleaved, REPEATS times, medians (one run is under a second, and this
    # machine's speed drifts by more than the differences measured). Every repeat has prompts of its own: a
    # repeated prompt would be served from our prefix cache, which transformers does not have.
    params = SamplingParams(max_tokens=128, temperature=0, ignore_eos=True)
    llms = {"ours": LLM(a.model), "ours_mtp": LLM(a.model, mtp=True)}
    for llm in llms.values():
        llm.generate([corpus_prompts(tok, 1, rng, 8, 8)[0]], SamplingParams(max_tokens=4, temperature=0))  # warm-up
    seconds = {"transformers": [], "ours": [], "ours_mtp": []}
    matches, acceptance, per_step = [], [], []
    for _ in range(REPEATS):
        prompt = corpus_prompts(tok, 1, rng, 64, 64)[0]
        hf_out, hf_s = timed(lambda: hf_generate(hf, [prompt], 128, 0))
        seconds["transformers"].append(hf_s)
        for key, llm in llms.items():
            out, ours_s = timed(lambda: llm.generate([prompt], params)[0])
            seconds[key].append(ours_s)
            matches.append(out.token_ids == hf_out[0].tolist())
            if key == "ours_mtp":
                acceptance.append(out.acceptance_rate)
                per_step.append(128 / max(out.decode_steps, 1))
    for key, runs in seconds.items():
        results[f"batch1_{key}_tokens_per_s"] = 128 / statistics.median(runs)
    results["batch1_matches_transformers"] = f"{sum(matches)}/{len(matches)}"
    results["batch1_mtp_acceptance"] = statistics.mean(acceptance)
    results["batch1_mtp_tokens_per_step"] = statistics.mean(per_step)
    del llms
    print(f"batch 1 done: {json.dumps(results)}", file=sys.stderr, flush=True)

    # 32 concurrent requests of mixed prompt lengths, every one generating the same number of tokens: equal work on
    # both sides (transformers' padded batch generates each row to the longest; with equal outputs nothing it
    # generates is thrown away). A new workload each repeat (fresh prompts, as above); both sides first run another
    # such workload, so that neither pays first-call costs (kernel selection for new shapes) in the timed runs
    def workload():
        prompts = corpus_prompts(tok, 32, rng, 16, 200)
        return prompts, [NEW_TOKENS_32] * len(prompts)

    llm = LLM(a.model)
    phases = PhaseTimer(llm.engine)
    warm, warm_tokens = workload()
    hf_generate(hf, warm, max(warm_tokens), 0)
    llm.generate(warm, [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in warm_tokens])
    hf_rates, ours_rates, equal, split = [], [], 0, []
    for _ in range(REPEATS_32):
        prompts, max_tokens = workload()
        useful = sum(max_tokens)
        params32 = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in max_tokens]
        hf_outs, hf_s = timed(lambda: hf_generate(hf, prompts, max(max_tokens), 0))
        _, hf_prefill_s = timed(lambda: hf_generate(hf, prompts, 1, 0))  # its padded prefill and first token
        phases.reset()
        outs, ours_s = timed(lambda: llm.generate(prompts, params32))
        hf_rates.append(useful / hf_s)
        ours_rates.append(useful / ours_s)
        equal += sum(o.token_ids == h[:m].tolist() for o, h, m in zip(outs, hf_outs, max_tokens))
        split.append({"ours_prefill_s": phases.prefill_s, "ours_decode_step_s": phases.decode_step_s(),
                      "transformers_prefill_s": hf_prefill_s,
                      "transformers_decode_step_s": (hf_s - hf_prefill_s) / (max(max_tokens) - 1)})
    results["batch32_ours_tokens_per_s"] = statistics.median(ours_rates)
    results["batch32_transformers_tokens_per_s"] = statistics.median(hf_rates)
    results["batch32_ratios"] = [o / h for o, h in zip(ours_rates, hf_rates)]
    results["batch32_outputs_equal"] = f"{equal}/{32 * REPEATS_32}"
    results["batch32_phases"] = split

    r = results
    rows = [
        ("batch 1 decode, tokens/s", r["batch1_ours_tokens_per_s"], r["batch1_transformers_tokens_per_s"]),
        ("batch 1 decode with MTP, tokens/s", r["batch1_ours_mtp_tokens_per_s"], r["batch1_transformers_tokens_per_s"]),
        (f"32 concurrent, prompts of 16-200 tokens, {NEW_TOKENS_32} new each (equal work), tokens/s",
         r["batch32_ours_tokens_per_s"], r["batch32_transformers_tokens_per_s"]),
    ]
    print("| workload | moeserve | transformers | ratio |\n|---|---|---|---|")
    for name, ours, theirs in rows:
        print(f"| {name} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f}x |")
    print(f"\nMTP at batch 1: acceptance {r['batch1_mtp_acceptance']:.0%}, {r['batch1_mtp_tokens_per_step']:.2f} tokens "
          f"per step, wall-clock speedup {r['batch1_ours_mtp_tokens_per_s'] / r['batch1_ours_tokens_per_s']:.2f}x; "
          f"greedy outputs equal to transformers: batch 1 {r['batch1_matches_transformers']}, "
          f"32 concurrent {r['batch32_outputs_equal']}; 32-concurrent ratio per repeat: "
          + " / ".join(f"{x:.2f}x" for x in r["batch32_ratios"]))
    print("\nwhere the 32-concurrent time goes (medians of the workloads): prefill = the steps that compute prompt "
          "tokens, with the decodes beside them (transformers: its generate of one token); decode step = one step "
          "of only decodes (transformers: the rest of its generate, per token)")
    print("| phase | moeserve | transformers | ratio |\n|---|---|---|---|")
    for name, key, scale in (("prefill, s", "prefill_s", 1), ("decode step, ms", "decode_step_s", 1e3)):
        ours, theirs = (statistics.median(w[f"{side}_{key}"] for w in split) for side in ("ours", "transformers"))
        print(f"| {name} | {ours * scale:.3f} | {theirs * scale:.3f} | {theirs / ours:.2f}x |")
    steal.finish(results, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
