"""Reading one split's rows: local JSONL or parquet files (offline), or the Hugging Face Hub.
Plumbing, not task logic: every failure is one DataError line naming the file and the row."""

from __future__ import annotations

import json
import random
from collections import defaultdict
from pathlib import Path

from errors import DataError


def read_rows(
    data_dir: str,
    split: str,
    hub_path: str,
    configs: tuple[str | None, ...],
    hub_split: str,
    fields: tuple[str, ...],
) -> list[dict]:
    """DATA_DIR/<split>.jsonl (or .parquet) when data_dir is set, else the Hub dataset `hub_path`
    (each of `configs`, concatenated); every row must carry every field in `fields`."""
    if data_dir:
        base = Path(data_dir)
        path = next(
            (p for p in (base / f"{split}.jsonl", base / f"{split}.parquet") if p.exists()), None
        )
        if path is None:
            raise DataError(f"data file not found: {base / split}.jsonl (or .parquet)")
        if path.suffix == ".jsonl":
            rows = []
            with path.open() as fh:
                for i, line in enumerate(fh):
                    if not line.strip():
                        continue
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}: row {i}: not valid JSON ({e.msg})") from None
        else:
            import datasets

            rows = datasets.Dataset.from_parquet(str(path)).to_list()
        source = str(path)
    else:
        import datasets

        rows = []
        for config in configs:
            try:
                rows += datasets.load_dataset(hub_path, config, split=hub_split).to_list()
            except Exception as e:  # offline, typo, gated: say so in one line
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise DataError(
                    f"cannot load {hub_path} ({config}, {hub_split}) from the Hub: {first}; "
                    "use --data-dir DIR for local files"
                ) from None
        source = hub_path
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{source}: row {i}: not a JSON object")
        for name in fields:
            if row.get(name) in (None, ""):
                raise DataError(f"{source}: row {i}: missing field {name!r}")
    return rows


def stratified_split(
    rows: list[dict], size: int, key: str, seed: int
) -> tuple[list[dict], list[dict]]:
    """(rest, held out): `size` rows held out, each value of row[key] in proportion, drawn with
    `seed`, so the same rows come out every run."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        groups[str(row.get(key))].append(i)
    rng = random.Random(seed)
    quotas = {k: len(v) * size / len(rows) for k, v in sorted(groups.items())}
    take = {k: int(q) for k, q in quotas.items()}
    # Largest remainder, ties by name, so the quotas add up to exactly `size`.
    for k in sorted(quotas, key=lambda k: (take[k] - quotas[k], k))[: size - sum(take.values())]:
        take[k] += 1
    held: set[int] = set()
    for k, idx in sorted(groups.items()):
        held.update(rng.sample(idx, take[k]))
    return [r for i, r in enumerate(rows) if i not in held], [
        r for i, r in enumerate(rows) if i in held
    ]
