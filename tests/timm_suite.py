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
not silently skip our models), if a model was reached by no test, or if a model passed fewer than
MIN_PASSED_PER_MODEL tests; a model whose every test timm's own input-size limit skips (as timm's CI does) is named.
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
    ("'twins', 'deit',", " 'registry',"),           # FEAT_INTER_FILTERS: timm's module name of the pm_* entries
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
        models = timm.list_models("pm_*") if all_models else list(CI_MODELS)
        return _judge(_outcomes(report), models)


SIZE_LIMIT_SKIP = "Fixed input size model > limit"  # timm's own rule: its CI skips these models too


def _outcomes(junit: pathlib.Path):
    """{model: {"passed": n, "skipped_size": n, "skipped": n, "failed": n}} from pytest's JUnit XML."""
    import xml.etree.ElementTree as ET
    out = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        match = re.search(r"[\[-](pm_[A-Za-z0-9_]+)", case.get("name", ""))  # ids like [1-pm_deit_tiny_patch16_224]
        if not match:
            continue
        counts = out.setdefault(match.group(1), dict(passed=0, skipped_size=0, skipped=0, failed=0))
        skip = case.find("skipped")
        if skip is not None:
            counts["skipped_size" if SIZE_LIMIT_SKIP in (skip.get("message") or "") else "skipped"] += 1
        elif case.find("failure") is not None or case.find("error") is not None:
            counts["failed"] += 1
        else:
            counts["passed"] += 1
    return out


def _judge(outcomes, models) -> int:
    """Each model passes at least MIN_PASSED_PER_MODEL of timm's tests, unless timm's own input-size limit skips
    all of them (said, not hidden); a model no test reached means a filter missed it."""
    problems, size_skipped, passed = [], [], 0
    for model in models:
        c = outcomes.get(model)
        if c is None:
            problems.append(f"{model}: no test ran (a filter missed it)")
        elif c["failed"]:
            problems.append(f"{model}: {c['failed']} failed")
        elif c["passed"] == 0 and c["skipped_size"] and not c["skipped"]:
            size_skipped.append(model)
        elif c["passed"] < MIN_PASSED_PER_MODEL:
            problems.append(f"{model}: only {c['passed']} passed, expected at least {MIN_PASSED_PER_MODEL}")
        passed += c["passed"] if c else 0
    if size_skipped:
        print(f"timm_suite: skipped by timm's own input-size limit (as timm's CI skips them): "
              f"{', '.join(size_skipped)}")
    for problem in problems:
        print(f"timm_suite: {problem}", file=sys.stderr)
    if problems:
        return 1
    print(f"timm_suite: {passed} of timm's tests passed on {len(models) - len(size_skipped)} pm_* models")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
