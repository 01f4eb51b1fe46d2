"""Conversion of ``result.json`` terminology codes to Slicer's serialized terminology entry.

Slicer (5.x) stores a segment's terminology as one string in the segment tag named by
``vtkSegment.GetTerminologyEntryTagName()``, in the format written by
``vtkSlicerTerminologiesModuleLogic::SerializeTerminologyEntry``::

    context~category~type~typeModifier~regionContext~region~regionModifier

where each coded entry is ``scheme^code^meaning`` and an absent one is ``^^``.
"""

from __future__ import annotations

from typing import Any, Mapping

CATEGORY_TYPE_CONTEXT = "Segmentation category and type - DICOM master list"
REGION_CONTEXT = "Anatomic codes - DICOM master list"

_RESERVED_CHARACTERS = ("~", "^", "|")
_CODE_KEYS = ("scheme", "code", "meaning")


def serialize_terminology(terminology: Mapping[str, Any], where: str = "terminology") -> str:
    """Return the Slicer terminology string for ``{"category", "type", "region", ...}`` codes.

    ``category`` and ``type`` are required; ``typeModifier``, ``region`` and ``regionModifier``
    are optional. Each code is ``{"scheme": "SCT", "code": "...", "meaning": "..."}``. Raises
    ``ValueError`` naming ``where`` and the bad key when a code is missing or malformed.
    """
    for required in ("category", "type"):
        if required not in terminology:
            raise ValueError(f"{where} has no '{required}' code; it needs at least 'category' and 'type'")

    category = _serialize_code(terminology.get("category"), f"{where}.category")
    type_code = _serialize_code(terminology.get("type"), f"{where}.type")
    type_modifier = _serialize_code(terminology.get("typeModifier"), f"{where}.typeModifier")
    region = _serialize_code(terminology.get("region"), f"{where}.region")
    region_modifier = _serialize_code(terminology.get("regionModifier"), f"{where}.regionModifier")

    return "~".join(
        [CATEGORY_TYPE_CONTEXT, category, type_code, type_modifier, REGION_CONTEXT, region, region_modifier]
    )


def _serialize_code(code: Any, where: str) -> str:
    if code is None:
        return "^^"
    if not isinstance(code, Mapping):
        raise ValueError(f"{where} must be an object with {list(_CODE_KEYS)}, got {code!r}")

    parts = []
    for key in _CODE_KEYS:
        value = code.get(key)
        if not isinstance(value, str) or not value:
            raise ValueError(f"{where}.{key} must be a non-empty string, got {value!r}")
        if any(character in value for character in _RESERVED_CHARACTERS):
            raise ValueError(
                f"{where}.{key} {value!r} contains one of {list(_RESERVED_CHARACTERS)}, "
                "which Slicer's terminology format reserves as separators"
            )
        parts.append(value)
    return "^".join(parts)
