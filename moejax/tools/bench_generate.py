"""Speculative decoding with the MTP module(s) as the draft against plain decoding, on CPU, in
one process: tokens per second and the drafts' acceptance.

    python scripts/bench_generate.py RUN_DIR [--rounds 7] [--new-tokens 128] [--json PATH]

RUN_DIR is a training run of scripts/train.py with model.mtp_depth >= 1 (its latest
checkpoint; e.g. configs/tiny_deepseek_v3.yaml trained for its default 300 steps). Prompts are
windows of --prompt-len tokens from the held-out split of the run's corpus, one per row.

Settings: greedy and sampling (temperature 1, top-p 1) with one sequence (the latency case
speculative decoding is for), and greedy with --batch rows (a step keeps the drafts that every
row accepted, so acceptance falls with the batch). Each call generates --new-tokens tokens per
row, prefill included in its time, with the same cache length for both (the speculative
minimum, P + N + D - 1). Every function is compiled before timing.

Protocol (the machine is shared and noisy): each round times plain and speculative once per
setting, in an order that alternates per round; the speed-up is taken per round (speculative
tokens/s over plain tokens/s of the same round), then its median and range over rounds are
reported. Greedy speculative tokens are checked equal to plain greedy's every round (the bench
stops otherwise). The load average is recorded at the start and the end; figures taken with a
load above 1 at the start are marked provisional.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from pathlib import Path

import jax
import numpy as np

from moejax.data import load_corpus
from moejax.generate import generate, load_model, speculative_generate
from moejax.tools import bench

SETTINGS = (  # name, batch rows (None: --batch), temperature, top-p
    ("greedy, 1 sequence", 1, 0.0, 1.0),
    ("sampling T=1, 1 sequence", 1, 1.0, 1.0),
    ("greedy, batch", None, 0.0, 1.0),
)
QUIET_LOAD = 1.0  # a load average above this at the start makes the figures provisional


def held_out_prompts(cfg, rows: int, prompt_len: int) -> np.ndarray:
    """`rows` windows [rows, prompt_len] spread evenly over the held-out split."""
    tokens = load_corpus(cfg).val_tokens
    starts = np.linspace(0, len(tokens) - prompt_len - 1, rows).astype(int)
    return np.stack([np.asarray(tokens[s:s + prompt_len], np.int32) for s in starts])


def _calls(model, prompts, new_tokens: int, temperature: float, top_p: float, cache_len: int,
           record: dict):
    """(plain call, speculative call) for one setting; each speculative call appends its
    SpeculativeStats to record["stats"], each greedy pair is checked equal."""
    outputs = {}

    def plain(seed: int):
        outputs["plain"] = generate(model.params, model.cfg, prompts, new_tokens,
                                    key=jax.random.key(seed), temperature=temperature,
                                    top_p=top_p, cache_len=cache_len)
        return outputs["plain"]

    def speculative(seed: int):
        tokens, stats = speculative_generate(model.params, model.cfg, prompts, new_tokens,
                                             key=jax.random.key(seed), temperature=temperature,
                                             top_p=top_p, cache_len=cache_len)
        record["stats"].append(stats)
        outputs["speculative"] = tokens
        return tokens

    def check_greedy():
        if temperature == 0 and not np.array_equal(outputs["plain"], outputs["speculative"]):
            raise AssertionError("greedy speculative tokens differ from plain greedy decoding")

    return plain, speculative, check_greedy


def measure(model, settings, rounds: int, new_tokens: int, prompt_len: int, log=print) -> list:
    """One record per setting: per-round seconds of both, acceptance, tokens per step."""
    depth = model.cfg.model.mtp_depth
    cache_len = prompt_len + new_tokens + depth - 1
    records, runs = [], {}
    for name, rows, temperature, top_p in settings:
        prompts = held_out_prompts(model.cfg, rows, prompt_len)
        record = {"setting": name, "batch": rows, "temperature": temperature, "top_p": top_p,
                  "stats": [], "plain_s": [], "speculative_s": []}
        plain, speculative, check = _calls(model, prompts, new_tokens, temperature, top_p,
                                           cache_len, record)
        plain(0).block_until_ready()  # compile both
        speculative(0).block_until_ready()
        check()
        record["stats"].clear()
        records.append(record)
        runs[name] = (plain, speculative, check, record)
    for round_ in range(rounds):
        for name, (plain, speculative, check, record) in runs.items():
            order = (("plain", plain), ("speculative", speculative))
            for system, call in order if round_ % 2 == 0 else order[::-1]:
                record[f"{system}_s"].append(bench.seconds(lambda c=call, s=round_ + 1: c(s)))
            check()
            log(f"  round {round_ + 1}/{rounds} {name}: plain {record['plain_s'][-1]:.2f}s, "
                f"speculative {record['speculative_s'][-1]:.2f}s")
    return [_summary(r, new_tokens) for r in records]


def _summary(record: dict, new_tokens: int) -> dict:
    tokens = new_tokens * record["batch"]
    plain_rate = [tokens / s for s in record["plain_s"]]
    speculative_rate = [tokens / s for s in record["speculative_s"]]
    stats = record.pop("stats")
    drafted = sum(s.drafted for s in stats)
    return {
        **record,
        "plain_tokens_per_s": bench.per_round_summary(plain_rate),
        "speculative_tokens_per_s": bench.per_round_summary(speculative_rate),
        "speedup": bench.per_round_summary(bench.round_ratios(speculative_rate, plain_rate)),
        "acceptance_rate": sum(s.accepted for s in stats) / drafted if drafted else None,
        "tokens_per_step": statistics.mean(s.tokens_per_step for s in stats),
        "verification_steps": statistics.mean(s.steps for s in stats),
    }


def run(args, command: str) -> dict:
    load_start = os.getloadavg()[0]
    started = time.time()
    model = load_model(args.run_dir)
    if model.cfg.model.mtp_depth < 1:
        raise SystemExit(f"error: {model.description} has no MTP module (model.mtp_depth=0).")
    settings = [(name, rows or args.batch, t, p) for name, rows, t, p in SETTINGS]
    print(f"{model.description}: {args.rounds} rounds, {args.new_tokens} new tokens per row, "
          f"prompts of {args.prompt_len} tokens; load average {load_start:.2f} at the start")
    results = measure(model, settings, args.rounds, args.new_tokens, args.prompt_len)
    load_end = os.getloadavg()[0]
    record = {
        "command": command,
        "model": model.description,
        "mtp_depth": model.cfg.model.mtp_depth,
        "rounds": args.rounds,
        "new_tokens": args.new_tokens,
        "prompt_len": args.prompt_len,
        "load_average_start": load_start,
        "load_average_end": load_end,
        "provisional": load_start > QUIET_LOAD,
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__}, "
                   f"{jax.devices()[0].platform}",
        "wall_s": time.time() - started,
        "results": results,
    }
    print_table(record)
    return record


def print_table(record: dict) -> None:
    """The results as a markdown table, with the load averages and the provisional mark."""
    note = " (provisional: load above 1 at the start)" if record["provisional"] else ""
    print(f"\nload average {record['load_average_start']:.2f} at the start, "
          f"{record['load_average_end']:.2f} at the end{note}\n")
    print("| setting | plain tokens/s | speculative tokens/s | speed-up (median, range) | "
          "acceptance | tokens per step |")
    print("|---|---|---|---|---|---|")
    for r in record["results"]:
        speedup = r["speedup"]
        print(f"| {r['setting']} ({r['batch']} x {record['new_tokens']} tokens) "
              f"| {r['plain_tokens_per_s']['median']:.0f} "
              f"| {r['speculative_tokens_per_s']['median']:.0f} "
              f"| {speedup['median']:.2f}x ({speedup['min']:.2f}-{speedup['max']:.2f}) "
              f"| {r['acceptance_rate']:.0%} | {r['tokens_per_step']:.2f} |")


def print_saved(path: Path) -> None:
    import json

    print_table(json.loads(Path(path).read_text()))
