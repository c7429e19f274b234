"""Which bands of each date feed the model: the rules the engine applies to a raster file and the QGIS
plugin to a layer before any engine starts. Standard library only."""
from __future__ import annotations

from geochange.engine.errors import OptionError, RasterError


def band_list(text: str) -> list[int]:
    """1-based band numbers written as text: ``3,2,1``."""
    try:
        return [int(b) for b in text.split(",")]
    except ValueError:
        raise OptionError(f"bands must be comma-separated numbers like 3,2,1, not {text!r}") from None


def check_band_count(count: int, spec: dict, date: str, where, hint: str, error=RasterError) -> None:
    """A date's band count must be the model's: one grey band would otherwise broadcast silently over
    three channels' normalisation statistics."""
    if count != spec["bands"]:
        raise error(f"{where}: the {date} image has {count} band(s), the model expects {spec['bands']} "
                    f"({spec['modality']}); {hint}")


def check_band_counts(pre, post, inputs: dict, where, hint: str, error=RasterError) -> None:
    """``check_band_count`` for both dates' ``(bands, H, W)`` images."""
    for date, image in (("pre", pre), ("post", post)):
        check_band_count(len(image), inputs[date], date, where, hint, error)


def check_dates_order(counts: tuple[int, int], inputs: dict, chosen: tuple, names: tuple[str, str]) -> None:
    """Two dates that would fit the model the other way round (optical before and SAR after, given in reverse) are
    named as swapped: choosing bands to fit each count, as the band-count error suggests, would run and miss every
    change. ``chosen``: the bands given for each date (None: all)."""
    pre, post = inputs["pre"], inputs["post"]
    if (chosen == (None, None) and pre["modality"] != post["modality"] and counts != (pre["bands"], post["bands"])
            and counts == (post["bands"], pre["bands"])):
        raise RasterError(f"{names[0]} has {counts[0]} band(s) and {names[1]} {counts[1]}: the model takes "
                          f"{pre['bands']} ({pre['modality']}) before and {post['bands']} ({post['modality']}) after; "
                          "are the dates swapped? Give the pre-event image first")


RGB = ("red", "green", "blue")  # what a three-band optical model takes: every optical dataset of the papers


def band_order_warning(colours: list[str], spec: dict, date: str, bands: list[int], where) -> str | None:
    """What to say where the bands read for a three-band optical date are labelled red, green and blue in the file
    (GDAL's colour interpretation, ``colours`` by band), in another order: a model given blue for red finds changes
    where there are none. Only said: a label can be wrong, a package does not record its bands' order (one trained
    on such files may take them so), and the bands are read as chosen."""
    labels = tuple(colours[b - 1].lower() for b in bands)
    if spec["modality"] != "optical" or len(bands) != 3 or labels == RGB or sorted(labels) != sorted(RGB):
        return None
    order = ",".join(str(bands[labels.index(colour)]) for colour in RGB)
    return (f"{where}: the {date} bands read ({','.join(map(str, bands))}) are labelled {', '.join(labels)} in the "
            f"file; a model of red, green, blue (the zoo's, the papers') takes them in that order with --{date}-bands "
            f"{order}")


def select_bands(count: int, spec: dict, date: str, bands: list[int] | None, where) -> list[int]:
    """The 1-based band indexes to read for a date of ``count`` bands: ``bands`` as given, else all.

    Their count must be what the model expects for that date (``spec``, the manifest's input).
    """
    if bands is None:
        hint = (f"if it is SAR, choose its band(s) with --{date}-bands (an optical image there finds no change)"
                if spec["modality"] == "sar" else f"choose them with --{date}-bands")
        check_band_count(count, spec, date, where, hint)
        return list(range(1, count + 1))
    outside = [b for b in bands if not 1 <= b <= count]
    if outside:
        raise RasterError(f"{where}: band(s) {outside} do not exist; the {date} image has {count} band(s)")
    if len(bands) != spec["bands"]:
        raise RasterError(f"{where}: {len(bands)} {date} band(s) chosen ({bands}), the model expects "
                          f"{spec['bands']} ({spec['modality']})")
    return list(bands)
