#!/usr/bin/env python3
"""Checks a search run through the compose stack, from the host, over MLflow's REST API (HTTP,
basic auth), with the standard library only.

    compose_check.py URL PASSWORD SEARCH wait-trial [PID]   # node IP of a trial running mid-search
    compose_check.py URL PASSWORD SEARCH verify TRIALS [STOPPED_NODE_IP]

`verify` passes when the search's parent run FINISHED, it has TRIALS trial runs and none FAILED
(each completed or pruned), the parent's champion is registered with the alias `champion` and
comes from one of its trials, and, given STOPPED_NODE_IP, the trial that was running there ran
on a second node afterwards and still ended well."""
from __future__ import annotations

import base64
import json
import os
import sys
import time
import urllib.parse
import urllib.request


class Api:
    def __init__(self, url: str, password: str):
        self.url = url.rstrip("/")
        self.auth = "Basic " + base64.b64encode(f"admin:{password}".encode()).decode()

    def call(self, path: str, body: dict | None = None, query: dict | None = None) -> dict:
        url = f"{self.url}/api/2.0/mlflow/{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, headers={
            "Authorization": self.auth, "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)

    def runs(self, filter_string: str) -> list[dict]:
        experiments = self.call("experiments/search", {"max_results": 1000}).get("experiments", [])
        ids = [e["experiment_id"] for e in experiments]
        if not ids:
            return []
        return self.call("runs/search", {"experiment_ids": ids, "filter": filter_string,
                                          "max_results": 1000}).get("runs", [])


def tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def parent(api: Api, search: str) -> dict | None:
    runs = [r for r in api.runs(f"tags.`tailtune.search` = '{search}'")
            if "mlflow.parentRunId" not in tags(r)]
    return runs[0] if runs else None


def trials(api: Api, parent_id: str) -> list[dict]:
    return api.runs(f"tags.`mlflow.parentRunId` = '{parent_id}'")


def wait_trial(api: Api, search: str, driver_pid: int | None, timeout: float = 600) -> str:
    """Returns the node IP of a trial that is RUNNING and has reported (so it has a checkpoint);
    gives up if the process `driver_pid` (the search) ends first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if driver_pid is not None and not os.path.exists(f"/proc/{driver_pid}"):
            raise SystemExit(f"the search (pid {driver_pid}) ended before a trial was seen running")
        top = parent(api, search)
        if top:
            for run in trials(api, top["info"]["run_id"]):
                ip = tags(run).get("tailtune.node_ip")
                if run["info"]["status"] == "RUNNING" and ip:
                    return ip
        time.sleep(0.5)
    raise SystemExit(f"no running trial of search {search} reported within {timeout:g}s")


def verify(api: Api, search: str, expected: int, stopped_ip: str | None) -> list[str]:
    """Returns the problems found; empty when the search ended as it should."""
    top = parent(api, search)
    if top is None:
        return [f"no parent run tagged tailtune.search={search}"]
    problems = []
    if top["info"]["status"] != "FINISHED":
        problems.append(f"parent run {top['info']['run_id']} is {top['info']['status']}, expected FINISHED")
    runs = trials(api, top["info"]["run_id"])
    if len(runs) != expected:
        problems.append(f"{len(runs)} trial runs, expected {expected}")
    for run in runs:
        status, state = run["info"]["status"], tags(run).get("tailtune.state")
        if status not in ("FINISHED", "KILLED") or state not in ("completed", "pruned"):
            problems.append(f"trial run {run['info']['run_id']}: status {status}, state {state}")
    champion = tags(top).get("tailtune.champion", "")   # models:/NAME/VERSION
    name = champion.removeprefix("models:/").rpartition("/")[0]
    if not name:
        problems.append(f"parent run has no tailtune.champion tag ({champion!r})")
    else:
        version = api.call("registered-models/alias", query={"name": name, "alias": "champion"})["model_version"]
        if version["run_id"] not in {r["info"]["run_id"] for r in runs}:
            problems.append(f"champion {name} v{version['version']} comes from run {version['run_id']}, not a trial")
        print(f"champion: {name} version {version['version']} (run {version['run_id']})")
    if stopped_ip:
        moved = [r for r in runs if len(tags(r).get("tailtune.nodes", "").split(",")) > 1]
        if not moved:
            problems.append(f"no trial ran on a second node after the worker at {stopped_ip} stopped")
        for run in moved:
            t = tags(run)
            print(f"trial {t.get('tailtune.trial_id')}: nodes {t['tailtune.nodes']}, "
                  f"last {t.get('tailtune.node_ip')}, {run['info']['status']}")
            if t.get("tailtune.node_ip") == stopped_ip:
                problems.append(f"trial {t.get('tailtune.trial_id')} last reported from the stopped node")
    print(f"search {search}: parent {top['info']['run_id']} {top['info']['status']}, "
          f"{len(runs)} trials: " + ", ".join(sorted(tags(r).get("tailtune.state", "?") for r in runs)))
    return problems


def main(argv: list[str]) -> int:
    url, password, search, command, *rest = argv
    api = Api(url, password)
    if command == "wait-trial":
        print(wait_trial(api, search, int(rest[0]) if rest else None))
        return 0
    problems = verify(api, search, int(rest[0]), rest[1] if len(rest) > 1 else None)
    for problem in problems:
        print(f"FAIL: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
