"""What a run leaves to read: log.jsonl (every logged step, written as it happens), the
evaluation table printed at each evaluation and at the end, and the six-panel metrics.png.
Plumbing, not task logic.
"""

from __future__ import annotations

import json
from pathlib import Path

from eval_stats import format_ci


def history_entry(record: dict) -> dict:
    """One evaluation as summary.json's "eval" list and print_table keep it."""
    keep = ("problems", "subsample", "ci95")
    return {"step": record["step"], **record["summary"], **{k: record[k] for k in keep}}


def eval_history(output_dir: str, upto: int) -> list[dict]:
    """The evaluations a resumed run made up to its checkpoint's step, from eval/step_*.json
    (those past it are redone, and overwritten, by the resumed run)."""
    records = [json.loads(p.read_text()) for p in (Path(output_dir) / "eval").glob("step_*.json")]
    return [history_entry(r) for r in sorted(records, key=lambda r: r["step"]) if r["step"] <= upto]


def print_table(history: list[dict]) -> None:
    """Evaluations, one line each, headline metrics with their 95 % intervals; the problems
    column says whether the eval ran on the whole eval set (all) or the eval_subsample."""
    if not history:
        return
    skip = ("step", "problems", "subsample", "ci95")
    keys = [k for k in history[-1] if k not in skip and not k.startswith("reward/")]
    table = [["step", "problems", *keys]]
    for h in history:
        cis = h.get("ci95", {})
        where = "subsample" if h.get("subsample") else "all"
        cells = [str(h["step"]), f"{h['problems']} {where}" if "problems" in h else ""]
        cells += [format_ci(h[k], cis.get(k)) if k in h else "-" for k in keys]
        table.append(cells)
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    print()
    for row in table:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
    print(flush=True)


def append_log(output_dir: str, record: dict) -> None:
    """One line of output_dir/log.jsonl, written at once: a run that dies keeps its log (TRL's log
    history reaches disk only with a checkpoint)."""
    with open(Path(output_dir) / "log.jsonl", "a") as fh:
        fh.write(json.dumps(record) + "\n")


def read_log(output_dir: str) -> tuple[list[dict], list[dict]]:
    """log.jsonl -> (training log history, evaluations), as plot_metrics takes them.

    A resumed run starts again at its checkpoint's step, so what an earlier run logged after that
    step is dropped; a last line cut short by a kill is skipped.
    """
    records: list[dict] = []
    for line in (Path(output_dir) / "log.jsonl").read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("event") == "train_begin":
            records = [r for r in records if r["step"] <= rec["step"]]
        else:
            records.append(rec)
    is_eval = [any(k.startswith("eval_") for k in r) for r in records]
    history = [r for r, e in zip(records, is_eval, strict=True) if not e]
    # Intervals (eval_<metric>_ci95_lo/hi) stay out: metrics_figure reads them from the eval files.
    evals = [
        {"step": r["step"], **{k[5:]: v for k, v in r.items() if k != "step" and "_ci95_" not in k}}
        for r, e in zip(records, is_eval, strict=True)
        if e
    ]
    return history, evals


def metrics_figure(output_dir: str, log_history: list[dict], evals: list[dict]):
    """Six panels: training reward by component, completion length and truncation, clip and
    importance-sampling ratios, where each step's time went, group filtering, and evaluation with
    95 % bands (the "ci95" of output_dir/eval/step_*.json, where present). A panel whose metrics
    were not logged says so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    def series(key: str) -> tuple[list, list]:
        pts = [(h["step"], h[key]) for h in log_history if h.get(key) is not None and "step" in h]
        return ([p[0] for p in pts], [p[1] for p in pts]) if pts else ([], [])

    def lines(ax, keys: dict[str, str], **kw) -> bool:
        drawn = False
        for key, label in keys.items():
            x, y = series(key)
            if x:
                ax.plot(x, y, marker=".", label=label, **kw)
                drawn = True
        return drawn

    def twin(ax, key: str, fmt: str, label: str, loc: str, band=None, **axis) -> bool:
        """`key` on a right-hand axis of its own (with a min-max band from the `band` keys)."""
        x, y = series(key)
        if not x:
            return False
        right = ax.twinx()
        right.plot(x, y, fmt, marker=axis.pop("marker", "."), label=label)
        lo, hi = (series(k)[1] for k in band) if band else ([], [])
        if band and len(lo) == len(hi) == len(x):
            right.fill_between(x, lo, hi, color="k", alpha=0.1, label=f"{label}: min-max")
        right.set(ylabel=axis.pop("ylabel", label), **axis)
        right.legend(fontsize=7, loc=loc)
        return True

    def finish(ax, drawn: bool, title: str, ylabel: str = "") -> None:
        ax.set(title=title, xlabel="step", ylabel=ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if drawn:
            ax.legend(fontsize=7, loc="best")
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)

    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    (ax_r, ax_len, ax_clip), (ax_t, ax_g, ax_e) = axes
    keys = sorted(
        {k for h in log_history for k in h if k.startswith("rewards/") and k.endswith("/mean")}
    )
    drawn = lines(ax_r, {"reward": "total (weighted)"}, linewidth=2)
    drawn |= lines(ax_r, {k: k.split("/")[1] for k in keys})
    finish(ax_r, drawn, "training reward by component (mean)")

    drawn = lines(
        ax_len,
        {
            "completions/mean_length": "mean length",
            "completions/mean_terminated_length": "mean length, ended ones",
        },
    )
    shown = twin(
        ax_len, "completions/clipped_ratio", "r--", "truncated rate", "lower right", ylim=(0, 1)
    )
    finish(ax_len, drawn or shown, "completion length (tokens) and truncation", "tokens")

    drawn = lines(
        ax_clip,
        {f"clip_ratio/{k}_mean": f"clip {k}" for k in ("low", "high", "region")},
    )
    isr = "sampling/importance_sampling_ratio/"
    shown = twin(
        ax_clip, isr + "mean", "k:", "IS ratio (mean)", "lower right",
        band=(isr + "min", isr + "max"), ylabel="vLLM importance-sampling ratio",
    )  # fmt: skip
    finish(ax_clip, drawn or shown, "clipped token share and importance sampling", "share")

    drawn = False
    steps, bottom = series("time/step")[0], None
    # The parts of time/step, in the order the trainer logs them (grpo_extensions.TIME_KEYS).
    parts = dict.fromkeys(k for h in log_history for k in h if k.startswith("time/"))
    for part in [k for k in parts if k != "time/step"]:
        x, y = series(part)
        if x:
            ax_t.bar(x, y, bottom=bottom, label=part.removeprefix("time/"))
            bottom = y if bottom is None else [a + b for a, b in zip(bottom, y, strict=True)]
            drawn = True
    twin(ax_t, "generation/tokens_per_s", "k", "generated tokens/s", "upper right")
    finish(ax_t, drawn, f"time per step ({len(steps)} steps)", "seconds")

    drawn = lines(
        ax_g,
        {
            "frac_reward_zero_std": "zero-variance groups",
            "dynamic_sampling/dropped_frac": "dropped",
        },
    )
    twin(ax_g, "dynamic_sampling/rounds", "k:", "generation rounds", "lower right", marker="s")
    finish(ax_g, drawn, "groups without reward variance (share)", "share")
    ax_g.set_ylim(0, 1)

    bands: dict[int, dict] = {}
    for e in evals:
        path = Path(output_dir) / "eval" / f"step_{e['step']:05d}.json"
        if path.exists():
            bands[e["step"]] = json.loads(path.read_text()).get("ci95") or {}
    metrics = [k for k in (evals[-1] if evals else {}) if k.startswith(("pass@", "mean@", "maj@"))]
    for key in metrics:
        x = [e["step"] for e in evals if key in e]
        (line,) = ax_e.plot(x, [e[key] for e in evals if key in e], marker="o", label=key)
        ci = [(s, bands[s][key]) for s in x if key in bands.get(s, {})]
        if ci:
            ax_e.fill_between(
                [s for s, _ in ci],
                [b[0] for _, b in ci],
                [b[1] for _, b in ci],
                color=line.get_color(),
                alpha=0.15,
            )
    finish(ax_e, bool(metrics), "evaluation (bands: 95 % CI where computed)")
    ax_e.set_ylim(0, 1)
    fig.tight_layout(w_pad=3)
    return fig


def plot_metrics(output_dir: str, log_history: list[dict], evals: list[dict]) -> Path:
    """output_dir/metrics.png: the six panels of metrics_figure in one file."""
    import matplotlib.pyplot as plt

    fig = metrics_figure(output_dir, log_history, evals)
    path = Path(output_dir) / "metrics.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
