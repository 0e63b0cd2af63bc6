"""Measure a model's input gate and referral band against issue 12's goals (default: the bundled model).

Every corpus is made at run time; nothing is fit here (the gate and band come from the model's card):

* far out-of-distribution: scikit-image's pictures (PNG, and photos also as JPEG), documents, charts, noise, flat,
  gradient and checkerboard images (`pneumolab.data.ood`), and every pydicom test file with pixel data that reads
  (CT, MR, US, NM, RT dose, OT ...), all through `predict_files`, as `pneumolab predict` sees them;
* near out-of-distribution: the official test films rotated 90 degrees, negated, a corner blown up, a lateral-looking
  crop (refused share per kind);
* the 624 official test films as they are, and re-encoded oddly but validly (16-bit PNG, EXIF-rotated JPEG,
  MONOCHROME1 DICOM): the share answered (not refused);
* selective prediction on validation and test at the card's band (`evaluate_artefact`): coverage, accuracy of the
  answered films, and per class the share answered wrongly against the band's nominal alpha.

    python benchmarks/gate.py --model default --data ../shared/data/chest_xray [--backend onnx] [--json OUT.json]

``--backend onnx`` measures the same goals (bar selective prediction, a PyTorch evaluation) through ONNX Runtime,
whose fp32 network is scored by the gate fit in fp32.

``--compare`` instead measures the candidate scores the gate was chosen from (max softmax, energy, class-conditional
Mahalanobis at each depth with channel-mean or mean + std pooling, and their max / mean over depth sets), fit on the
model's training split, each limit at the validation 99.5 % quantile, refusal rates on the far corpus and on near
versions of 300 training films (the columns the choice was made on), and the test false-refusal rate (reported).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from pneumolab.data.io import load_xray_with_meta
from pneumolab.data.ood import NEAR_KINDS, dicom_test_files, near_ood, write_far_ood_corpus
from pneumolab.evaluate.runner import evaluate_artefact
from pneumolab.inference.files import collect_image_paths, predict_files
from pneumolab.inference.loader import BACKENDS, load_backend
from pneumolab.inference.pytorch import load_trained


def _share(rows, status: str) -> float:
    return float(np.mean([row["status"] == status for row in rows])) if rows else float("nan")


def _monochrome1_dicom(pixels: np.ndarray, dest: Path) -> None:
    """A 12-bit MONOCHROME1 (white = 0) DX file, uncompressed, with a window over the whole 12-bit range, as CR / DX
    systems write them (without a window the reader stretches the film's own min-max, which changes its contrast)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PhotometricInterpretation, ds.SamplesPerPixel = "DX", "MONOCHROME1", 1
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(dest, enforce_file_format=True)


def _odd_encodings(films: list[Path], dest: Path) -> dict[str, list[Path]]:
    """Each film as a 16-bit PNG, an EXIF-rotated JPEG (stored turned, displayed upright), a MONOCHROME1 DICOM."""
    out: dict[str, list[Path]] = {"16-bit PNG": [], "EXIF-rotated JPEG": [], "MONOCHROME1 DICOM": []}
    exif = Image.Exif()
    exif[0x0112] = 6
    for i, film in enumerate(films):
        gray = np.asarray(Image.open(film).convert("L"))
        png, jpeg, dcm = dest / f"{i}.png", dest / f"{i}.jpeg", dest / f"{i}.dcm"
        Image.fromarray(gray.astype(np.uint16) * 257).save(png)
        Image.fromarray(np.ascontiguousarray(np.rot90(gray))).save(jpeg, exif=exif, quality=95)
        _monochrome1_dicom((255 - gray.astype(np.uint32)) * 4095 // 255, dcm)
        out["16-bit PNG"].append(png)
        out["EXIF-rotated JPEG"].append(jpeg)
        out["MONOCHROME1 DICOM"].append(dcm)
    return out


PARTS = ("far", "near", "test", "odd", "selective")


def goals(model: str, data: Path, parts: tuple[str, ...] = PARTS, backend: str = "pytorch") -> dict:
    trained = load_backend(model, backend)
    if trained.gate is None:
        raise SystemExit(f"{model}: no fitted gate (pneumolab gate MODEL --data DIR --out DIR)")
    result: dict = {
        "model": model,
        "backend": f"{backend} ({trained.compute_precision}), gate fit in {trained.gate.precision}",
        "gate": trained.gate.describe(),
        "referral": trained.band.describe(),
    }
    test_files, _ = collect_image_paths([str(data / "test")])
    with tempfile.TemporaryDirectory() as tmp:
        if "far" in parts:
            result["far"] = _far(trained, Path(tmp))
        if "near" in parts:
            films = np.stack([load_xray_with_meta(p, size=trained.cache_size)[0] for p in test_files])
            result["near_from_test"] = {
                kind: float(np.mean([d.status == "refused" for d in trained.assess(near_ood(films, kind))]))
                for kind in NEAR_KINDS
            }
        if "test" in parts:
            rows, _ = predict_files(trained, test_files)
            result["test_films"] = {"n": len(rows), "answered_not_refused": 1 - _share(rows, "refused")}
        if "odd" in parts:
            odd = {}
            for encoding, files in _odd_encodings(test_files, Path(tmp)).items():
                encoded_rows, failures = predict_files(trained, files)
                odd[encoding] = {"n": len(files), "unreadable": len(failures),
                                 "answered_not_refused": 1 - _share(encoded_rows, "refused")}  # fmt: skip
            result["odd_encodings"] = odd
    for split in ("val", "test") if "selective" in parts and backend == "pytorch" else ():
        metrics = evaluate_artefact(model, data=data, split=split, n_resamples=200, progress=False)
        result[f"selective_{split}"] = metrics["selective"]
    return result


def _far(trained, tmp: Path) -> dict:
    """The far corpus and pydicom's files through `predict_files`: the share refused."""
    corpus = write_far_ood_corpus(tmp / "far")
    dicoms = [path for path, _ in dicom_test_files()]
    rows, unreadable = predict_files(trained, [*corpus, *dicoms])
    return {
        "files": len(rows),
        "unreadable_skipped": len(unreadable),
        "refused": _share(rows, "refused"),
        "not_refused": [row["file"].split("/")[-1] for row in rows if row["status"] != "refused"],
        "pictures_refused": _share(rows[: len(corpus)], "refused"),
        "dicom_refused": _share(rows[len(corpus) :], "refused"),
    }


def compare(model: str, data: Path) -> list[dict]:
    from scipy.special import logsumexp, softmax

    from pneumolab.data.cache import prepare_cache
    from pneumolab.data.splits import carve_validation
    from pneumolab.evaluate.gating import ood_corpus
    from pneumolab.gate import FeatureGate

    trained = load_trained(model)
    trained.gates = None
    layers = tuple(group.prefixes[-1] for group in trained.model.spec.freeze_groups)
    cache, _ = prepare_cache(data, size=trained.cache_size, progress=False)
    settings = trained.validation_split
    assigned = carve_validation(cache.manifest, fraction=settings["fraction"], seed=settings["seed"]).to_numpy()
    labels = cache.manifest["label"].to_numpy()
    rows = {s: np.flatnonzero(assigned == s) for s in ("train", "val", "test")}
    near_rows = np.sort(np.random.default_rng(1).choice(rows["train"], 300, replace=False))
    far = ood_corpus(trained.cache_size)["far-ood"][1]
    sets = {"val": cache.images[rows["val"]], "test": cache.images[rows["test"]], "far": far}
    sets |= {f"near-{k}": near_ood(np.asarray(cache.images[near_rows]), k) for k in NEAR_KINDS}

    def features(images):
        logits, feats = trained.gate_features(np.asarray(images), layers)
        return logits.numpy(), feats

    train_logits, train_feats = features(cache.images[rows["train"]])
    del train_logits
    extracted = {name: features(images) for name, images in sets.items()}
    results = []

    def record(name: str, scores: dict[str, np.ndarray]) -> None:
        limit = np.quantile(scores["val"], 0.995, method="higher")
        row = {"score": name, **{k: float(np.mean(v > limit)) for k, v in scores.items() if k != "val"}}
        results.append(row)
        print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{v:40s}" for k, v in row.items()), flush=True)

    record("max softmax", {k: -softmax(v[0], 1).max(1) for k, v in extracted.items()})
    record("energy", {k: -logsumexp(v[0], 1) for k, v in extracted.items()})
    for pooling in ("mean", "mean+std"):

        def pick(x, pooling=pooling):
            return x[:, : x.shape[1] // 2] if pooling == "mean" else x

        depth_sets = [(f"depth {i}", [i]) for i in range(len(layers))]
        depth_sets += [("depths 0-4", [0, 1, 2, 3, 4]), ("last 4", list(range(len(layers))[-4:]))]
        depth_sets += [("all depths", list(range(len(layers))))]
        for subset_name, subset in depth_sets:
            train = [pick(train_feats[i]) for i in subset]
            val = [pick(extracted["val"][1][i]) for i in subset]
            gate = FeatureGate(layers=[layers[i] for i in subset]).fit(train, labels[rows["train"]], val)
            scores = {k: gate.score([pick(v[1][i]) for i in subset]) for k, v in extracted.items()}
            record(f"Mahalanobis {pooling}, {subset_name}", scores)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--compare", action="store_true")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="which goals to measure")
    parser.add_argument("--backend", choices=BACKENDS, default="pytorch")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    started = time.perf_counter()
    if args.compare:
        result = compare(args.model, args.data)
    else:
        result = goals(args.model, args.data, tuple(args.parts), args.backend)
    if not args.compare:
        print(json.dumps(result, indent=2))
    print(f"wall {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
