"""Regions (countries) of free-text locations, for leave-one-region-out splits."""

from __future__ import annotations

UNKNOWN_REGION = "unknown"

_US_STATES = {
    "alabama": "al", "alaska": "ak", "arizona": "az", "arkansas": "ar", "california": "ca",
    "colorado": "co", "connecticut": "ct", "delaware": "de", "district of columbia": "dc",
    "florida": "fl", "georgia": "ga", "hawaii": "hi", "idaho": "id", "illinois": "il",
    "indiana": "in", "iowa": "ia", "kansas": "ks", "kentucky": "ky", "louisiana": "la",
    "maine": "me", "maryland": "md", "massachusetts": "ma", "michigan": "mi",
    "minnesota": "mn", "mississippi": "ms", "missouri": "mo", "montana": "mt",
    "nebraska": "ne", "nevada": "nv", "new hampshire": "nh", "new jersey": "nj",
    "new mexico": "nm", "new york": "ny", "north carolina": "nc", "north dakota": "nd",
    "ohio": "oh", "oklahoma": "ok", "oregon": "or", "pennsylvania": "pa",
    "rhode island": "ri", "south carolina": "sc", "south dakota": "sd", "tennessee": "tn",
    "texas": "tx", "utah": "ut", "vermont": "vt", "virginia": "va", "washington": "wa",
    "west virginia": "wv", "wisconsin": "wi", "wyoming": "wy",
}  # fmt: skip

# Written forms of one country -> one name. Hong Kong and Macao count as China because
# the collection itself writes "Macao, China" and "..., Hong Kong, China".
_COUNTRY_ALIASES = {
    **{name: "USA" for name in ("us", "u.s.", "u.s.a.", "united states", "america")},
    **{name: "USA" for name in ("united states of america", *_US_STATES)},
    **{code: "USA" for code in _US_STATES.values() if code not in ("in", "or", "me", "ok")},
    **{
        name: "United Kingdom"
        for name in ("uk", "u.k.", "england", "scotland", "wales", "northern ireland")
    },
    "great britain": "United Kingdom",
    "korea": "South Korea",
    "republic of korea": "South Korea",
    "hong kong": "China",
    "macao": "China",
    "macau": "China",
}
_UNKNOWN_TEXTS = {"", "unknown", "n/a", "na", "none", "-"}


def region_of(location: str | None) -> str:
    """The region (country) of a ``location`` value, for leave-one-region-out.

    Rule: the last comma-separated part, with whitespace collapsed and a trailing
    ``.`` removed ("Wuhan, China" -> "China", "Barcelona, Spain " -> "Spain"). Names
    of one country are merged: "USA", "US", "United States" and the US states and
    their postal codes -> "USA" ("Seattle, Washington" -> "USA"); "UK", "England",
    "Scotland", "Wales" -> "United Kingdom"; "Korea" -> "South Korea"; "Hong Kong"
    and "Macao" -> "China" (as the collection writes them). Blank, ``?`` and
    "unknown" -> :data:`UNKNOWN_REGION`. Anything else is kept as written.
    """
    if location is None:
        return UNKNOWN_REGION
    last = " ".join(location.split(",")[-1].split()).rstrip(".").strip()
    lowered = last.lower()
    if lowered in _UNKNOWN_TEXTS or not lowered.strip("?"):
        return UNKNOWN_REGION
    return _COUNTRY_ALIASES.get(lowered, last)
