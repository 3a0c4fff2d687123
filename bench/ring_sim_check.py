"""The ring simulator: calibrated on the real ring, checked against it, then used to predict.

    .venv/bin/python bench/ring_sim_check.py [--measured bench/results/ring_window.json]

1. Calibrate (from `bench/ring_window.py`'s runs, nothing else; see `Calibration`):
   - the hop: the origin's ring time less the stages' compute, per pass of the plain ring,
     shared among its P hops (P - 1 forwards and the result home); it absorbs serialisation
     and scheduling too;
   - the stages' one-token passes: the plain ring's decode seconds per token less that
     overhead, split by the stages' shares of the layers;
   - fitted: the cost of each further token in a pass (suffix W = 1 runs at 0 ms), and the
     draft model's step on stage 0's core and its prompt pass per prompt token (which the
     scheduler runs after the first token, so inside the decode span; model W = 1 at 0 ms);
   - the acceptance: each run's own verified blocks, (K, accepted), replayed in order.
2. Validate: the predicted decode tokens/s of every real run (plain ring, each drafter at
   every window) against the measured, as a ratio.
3. Predict 2, 4 and 8 stages of an 8B and a 70B model (cost sources in `apple_silicon`) at 1, 5
   and 20 ms per hop: plain ring, W = 1, the best fixed W and the automatic window, with the
   acceptance of the measured runs (the suffix drafter on code editing and the model drafter
   on code generation, W = 1 runs).
4. Sweep the automatic window's threshold (MIN_SURVIVAL) over rings and acceptance levels.

Writes bench/results/ring_sim_check.json and .png.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
from pathlib import Path

import numpy as np

from common import RESULTS, grouped_bars, machine, pyplot, save, save_figure
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: tools/ is not installed
from tools.ring_sim import Policy, RingSpec, StageCost, plain_ring, simulate  # noqa: E402
from exo.speculative.pipeline.window import MIN_SURVIVAL

SEEDS = range(3)


def mean_tps(spec: RingSpec, policy: Policy, tokens: int) -> float:
    return statistics.mean(simulate(spec, policy, tokens, seed=s).tokens_per_second for s in SEEDS)


# -- 1. calibration ------------------------------------------------------------------------------
# The stages' totals include the prompt pass, which dwarfs a decode pass and scales with the
# prompt; so the decode costs come from the decode timings instead: the plain ring's seconds
# per token (one pass each) are the stages' one-token passes plus the ring's per-pass overhead
# (the origin's measured ring time less every stage's compute, over its passes); the passes
# split among the stages by their share of the layers (the same layers cost the same). Two
# costs the plain ring cannot show are fitted, each on one kind of run at 0 ms and checked
# on all the others: the cost of every further token in a pass (on the suffix drafter's W = 1
# runs, whose drafts are free) and the draft model's step (on its W = 1 runs).
def layer_shares(run: dict) -> list[float]:
    layers = [s["end_layer"] - s["start_layer"] + 1 for s in run["ring"]["stages"]]
    return [n / sum(layers) for n in layers]


def overhead_per_pass(runs: list[dict], delay: float) -> float:
    plain = [r for r in runs if r["mode"] == "plain ring" and r["delay_ms"] == delay]
    return statistics.median((r["ring"]["wall_seconds"] - sum(r["ring"]["compute_seconds"])) / r["ring"]["passes"]
                             for r in plain)


class Calibration:
    def __init__(self, runs: list[dict]):
        self.runs = runs
        plain_runs = [r for r in runs if r["mode"] == "plain ring"]
        self.shares = layer_shares(plain_runs[0])
        self.hop_s = {d: overhead_per_pass(runs, d) / len(self.shares) for d in sorted({r["delay_ms"] for r in runs})}
        # Seconds of every stage's one-token pass together, per prompt (its context length).
        self.pass_s = {p: statistics.median(r["decode_seconds"] / (r["tokens"] - 1)
                                            - self.hop_s[r["delay_ms"]] * len(self.shares)
                                            for r in plain_runs if r["prompt"] == p)
                       for p in sorted({r["prompt"] for r in runs})}
        # Prompt tokens: a plain run's stage tokens less its one-token decode passes.
        self.prompt_tokens = {r["prompt"]: next(iter(r["stages"].values()))["tokens"] - r["ring"]["passes"] + 1
                              for r in plain_runs}
        self.per_token_s = 0.0  # the ring's, all stages together
        self.draft_step_s = self.draft_prefill_token_s = 0.0
        self._fit("suffix", {"per_token_s": np.linspace(0.0, 0.1, 41)})
        self._fit("model", {"draft_step_s": np.linspace(0.0, 0.4, 41),
                            "draft_prefill_token_s": np.linspace(0.0, 0.03, 31)})

    def spec(self, prompt: str, delay: float, drafter: str | None) -> RingSpec:
        stages = [StageCost(share * self.pass_s[prompt] - share * self.per_token_s, share * self.per_token_s)
                  for share in self.shares]
        model = drafter == "model"
        return RingSpec(stages, hop_s=self.hop_s[delay], draft_step_s=self.draft_step_s if model else 0.0,
                        draft_shares_stage0=model,
                        draft_prefill_s=self.draft_prefill_token_s * self.prompt_tokens[prompt] if model else 0.0)

    def predict(self, run: dict) -> float:
        spec = self.spec(run["prompt"], run["delay_ms"], run["drafter"])
        # The decode span the client timed: from the first token to the last.
        return simulate(spec, policy_of(run), run["tokens"] - 1, seed=0).tokens_per_second

    def _fit(self, drafter: str, grids: dict[str, np.ndarray]) -> None:
        """Set the attributes in `grids` to the grid point whose predictions best match (in
        log ratio) the drafter's W = 1 runs at 0 ms."""
        fitted = [r for r in self.runs if r["drafter"] == drafter and r["window"] == 1 and r["delay_ms"] == 0]

        def error(values: tuple[float, ...]) -> float:
            for name, value in zip(grids, values):
                setattr(self, name, float(value))
            return sum(math.log(self.predict(r) / r["tokens_per_second"]) ** 2 for r in fitted)

        best = min(itertools.product(*grids.values()), key=error)
        error(best)

    def summary(self) -> dict:
        return {"layer_shares": self.shares, "hop_s": {str(d): h for d, h in self.hop_s.items()},
                "one_token_pass_s": self.pass_s, "per_token_s": self.per_token_s,
                "draft_step_s": self.draft_step_s, "draft_prefill_token_s": self.draft_prefill_token_s,
                "prompt_tokens": self.prompt_tokens,
                "fitted_on": "per_token_s: suffix W=1 at 0 ms; draft_step_s and draft_prefill_token_s: "
                             "model W=1 at 0 ms"}


def policy_of(run: dict) -> Policy:
    if run["drafter"] is None:
        return Policy(k=0, window=1, defer_bonus=False)
    return Policy(k=0, window=run["window"], blocks=[tuple(b) for b in run["blocks"]], replay=True)


def validate(runs: list[dict]) -> tuple[dict, list[dict]]:
    calibration = Calibration(runs)
    out = []
    for run in runs:
        tps = calibration.predict(run)
        fitted = run["drafter"] in ("suffix", "model") and run["window"] == 1 and run["delay_ms"] == 0
        out.append({k: run[k] for k in ("nodes", "delay_ms", "prompt", "mode", "drafter", "window")}
                   | {"measured_tps": run["tokens_per_second"], "predicted_tps": tps,
                      "ratio": tps / run["tokens_per_second"], "fitted_on": fitted})
    return calibration.summary(), out


# -- 3. predictions ------------------------------------------------------------------------------
def apple_silicon(params_b: float, hidden: int, stages: int) -> tuple[list[StageCost], float]:
    """Stage costs of a 4-bit model split evenly over `stages` Apple-silicon nodes, and the
    activation bytes per token a pass sends on.

    Decoding is memory-bound: a pass reads its stage's weights once, so the fixed cost is
    weight bytes over the achieved bandwidth. Weights: 4-bit with group scales, ~0.56 bytes
    per parameter (mlx-community 4-bit checkpoints: Llama-3.1-8B 4.5 GB, 70B 39.7 GB).
    Bandwidth: an M2 Max's 400 GB/s nominal at ~70 % achieved in MLX decode (280 GB/s).
    Each extra token in a pass costs its FLOPs: 2 per parameter at ~10 TFLOPS achieved
    (M2 Max GPU, fp16 ~13.6 TFLOPS nominal). Activations travel as fp16 (2 bytes x hidden).
    """
    weights = params_b * 1e9 * 0.56 / stages
    fixed = weights / 280e9
    per_token = 2 * params_b * 1e9 / stages / 10e12
    return [StageCost(fixed, per_token) for _ in range(stages)], 2.0 * hidden


MODELS = {"8B": (8.0, 4096), "70B": (70.0, 8192)}
# The draft for each, on stage 0's GPU (Llama-3.2-1B / 3B 4-bit: ~0.7 / 1.8 GB read per step).
DRAFT_STEP_S = {"8B": 0.7e9 / 280e9, "70B": 1.8e9 / 280e9}
LINK_BPS = 125e6  # 1 Gb Ethernet; Thunderbolt would make bytes negligible


def predict(acceptance: dict[str, list[tuple[int, int]]], windows: range = range(1, 9)) -> list[dict]:
    out = []
    for model, (params_b, hidden) in MODELS.items():
        for stages in (2, 4, 8):
            costs, bytes_per_token = apple_silicon(params_b, hidden, stages)
            for hop_ms in (1, 5, 20):
                base = dict(stages=costs, hop_s=hop_ms / 1000, bytes_per_token=bytes_per_token,
                            bandwidth_bps=LINK_BPS)
                plain = plain_ring(RingSpec(**base), tokens=400).tokens_per_second
                for source, blocks in acceptance.items():
                    drafter = source.split()[0]
                    spec = RingSpec(**base, draft_step_s=DRAFT_STEP_S[model] if drafter == "model" else 0.0,
                                    draft_shares_stage0=drafter == "model")
                    by_w = {w: mean_tps(spec, Policy(k=0, window=w, blocks=blocks), 2000) for w in windows}
                    best = max(by_w, key=by_w.get)
                    auto = mean_tps(spec, Policy(k=0, window=stages, blocks=blocks, min_survival=MIN_SURVIVAL), 2000)
                    out.append({"model": model, "stages": stages, "hop_ms": hop_ms, "acceptance": source,
                                "plain_tps": plain, "w1_tps": by_w[1], "best_window": best, "best_tps": by_w[best],
                                "auto_tps": auto, "best_vs_plain": by_w[best] / plain,
                                "w1_vs_plain": by_w[1] / plain, "auto_vs_best": auto / by_w[best]})
    return out


# -- 4. the automatic window's threshold ---------------------------------------------------------
def sweep(thresholds=(0.02, 0.05, 0.1, 0.2, 0.3, 0.5)) -> list[dict]:
    """tokens/s of the automatic window relative to the best fixed W, per threshold, over
    rings (2-8 stages, 1-20 ms) and per-position acceptance 0.3-0.95 at K = 4."""
    out = []
    for model in MODELS:
        for stages in (2, 4, 8):
            costs, bytes_per_token = apple_silicon(*MODELS[model], stages)
            for hop_ms in (1, 20):
                spec = RingSpec(costs, hop_s=hop_ms / 1000, bytes_per_token=bytes_per_token, bandwidth_bps=LINK_BPS)
                for a in (0.3, 0.5, 0.7, 0.85, 0.95):
                    best = max(mean_tps(spec, Policy(k=4, window=w, acceptance=[a]), 800)
                               for w in range(1, stages + 2))
                    for t in thresholds:
                        auto = mean_tps(spec, Policy(k=4, window=stages, acceptance=[a], min_survival=t), 800)
                        out.append({"model": model, "stages": stages, "hop_ms": hop_ms, "acceptance": a,
                                    "threshold": t, "auto_vs_best": auto / best})
    return out


def plot(validation: list[dict], predictions: list[dict], name: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(15, 5))
    labels = [f"{v['delay_ms']:g}ms {v['prompt'][:9]}\n{v['mode']}" for v in validation]
    grouped_bars(axes[0], labels, {"measured": [v["measured_tps"] for v in validation],
                                   "simulated": [v["predicted_tps"] for v in validation]}, fontsize=5, rotation=90)
    axes[0].set_title("real 2-node ring vs the calibrated simulator (decode tokens/s)")
    axes[0].legend(fontsize=8)
    rows = [p for p in predictions if p["hop_ms"] == 5]
    labels = [f"{p['model']} {p['stages']}st\n{p['acceptance']}" for p in rows]
    grouped_bars(axes[1], labels, {"plain ring": [p["plain_tps"] for p in rows],
                                   "W = 1": [p["w1_tps"] for p in rows],
                                   "best W": [p["best_tps"] for p in rows],
                                   "auto W": [p["auto_tps"] for p in rows]}, fontsize=5, rotation=90)
    axes[1].set_yscale("log")
    axes[1].set_title("predicted tokens/s, Apple-silicon nodes, 5 ms per hop")
    axes[1].legend(fontsize=8)
    save_figure(fig, name)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--measured", type=Path, default=RESULTS / "ring_window.json")
    parser.add_argument("--name", default="ring_sim_check")
    args = parser.parse_args()
    measured = json.loads(args.measured.read_text())
    runs = measured["runs"]
    calibration, validation = validate(runs)
    sources = {}
    for drafter, prompt in (("suffix", "code editing"), ("model", "code generation")):
        w1 = [r for r in runs if r["drafter"] == drafter and r["prompt"] == prompt and r["window"] == 1]
        if w1:
            sources[f"{drafter} ({prompt})"] = [tuple(b) for r in w1 for b in r["blocks"]]
    predictions = predict(sources)
    thresholds = sweep()
    by_threshold = {t: statistics.geometric_mean([s["auto_vs_best"] for s in thresholds if s["threshold"] == t])
                    for t in sorted({s["threshold"] for s in thresholds})}
    worst = {t: min(s["auto_vs_best"] for s in thresholds if s["threshold"] == t) for t in by_threshold}
    save(args.name, {"machine": machine(), "measured": str(args.measured), "calibration": calibration,
                     "validation": validation, "predictions": predictions,
                     "threshold_sweep": {"geomean_auto_vs_best": by_threshold, "worst_auto_vs_best": worst,
                                         "cases": thresholds}})
    plot(validation, predictions, args.name)
    print(json.dumps(calibration, indent=1))
    for v in validation:
        print(f"| {v['delay_ms']:g} | {v['prompt']} | {v['mode']} | {v['measured_tps']:.2f} | "
              f"{v['predicted_tps']:.2f} | {v['ratio']:.2f} |")
    for p in predictions:
        print(f"| {p['model']} | {p['stages']} | {p['hop_ms']} | {p['acceptance']} | {p['plain_tps']:.1f} | "
              f"{p['w1_tps']:.1f} | {p['best_window']} | {p['best_tps']:.1f} | {p['auto_tps']:.1f} | "
              f"{p['best_vs_plain']:.2f}x |")
    for t in by_threshold:
        print(f"threshold {t}: auto / best fixed W geomean {by_threshold[t]:.3f}, worst {worst[t]:.3f}")


if __name__ == "__main__":
    main()
