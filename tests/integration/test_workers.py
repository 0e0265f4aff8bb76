"""Integration: several workers on one pool. `up(stack, workers=2)` starts real Prefect and MLflow
servers on loopback and two real process workers, one per GPU slot (`gpu:0`, `gpu:1`); two retrain
runs with the same parameters, triggered at once, run side by side, one per worker, each holding
its GPU's slot, and share no training directory, checkpoint or MLflow run (the data they share is
made once, by one of them); `down` stops everything."""

from __future__ import annotations

import json
import socket
import time

import httpx
import mlflow

from chimein.ops.stack import Stack, down, up

from .test_stack import bound, free_port, stack_processes


class RetryingClient(httpx.Client):
    """The Prefect server answers 503 while it is busy (two workers, two flow runs and a training
    at once on two cores); Prefect's own client retries those, and so does this one."""

    def request(self, *args, **kwargs):
        for attempt in range(8):
            r = super().request(*args, **kwargs)
            if r.status_code not in (429, 503):
                return r
            time.sleep(min(0.5 * 2 ** attempt, 8))
        return r


def test_two_workers_run_two_retrains_at_once_without_collisions(tmp_path, monkeypatch):
    monkeypatch.setenv("CHIMEIN_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("PREFECT_WORKER_QUERY_SECONDS", "1")
    stack = Stack(tmp_path / "stack", free_port(), free_port())
    api = RetryingClient(base_url=stack.prefect_api, timeout=30)
    try:
        started = time.monotonic()
        # a host with two GPUs (cuda=True: the deployments stay as for a GPU host; the runs below
        # name their preset), each worker pinned to one
        assert up(stack, workers=2, cuda=True) == {"prefect-server": "started", "mlflow-server": "started",
                                                   "worker-gpu0": "started", "worker-gpu1": "started"}
        assert up(stack, workers=2, cuda=True) == {"prefect-server": "running", "mlflow-server": "running",
                                                   "worker-gpu0": "running", "worker-gpu1": "running"}
        up_s = time.monotonic() - started
        # the slots, created once however often `up` runs, and a pool that takes a run per worker
        limits = api.post("/v2/concurrency_limits/filter", json={}).json()
        assert sorted((c["name"], c["limit"], c["active"]) for c in limits) == [
            ("gpu:0", 1, True), ("gpu:1", 1, True)]
        assert api.get(f"/work_pools/{stack.pool}").json()["concurrency_limit"] == 2

        # two runs of the nightly deployment with the same parameters, triggered together
        deployment = api.get("/deployments/name/retrain/nightly-retrain").json()
        params = {"preset": "tiny-chatml", "train_config": "defaults", "max_steps": 2, "benchmark": False,
                  "heldout_limit": 1, "generation": {"count": 8}, "data_dir": str(tmp_path / "generated"),
                  "output_dir": str(tmp_path / "train")}
        created = [api.post(f"/deployments/{deployment['id']}/create_flow_run",
                            json={"parameters": {"params": params}}) for _ in range(2)]
        assert all(r.status_code == 201 for r in created), [r.text[:500] for r in created]
        ids = [r.json()["id"] for r in created]
        started, deadline = time.monotonic(), time.monotonic() + 300
        while not all((runs := [api.get(f"/flow_runs/{i}").json() for i in ids])[k]["state"]["type"]
                      in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") for k in range(2)):
            assert time.monotonic() < deadline, [r["state"] for r in runs]
            time.sleep(1)
        runs_s = time.monotonic() - started
        logs = {n: (stack.root / f"{n}.log").read_text(errors="replace")[-3000:] for n in ("worker-gpu0", "worker-gpu1")}
        assert [r["state"]["type"] for r in runs] == ["COMPLETED"] * 2, logs

        # both flow runs were running at once
        spans = [(r["start_time"], r["end_time"]) for r in runs]
        assert max(s for s, _ in spans) < min(e for _, e in spans), spans

        # each on its own worker, GPU and slot, with its own MLflow run, directory and checkpoints
        client = mlflow.MlflowClient(stack.mlflow_uri)
        mlruns = client.search_runs([client.get_experiment_by_name("chimein").experiment_id])
        by_flow_run = {r.data.tags["prefect.flow_run_id"]: r for r in mlruns}
        assert sorted(by_flow_run) == sorted(ids) and len(mlruns) == 2
        tags = [by_flow_run[i].data.tags for i in ids]
        host = socket.gethostname()  # worker names are unique across the hosts of a pool
        assert {t["prefect.worker_name"] for t in tags} == {f"chimein-worker-gpu0-{host}", f"chimein-worker-gpu1-{host}"}
        assert {(t["chimein.gpu_slot"], t["chimein.cuda_visible_devices"]) for t in tags} == {
            ("gpu:0", "0"), ("gpu:1", "1")}
        for t in tags:  # the worker that the run's tags name is the one that started it
            assert t["prefect.flow_run_id"] in (stack.root / f"worker-gpu{t['chimein.cuda_visible_devices']}.log").read_text()
        assert len({r.info.run_id for r in mlruns}) == 2 and len({r.info.run_name for r in mlruns}) == 2
        assert len({r.data.params["output_dir"] for r in mlruns}) == 2
        checkpoints = sorted((tmp_path / "train").rglob("checkpoint-*"))
        assert len(checkpoints) == 2 and len({c.parent for c in checkpoints}) == 2, checkpoints
        assert {(c.parent / "mlflow_run_id").read_text().strip() for c in checkpoints} == \
            {r.info.run_id for r in mlruns}
        adapters = sorted(p.name for p in (tmp_path / "store" / "adapters").iterdir())
        assert adapters == sorted(r.info.run_name for r in mlruns)
        # the training runs themselves overlapped: each held its own GPU's slot, at the same time
        trained = [(r.info.start_time, r.info.end_time) for r in mlruns]
        overlap_s = (min(e for _, e in trained) - max(s for s, _ in trained)) / 1000
        assert overlap_s > 0, trained

        # the data both asked for was made once, by one run, and only read by the other
        (conversations,) = (tmp_path / "generated").glob("conversations-*.jsonl")
        assert len(conversations.read_text().splitlines()) == 8
        assert len({r.data.tags["chimein.dataset_version"] for r in mlruns}) == 1
        assert len(list((tmp_path / "store" / "datasets").iterdir())) == 1
        # every slot is free again
        assert all(c["active_slots"] == 0 for c in api.post("/v2/concurrency_limits/filter", json={}).json())
    finally:
        api.close()
        stopping = time.monotonic()
        status = down(stack)
        down_s = time.monotonic() - stopping
    assert status == dict.fromkeys(("worker-gpu0", "worker-gpu1", "mlflow-server", "prefect-server"), "stopped") \
        | {"worker": "not running"}
    assert down_s < 60 and not stack_processes(stack.root) and not list(stack.root.glob("*.pid"))
    assert not bound(stack.prefect_port) and not bound(stack.mlflow_port)
    print(json.dumps({"up_s": round(up_s, 1), "two_runs_s": round(runs_s, 1),
                      "training_overlap_s": round(overlap_s, 1), "down_s": round(down_s, 1)}))
