"""report_to=wandb, run for real: the smoke pipeline with WANDB_MODE=offline, set up as one grid
point of run_sweep.sh, and the offline run read back from its .wandb file with wandb's protobuf
schema: config, train and eval metrics, the sweep's group and run name, and no secret."""

from __future__ import annotations

import json
import os
import shlex
import struct
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARKER = "wandb-key-marker-7c1e0b"  # stands in for WANDB_API_KEY; must reach no file
SWEEP = "wandb-test-sweep"


def read_records(path: Path) -> list:
    """Every record of a .wandb file: a LevelDB-style log (7-byte ':W&B' header, 32 KiB blocks
    of chunks, each with a 7-byte header: crc32c, length, type) of wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a .wandb file"
    block, pos, records, pending = 32768, 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0:  # zero padding up to the block's end
            pos += left - 7 - length
            continue
        pending = chunk if kind in (1, 2) else pending + chunk  # FULL/FIRST, MIDDLE/LAST
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(pending)
            records.append(rec)
    return records


def sweep_point(tmp: Path) -> dict[str, str]:
    """What run_sweep.sh gives the trainer of its first grid point (its DRY_RUN command line),
    plus WANDB_RUN_GROUP, which it exports to every run (tests/test_run_sweep.py checks that)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GRPO_", "SWEEP_"))}
    env.update(DRY_RUN="1", GPUS="0,1", VLLM_MODE="none", SWEEP_NAME=SWEEP, SWEEP_DIR=str(tmp))
    proc = subprocess.run(
        [str(ROOT / "run_sweep.sh"), "gsm8k", "lr=1e-6,3e-6"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"wandb group {SWEEP}" in proc.stdout
    cmds = [shlex.split(ln) for ln in proc.stdout.splitlines() if "train_trl_grpo.py" in ln]
    points = [dict(w.split("=", 1) for w in c if w.startswith("GRPO_")) for c in cmds]
    names = [p["GRPO_RUN_NAME"] for p in points]
    assert len(names) == 2 and len(set(names)) == 2  # one run name per grid point
    return {**points[0], "WANDB_RUN_GROUP": SWEEP}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wandb")
    point = sweep_point(tmp / "sweep")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GRPO_", "WANDB_"))}
    env.update(point)
    env.update(
        WANDB_MODE="offline",
        WANDB_DIR=str(tmp),
        WANDB_API_KEY=MARKER,
        HF_TOKEN=MARKER,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
    )
    # 2 steps: the baseline evaluation, two training steps, the final evaluation.
    args = ["--dataset", "gsm8k", "--smoke", "--report-to", "wandb", "--total-steps", "2"]
    args += ["--max-eval-samples", "2", "--max-completion-length", "16"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train_trl_grpo.py"), *args],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wandb_file,) = tmp.glob("wandb/offline-run-*/run-*.wandb")
    records = read_records(wandb_file)
    config: dict = {}
    history: list[dict] = []
    for rec in records:
        kind = rec.WhichOneof("record_type")
        if kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in rec.config.update})
        elif kind == "history":
            items = rec.history.item
            history.append(
                {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}
            )
    (run_rec,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    return {
        "tmp": tmp,
        "point": point,
        "out": Path(point["GRPO_OUTPUT_DIR"]),
        "run": run_rec,
        "config": config,
        "history": history,
        "output": proc.stdout + proc.stderr,
    }


def test_sweep_group_and_run_name(run):
    assert run["run"].run_group == SWEEP
    assert run["run"].display_name == run["point"]["GRPO_RUN_NAME"]


def test_grpo_config_is_the_resolved_one(run):
    cfg = run["config"]
    assert cfg["learning_rate"] == float(run["point"]["GRPO_LR"])  # the grid point's value
    assert cfg["run_name"] == run["point"]["GRPO_RUN_NAME"]
    assert (cfg["max_steps"], cfg["num_generations"], cfg["max_completion_length"]) == (2, 4, 16)
    assert cfg["report_to"] == ["wandb"]


def test_harness_config_reaches_wandb(run):
    resolved = json.loads((run["out"] / "resolved_config.json").read_text())
    nested = [v for v in run["config"].values() if isinstance(v, dict)]
    missing = {
        k: v
        for k, v in resolved.items()
        if run["config"].get(k) != v and not any(d.get(k) == v for d in nested)
    }
    assert not missing


def test_train_metrics_with_time_breakdown(run):
    train = [h for h in run["history"] if "train/reward" in h]
    assert [h["train/global_step"] for h in train] == [1, 2]
    want = {"train/rewards/correctness/mean", "train/rewards/format/mean", "train/pass@1"}
    want |= {f"train/time/{k}" for k in ("step", "generation", "reward", "train", "eval")}
    for h in train:
        assert want <= set(h), want - set(h)
        assert h["train/time/step"] > 0


def eval_rows(run) -> dict[int, dict]:
    return {h["train/global_step"]: h for h in run["history"] if "eval/pass@1" in h}


def test_eval_metrics_at_baseline_and_end(run):
    rows = eval_rows(run)
    assert sorted(rows) == [0, 2]  # baseline and final weights
    for step, h in rows.items():
        summary = json.loads((run["out"] / "eval" / f"step_{step:05d}.json").read_text())["summary"]
        for k in ("pass@1", "mean@4", "maj@4", "format_rate"):
            assert h[f"eval/{k}"] == pytest.approx(summary[k])
        assert h["eval/problems"] == 2


def test_eval_intervals_reach_wandb(run):
    rows = eval_rows(run)
    for step, h in rows.items():
        ci95 = json.loads((run["out"] / "eval" / f"step_{step:05d}.json").read_text())["ci95"]
        for metric, (lo, hi) in ci95.items():
            assert h.get(f"eval/{metric}_ci95_lo") == pytest.approx(lo)
            assert h.get(f"eval/{metric}_ci95_hi") == pytest.approx(hi)


def test_no_secret_in_any_file_of_the_run(run):
    assert MARKER not in run["output"]
    files = [p for p in run["tmp"].rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files)
    leaked = [str(p) for p in files if MARKER.encode() in p.read_bytes()]
    assert not leaked
