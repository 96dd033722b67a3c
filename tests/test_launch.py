"""docs/launch/: the SLURM script, the JobSet manifest and the Dockerfile start one process per
host with every variable moejax.training.distributed reads (its LAUNCH_ENV), with a launch line
that is safe to repeat, and requeue or restart a preempted or failed job."""

import ast
import re
from pathlib import Path

import yaml

from moejax.training import distributed
from moejax.training.runlock import JOB_ENV

LAUNCH = Path(__file__).resolve().parent.parent / "docs" / "launch"
ENV_NAME = re.compile(r"^[A-Z][A-Z0-9]*(_[A-Z0-9]+)+$")


def test_launch_env_lists_every_variable_the_module_reads():
    tree = ast.parse(Path(distributed.__file__).read_text())
    names = {node.value for node in ast.walk(tree)
             if isinstance(node, ast.Constant) and isinstance(node.value, str)
             and ENV_NAME.match(node.value)}
    assert names == set(distributed.LAUNCH_ENV) | set(distributed.SCHEDULER_ENV)


def test_slurm_script_sets_every_launch_variable_one_task_per_host():
    script = (LAUNCH / "slurm.sbatch").read_text()
    assignment = re.compile(r"(?:^|[\s\"'])(?:export\s+)?([A-Z][A-Z0-9_]*)=", re.MULTILINE)
    assigned = set(assignment.findall(script))
    assert set(distributed.LAUNCH_ENV) <= assigned
    assert "#SBATCH --ntasks-per-node=1" in script
    srun = script[script.index("srun "):]
    assert "--ntasks-per-node=1" in srun and "scripts/train.py" in srun
    assert "JAX_PROCESS_ID=\\$SLURM_PROCID" in srun  # per task, not once for the job
    # requeued on preemption / node failure / time limit, the same run directory and line
    assert "#SBATCH --requeue" in script and "--auto-resume" in script
    assert "--run-dir runs/slurm-${SLURM_JOB_ID}" in script
    signal_line = next(line for line in script.splitlines() if line.startswith("#SBATCH --signal"))
    signal_name = signal_line.split("=B:")[1].split("@")[0]
    assert f"trap checkpoint_and_requeue {signal_name}" in script
    assert 'kill -TERM "$TRAIN_PID"' in script and 'scontrol requeue "$SLURM_JOB_ID"' in script


def test_jobset_sets_every_launch_variable_and_one_pod_per_process():
    manifest = yaml.safe_load((LAUNCH / "jobset.yaml").read_text())
    assert manifest["kind"] == "JobSet"
    (workers,) = manifest["spec"]["replicatedJobs"]
    job = workers["template"]["spec"]
    (container,) = job["template"]["spec"]["containers"]
    env = {item["name"]: item for item in container["env"]}
    assert set(distributed.LAUNCH_ENV) <= set(env)
    processes = int(env[distributed.NUM_PROCESSES_ENV]["value"])
    assert job["completionMode"] == "Indexed"
    assert job["parallelism"] == job["completions"] == processes * workers["replicas"]
    index = env[distributed.PROCESS_ID_ENV]["valueFrom"]["fieldRef"]["fieldPath"]
    assert "job-completion-index" in index
    # pod 0's JobSet DNS name: <jobset>-<replicatedJob>-0-0.<jobset>
    name = manifest["metadata"]["name"]
    host, port = env[distributed.COORDINATOR_ENV]["value"].split(":")
    assert host == f"{name}-{workers['name']}-0-0.{name}"
    assert {"containerPort": int(port)} in container["ports"]
    # a failed or preempted pod restarts the JobSet, which runs the same line again
    assert manifest["spec"]["failurePolicy"]["maxRestarts"] > 0
    assert "--auto-resume" in container["args"]
    stopped_code = container["args"][container["args"].index("--stopped-exit-code") + 1]
    assert int(stopped_code) != 0
    assert job["template"]["spec"]["terminationGracePeriodSeconds"] >= 60
    assert {name for pair in JOB_ENV[1:] for name in pair} <= set(env)


def test_dockerfile_builds_on_cuda_and_starts_the_trainer():
    lines = (LAUNCH / "Dockerfile").read_text().splitlines()
    base = next(line for line in lines if line.startswith("ARG CUDA_IMAGE="))
    assert base.split("=", 1)[1].startswith("nvidia/cuda:")
    assert any(line.startswith("FROM ${CUDA_IMAGE}") for line in lines)
    assert any("pip install" in line and "[${GPU_EXTRA}]" in line for line in lines)
    entry = next(line for line in lines if line.startswith("ENTRYPOINT"))
    assert "scripts/train.py" in entry
