"""Integration, in a real browser: a new user's journey on a CPU stack, as the issue walked it.

`chimein up` (real Prefect and MLflow servers on free loopback ports, this host has no CUDA
device) → headless Chromium with a fresh profile opens the nightly deployment's Custom run form,
chooses a model and types the generation count, training steps and other numbers straight into
their fields (no type switch exists to click), names the run, submits → the worker runs the flow
to COMPLETED under that name → the MLflow link `chimein up` printed opens the runs table with the
run and its Dataset column, and the run link the flow logged opens the run's page, not MLflow's
GenAI view. No page asks for anything outside the machine (the v2 Prefect UI would: Amplitude).
Bounded: each wait has a timeout, the run at most 10 minutes; `chimein down` stops everything."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import httpx

from chimein.ops.stack import Stack, down

from . import browser
from .test_stack import free_port, stack_processes


def test_a_new_user_runs_a_retrain_from_the_form_and_finds_it_in_mlflow(tmp_path):
    root, prefect_port, mlflow_port = tmp_path / "stack", free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))} | {
        "CHIMEIN_STORE": str(tmp_path / "store"), "PREFECT_WORKER_QUERY_SECONDS": "2"}
    d = None
    try:
        up = subprocess.run([sys.executable, "-m", "chimein.cli", "up", "--dir", str(root), "--prefect-port",
                             str(prefect_port), "--mlflow-port", str(mlflow_port), "--mlflow-store",
                             str(tmp_path / "mlflow.db")], env=env, capture_output=True, text=True, timeout=300)
        assert up.returncode == 0, up.stdout + up.stderr
        assert "nightly-retrain: deployed with smollm2-135m-instruct on the CPU" in up.stdout
        prefect_ui = re.search(r"^Prefect UI +(\S+)$", up.stdout, re.M)[1]
        mlflow_link = re.search(r"^MLflow UI +(\S+)$", up.stdout, re.M)[1]
        api = httpx.Client(base_url=f"{prefect_ui}/api", timeout=30)
        deployment = api.get("/deployments/name/retrain/nightly-retrain").json()

        d = browser.chromium(tmp_path / "chromium")
        browser.open_run_form(d, prefect_ui, deployment["id"])
        form = d.find_element("css selector", browser.RUN_FORM)
        assert 'Property is type "None"' not in form.text  # no field waits for a type switch
        assert not re.search(r"GenerationSettings|DEFAULT_MODELS|\bNone\b", form.text), form.text[:3000]
        browser.set_run_name(d, "first try from the form")
        for title, value in {"Model": "tiny-chatml", "Conversations/Number of conversations": 8,
                             "Training steps": 2, "Training config": "defaults", "Benchmark chats": 3,
                             "Held-out chats": 1, "Conversations directory": tmp_path / "generated",
                             "Training directory": tmp_path / "train"}.items():
            browser.fill(d, title, value)
        assert browser.submit(d) == "first try from the form"

        deadline = time.monotonic() + 600
        while True:  # (the deployment's schedule has made runs of its own: this one goes by its name)
            (run,) = api.post("/flow_runs/filter", json={
                "flow_runs": {"name": {"any_": ["first try from the form"]}}}).json()
            if run["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            assert time.monotonic() < deadline, run["state_type"]
            time.sleep(2)
        assert run["state_type"] == "COMPLETED", (root / "worker.log").read_text(errors="replace")[-4000:]
        assert run["name"] == "first try from the form"  # the typed name was kept
        params = run["parameters"]["params"]
        assert (params["preset"], params["generation"]["count"], params["max_steps"]) == ("tiny-chatml", 8, 2)

        # the MLflow link `chimein up` printed: the runs table, with the run and its dataset
        run_link, deadline = None, time.monotonic() + 60  # the run's last log lines may still be on their way
        while not run_link and time.monotonic() < deadline:
            logs = api.post("/logs/filter", json={"logs": {"flow_run_id": {"any_": [run["id"]]}},
                                                  "sort": "TIMESTAMP_DESC", "limit": 50}).json()
            run_link = next((m[1] for log in logs if (m := re.search(r"MLflow run: (\S+)", log["message"]))), None)
            time.sleep(0 if run_link else 1)
        assert run_link, [log["message"][:200] for log in logs]
        mlflow_run = httpx.get(f"http://127.0.0.1:{mlflow_port}/api/2.0/mlflow/runs/get",
                               params={"run_id": run_link.split("?")[0].rsplit("/", 1)[1]}).json()["run"]
        run_name = mlflow_run["info"]["run_name"]
        headers = browser.open_runs_table(d, mlflow_link, run_name)
        assert "Dataset" in headers and "Run Name" in headers, headers
        assert "/runs?workflowType=machine_learning" in d.current_url  # MLflow kept the runs view

        # the run link the flow logged: the run's page
        page = browser.open_run_page(d, run_link, run_name)
        assert "Datasets" in page and "Parameters" in page
        assert "workflowType=genai" not in d.current_url and "/traces" not in d.current_url

        assert browser.external_requests(d) == []  # the Prefect and MLflow pages stayed on this machine
    finally:
        if d is not None:
            d.quit()
        status = down(Stack(root))
    assert set(status.values()) == {"stopped"} and not stack_processes(root)
