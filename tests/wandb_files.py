"""Reading back what W&B wrote offline (WANDB_MODE=offline): each offline run directory's transaction log
(`run-<id>.wandb`, records in W&B's own protobuf) and the media files beside it."""

import glob
import json
import os

from wandb.proto import wandb_internal_pb2
from wandb.sdk.internal import datastore


def offline_runs(root: str) -> list[str]:
    """The offline run directories under `root`, oldest first (one per process that opened a run)."""
    return sorted(glob.glob(os.path.join(root, "**", "offline-run-*"), recursive=True))


def read(run_dir: str) -> dict:
    """{"run": the run record (id, group, name, job type, tags), "config": {key: value}, "history": [{key: value}]
    in order, "summary": {key: value}, "exit_code": the process's (None: it never finished), "dir": run_dir}."""
    out = {"run": None, "config": {}, "history": [], "summary": {}, "exit_code": None, "dir": run_dir}
    store = datastore.DataStore()
    store.open_for_scan(glob.glob(os.path.join(run_dir, "run-*.wandb"))[0])
    while (data := store.scan_data()) is not None:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            out["run"] = {"id": r.run_id, "group": r.run_group, "name": r.display_name, "job_type": r.job_type,
                          "tags": list(r.tags), "project": r.project}
            out["config"].update({i.key: json.loads(i.value_json) for i in r.config.update})
        elif kind == "exit":
            out["exit_code"] = record.exit.exit_code
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            out["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                   for i in record.history.item})
        elif kind == "summary":
            out["summary"].update({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                   for i in record.summary.update})
    return out


def media(run: dict, entry: dict) -> dict:
    """A logged table or boxes file (its history entry's `path`), read as JSON."""
    with open(os.path.join(run["dir"], "files", entry["path"])) as f:
        return json.load(f)


def by_name(root: str) -> dict[str, list[dict]]:
    """{run name: [what each offline process of it wrote, oldest first]}."""
    out: dict[str, list[dict]] = {}
    for d in offline_runs(root):
        r = read(d)
        out.setdefault(r["run"]["name"], []).append(r)
    return out


def logged(row: dict, key: str) -> dict:
    """A media value of a history row (W&B flattens it to `<key>/<field>` items), as {field: value}."""
    return {k[len(key) + 1:]: v for k, v in row.items() if k.startswith(key + "/")}
