"""The static page in a real browser with the bundled model: a real X-ray gets its label, probability and a heatmap
shown whole; a photo is refused plainly, with no heatmap; an unreadable file shows the server's reason."""

from __future__ import annotations

import shutil
from pathlib import Path

from pneumolab.constants import CLASSES
from pneumolab.serve.app import create_app
from tests.serve import running_server

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
SLOW = 180_000  # ms: the bundled model's five TTA views and Grad-CAM on a shared 2-core CPU

# the heatmap's rendered width against its natural width and the width its figure leaves it
HEATMAP_FIT = """(() => {
  const img = document.getElementById('heatmap'), box = document.getElementById('heatmap-box');
  const style = getComputedStyle(box);
  const room = box.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
  const shown = img.getBoundingClientRect();
  return {shown: shown.width, shownHeight: shown.height, natural: img.naturalWidth,
          naturalHeight: img.naturalHeight, room: room};
})()"""


def _screenshot(page, tmp_path: Path, name: str) -> None:
    shot = tmp_path / name
    page.screenshot(path=str(shot), full_page=True)
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copyfile(shot, ARTIFACTS / name)


def test_page_answers_a_film_refuses_a_photo_and_reports_a_broken_file(
    browser, bundled, photo_png, shared_data, tmp_path
):
    film = sorted((shared_data / "test" / "PNEUMONIA").glob("*.jpeg"))[0]
    with running_server(create_app(bundled)) as url:
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(url + "/")
        page.wait_for_function(f"document.getElementById('model').textContent === '{bundled.name}'", timeout=10_000)
        assert page.text_content("#gate") == "on"

        # a real film: label, probability, threshold, and the overlay shown whole
        page.set_input_files("#file", str(film))
        page.wait_for_selector("#summary:not([hidden])", timeout=SLOW)
        page.wait_for_function(
            "(() => { const i = document.getElementById('heatmap'); return i.complete && i.naturalWidth > 0 })()",
            timeout=SLOW,
        )
        assert page.text_content("#label") in CLASSES
        assert 0.0 <= float(page.text_content("#probability")) <= 1.0
        assert float(page.text_content("#threshold")) == round(bundled.threshold, 3)
        # every class with its probability, the chosen one marked; the caption names the class Grad-CAM explains
        shown = page.eval_on_selector_all("#classes tr", "rows => rows.map(r => [r.cells[0].textContent, r.className])")
        assert [name for name, _ in shown] == list(CLASSES)
        assert [name for name, mark in shown if mark == "chosen"] == [page.text_content("#label")]
        assert page.text_content("#heatmap-caption") == "Grad-CAM for PNEUMONIA"
        assert page.is_hidden("#refused") and page.is_hidden("#error") and page.is_visible("#heatmap-box")
        fit = page.evaluate(HEATMAP_FIT)
        assert fit["shown"] >= 0.9 * min(fit["natural"], fit["room"]), fit  # not squeezed
        # and not distorted: the caption and the overlay keep their proportions
        assert abs(fit["shownHeight"] / fit["shown"] - fit["naturalHeight"] / fit["natural"]) < 0.02, fit
        assert page.evaluate("document.getElementById('preview').naturalWidth") > 0
        _screenshot(page, tmp_path, "page.png")

        # a photo: refused in plain words, and the film's heatmap is gone
        photo = tmp_path / "cat.png"
        photo.write_bytes(photo_png)
        page.set_input_files("#file", str(photo))
        page.wait_for_selector("#refused:not([hidden])", timeout=SLOW)
        refused = page.text_content("#refused")
        assert refused.startswith("Not a frontal chest X-ray: ") and refused.count("frontal chest X-ray") == 1
        assert page.is_hidden("#heatmap-box") and page.is_hidden("#summary") and page.is_hidden("#error")
        _screenshot(page, tmp_path, "page-refused.png")

        # an unreadable file shows the server's one-line reason
        bad = tmp_path / "broken.jpeg"
        bad.write_bytes(b"not an image")
        page.set_input_files("#file", str(bad))
        page.wait_for_selector("#error:not([hidden])", timeout=SLOW)
        assert "broken.jpeg" in page.text_content("#error") and page.is_hidden("#refused")
        assert not errors
