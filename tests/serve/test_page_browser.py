"""The static page in a real browser: upload a real X-ray, see the label, probability and the heatmap."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pneumolab.serve.app import create_app
from tests.serve import running_server, tiny_trained

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


def test_page_uploads_an_xray_and_shows_the_result(browser, shared_data, tmp_path):
    image = sorted((shared_data / "test" / "PNEUMONIA").glob("*.jpeg"))[0]
    with running_server(create_app(tiny_trained())) as url:
        page = browser.new_page(viewport={"width": 1100, "height": 800})
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(url + "/")
        page.wait_for_function("document.getElementById('model').textContent === 'resnet18'", timeout=10_000)
        page.set_input_files("#file", str(image))
        page.wait_for_selector("#summary:not([hidden])", timeout=30_000)
        page.wait_for_function(
            "(() => { const i = document.getElementById('heatmap'); return i.complete && i.naturalWidth > 0 })()",
            timeout=30_000,
        )
        assert page.text_content("#label") in ("NORMAL", "PNEUMONIA")
        probability = float(page.text_content("#probability"))
        assert 0.0 <= probability <= 1.0
        assert float(page.text_content("#threshold")) == pytest.approx(0.5)
        assert page.evaluate("document.getElementById('preview').naturalWidth") > 0
        assert page.is_hidden("#error") and not errors
        shot = tmp_path / "page.png"
        page.screenshot(path=str(shot), full_page=True)
        ARTIFACTS.mkdir(exist_ok=True)
        shutil.copyfile(shot, ARTIFACTS / "page.png")

        # an unreadable file shows the server's one-line reason
        bad = tmp_path / "broken.jpeg"
        bad.write_bytes(b"not an image")
        page.set_input_files("#file", str(bad))
        page.wait_for_selector("#error:not([hidden])", timeout=30_000)
        assert "broken.jpeg" in page.text_content("#error")
