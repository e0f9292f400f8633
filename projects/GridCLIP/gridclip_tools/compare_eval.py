"""Evaluate several checkpoints on the same dataset and print one side-by-side table.

    python tools/compare_eval.py \\
        --run GridCLIP embedded/GridCLIP_world.yaml output/demo/gridclip/model_final.pth \\
        --run ViLD embedded/ViLD_world.yaml output/demo/vild/model_final.pth \\
        --dataset gridclip_world_val --output-dir output/compare

Each run is ``projects/GridCLIP/train_net.py --eval-only`` in its own process (the evaluation code
path of training, Detectron2's LVIS/COCO evaluators), with ``OUTPUT_DIR <output-dir>/<NAME>``;
its ``eval_results.json`` feeds the table. Writes ``<output-dir>/comparison.md`` and
``comparison.json`` and prints the table (AP, APr, APc, APf, AP50, ...).

Config overrides: trailing ``KEY VALUE`` pairs (or ``--opts ...``) apply to every run;
``--run-opts NAME KEY VALUE ...`` to one run. Regressions fail loudly with Detectron2's
expected results: ``--run-opts GridCLIP TEST.EXPECTED_RESULTS "[['bbox','AP',31.2,1.0]]"`` makes
train_net's ``verify_results`` exit non-zero when AP leaves 31.2 +- 1.0; this tool then exits
non-zero naming the run (after writing the table of everything that was evaluated).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Dict, List

from detectron2.data import DatasetCatalog
from tqdm import tqdm

import gridclip  # noqa: F401  (registers datasets, so --dataset can be checked)
from gridclip.config import PROJECT_ROOT, get_gridclip_cfg
from gridclip.data import register_datasets_from_cfg
from gridclip.utils.io import atomic_write
from gridclip_tools.args import (
    add_config_overrides,
    check_weights_file,
    config_overrides,
    positive_int,
    weights_in_opts,
)

TRAIN_NET = os.path.join(PROJECT_ROOT, "train_net.py")

#: metrics shown first, in this order; any other metric of the results follows
METRIC_ORDER = ["AP", "APr", "APc", "APf", "AP50", "AP75", "APs", "APm", "APl"]
VERIFY_FAILED = "Result verification failed"


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--run",
        nargs=3,
        action="append",
        required=True,
        metavar=("NAME", "CONFIG", "WEIGHTS"),
        help="a run: its name in the table, a config (path or name under "
        "projects/GridCLIP/configs), a checkpoint. Repeat for each model.",
    )
    p.add_argument(
        "--run-opts",
        nargs="+",
        action="append",
        default=[],
        metavar="NAME_THEN_KEY_VALUE",
        help="config overrides for one run: NAME KEY VALUE [KEY VALUE ...]",
    )
    p.add_argument(
        "--dataset",
        help="registered dataset every run is evaluated on (default: each config's DATASETS.TEST,"
        " which must then agree)",
    )
    p.add_argument(
        "--fixed-ap",
        action="store_true",
        help="fixed AP (Dave et al. 2021: top TEST.FIXED_AP_DETECTIONS_PER_CLASS detections per "
        "class, no per-image cap) instead of the standard 300 per image: TEST.FIXED_AP True",
    )
    p.add_argument("--output-dir", default="output/compare_eval")
    p.add_argument(
        "--jobs",
        type=positive_int,
        default=1,
        help="evaluate this many runs at once (each in its own process; mind memory and devices)",
    )
    add_config_overrides(p, " for every run")
    return p


def _check_pairs(opts: List[str], where: str) -> None:
    if len(opts) % 2:
        raise ValueError(f"{where}: config overrides come in KEY VALUE pairs, got {opts}")


def parse_runs(args) -> List[Dict]:
    """The runs of the command line, checked: unique names, existing weights, opts in pairs."""
    runs, names = [], set()
    for name, config, weights in args.run:
        if name in names:
            raise ValueError(f"--run {name!r} is given twice; run names must be unique")
        if not name or name in (".", "..") or os.sep in name or (os.altsep or os.sep) in name:
            raise ValueError(
                f"--run {name!r}: a run name becomes a folder under --output-dir; use a plain name "
                "(no path separators, not '.' or '..')"
            )
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"--run {name!r}: weights {weights!r} do not exist")
        names.add(name)
        runs.append({"name": name, "config": config, "weights": weights, "opts": []})
    by_name = {r["name"]: r for r in runs}
    for item in args.run_opts:
        name, opts = item[0], item[1:]
        if name not in by_name:
            raise ValueError(f"--run-opts {name!r}: no --run of that name ({sorted(by_name)})")
        _check_pairs(opts, f"--run-opts {name}")
        by_name[name]["opts"] += opts
    for run in runs:  # MODEL.WEIGHTS among the overrides replaces the --run weights
        for weights in weights_in_opts(config_overrides(args)) + weights_in_opts(run["opts"]):
            check_weights_file(weights, f"--run {run['name']!r}: MODEL.WEIGHTS override")
    return runs


def resolve_datasets(runs, common_opts, dataset) -> List[str]:
    """The test datasets every run is evaluated on; an error when configs disagree."""
    if dataset:
        # datasets named by their files (DATASETS.FILES in the common opts) count as registered
        register_datasets_from_cfg(get_gridclip_cfg(None, list(common_opts)))
        if dataset not in DatasetCatalog.list():
            raise KeyError(
                f"--dataset {dataset!r} is not registered; registered ones include "
                f"{sorted(n for n in DatasetCatalog.list() if 'gridclip' in n or 'lvis' in n)}"
            )
        return [dataset]
    seen = {}
    for run in runs:
        opts = list(common_opts) + run["opts"]
        try:
            cfg = get_gridclip_cfg(run["config"], opts)
        except (AssertionError, KeyError) as e:  # yacs reports unknown keys/bad values this way
            raise ValueError(f"--run {run['name']!r}: config with overrides {opts}: {e}") from e
        seen[run["name"]] = list(cfg.DATASETS.TEST)
    distinct = {tuple(v) for v in seen.values()}
    if len(distinct) != 1 or not next(iter(distinct)):
        raise ValueError(
            f"the runs evaluate different/no datasets {seen}; pass --dataset NAME to compare them "
            "on the same one"
        )
    return list(next(iter(distinct)))


def evaluate(run: Dict, datasets: List[str], common_opts: List[str], output_dir: str) -> Dict:
    """train_net.py --eval-only for one run, logged to ``<run dir>/compare_eval.log``."""
    run_dir = os.path.join(output_dir, run["name"])
    os.makedirs(run_dir, exist_ok=True)
    results_path = os.path.join(run_dir, "eval_results.json")
    if os.path.exists(results_path):
        os.remove(results_path)  # never report a stale result
    datasets_opt = "(" + "".join(f"'{d}'," for d in datasets) + ")"
    cmd = [sys.executable, TRAIN_NET, "--config-file", run["config"], "--eval-only"]
    cmd += ["OUTPUT_DIR", run_dir, "MODEL.WEIGHTS", run["weights"], "DATASETS.TEST", datasets_opt]
    cmd += list(common_opts) + run["opts"]
    log_path = os.path.join(run_dir, "compare_eval.log")
    start = time.perf_counter()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=os.getcwd())
    record = dict(run, command=cmd, log=log_path, returncode=proc.returncode)
    record["eval_s"] = round(time.perf_counter() - start, 2)
    with open(log_path) as f:
        log_text = f.read()
    if os.path.isfile(results_path):
        with open(results_path) as f:
            record["results"] = json.load(f)["results"]
    if proc.returncode == 0 and "results" in record:
        record["status"] = "ok"
    elif VERIFY_FAILED in log_text:
        record["status"] = "expected results not met"
        lines = log_text.splitlines()
        first = next(i for i, line in enumerate(lines) if VERIFY_FAILED in line)
        record["log_tail"] = lines[first : first + 25]
    else:
        record["status"] = "failed"
        record["log_tail"] = log_text.splitlines()[-25:]
    return record


def _fmt(value) -> str:
    if value is None:
        return "-"
    value = float(value)
    if math.isnan(value):
        return "nan"
    # LVIS/COCO report -1 (x100 by Detectron2) where the dataset has no ground truth of that kind
    return "n/a" if value < 0 else f"{value:.1f}"


def comparison_table(records: List[Dict]) -> str:
    """A Markdown table: one row per run, one column per metric (of every task)."""
    columns = []
    for r in records:
        for task, metrics in r.get("results", {}).items():
            for metric in metrics:
                if (task, metric) not in columns:
                    columns.append((task, metric))
    rank = {m: i for i, m in enumerate(METRIC_ORDER)}
    tasks = list(dict.fromkeys(t for t, _ in columns))
    columns.sort(key=lambda c: (tasks.index(c[0]), rank.get(c[1], len(rank)), c[1]))
    single_task = len(tasks) <= 1
    headers = ["run"] + [m if single_task else f"{t}/{m}" for t, m in columns]
    headers += ["eval s", "status"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in records:
        res = r.get("results", {})
        cells = [r["name"]] + [_fmt(res.get(t, {}).get(m)) for t, m in columns]
        cells += [f"{r['eval_s']:.0f}", r["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(records, datasets, output_dir) -> str:
    table = comparison_table(records)
    md = [f"# Evaluation comparison on {', '.join(datasets)}", "", table]
    md += ["n/a: the dataset has no ground truth of that kind (e.g. no large objects).", ""]
    md += ["Runs (`train_net.py --eval-only`):", ""]
    md += [f"- **{r['name']}**: `{r['config']}` + `{r['weights']}`" for r in records]
    with atomic_write(os.path.join(output_dir, "comparison.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    payload = {"datasets": datasets, "runs": records}
    with atomic_write(os.path.join(output_dir, "comparison.json"), "w") as f:
        json.dump(payload, f, indent=2, default=float)
    return table


def main(argv=None) -> Dict:
    parser = get_parser()
    args = parser.parse_args(argv)
    common_opts = config_overrides(args)
    if args.fixed_ap:
        common_opts += ["TEST.FIXED_AP", "True"]

    try:
        _check_pairs(common_opts, "opts")
        runs = parse_runs(args)
        datasets = resolve_datasets(runs, common_opts, args.dataset)
    except (FileNotFoundError, ValueError, KeyError) as e:
        parser.error(str(e))
    os.makedirs(args.output_dir, exist_ok=True)

    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    records = [None] * len(runs)
    with (
        ThreadPoolExecutor(max_workers=args.jobs) as pool,
        tqdm(total=len(runs), desc="eval-only", unit="run") as bar,
    ):
        futures = {
            pool.submit(evaluate, run, datasets, common_opts, args.output_dir): i
            for i, run in enumerate(runs)
        }
        for future in as_completed(futures):
            i = futures[future]
            records[i] = future.result()
            bar.set_postfix_str(f"{runs[i]['name']}: {records[i]['status']}")
            bar.update()

    table = write_outputs(records, datasets, args.output_dir)
    print(f"\nEvaluation on {', '.join(datasets)}:\n\n{table}")
    print(f"Wrote {args.output_dir}/comparison.md and comparison.json")
    failed = [r for r in records if r["status"] != "ok"]
    for r in failed:
        print(
            f"\nerror: run {r['name']!r}: {r['status']} (exit {r['returncode']}); log: {r['log']}",
            file=sys.stderr,
        )
        for line in r.get("log_tail", []):
            print("    " + line, file=sys.stderr)
    if failed:
        sys.exit(1)
    return {"datasets": datasets, "runs": records}
