"""metrics.png: one file with every panel, eval confidence bands where the eval JSON has them."""

from __future__ import annotations

import json

import numpy as np

import run_log
import train_trl_grpo as T
from grpo_extensions import TIME_KEYS

STEP_SECONDS = float(sum(range(1, len(TIME_KEYS) + 1)))  # part i takes i + 1 seconds


def _log() -> list[dict]:
    return [
        {
            "step": s,
            "loss": 0.1,
            "reward": 0.1 * s,
            "rewards/correctness/mean": 0.1 * s,
            "rewards/format/mean": 0.5,
            "completions/mean_length": 10.0 + s,
            "completions/clipped_ratio": 0.2,
            "clip_ratio/high_mean": 0.01,
            "sampling/importance_sampling_ratio/mean": 1.0,
            "sampling/importance_sampling_ratio/min": 0.9,
            "sampling/importance_sampling_ratio/max": 1.1,
            **{f"time/{k}": float(i + 1) for i, k in enumerate(TIME_KEYS)},
            "time/step": STEP_SECONDS,
            "generation/tokens_per_s": 100.0,
            "frac_reward_zero_std": 0.3,
            "dynamic_sampling/dropped_frac": 0.3,
            "dynamic_sampling/rounds": 2.0,
        }
        for s in (1, 2, 3, 4)
    ]


def _evals(tmp_path, ci: bool) -> list[dict]:
    evals = [{"step": 0, "pass@1": 0.2, "mean@4": 0.2}, {"step": 4, "pass@1": 0.4, "mean@4": 0.4}]
    (tmp_path / "eval").mkdir(exist_ok=True)
    for e, band in zip(evals, ([0.1, 0.3], [0.3, 0.5]), strict=True):
        doc = {"step": e["step"], "summary": e, "rows": []}
        if ci:
            doc["ci95"] = {"pass@1": band}  # mean@4 without an interval: no band for it
        (tmp_path / "eval" / f"step_{e['step']:05d}.json").write_text(json.dumps(doc))
    return evals


def _panels(fig) -> dict:
    return {ax.get_title(): ax for ax in fig.axes if ax.get_title()}


def test_metrics_figure_panels_and_eval_bands(tmp_path):
    fig = run_log.metrics_figure(str(tmp_path), _log(), _evals(tmp_path, ci=True))
    panels = _panels(fig)
    assert len(panels) == 6
    reward = panels["training reward by component (mean)"]
    assert [ln.get_label() for ln in reward.lines] == ["total (weighted)", "correctness", "format"]
    time_ax = panels["time per step (4 steps)"]
    assert [c.get_label() for c in time_ax.containers] == list(TIME_KEYS)
    tops = [sum(c.patches[i].get_height() for c in time_ax.containers) for i in range(4)]
    assert tops == [STEP_SECONDS] * 4  # stacked: the parts add up to the step
    (band,) = panels["evaluation (bands: 95 % CI where computed)"].collections
    ys = band.get_paths()[0].vertices[:, 1]
    assert np.isclose(ys.min(), 0.1) and np.isclose(ys.max(), 0.5)
    assert (tmp_path / "metrics.png").exists() is False
    assert T.plot_metrics(str(tmp_path), _log(), _evals(tmp_path, ci=True)).stat().st_size > 10_000


def test_no_band_without_intervals_and_missing_metrics_say_so(tmp_path):
    fig = run_log.metrics_figure(str(tmp_path), [], _evals(tmp_path, ci=False))
    panels = _panels(fig)
    assert not panels["evaluation (bands: 95 % CI where computed)"].collections
    texts = [t.get_text() for t in panels["training reward by component (mean)"].texts]
    assert texts == ["not logged"]
