"""The figures the READMEs show are the committed results: every table of measured figures is marked with the
results file (and key) it comes from, and equals what the command wrote there; the demo table is also parsed and
compared number by number with the rows, and the sentence that dates it with the run's environment."""
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not (ROOT / "docs" / "digits_demo_results.json").exists(),
                                reason="the measured results are not shipped (an sdist): nothing to compare")
MARKER = re.compile(r"<!-- table: (\S+) (.+?) -->")
DOCS = ["README.md", "bench/README.md"]


def _tables(text: str):
    """[(marker or None, table text)] for every Markdown table of ``text``."""
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        if lines[i].startswith("|"):
            start = i
            while i < len(lines) and lines[i].startswith("|"):
                i += 1
            above = lines[start - 1] if start else ""
            out.append((MARKER.fullmatch(above.strip()), "\n".join(lines[start:i])))
        i += 1
    return out


def _value(path: str, key: str):
    value = json.loads((ROOT / path).read_text())
    for part in key.split("."):
        value = value[part]
    return value


@pytest.mark.parametrize("doc", DOCS)
def test_marked_tables_equal_the_results_files(doc):
    marked = [(m, table) for m, table in _tables((ROOT / doc).read_text()) if m]
    assert marked, f"{doc}: no table marked with its results file"
    for m, table in marked:
        assert table == _value(m.group(1), m.group(2)).strip(), f"{doc}: the table from {m.group(1)} {m.group(2)}"


def test_every_readme_table_of_figures_names_its_results_file():
    """A table with a measured figure (a decimal number) in the main README is marked, so the test above checks it."""
    for marker, table in _tables((ROOT / "README.md").read_text()):
        if re.search(r"\d\.\d", table):
            assert marker, f"README.md: a table of figures without its results file:\n{table[:200]}"


def _demo():
    return json.loads((ROOT / "docs" / "digits_demo_results.json").read_text())


def _close(cell: str, value: float, digits: int) -> bool:
    return abs(float(cell.replace("−", "-").rstrip("×")) - value) <= 0.5 * 10 ** -digits + 1e-12


def test_readme_demo_table_is_the_demo_rows():
    demo = _demo()
    table = next(t for m, t in _tables((ROOT / "README.md").read_text())
                 if m and m.group(1) == "docs/digits_demo_results.json")
    body = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:]]
    assert [cells[0] for cells in body] == [r["model"] for r in demo["rows"]]
    for cells, r in zip(body, demo["rows"]):
        assert _close(cells[1], r["keep"], 3) and _close(cells[2], r["top1"], 2)
        assert _close(cells[3], r["delta_top1"], 2) and _close(cells[4], r["gmacs"] * 1e3, 2)
        assert _close(cells[5], r["mac_ratio"], 2) and _close(cells[7], r["speedup"], 2)
        median, lo, hi = re.fullmatch(r"(\d+) \((\d+)–(\d+)\)", cells[6]).groups()
        for got, want in ((median, r["images_per_s"]), (lo, r["images_per_s_min"]), (hi, r["images_per_s_max"])):
            assert _close(got, want, 0)
        # the row is the measurement it claims: interleaved rounds, the deployed form for PM
        assert r["images_per_s_min"] <= r["images_per_s"] <= r["images_per_s_max"]
        assert len(r["images_per_s_runs"]) == demo["config"]["speed_repeats"]
        assert r["timed"] == ("eager" if r["model"] == "dense" else "optimize")


def test_readme_dates_the_demo_with_its_environment():
    demo, text = _demo(), (ROOT / "README.md").read_text()
    env = demo["environment"]
    said = re.search(r"Measured (\S+) on a shared (\d+)-core (.+?), (\d+) torch thread, load average ([\d.]+) at the "
                     r"start and ([\d.]+) at\s+the end, (\d+) s in all", text)
    assert said, "README.md: the sentence that dates the demo table"
    date, cores, cpu, threads, start, end, total = said.groups()
    assert date == env["date_utc"][:10] and int(cores) == env["cpu_count"] and cpu == env["cpu_name"]
    assert int(threads) == env["threads"] and _close(total, demo["timings"]["total_s"], 0)
    assert _close(start, env["load_average_start"][0], 2) and _close(end, env["load_average_end"][0], 2)
