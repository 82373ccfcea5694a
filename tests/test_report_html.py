"""The Snakemake HTML report of the demo, opened in headless Chromium: every plot renders.

The report is a single-page app that shows a plot only when its result is clicked. The test
adds a probe script to a copy of the report that makes the app show each plot in turn, exactly
as the result's view button does, and writes each displayed image's decoded size into the DOM,
which Chromium's --dump-dom returns.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import run_snakemake

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
EXPECTED_PLOTS = {
    "results/report/note_lengths.png",
    "results/report/training-pretrain.png",
    "results/report/training-finetune.png",
    "results/report/judge_scores.png",
    "results/report/rouge_l.png",
}
EXPECTED_TABLES = {
    "results/report/plan.html",
    "results/report/dataset.html",
    "results/report/models.html",
    "results/report/evaluation.html",
    "results/report/answers.html",  # the demo sets evaluate.report_answers
}

PROBE = """<script>
window.addEventListener("load", async () => {
  const sleep = (ms) => new Promise((done) => setTimeout(done, ms));
  // React mounts the app after the load event; a view set before that is lost.
  for (let i = 0; i < 200 && !document.querySelector("#app").children.length; i++) await sleep(50);
  const checks = [];
  for (const [path, result] of Object.entries(results)) {
    if (!result.mime_type.startsWith("image/")) continue;
    app.setView({content: "img", contentPath: result.data_uri, resultPath: path});
    let shown = null;
    for (let i = 0; i < 100 && !(shown && shown.complete); i++) {
      await sleep(50);
      shown = [...document.querySelectorAll("#app img")].find((img) => img.getAttribute("src") === result.data_uri);
    }
    checks.push({path: path, shown: Boolean(shown), width: shown ? shown.naturalWidth : 0,
                 height: shown ? shown.naturalHeight : 0});
  }
  const out = document.createElement("pre");
  out.id = "render-check";
  out.textContent = JSON.stringify(checks);
  document.body.appendChild(out);
});
</script>
"""


@pytest.fixture(scope="module")
def report(demo_run) -> Path:
    path = demo_run / "report.html"
    run_snakemake(demo_run, "--report", str(path))
    return path


def embedded_results(report: Path) -> dict:
    match = re.search(r'<script id="results">\s*var results = (.*?);\s*</script>', report.read_text(), re.DOTALL)
    assert match, "the report has no results block"
    return json.loads(match.group(1))


def test_report_lists_every_plot_and_table_with_a_caption(report):
    results = embedded_results(report)
    assert EXPECTED_PLOTS | EXPECTED_TABLES <= set(results)
    for path in EXPECTED_PLOTS | EXPECTED_TABLES:
        assert results[path]["caption"].strip(), f"{path} has no caption"
    tables = base64.b64decode(results["results/report/evaluation.html"]["data_uri"].split(",", 1)[1]).decode()
    assert "Asclepius-R-7B" in tables and "judge_score" in tables and "<table>" in tables
    dataset = base64.b64decode(results["results/report/dataset.html"]["data_uri"].split(",", 1)[1]).decode()
    assert "rows read from NOTEEVENTS" in dataset
    models = base64.b64decode(results["results/report/models.html"]["data_uri"].split(",", 1)[1]).decode()
    assert "<td>7B</td>" in models and "<td>13B</td>" in models and "finetune max_length" in models


def test_plots_render_in_headless_chromium(report, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed: run `make chromium` (Debian package chromium)")
    probed = tmp_path / "report-probe.html"
    # The last </body>: the embedded JavaScript libraries contain the string too.
    page, _, end = report.read_text().rpartition("</body>")
    probed.write_text(page + PROBE + "</body>" + end)
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=60000",
        "--dump-dom",
        probed.as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    match = re.search(r'<pre id="render-check">(.*?)</pre>', done.stdout, re.DOTALL)
    assert match, f"the probe did not finish (exit {done.returncode}):\n{done.stderr[-3000:]}"
    checks = {c["path"]: c for c in json.loads(match.group(1).replace("&quot;", '"'))}
    assert set(checks) == EXPECTED_PLOTS
    for path, check in checks.items():
        assert check["shown"], f"{path}: the report did not display it"
        assert check["width"] > 100 and check["height"] > 100, f"{path}: the image did not decode ({check})"
