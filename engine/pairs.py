"""A list of raster pairs for ``detect-many``: read from a CSV file, or made by pairing the files of two
glob patterns by the text their wildcards match. Each pair has a name, the folder of its outputs."""
from __future__ import annotations

import csv
import glob
import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from geochange.engine.aoi import absolute_layer
from geochange.engine.contracts import SUMMARY_FILES
from geochange.engine.errors import OptionError

REQUIRED_COLUMNS = ("pre", "post")
COLUMNS = (*REQUIRED_COLUMNS, "name", "aoi")
SHOWN = 5  # unpaired files named in an error, the rest counted
# What a wildcard does not match: the folder separators (Windows's glob joins its matches with \, whatever the
# pattern's separator).
NOT_SEPARATOR = "[^" + re.escape(os.sep + (os.altsep or "")) + "]"


@dataclass(frozen=True)
class Pair:
    name: str  # the folder of its outputs under the run's output folder
    pre: str
    post: str
    aoi: str | None = None  # FILE or FILE|layername=NAME; None: the run's --aoi, if any


def read_pairs(path: str | os.PathLike) -> list[Pair]:
    """Pairs from a CSV file with the columns ``pre``, ``post`` and optionally ``name`` and ``aoi``
    (paths relative to the CSV's folder). A pair without a name is named after its post file."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's byte-order mark
            reader = csv.DictReader(f)
            rows = [(reader.line_num, row) for row in reader]
            # In the block: an empty file's header is read here, when asked for.
            columns = [column.strip() for column in reader.fieldnames or []]
    except FileNotFoundError:
        raise OptionError(f"{path}: no such pairs file") from None
    except UnicodeDecodeError:  # Excel's "CSV" is its Windows code page, its "Unicode Text" UTF-16
        raise OptionError(f'{path}: not UTF-8 text; save it as "CSV UTF-8"') from None
    except (OSError, csv.Error) as error:
        raise OptionError(f"{path}: not a readable CSV file of pairs ({error})") from None
    if not columns and not rows:
        raise OptionError(f"{path}: no pairs (the file is empty)")
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    unknown = [c for c in columns if c not in COLUMNS]
    if missing or unknown:
        raise OptionError(f"{path}: the columns must be {', '.join(REQUIRED_COLUMNS)} and optionally name, aoi; "
                          f"found {', '.join(columns) or 'none'}")
    twice = sorted({c for c in columns if columns.count(c) > 1})
    if twice:  # DictReader would keep the last one's values, silently
        raise OptionError(f"{path}: the header names {', '.join(twice)} twice; one column each")
    folder = Path(os.path.abspath(path)).parent
    pairs = []
    for line, row in rows:
        # None: DictReader's key for the values past the header's columns (empty ones, trailing commas, read as none)
        if any(value.strip() for value in row.pop(None, ())):
            raise OptionError(f"{path}, line {line}: more values than the header's columns (quote paths that "
                              "contain commas)")
        row = {key.strip(): (value or "").strip() for key, value in row.items()}
        if not row["pre"] or not row["post"]:
            raise OptionError(f"{path}, line {line}: a pair needs both a pre and a post file")
        pre, post = (str(folder / row[date]) for date in REQUIRED_COLUMNS)
        aoi = row.get("aoi") or None
        if aoi is not None:
            aoi = absolute_layer(aoi, folder)
        pairs.append(Pair(row.get("name") or Path(post).stem, pre, post, aoi))
    return checked(pairs, str(path))


def _capturing(pattern: str) -> re.Pattern:
    """``pattern`` (glob's ``*``, ``?`` and ``[...]``) as a regular expression with a group per wildcard. A
    class of one character is that character (``glob.escape`` writes a folder's ``[`` as ``[[]``)."""
    parts, i = [], 0
    while i < len(pattern):
        char = pattern[i]
        if char == "*":
            parts.append(f"({NOT_SEPARATOR}*)")
        elif char == "?":
            parts.append(f"({NOT_SEPARATOR})")
        elif char == "[" and "]" in pattern[i + 2:]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1:end]
            if len(body) == 1:
                parts.append(re.escape(body))
            else:
                parts.append(f"([{'^' + body[1:] if body.startswith('!') else body}])")
            i = end
        else:
            parts.append(re.escape(char))
        i += 1
    # Windows' glob matches case-blind (*.tif finds a Landsat scene's .TIF): so must its pairing.
    return re.compile("".join(parts), re.IGNORECASE if os.name == "nt" else 0)


def _by_key(pattern: str, option: str) -> dict[str, str]:
    """The files ``pattern`` matches, by the text its wildcards match (joined by ``_``)."""
    expression = _capturing(os.path.normpath(pattern))  # matched against normalised paths: one separator
    if not expression.groups:
        raise OptionError(f"{option} {pattern!r} has no wildcard (*, ? or [...]): the text the wildcards match "
                          "pairs the files")
    files = {}
    for path in sorted(glob.glob(pattern)):
        match = expression.fullmatch(os.path.normpath(path))
        if match and os.path.isfile(path):
            # A name's trailing dots and spaces are Windows' to drop ('before/*tif' matches 'site1.'): left out here.
            key = "_".join(match.groups()).rstrip(". ")
            if key in files:  # "a_b/c" and "a/b_c": one pair would take the other's place unseen
                raise OptionError(f"{option} {pattern!r}: {files[key]} and {os.path.abspath(path)} both name pair "
                                  f"{key!r} (the texts the wildcards match, joined by _); rename one of them")
            files[key] = os.path.abspath(path)
    if not files:
        raise OptionError(f"{option} {pattern!r} matches no file")
    return files


def glob_pairs(pre_glob: str, post_glob: str) -> list[Pair]:
    """Pairs of the files the two patterns match, paired by the text their wildcards match, which
    names the pair: ``before/*.tif`` and ``after/*.tif`` pair files of the same name, ``tiles/*/pre.tif``
    and ``tiles/*/post.tif`` the files of each tile's folder. A file without a partner is an error."""
    pre, post = _by_key(pre_glob, "--pre-glob"), _by_key(post_glob, "--post-glob")
    for files, other, option in ((pre, post, "--post-glob"), (post, pre, "--pre-glob")):
        alone = [files[key] for key in files if key not in other]
        if alone:
            raise OptionError(f"{len(alone)} file(s) without a partner in {option} (paired by the text the "
                              f"wildcards match): {', '.join(alone[:SHOWN])}" + " ..." * (len(alone) > SHOWN))
    return checked([Pair(key, pre[key], post[key]) for key in pre], f"{pre_glob} and {post_glob}")


def pairs_from(table: str | None = None, pre_glob: str | None = None, post_glob: str | None = None) -> list[Pair]:
    """The pairs of a CSV file (``read_pairs``) or of two glob patterns (``glob_pairs``): one or the other."""
    if table and not (pre_glob or post_glob):
        return read_pairs(table)
    if pre_glob and post_glob and not table:
        return glob_pairs(pre_glob, post_glob)
    raise OptionError("give the pairs as a CSV file, or as both --pre-glob and --post-glob")


# What a folder's name cannot hold where the outputs may be read (Windows: a drive's colon, wildcards; and the
# names its devices keep, whatever their extension).
NOT_IN_NAMES = '/\\:*?"<>|'
DEVICE_NAMES = {"CON", "PRN", "AUX", "NUL", *(f"{port}{i}" for port in ("COM", "LPT") for i in range(1, 10))}


def checked(pairs: list[Pair], where: str) -> list[Pair]:
    """``pairs``, refused where empty, or where a name is no plain folder name (nor a summary file's, or one of its
    side files': those are replaced with the summary) or is given twice: names that differ only in case or in
    their Unicode composition are one folder on Windows and macOS."""
    if not pairs:
        raise OptionError(f"{where}: no pairs")
    seen = {}
    for pair in pairs:
        name = pair.name
        if (not name or name.startswith(".") or name.endswith((".", " ")) or any(c in name for c in NOT_IN_NAMES)
                or any(ord(c) < 32 for c in name) or name.split(".")[0].upper() in DEVICE_NAMES
                or any(name.lower().startswith(summary) for summary in SUMMARY_FILES)):
            raise OptionError(f"{where}: {name!r} cannot name a pair's output folder (a plain name: no dot first, no "
                              f"dot or space last, none of {NOT_IN_NAMES} nor control characters, no device name of "
                              f"Windows such as CON or NUL, not starting with {' or '.join(SUMMARY_FILES)})")
        folder = unicodedata.normalize("NFC", name).lower()
        if folder in seen:
            first, post = seen[folder]
            alike = "named" if first == name else f"named {first!r} and"
            raise OptionError(f"{where}: two pairs are {alike} {name!r} ({post} and {pair.post}), one output folder "
                              "(where case does not count, as on Windows and macOS); give each a name of its own "
                              "(the CSV's name column)")
        seen[folder] = name, pair.post
    return pairs
