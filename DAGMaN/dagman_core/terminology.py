"""DICOM terminology codes (SNOMED CT) and display colors for segment names."""

from __future__ import annotations

import copy

_MORPHOLOGIC = {"scheme": "SCT", "code": "49755003", "meaning": "Morphologically Altered Structure"}
_TISSUE = {"scheme": "SCT", "code": "85756007", "meaning": "Tissue"}
_LUNG = {"scheme": "SCT", "code": "39607008", "meaning": "Lung"}

# Lower-case segment name -> (category, type, anatomic region or None, RGB color in 0..1).
KNOWN_SEGMENTS = {
    "lung tumor": (_MORPHOLOGIC, {"scheme": "SCT", "code": "108369006", "meaning": "Neoplasm"}, _LUNG, (0.86, 0.31, 0.24)),
    "tumor": (_MORPHOLOGIC, {"scheme": "SCT", "code": "108369006", "meaning": "Neoplasm"}, None, (0.86, 0.31, 0.24)),
    "lung nodule": (_MORPHOLOGIC, {"scheme": "SCT", "code": "27925004", "meaning": "Nodule"}, _LUNG, (0.95, 0.75, 0.2)),
    "nodule": (_MORPHOLOGIC, {"scheme": "SCT", "code": "27925004", "meaning": "Nodule"}, _LUNG, (0.95, 0.75, 0.2)),
}

_FALLBACK_COLORS = [(0.3, 0.69, 0.29), (0.22, 0.49, 0.72), (0.6, 0.31, 0.64), (1.0, 0.5, 0.0), (0.65, 0.34, 0.16)]


def describe_label(value: int, name: str) -> dict:
    """Return the bundle entry of one label: value, name, color (RGB 0..1) and terminology codes.

    Names without a known code get the generic category and type "Tissue", so Slicer still shows them.
    """
    known = KNOWN_SEGMENTS.get(name.strip().lower())
    if known is None:
        category, segment_type, region = _TISSUE, _TISSUE, None
        color = _FALLBACK_COLORS[(value - 1) % len(_FALLBACK_COLORS)]
    else:
        category, segment_type, region, color = known

    terminology = {"category": copy.deepcopy(category), "type": copy.deepcopy(segment_type)}
    if region is not None:
        terminology["region"] = copy.deepcopy(region)
    return {"value": int(value), "name": name, "color": list(color), "terminology": terminology}
