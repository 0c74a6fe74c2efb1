"""The report in a real headless browser (Chromium from the system's packages, driven by
playwright): it renders without errors, every plot has data, every image loads, and
the predictions are split into right and wrong with the counts the run recorded.

One real tiny SFT run with evals (the recipe writes its predictions and images), and
DPO and RL run directories in the recipes' shapes. ``make test`` installs Chromium
when it is missing (the Makefile's ``chromium`` target); without it these tests skip.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.recipes.test_sft import job_file, train
from tests.report.run_dirs import make_run
from vlmtune.report import build_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
playwright = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium (make chromium)")

# Every check the page answers in one evaluation: plots, images, predictions.
INSPECT = """() => {
  const finite = (d) => (d.match(/-?[\\d.]+/g) || []).map(Number).every(Number.isFinite);
  const plots = [...document.querySelectorAll('figure')].map((f) => {
    const paths = [...f.querySelectorAll('svg path.series')];
    const polys = [...f.querySelectorAll('svg polygon.band')];
    return {
      title: f.querySelector('figcaption b').textContent.replace(/\\.$/, ''),
      points: Math.max(0, ...paths.map((p) => (p.getAttribute('d').match(/[ML]/g) || []).length)),
      finite: paths.every((p) => finite(p.getAttribute('d')))
        && polys.every((p) => finite(p.getAttribute('points'))),
      width: f.querySelector('svg').getBoundingClientRect().width,
    };
  });
  const images = [...document.images].map((i) => ({complete: i.complete, w: i.naturalWidth}));
  const section = (kind) => {
    const s = document.querySelector('.predictions.' + kind);
    return s && {count: Number(s.dataset.count), cards: s.querySelectorAll('.card').length,
                 heading: s.querySelector('h4').textContent};
  };
  return {plots, images, right: section('right'), wrong: section('wrong')};
}"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with playwright.sync_playwright() as p:
        # the system's Chromium: playwright downloads nothing
        b = p.chromium.launch(executable_path=CHROMIUM)
        yield b
        b.close()


def open_report(browser: Any, run_dir: Path, tmp_path: Path) -> dict[str, Any]:
    """The page's checks, after asserting it rendered without console or page errors."""
    html = tmp_path / f"{run_dir.name}.html"
    html.write_text(build_report(run_dir))
    page = browser.new_page(viewport={"width": 1300, "height": 900})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(html.as_uri(), wait_until="load")
    found = page.evaluate(INSPECT)
    page.close()
    assert errors == []
    assert requests == [html.as_uri()]  # data URLs are not fetched: nothing else was
    return found


def assert_plots_have_data(found: dict[str, Any]) -> list[str]:
    assert found["plots"], "no plot"
    for plot in found["plots"]:
        assert plot["points"] >= 2 and plot["finite"], plot
        assert plot["width"] > 200, plot  # laid out, not collapsed
    return [p["title"] for p in found["plots"]]


def assert_images_loaded(found: dict[str, Any], n: int) -> None:
    assert len(found["images"]) == n
    assert all(i["complete"] and i["w"] > 0 for i in found["images"])


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real tiny SFT run, evaluated at step 2 and at its end (step 4)."""
    folder = tmp_path_factory.mktemp("browser-sft")
    out = folder / "run"
    train(job_file(folder), out, "hyperparameters.save_every=0", "hyperparameters.eval_every=2")
    return out


def test_a_real_sft_run_renders_with_its_plots_images_and_predictions(browser, sft_run, tmp_path):
    found = open_report(browser, sft_run, tmp_path)
    titles = assert_plots_have_data(found)
    assert {"Loss", "Learning rate", "Gradient norm", "Eval loss", "Eval accuracy"} <= set(titles)
    records = [json.loads(x) for x in (sft_run / "evals" / "step-4.jsonl").read_text().splitlines()]
    right = sum(r["correct"] for r in records)
    assert len(records) == 3  # the validation rows (eval_max_examples is larger)
    assert found["right"] == {"count": right, "cards": right, "heading": f"Right ({right})"}
    wrong = len(records) - right
    assert found["wrong"] == {"count": wrong, "cards": wrong, "heading": f"Wrong ({wrong})"}
    assert_images_loaded(found, len(records))  # one image per validation row


def test_dpo_and_rl_reports_render_with_their_own_plots(browser, tmp_path):
    dpo = open_report(browser, make_run(tmp_path / "dpo", "dpo", right=4, wrong=3), tmp_path)
    assert {"Chosen and rejected rewards", "Reward accuracy"} <= set(assert_plots_have_data(dpo))
    assert (dpo["right"]["count"], dpo["wrong"]["count"]) == (4, 3)
    assert_images_loaded(dpo, 7)

    rl = open_report(browser, make_run(tmp_path / "rl", "rl", finished=False), tmp_path)
    assert {"Reward per step", "Skipped groups"} <= set(assert_plots_have_data(rl))
    assert (rl["right"]["count"], rl["wrong"]["count"]) == (3, 2)
    assert_images_loaded(rl, 5)
