"""Run timm's own model tests (tests/test_models.py of the installed timm version) on every pm_* model.

    python tests/timm_suite.py [--all-models] [pytest args...]     (make test-timm; CI runs it)

timm's tests are not vendored: the source distribution of the installed timm version is downloaded from PyPI
into a temporary folder, its filters are extended so the pm_* names get exactly the treatment timm gives the
deit* names (the non-standard-model filters, the FX+TorchScript exclusion of distilled DeiT, the module list of
models with forward_intermediates), and pytest runs it with pm_kernels imported as a plugin (so the pm_* entries
are registered before timm lists its models) and timm's CI markers (timm's CI leaves out its unmarked, slow
``test_prune_intermediate_layers_contract`` and the FX + TorchScript test, and so do we).

CI runs one model per family (``CI_MODELS``: one prefix token, CLS + distillation token, registers without CLS,
no prefix token, EVA-02's rotary embedding); ``--all-models`` runs every pm_* model (the larger ones share the
code of these and cost minutes each on a CPU). Fails if an anchor of the filter lists moved (a timm update must
not silently skip our models) or if fewer tests passed than expected.
"""
import os
import pathlib
import re
import subprocess
import sys
import tarfile
import tempfile

import timm

REPO = pathlib.Path(__file__).resolve().parent.parent
# (anchor in timm's test_models.py, what is added right after it)
EXTENSIONS = [
    ("'twins', 'deit',", " 'models',"),                                  # FEAT_INTER_FILTERS: pm_kernels.models
    ("'visformer*', 'deit*',", " 'pm_*',"),                              # NON_STD_FILTERS
    ("        'deit_*_distilled_patch16_224',\n", "        'pm_deit_*_distilled_patch16_224',\n"),  # FX + TorchScript
]
MARKERS = "base or forward or backward or cfg or torchscript or features or fxforward or fxbackward"
CI_MODELS = ("pm_deit_tiny_patch16_224", "pm_deit_tiny_distilled_patch16_224", "pm_vit_little_patch16_reg1_gap_256",
             "pm_vit_medium_patch16_gap_256", "pm_eva02_tiny_patch14_224")
ALL_MODELS = "pm_deit or pm_vit or pm_eva"  # not "pm_": timm has a maxvit_tiny_pm_256
MIN_PASSED_PER_MODEL = 7  # of timm's 8 marked tests that run per model (38 of 40 passed, 2 skipped by input size)


def fetch(version: str, into: pathlib.Path) -> pathlib.Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:", "--no-deps",
                    f"timm=={version}", "-d", str(into)], check=True)
    archive = next(into.glob(f"timm-{version}.tar.gz"))
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if re.match(rf"timm-{re.escape(version)}/(tests/|pyproject.toml)", m.name)]
        tar.extractall(into, members=members)
    return into / f"timm-{version}"


def extend_filters(test_file: pathlib.Path) -> None:
    text = test_file.read_text()
    for anchor, addition in EXTENSIONS:
        if text.count(anchor) != 1:
            raise SystemExit(f"timm_suite: anchor {anchor!r} not found once in {test_file} (timm changed its "
                             "filters): update EXTENSIONS")
        text = text.replace(anchor, anchor + addition)
    test_file.write_text(text)


def main(argv) -> int:
    all_models = "--all-models" in argv
    argv = [a for a in argv if a != "--all-models"]
    select = ALL_MODELS if all_models else " or ".join(CI_MODELS)
    import pm_kernels  # noqa: F401  (registers the pm_* names)
    n_models = len(timm.list_models("pm_*")) if all_models else len(CI_MODELS)
    with tempfile.TemporaryDirectory(prefix="timm-suite-") as tmp:
        root = fetch(timm.__version__, pathlib.Path(tmp))
        extend_filters(root / "tests" / "test_models.py")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        report = pathlib.Path(tmp) / "report.txt"
        cmd = [sys.executable, "-m", "pytest", "tests/test_models.py", "-p", "pm_kernels", "-k", select,
               "-m", MARKERS, "-q", "-p", "no:cacheprovider", "-rs", f"--junitxml={report}", *argv]
        print("timm_suite:", " ".join(cmd), f"(timm {timm.__version__}, in {root})", flush=True)
        code = subprocess.run(cmd, cwd=root, env=env).returncode
        if code != 0:
            return code
        passed = _passed(report)
        if passed < MIN_PASSED_PER_MODEL * n_models:
            print(f"timm_suite: only {passed} tests passed, expected at least {MIN_PASSED_PER_MODEL * n_models}",
                  file=sys.stderr)
            return 1
        print(f"timm_suite: {passed} of timm's tests passed on the pm_* models")
        return 0


def _passed(junit: pathlib.Path) -> int:
    import xml.etree.ElementTree as ET
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    return int(suite.get("tests")) - sum(int(suite.get(k, 0)) for k in ("failures", "errors", "skipped"))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
