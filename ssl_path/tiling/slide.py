"""Opening slides and finding their level-0 resolution (µm/px), with the fallback chain users expect.

Order: what the user gives for the slide (the input CSV's ``mpp``, else its ``magnification``), then
``openslide.mpp-x``/``mpp-y`` from the metadata, then the objective power (10 / power µm/px: 20x is
0.5, 40x is 0.25, the usual convention of CLAM/TRIDENT), then the configured ``fallback_mpp``; with none
of them the slide fails with a reason rather than being tiled at a guessed scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import openslide

MPP_SOURCES = ("csv", "metadata", "objective", "fallback")


class SlideError(RuntimeError):
    """A slide that cannot be tiled; the message is recorded as the slide's failure reason."""


@dataclass(frozen=True)
class SlideMpp:
    """Level-0 resolution and where it came from; ``warning`` is set when it was not read from metadata."""

    mpp: float
    source: str
    warning: str | None = None


def open_slide(path: str | Path) -> openslide.OpenSlide:
    """Open a slide with openslide, turning its errors into a ``SlideError`` with a readable reason."""
    path = Path(path)
    if not path.exists():
        raise SlideError(f"file not found: {path}")
    try:
        return openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError as e:
        raise SlideError(f"openslide cannot read {path.name}: unsupported or corrupt file ({e})") from e
    except openslide.OpenSlideError as e:
        raise SlideError(f"openslide failed on {path.name}: {e}") from e


def _positive(value: str | None) -> float | None:
    try:
        v = float(value) if value is not None else None
    except ValueError:
        return None
    return v if v is not None and math.isfinite(v) and v > 0 else None


def resolve_mpp(
    properties: dict[str, str],
    fallback_mpp: float | None,
    name: str = "slide",
    *,
    csv_mpp: float | None = None,
    csv_magnification: float | None = None,
) -> SlideMpp:
    """Level-0 µm/px of a slide: the user's ``csv_mpp`` or ``csv_magnification`` (source ``csv``), else
    its openslide ``properties`` (metadata → objective), else ``fallback_mpp``.

    A user value that disagrees with the metadata by more than 5% still wins, with a warning.
    """
    meta_mpp = _positive(properties.get(openslide.PROPERTY_NAME_MPP_X))
    if csv_mpp is not None or csv_magnification is not None:
        return _from_csv(csv_mpp, csv_magnification, meta_mpp, name)
    mpp_x = meta_mpp
    mpp_y = _positive(properties.get(openslide.PROPERTY_NAME_MPP_Y))
    if mpp_x is not None:
        if mpp_y is not None and abs(mpp_x - mpp_y) / mpp_x > 0.05:
            return SlideMpp(mpp_x, "metadata", f"{name}: mpp-x {mpp_x} and mpp-y {mpp_y} differ; using mpp-x")
        return SlideMpp(mpp_x, "metadata")
    power = _positive(properties.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER))
    if power is not None:
        mpp = 10.0 / power
        return SlideMpp(
            mpp, "objective", f"{name}: no mpp in metadata; {power:g}x objective gives {mpp:g} µm/px"
        )
    if fallback_mpp is not None:
        return SlideMpp(
            float(fallback_mpp),
            "fallback",
            f"{name}: no mpp and no objective power in metadata; using fallback_mpp={fallback_mpp:g} µm/px",
        )
    raise SlideError(
        f"{name}: no mpp and no objective power in the metadata and no fallback_mpp configured "
        "(set tiling.fallback_mpp, or give the slide's mpp in an input CSV, to tile it)"
    )


def _from_csv(mpp: float | None, magnification: float | None, meta_mpp: float | None, name: str) -> SlideMpp:
    for label, value in (("mpp", mpp), ("magnification", magnification)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise SlideError(f"{name}: the CSV's {label} {value!r} is not a positive number")
    notes = []
    if mpp is None:
        mpp = 10.0 / magnification
        notes.append(f"{name}: mpp from the CSV's magnification {magnification:g}x: {mpp:g} µm/px")
    elif magnification is not None and abs(10.0 / magnification - mpp) / mpp > 0.05:
        notes.append(
            f"{name}: the CSV's mpp {mpp:g} and magnification {magnification:g}x "
            f"({10.0 / magnification:g} µm/px) disagree; using mpp"
        )
    if meta_mpp is not None and abs(meta_mpp - mpp) / mpp > 0.05:
        notes.append(
            f"{name}: the CSV's {mpp:g} µm/px overrides {meta_mpp:g} µm/px from the slide's metadata"
        )
    return SlideMpp(float(mpp), "csv", "; ".join(notes) or None)
