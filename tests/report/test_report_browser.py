"""The HTML report in a real browser: Playwright driving Debian's chromium, headless, offline.

Skipped when Playwright or ``/usr/bin/chromium`` is absent (``apt-get install -y chromium``; ``playwright install``
cannot download browsers on these machines). A full-page screenshot goes to pytest's ``tmp_path`` and to
``tests/report/artifacts/report.png`` for a person to look at.
"""

from __future__ import annotations

from pathlib import Path

from pneumolab.report.render import METRIC_COLUMNS

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


def test_report_renders_offline_with_table_images_and_model_cards(
    browser, built_report: dict[str, Path], report_runs: list[Path], tmp_path: Path
) -> None:
    page = browser.new_page(viewport={"width": 1920, "height": 1080})
    requests: list[str] = []
    errors: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.goto(built_report["html"].resolve().as_uri(), wait_until="load")

    table = page.locator("table#comparison")
    assert table.is_visible()
    headers = [text.strip() for text in table.locator("thead th.metric").all_inner_texts()]
    assert len(headers) == len(METRIC_COLUMNS)
    for (_, name, _), header in zip(METRIC_COLUMNS, headers, strict=True):
        assert header.startswith(name)
    rows = table.locator("tbody tr.result")
    assert rows.count() == 2 * 2 * len(report_runs)  # (test, validation) x (plain, TTA) per run
    assert table.locator('tbody tr.result[data-split="test"]').count() == 2 * len(report_runs)
    assert rows.first.is_visible()
    assert "random initialisation (no ImageNet weights here)" in table.inner_text()

    images = page.locator("img")
    assert images.count() == len(list(built_report["images"].rglob("*.png")))
    loaded = page.evaluate("Array.from(document.images).map(i => i.complete && i.naturalWidth > 0)")
    assert loaded and all(loaded)

    gating = page.locator("section.gating")  # only the run with an input gate has the part
    assert gating.count() == 1
    assert gating.first.get_attribute("id") == "gating-lite0-imagenet"
    assert gating.locator("img").count() == 2 and gating.locator("table.gate-refusals").is_visible()

    cards = page.locator("section.model-card")
    assert cards.count() == len(report_runs)
    assert "Intended use" in cards.first.inner_text()
    assert "Limitations" in cards.first.inner_text()
    assert page.locator("#card-resnet50-scratch").is_visible()

    # the page asked for nothing but itself: no fonts, scripts, styles or images from anywhere
    assert [url for url in requests if not url.startswith(("file:", "data:"))] == []
    assert errors == []

    screenshot = page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "report.png").write_bytes(screenshot)
    assert screenshot.startswith(b"\x89PNG")
    page.close()
