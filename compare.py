"""Runs side by side: `train_trl_grpo.py --compare RUN_DIR RUN_DIR [...] [--png FILE]`.

Plumbing, not task logic: it reads each run's own files (`resolved_config.json`, `summary.json`,
`eval/step_*.json`) and

1. prints one line per run: steps, wall time, training reward first -> last, and its final
   evaluation's headline metrics (pass@k, mean@n, maj@n, greedy pass@1) with their 95 % intervals;
2. prints every other run's paired difference from the first run, on the problems that both final
   evaluations share, with a paired 95 % interval;
3. writes one PNG: each headline metric over steps for every run (95 % bands; hollow markers for
   mid-run evaluations on the eval_subsample), and the paired differences.

Intervals come from eval_stats.bootstrap_ci (percentile bootstrap over problems, fixed seed),
the same function the eval files use; paired ones resample the per-problem differences, so the
problem-to-problem spread that both runs share cancels. run_sweep.sh's end-of-sweep table is this.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from config_cli import OneLineParser
from errors import ConfigError, DataError
from eval_stats import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, bootstrap_ci, format_ci, problem_scores

HEADLINE = ("pass@", "mean@", "maj@", "greedy_pass@1")


@dataclass
class Run:
    name: str
    path: Path
    eval_set: tuple[str | None, str]  # (dataset, split): only the same set can be paired
    summary: dict  # summary.json; {} for a run that never finished
    evals: list[dict]  # every eval/step_*.json, by step

    @property
    def final(self) -> dict:
        return self.evals[-1]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise DataError(f"{path}: not valid JSON") from None


def load_run(path: str) -> Run:
    d = Path(path)
    if not d.is_dir():
        raise DataError(f"{path}: no such run directory")
    files = sorted(d.glob("eval/step_*.json"))
    if not files:
        raise DataError(f"{path}: no eval/step_*.json (the run never finished an evaluation)")
    evals = []
    for f in files:
        ev = _read_json(f)
        if not isinstance(ev.get("rows"), list) or not ev["rows"] or "summary" not in ev:
            raise DataError(f"{f}: not an evaluation file (no summary or rows)")
        evals.append(ev)
    evals.sort(key=lambda e: e["step"])
    cfg_file, summary_file = d / "resolved_config.json", d / "summary.json"
    dataset = _read_json(cfg_file).get("dataset") if cfg_file.is_file() else None
    summary = _read_json(summary_file) if summary_file.is_file() else {}
    return Run(d.name, d, (dataset, evals[-1]["split"]), summary, evals)


def scores(ev: dict) -> dict[str, dict[int, float]]:
    """{metric: {row: per-problem value}} for an evaluation's headline metrics."""
    ks = sorted(int(k[len("pass@") :]) for k in ev["summary"] if k.startswith("pass@"))
    majority = any(k.startswith("maj@") for k in ev["summary"])
    rows = ev["rows"]
    per = problem_scores(rows, ks, majority)
    return {m: dict(zip([r["row"] for r in rows], v, strict=True)) for m, v in per.items()}


def intervals(ev: dict) -> dict[str, tuple[float, float]]:
    # From the rows rather than the file's ci95, so eval files written before ci95 existed work.
    return {m: bootstrap_ci(list(v.values())) for m, v in scores(ev).items()}


def paired(a: dict, b: dict) -> tuple[int, dict[str, tuple[float, tuple[float, float]]]]:
    """Shared problems, and {metric: (mean of b - a, its paired 95 % interval)}."""
    sa, sb = scores(a), scores(b)
    shared = sorted({r["row"] for r in a["rows"]} & {r["row"] for r in b["rows"]})
    out = {}
    for m in sa.keys() & sb.keys() if shared else ():
        diffs = [sb[m][r] - sa[m][r] for r in shared]
        out[m] = (sum(diffs) / len(diffs), bootstrap_ci(diffs))
    return len(shared), out


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _reward(summary: dict) -> str:
    first, last = summary.get("first_reward"), summary.get("last_reward")
    if first is None or last is None:
        return "-"
    return f"{first:.3f} -> {last:.3f}"


def _print(table: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            ).rstrip()
        )


def headline(runs: list[Run]) -> list[str]:
    """Headline metrics in the first run's order, then any that only later runs have."""
    names: list[str] = []
    for run in runs:
        names += [k for k in run.final["summary"] if k.startswith(HEADLINE) and k not in names]
    return names


def print_report(runs: list[Run]) -> None:
    metrics = headline(runs)
    table = [["run", "steps", "time", "reward first -> last", "final eval", *metrics]]
    for run in runs:
        ev, ci = run.final, intervals(run.final)
        where = "subsample" if ev.get("subsample") else "all"
        cells = [
            run.name,
            str(run.summary.get("steps", "-")),
            _duration(run.summary.get("train_seconds")),
            _reward(run.summary),
            f"step {ev['step']}, {len(ev['rows'])} {where}",
        ]
        cells += [
            format_ci(ev["summary"][m], ci.get(m)) if m in ev["summary"] else "-" for m in metrics
        ]
        table.append(cells)
    print("final evaluations (95 % intervals):")
    _print(table)
    if len(runs) > 1:
        ref = runs[0]
        table = [["run", "shared problems", *(f"{m} - ref" for m in metrics)]]
        for run in runs[1:]:
            n, diffs = paired(ref.final, run.final)
            cells = [run.name, str(n)]
            for m in metrics:
                if m not in diffs:
                    cells.append("-")
                    continue
                d, (lo, hi) = diffs[m]
                star = "*" if lo > 0 or hi < 0 else " "
                cells.append(format_ci(d, [lo, hi], "+") + star)
            table.append(cells)
        print(f"\npaired differences from ref = {ref.name} (final evaluations, shared problems):")
        _print(table)
    print(
        f"\n95 % intervals: percentile bootstrap over problems, {BOOTSTRAP_RESAMPLES} "
        f"resamples, seed {BOOTSTRAP_SEED}; * = the interval excludes 0",
        flush=True,
    )


def plot(runs: list[Run], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = headline(runs)
    panels = len(metrics) + (len(runs) > 1)
    cols = min(3, panels)
    rows = -(-panels // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), squeeze=False)
    axes = axes.ravel()
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, m in zip(axes, metrics, strict=False):
        for i, run in enumerate(runs):
            evs = [e for e in run.evals if m in e["summary"]]
            if not evs:
                continue
            color = colors[i % len(colors)]
            steps = [e["step"] for e in evs]
            cis = [intervals(e)[m] for e in evs]
            ax.plot(steps, [e["summary"][m] for e in evs], color=color, label=run.name)
            ax.fill_between(
                steps, [c[0] for c in cis], [c[1] for c in cis], color=color, alpha=0.15
            )
            for e in evs:
                ax.plot(
                    e["step"],
                    e["summary"][m],
                    "o",
                    color=color,
                    markerfacecolor="none" if e.get("subsample") else color,
                )
        ax.set(title=m, xlabel="step", ylim=(0, 1))
    axes[0].legend(fontsize="small")
    if len(runs) > 1:
        ax = axes[len(metrics)]
        width = 0.8 / (len(runs) - 1)
        for j, run in enumerate(runs[1:]):
            _, diffs = paired(runs[0].final, run.final)
            xs = [
                i + (j - (len(runs) - 2) / 2) * width for i, m in enumerate(metrics) if m in diffs
            ]
            ds = [diffs[m] for m in metrics if m in diffs]
            ax.errorbar(
                xs,
                [d for d, _ in ds],
                yerr=[[d - lo for d, (lo, _) in ds], [hi - d for d, (_, hi) in ds]],
                fmt="o",
                capsize=3,
                color=colors[(j + 1) % len(colors)],
                label=run.name,
            )
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_xticks(range(len(metrics)), metrics, rotation=30)
        ax.set(title=f"final, paired difference from {runs[0].name}")
    for ax in axes[panels:]:
        ax.set_visible(False)
    fig.suptitle("95 % bands: bootstrap over problems; hollow = eval_subsample", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str]) -> int:
    p = OneLineParser(
        prog="train_trl_grpo.py --compare",
        description="Final metrics, paired differences and one PNG for finished runs.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="output_dir of each run")
    p.add_argument("--png", default="compare.png", help="where to write the plot")
    try:
        args = p.parse_args(argv)
        runs = [load_run(r) for r in args.runs]
        for run in runs[1:]:
            if run.eval_set != runs[0].eval_set:
                raise DataError(
                    f"{run.path} was evaluated on {'/'.join(map(str, run.eval_set))} and "
                    f"{runs[0].path} on {'/'.join(map(str, runs[0].eval_set))}: nothing to pair"
                )
            if not paired(runs[0].final, run.final)[0]:
                raise DataError(f"{run.path} and {runs[0].path} share no evaluated problem")
        print_report(runs)
        print(f"comparison plot: {plot(runs, Path(args.png))}")
        return 0
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
