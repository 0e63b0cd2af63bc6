"""Fixtures of the site tests: a few real test films as a labels CSV (patients from their names)."""

from __future__ import annotations

from pathlib import Path

import pytest


def write_labels_csv(shared_data: Path, folder: Path, per_class: int, *, offset: int = 0) -> Path:
    """`per_class` real test films per class as a labels CSV in `folder` (absolute paths: no images copied)."""
    rows = ["file,label,patient_id"]
    for name in ("NORMAL", "PNEUMONIA"):
        files = sorted((shared_data / "test" / name).iterdir())[offset : offset + per_class]
        rows += [f"{f},{name},{f.stem.rsplit('-', 1)[0] if name == 'NORMAL' else f.stem.split('_')[0]}" for f in files]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder / "labels.csv"


@pytest.fixture(scope="session")
def calibrated(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The bundled model calibrated on 8 real test films per class (band at alpha 0.2: 4 per class suffice), its
    probabilities moved to the prevalence EM finds in 6 unlabelled pneumonia films."""
    from pneumolab.site.calibrate import calibrate_artefact

    folder = tmp_path_factory.mktemp("site")
    csv = write_labels_csv(shared_data, folder / "local", 8)
    unlabelled = sorted((shared_data / "test" / "PNEUMONIA").iterdir())[100:106]  # the site's prevalence, from these
    card = calibrate_artefact(
        None, data=csv, out=folder / "calibrated", site="st-elsewhere", alpha=0.2, unlabelled=unlabelled, progress=False
    )
    return folder / "calibrated", card
