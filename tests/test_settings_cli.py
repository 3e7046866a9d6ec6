import subprocess
import sys

import pytest

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


def test_unknown_keys_and_sections_are_refused_with_the_closest_name(tmp_path, monkeypatch):
    cfg = tmp_path / "odpo.yaml"
    cfg.write_text("generator:\n  temprature: 0.7\n")
    monkeypatch.setenv("ODPO_CONFIG", str(cfg))
    with pytest.raises(ValueError, match="unknown key `temprature` in section `generator` \\(did you mean temperature"):
        GeneratorSettings()
    with pytest.raises(ValueError, match="temprature"):  # every component refuses the file, not only its owner
        TrainerSettings()
    cfg.write_text("trainr:\n  beta: 0.2\n")
    with pytest.raises(ValueError, match="unknown section `trainr` \\(did you mean trainer"):
        TrainerSettings()
    cfg.write_text("gate:\n  heldout_prompts: 7\n")
    from core.settings import GateSettings

    assert GateSettings().heldout_prompts == 7  # the gate has its own section


def test_an_unknown_odpo_variable_is_named_with_the_closest_setting():
    from core.settings import check_environment

    with pytest.raises(ValueError, match=r"ODPO_TRAINER_BETTA \(did you mean ODPO_TRAINER_BETA\?\)"):
        check_environment({"ODPO_TRAINER_BETTA": "0.2"})
    with pytest.raises(ValueError, match=r"ODPO_GATEWAY_ADMIN_TOKEN \(did you mean ODPO_GATE_ADMIN_TOKEN\?\)"):
        check_environment({"ODPO_GATEWAY_ADMIN_TOKEN": "x"})  # moved to the gate: an old deployment is told
    check_environment({"ODPO_GATEWAY_PORT": "1", "ODPO_GATE_PORT": "2", "ODPO_BOOTSTRAP_SERVERS": "b:1",
                       "ODPO_CONFIG": "c.yaml", "ODPO_LORA_STORE": "/s", "PATH": "/bin"})


def test_every_setting_is_documented():
    from core import settings

    for cls in (settings.CommonSettings, settings.GeneratorSettings, settings.JudgeSettings,
                settings.TrainerSettings, settings.GatewaySettings, settings.GateSettings):
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
    r = _odpo("trainer", env={"ODPO_TRAINER_BETTA": "0.2"})
    assert r.returncode == 2 and r.stderr.strip() == ("odpo: error: unknown setting ODPO_TRAINER_BETTA "
                                                      "(did you mean ODPO_TRAINER_BETA?)")
    r = _odpo("trainer", env={"ODPO_TRAINER_BETA": "-1"})
    assert r.returncode == 2 and "ODPO_TRAINER_BETA (trainer.beta)" in r.stderr
    for args in (("up", "--window-pairs", "0"), ("eval", "--concurrency", "0"), ("up", "--heldout-prompts", "0")):
        r = _odpo(*args)
        assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, (args, r.stderr)
        assert f"{args[1]} must be >= 1 (got 0)" in r.stderr, r.stderr
    # `odpo up` checks every component's settings before it starts anything (here the gate's)
    r = _odpo("up", env={"ODPO_GATE_HELDOUT_PROMPTS": "0"})
    assert r.returncode == 2 and "ODPO_GATE_HELDOUT_PROMPTS" in r.stderr


def test_version_config_show_and_component_help():
    r = _odpo("--version")
    assert r.returncode == 0 and r.stdout.startswith("odpo 0.")
    import yaml

    r = _odpo("config", "show", env={"ODPO_GATE_ADMIN_TOKEN": "do-not-print-me", "ODPO_TRAINER_BETA": "0.25"})
    assert r.returncode == 0, r.stderr
    shown = yaml.safe_load(r.stdout)
    assert set(shown) == {"common", "generator", "judge", "trainer", "gateway", "gate"}
    assert shown["trainer"]["beta"] == 0.25 and shown["gate"]["admin_token"] == "**********"
    assert "do-not-print-me" not in r.stdout
    r = _odpo("gate", "--help")
    assert r.returncode == 0 and "ODPO_GATE_HELDOUT_PROMPTS = 48" in r.stdout and "ODPO_BOOTSTRAP_SERVERS" in r.stdout


def test_json_log_lines():
    """ODPO_LOG_FORMAT=json: one JSON object per line, exceptions included, as a component writes them."""
    import json
    import os

    code = ("from core.runtime import setup_logging; from core.settings import CommonSettings; import logging; "
            "c = CommonSettings(); setup_logging(c.log_level, c.log_format, 'judge'); log = logging.getLogger('x'); "
            "log.info('hello %s', 'there')\ntry:\n    1 / 0\nexcept ZeroDivisionError:\n    log.exception('boom')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "ODPO_LOG_FORMAT": "json"})
    lines = [json.loads(line) for line in r.stderr.splitlines()]
    assert [(x["level"], x["logger"], x["message"], x["component"]) for x in lines] == [
        ("INFO", "x", "hello there", "judge"), ("ERROR", "x", "boom", "judge")]
    assert "ZeroDivisionError" in lines[1]["exc"]


def test_kafka_warnings_about_logins_are_kept_and_reconnect_noise_is_not():
    import logging

    from core.runtime import kafka_quiet

    def record(name: str, level: int, msg: str) -> logging.LogRecord:
        return logging.LogRecord(name, level, __file__, 1, msg, (), None)

    assert kafka_quiet(record("kafka.consumer.fetcher", logging.WARNING, "Not authorized to read from topic odpo.x."))
    assert kafka_quiet(record("kafka.net.connection", logging.WARNING, "c: SASL re-authentication failed: boom"))
    assert not kafka_quiet(record("kafka.cluster", logging.WARNING, "No node available for metadata refresh"))
    assert kafka_quiet(record("kafka.net.manager", logging.ERROR, "Connection failed: KafkaConnectionError"))
    assert kafka_quiet(record("service.gate", logging.INFO, "anything of ours"))
