"""Make a DICOM film from a JPEG or PNG: to try the node, to test it, and to load it in a benchmark.

The result is a DX Image Storage (For Presentation) instance, 16-bit MONOCHROME2 (12 bits stored), chest PA, with
the patient and study given, optionally compressed losslessly (RLE through pydicom itself, JPEG-LS through
pyjpegls).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from pneumolab.errors import MissingExtraError

__all__ = ["DX_STORAGE", "film_to_dicom"]

DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation


def film_to_dicom(
    image: str | os.PathLike[str] | np.ndarray,
    *,
    patient_id: str,
    study_uid: str,
    patient_name: str = "TEST^FILM",
    series_uid: str | None = None,
    sop_uid: str | None = None,
    instance_number: int = 1,
    modality: str = "DX",
    view_position: str = "PA",
    compression: str | None = None,
    frames: int = 1,
) -> Any:
    """A DX dataset (pydicom) holding `image` (a file Pillow reads, or a 2-D array in [0, 1] or uint8).

    Args:
        image: The picture.
        patient_id: PatientID.
        study_uid: StudyInstanceUID.
        patient_name: PatientName.
        series_uid: SeriesInstanceUID (default: derived from the study).
        sop_uid: SOPInstanceUID (default: a new UID).
        instance_number: InstanceNumber.
        modality: Modality (``DX``; other values make odd inputs for tests).
        view_position: ViewPosition.
        compression: None (explicit VR little endian), ``rle`` or ``jpegls`` (both lossless).
        frames: More than 1 repeats the picture into a multi-frame instance (an odd input).
    """
    try:
        from pydicom.dataset import Dataset, FileMetaDataset
        from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless, RLELossless, generate_uid
    except ImportError:
        raise MissingExtraError('DICOM films need pydicom: pip install "pneumolab[dicom]"') from None
    if isinstance(image, np.ndarray):
        gray = image.astype(np.float64) / (255.0 if image.dtype == np.uint8 else 1.0)
    else:
        from PIL import Image

        with Image.open(image) as im:
            gray = np.asarray(im.convert("L"), dtype=np.float64) / 255.0
    pixels = np.round(gray * 4095).astype(np.uint16)  # 12 bits stored in 16
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = DX_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid or generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = DX_STORAGE
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid or generate_uid(entropy_srcs=[study_uid, "series"])
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20261206"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.Modality = modality
    ds.Manufacturer = "pneumolab test films"
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance_number
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = view_position
    ds.PatientOrientation = ["L", "F"]
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.BurnedInAnnotation = "NO"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.WindowCenter = 2048
    ds.WindowWidth = 4096
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = 1
    ds.LossyImageCompression = "00"
    if frames > 1:
        ds.NumberOfFrames = frames
        pixels = np.repeat(pixels[None], frames, axis=0)
    ds.PixelData = pixels.tobytes()
    if compression is not None:
        syntax = {"rle": RLELossless, "jpegls": JPEGLSLossless}[compression]
        ds.compress(syntax, pixels)
    return ds
