"""report_to: a real training run writes TensorBoard event files whose scalars carry the Prometheus metric names
and the values the trainer computed for each version; a tracker that fails never stops training; a tracker whose
package is missing is a one-line error at start."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
from prometheus_client import REGISTRY

from core.adapter_store import published_versions
from service.cli import main
from tests.test_trainer_offline import QA, chat, run, write
from trainer import metrics as M
from trainer.checkpoint import RECIPE_FIELDS, STATE_FILE
from trainer.tracking import Tracker, _Backend

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def prometheus_names() -> set[str]:
    """Every metric (a histogram's family name) and sample name the trainer exports on /metrics."""
    names = set()
    for family in REGISTRY.collect():
        if family.name.startswith("odpo_trainer_"):
            names |= {family.name} | {s.name for s in family.samples}
    return names


def scalars(log_dir) -> dict[str, dict[int, float]]:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def train(capsys, tiny_model_dir, pairs_file, store, monkeypatch, **env):
    for key, value in env.items():
        monkeypatch.setenv(f"ODPO_TRAINER_{key.upper()}", str(value))
    return run(capsys, "train", "--base-model", tiny_model_dir, "--pairs", pairs_file, "--store", store,
               "--window-pairs", 2, "--steps-per-window", 3)


def test_tensorboard_gets_each_version_under_the_prometheus_names(tiny_model_dir, tmp_path, capsys, monkeypatch):
    pairs_file = write(tmp_path / "pairs.jsonl", [chat(*qa) for qa in QA])
    store, tb = tmp_path / "store", tmp_path / "tb"
    code, rows, err = train(capsys, tiny_model_dir, pairs_file, store, monkeypatch, report_to="tensorboard",
                            tracking_dir=tb, tracking_run_name="run-a", kl_target=0.1)
    assert code == 0, err
    versions = [r["version"] for r in rows[:-1]]
    assert versions == [1, 2, 3] == published_versions(store)
    got = scalars(tb / "run-a")

    # every tag is a sample name of /metrics (a labelled series as name/label)
    exported = prometheus_names()
    assert {tag.split("/")[0] for tag in got} <= exported, set(got) - exported
    for name in ("odpo_trainer_loss", "odpo_trainer_reward_margin", "odpo_trainer_reward_accuracy_ratio",
                 "odpo_trainer_beta", "odpo_trainer_learning_rate", "odpo_trainer_grad_norm",
                 "odpo_trainer_logps_nats/chosen", "odpo_trainer_logps_nats/rejected",
                 "odpo_trainer_policy_version", "odpo_trainer_pairs_trained_total", "odpo_trainer_window_seconds"):
        assert set(got[name]) == {1, 2, 3}, name  # one point per version, the version as the step

    # the values the trainer computed for each window: its printed rows and each version's recorded metrics
    fields = {"odpo_trainer_loss": "loss", "odpo_trainer_reward_margin": "reward_margin",
              "odpo_trainer_reward_accuracy_ratio": "reward_accuracy", "odpo_trainer_beta": "beta",
              "odpo_trainer_learning_rate": "learning_rate", "odpo_trainer_grad_norm": "grad_norm",
              "odpo_trainer_reward_chosen": "reward_chosen", "odpo_trainer_reward_rejected": "reward_rejected",
              "odpo_trainer_logps_nats/chosen": "logps_chosen", "odpo_trainer_logps_nats/rejected": "logps_rejected",
              "odpo_trainer_logits_mean/chosen": "logits_chosen",
              "odpo_trainer_logits_mean/rejected": "logits_rejected", "odpo_trainer_window_seconds": "seconds"}
    trained = 0
    for row in rows[:-1]:
        v = row["version"]
        state = json.loads((store / f"policy-v{v}" / STATE_FILE).read_text())
        for tag, field in fields.items():
            assert got[tag][v] == pytest.approx(state["metrics"][field], rel=1e-5, abs=1e-6), (tag, v)
        assert got["odpo_trainer_loss"][v] == pytest.approx(row["loss"], rel=1e-5)
        assert got["odpo_trainer_reward_margin"][v] == pytest.approx(row["reward_margin"], rel=1e-5, abs=1e-6)
        trained += row["pairs"]
        assert got["odpo_trainer_pairs_trained_total"][v] == trained
        assert got["odpo_trainer_policy_version"][v] == v
        assert set(state["settings"]) == set(RECIPE_FIELDS) and state["settings"]["steps_per_window"] == 3
    assert got["odpo_trainer_beta"][1] == pytest.approx(0.1)  # the beta the first window trained with
    assert got["odpo_trainer_loss"][1] < math.log(2) + 1e-6  # trained: below the untrained sigmoid loss

    # a second run on the same store continues the same TensorBoard run at the next version
    write(pairs_file, [chat(*qa) for qa in QA] + [chat("New?", "Yes, new.", "Old.")])
    code, rows, _ = train(capsys, tiny_model_dir, pairs_file, store, monkeypatch)
    assert code == 0 and [r["version"] for r in rows[:-1]] == [4]
    assert set(scalars(tb / "run-a")["odpo_trainer_loss"]) == {1, 2, 3, 4}


def test_a_failing_tracker_never_stops_training(tiny_model_dir, tmp_path, capsys, monkeypatch, caplog):
    pairs_file = write(tmp_path / "pairs.jsonl", [chat(*qa) for qa in QA[:4]])
    not_a_folder = write(tmp_path / "taken", ["a file where the log folder should go"])
    errors = REGISTRY.get_sample_value("odpo_trainer_tracking_errors_total", {"backend": "tensorboard"}) or 0.0
    code, rows, err = train(capsys, tiny_model_dir, pairs_file, tmp_path / "store", monkeypatch,
                            report_to="tensorboard", tracking_dir=not_a_folder)
    assert code == 0, err
    assert [r["version"] for r in rows[:-1]] == [1, 2]
    assert REGISTRY.get_sample_value("odpo_trainer_tracking_errors_total", {"backend": "tensorboard"}) > errors
    warned = [r for r in caplog.records if "experiment tracker tensorboard failed" in r.getMessage()]
    assert len(warned) == 1 and "training goes on" in warned[0].getMessage()


class _Flaky(_Backend):
    """Fails every other call to log, and takes its time."""

    name = "flaky"

    def __init__(self):
        self.logged: list[int] = []
        self.calls = 0

    def open(self, run_name, params):
        pass

    def log(self, step, values):
        self.calls += 1
        if self.calls % 2:
            raise OSError("disk full")
        self.logged.append(step)


def test_tracker_failures_are_logged_once_and_later_windows_still_go_out(caplog):
    flaky = _Flaky()
    tracker = Tracker([flaky], "run", {})
    for version in range(1, 7):
        tracker.log_window(version, {"odpo_trainer_loss": 0.5})
    tracker.close()
    assert flaky.logged == [2, 4, 6]
    assert sum("experiment tracker flaky failed" in r.getMessage() for r in caplog.records) == 1
    assert REGISTRY.get_sample_value("odpo_trainer_tracking_errors_total", {"backend": "flaky"}) == 3


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is not None, reason="mlflow is installed here")
def test_a_tracker_without_its_package_is_one_line_at_start(tiny_model_dir, tmp_path, capsys, monkeypatch):
    pairs_file = write(tmp_path / "pairs.jsonl", [chat(*QA[0])])
    code, rows, err = train(capsys, tiny_model_dir, pairs_file, tmp_path / "store", monkeypatch,
                            report_to="tensorboard,mlflow")
    assert code == 2 and rows == [] and err.count("\n") == 1
    assert "report_to mlflow needs `pip install mlflow`" in err
    assert published_versions(tmp_path / "store") == []
    monkeypatch.setenv("ODPO_TRAINER_REPORT_TO", "tensorbord")
    assert main(["trainer"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("odpo: error: invalid setting ODPO_TRAINER_REPORT_TO") and err.count("\n") == 1


def test_tracked_values_are_what_the_gauges_show():
    from trainer.window import WindowResult

    result = WindowResult(pairs=4, steps=2, loss=0.6, reward_margin=0.2, reward_accuracy=0.75, reward_chosen=0.1,
                          reward_rejected=-0.1, logps_chosen=-10, logps_rejected=-12, logits_chosen=1.5,
                          logits_rejected=1.25, grad_norm=0.9, learning_rate=2e-4, seconds=2.0, beta=0.1)
    values = M.tracked_values(result, version=7, pairs_trained=28)
    M.record_published(result)
    for name, value in values.items():
        base, _, label = name.partition("/")
        if base in ("odpo_trainer_policy_version", "odpo_trainer_pairs_trained_total", "odpo_trainer_window_seconds",
                    "odpo_trainer_pairs_per_second"):
            continue  # set elsewhere (the service's publish, record_window); a counter is per process
        shown = REGISTRY.get_sample_value(base, {"side": label} if label else {})
        assert shown == pytest.approx(value), name
    assert "odpo_trainer_drift_per_token" not in values  # NaN: nothing measured, nothing logged
    assert values["odpo_trainer_policy_version"] == 7 and values["odpo_trainer_pairs_per_second"] == 2.0


def test_mlflow_gets_each_version_in_a_local_file_store(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """Runs where mlflow is installed (it is not a test dependency: `pip install mlflow-skinny` is enough)."""
    mlflow = pytest.importorskip("mlflow")
    pairs_file = write(tmp_path / "pairs.jsonl", [chat(*qa) for qa in QA[:4]])
    uri = (tmp_path / "mlruns").as_uri()  # MLflow's local file store (a database needs sqlalchemy: not in skinny)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps it only on request
    code, rows, err = train(capsys, tiny_model_dir, pairs_file, tmp_path / "store", monkeypatch,
                            report_to="mlflow", mlflow_tracking_uri=uri, mlflow_experiment="odpo-test",
                            tracking_run_name="run-m")
    assert code == 0, err
    client = mlflow.MlflowClient(tracking_uri=uri)
    (run_,) = client.search_runs([client.get_experiment_by_name("odpo-test").experiment_id])
    assert run_.info.run_name == "run-m" and run_.info.status == "FINISHED"
    assert run_.data.params["steps_per_window"] == "3" and run_.data.params["loss_type"] == "sigmoid"
    for tag in ("odpo_trainer_loss", "odpo_trainer_reward_margin", "odpo_trainer_logps_nats/chosen"):
        history = {m.step: m.value for m in client.get_metric_history(run_.info.run_id, tag)}
        assert set(history) == {1, 2}, tag
    for row in rows[:-1]:
        history = {m.step: m.value for m in client.get_metric_history(run_.info.run_id, "odpo_trainer_loss")}
        assert history[row["version"]] == pytest.approx(row["loss"], rel=1e-6)
