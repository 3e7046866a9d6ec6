import subprocess
import sys

import pytest
from pydantic import ValidationError

from core.settings import CommonSettings, GeneratorSettings, TrainerSettings


def test_env_and_yaml_precedence(tmp_path, monkeypatch):
    cfg = tmp_path / "odpo.yaml"
    cfg.write_text("trainer:\n  window_pairs: 7\n  beta: 0.2\ncommon:\n  bootstrap_servers: yaml:1\n")
    monkeypatch.setenv("ODPO_CONFIG", str(cfg))
    monkeypatch.setenv("ODPO_TRAINER_BETA", "0.3")
    t = TrainerSettings()
    assert (t.window_pairs, t.beta) == (7, 0.3)  # the environment beats the file, the file beats defaults
    assert CommonSettings().bootstrap_servers == "yaml:1"
    assert TrainerSettings(beta=0.5).beta == 0.5


def test_unknown_keys_are_refused(tmp_path, monkeypatch):
    cfg = tmp_path / "odpo.yaml"
    cfg.write_text("generator:\n  temprature: 0.7\n")
    monkeypatch.setenv("ODPO_CONFIG", str(cfg))
    with pytest.raises(ValidationError, match="temprature"):
        GeneratorSettings()


def test_every_setting_is_documented():
    from core import settings

    for cls in (settings.CommonSettings, settings.GeneratorSettings, settings.JudgeSettings,
                settings.TrainerSettings, settings.GatewaySettings):
        undocumented = [n for n, f in cls.model_fields.items() if not f.description]
        assert not undocumented, f"{cls.__name__}: {undocumented}"


def _odpo(*args, env=None):
    import os

    return subprocess.run([sys.executable, "-m", "service.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)


def test_cli_bad_setting_is_one_line_and_exit_2():
    r = _odpo("prepare-model", env={"ODPO_LOG_LEVEL": "INFO", "ODPO_BASE_MODEL": "/nonexistent/model"})
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "not an HF model folder" in r.stderr
    r = _odpo("up", "--rounds", "0")
    assert r.returncode == 2 and "--rounds" in r.stderr
    r = _odpo("gateway", env={"ODPO_GATEWAY_PORT": "not-a-port"})
    assert r.returncode == 2 and r.stderr.startswith("odpo: error: invalid setting ODPO_GATEWAY_PORT")
