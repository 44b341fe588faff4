"""What kind of images a study trained on, by their DICOM headers, and whether an image to predict is of that kind.

A classifier trained on chest radiographs (CR, DX) answers for a CT slice too. The input profile
(common/inputprofile.py) catches most such images by their pixels; the DICOM header says it outright. So each
hospital summarises the DICOM Modality (0008,0060) and Photometric Interpretation (0028,0004) values of its
training images, the server records their union in model.pt (``acquisition``), and ``fedrad predict`` warns
about an image whose modality is not among them. A PNG or JPEG has no modality: it is not checked.

What leaves a hospital is a set, never a count: one 0/1 flag per term of two fixed vocabularies
(``MODALITY_TERMS``, ``PHOTOMETRIC_TERMS``), set where at least ``MIN_IMAGES`` training images carry the term.
A value outside the vocabularies (a vendor's own code, a missing Modality) is the term "other"; an image with no
DICOM header (PNG, JPEG, an .npz) counts as "not DICOM". So nothing a file's header holds is sent verbatim, a
term held by one or two images is not named, and the coordinator learns which kinds of equipment made a site's
training images, the fact a study protocol states anyway (client/release.py: release level ``full`` only).
The vocabularies only ever grow at their end, so a flag means the same term in every fedrad version.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

NOT_DICOM, OTHER = "not DICOM", "other"
# DICOM PS3.3 C.7.3.1.1.1 defined terms of modalities that make images (append only).
MODALITY_TERMS = (NOT_DICOM, OTHER, "CR", "DX", "MG", "IO", "PX", "RG", "RF", "XA", "CT", "MR", "US", "IVUS", "NM",
                  "PT", "OT", "ES", "XC", "OP", "OPT", "OCT", "IVOCT", "SM", "GM", "DG", "BI", "BMD", "TG", "LS", "PA",
                  "HC", "RTIMAGE")
# DICOM PS3.3 C.7.6.3.1.2 photometric interpretations (append only); PNG/JPEG images have none.
PHOTOMETRIC_TERMS = (OTHER, "MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB", "YBR_FULL", "YBR_FULL_422",
                     "YBR_PARTIAL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT")
MIN_IMAGES = 5  # a term is flagged only where at least this many training images carry it
VOCABULARY = "fedrad-acquisition/1"


def modality_term(modality: str | None) -> str:
    """The vocabulary term of a DICOM Modality value (None: an image without a DICOM header)."""
    if modality is None:
        return NOT_DICOM
    value = modality.strip().upper()
    return value if value in MODALITY_TERMS[2:] else OTHER


def photometric_term(photometric: str) -> str:
    value = photometric.strip().upper()
    return value if value in PHOTOMETRIC_TERMS[1:] else OTHER


def site_acquisition(rows: Sequence[tuple[str, str] | None]) -> dict[str, list[float]]:
    """What a site sends (release level full) about its training images, one row per image ((Modality,
    PhotometricInterpretation), or None for an image without a DICOM header): ``input-modality`` and
    ``input-photometric``, a 0/1 flag per vocabulary term (module docstring). Nothing for no images."""
    if not rows:
        return {}
    modalities = Counter(modality_term(None if row is None else row[0]) for row in rows)
    photometrics = Counter(photometric_term(row[1]) for row in rows if row is not None)
    return {"input-modality": [float(modalities[t] >= MIN_IMAGES) for t in MODALITY_TERMS],
            "input-photometric": [float(photometrics[t] >= MIN_IMAGES) for t in PHOTOMETRIC_TERMS]}


def _flagged(flags: Any, terms: Sequence[str]) -> set[str]:
    return {t for t, flag in zip(terms, flags or []) if float(flag) > 0}


def pooled_acquisition(replies: Mapping[str, Mapping[str, Any]]) -> dict[str, Any] | None:
    """The union of the sites' flags (evaluation replies by site), as model.pt's ``acquisition``: the
    ``modalities`` and ``photometrics`` named, in vocabulary order, and how many ``sites`` sent them. None when no
    site sent any (or none flagged a term)."""
    sent = [r for r in replies.values() if "input-modality" in r]
    modalities = set().union(*(_flagged(r["input-modality"], MODALITY_TERMS) for r in sent))
    photometrics = set().union(*(_flagged(r.get("input-photometric"), PHOTOMETRIC_TERMS) for r in sent))
    if not modalities:
        return None
    return {"vocabulary": VOCABULARY, "sites": len(sent),
            "modalities": [t for t in MODALITY_TERMS if t in modalities],
            "photometrics": [t for t in PHOTOMETRIC_TERMS if t in photometrics]}


def describe(record: Mapping[str, Any]) -> str:
    """'CR, DX (MONOCHROME1, MONOCHROME2)' and 'non-DICOM images' where some were."""
    dicom = [m for m in record["modalities"] if m != NOT_DICOM]
    parts = []
    if dicom:
        photometric = f" ({', '.join(record['photometrics'])})" if record.get("photometrics") else ""
        parts.append(", ".join(dicom) + photometric)
    if NOT_DICOM in record["modalities"]:
        parts.append("non-DICOM images (PNG, JPEG or .npz: no modality)")
    return " and ".join(parts)


def check_modality(record: Mapping[str, Any] | None, modality: str | None) -> tuple[str, str]:
    """Whether an image's DICOM ``modality`` (None: not a DICOM image) is among the training images' (model.pt's
    ``acquisition``): (what the check found, a warning or '')."""
    if record is None:
        return "not checked: model.pt records no modality of its training images", ""
    if modality is None:
        return "not checked: not a DICOM image (no modality)", ""
    if not [m for m in record["modalities"] if m != NOT_DICOM]:
        return "not checked: the study's training images were not DICOM", ""
    if modality_term(modality) in record["modalities"]:
        return "among the training images' modalities", ""
    return "not among the training images' modalities", (
        f"modality {modality.strip() or 'missing'}: the study trained on {describe(record)}: the prediction may "
        "mean nothing")
