"""Tests of the finding vocabulary and the finding parser."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from covidcxr.errors import MappingError, MetadataError
from covidcxr.schema.findings import (
    Finding,
    ParsedFinding,
    all_nodes,
    ancestors,
    check_value_map,
    children,
    format_finding,
    get_node,
    is_under,
    parse_finding,
    pathogen,
    resolve_node,
)
from covidcxr.schema.values import Severity

SHARED_DATASETS = Path(__file__).parents[2] / ".." / "shared" / "datasets"

COVID = "Pneumonia/Viral/COVID-19"

# Every finding value the real files hold, and the paths it must parse to.
REAL_VALUES = [
    # June 2020 metadata.csv (flat)
    ("COVID-19", (COVID,)),
    ("COVID-19, ARDS", (COVID, "ARDS")),
    ("No Finding", ("No Finding",)),
    ("Pneumocystis", ("Pneumonia/Fungal/Pneumocystis",)),
    ("Streptococcus", ("Pneumonia/Bacterial/Streptococcus",)),
    ("SARS", ("Pneumonia/Viral/SARS",)),
    ("Pneumonia", ("Pneumonia",)),
    ("Klebsiella", ("Pneumonia/Bacterial/Klebsiella",)),
    ("Mycoplasma Bacterial Pneumonia", ("Pneumonia/Bacterial/Mycoplasma",)),
    ("Legionella", ("Pneumonia/Bacterial/Legionella",)),
    ("Lipoid", ("Pneumonia/Lipoid",)),
    ("Varicella", ("Pneumonia/Viral/Varicella",)),
    ("ARDS", ("ARDS",)),
    ("E.Coli", ("Pneumonia/Bacterial/E.Coli",)),
    ("Bacterial", ("Pneumonia/Bacterial",)),
    ("Chlamydophila", ("Pneumonia/Bacterial/Chlamydophila",)),
    ("Influenza", ("Pneumonia/Viral/Influenza",)),
    # metadata-latest.csv (hierarchical)
    (COVID, (COVID,)),
    ("Pneumonia/Fungal/Pneumocystis", ("Pneumonia/Fungal/Pneumocystis",)),
    ("Pneumonia/Bacterial/Streptococcus", ("Pneumonia/Bacterial/Streptococcus",)),
    ("Tuberculosis", ("Tuberculosis",)),
    ("Pneumonia/Viral/SARS", ("Pneumonia/Viral/SARS",)),
    ("Pneumonia/Lipoid", ("Pneumonia/Lipoid",)),
    ("Pneumonia/Bacterial/Mycoplasma", ("Pneumonia/Bacterial/Mycoplasma",)),
    ("Pneumonia/Bacterial/Klebsiella", ("Pneumonia/Bacterial/Klebsiella",)),
    ("Pneumonia/Bacterial/Legionella", ("Pneumonia/Bacterial/Legionella",)),
    ("Pneumonia/Viral/MERS-CoV", ("Pneumonia/Viral/MERS-CoV",)),
    ("Pneumonia/Bacterial/Nocardia", ("Pneumonia/Bacterial/Nocardia",)),
    ("Pneumonia/Viral/Varicella", ("Pneumonia/Viral/Varicella",)),
    ("Pneumonia/Viral/Influenza", ("Pneumonia/Viral/Influenza",)),
    ("Pneumonia/Bacterial/E.Coli", ("Pneumonia/Bacterial/E.Coli",)),
    ("Pneumonia/Bacterial", ("Pneumonia/Bacterial",)),
    ("Pneumonia/Bacterial/Chlamydophila", ("Pneumonia/Bacterial/Chlamydophila",)),
    ("Pneumonia/Viral/Herpes ", ("Pneumonia/Viral/Herpes",)),
    ("Pneumonia/Viral/Influenza/H1N1", ("Pneumonia/Viral/Influenza/H1N1",)),
    ("Pneumonia/Fungal/Aspergillosis", ("Pneumonia/Fungal/Aspergillosis",)),
    ("Pneumonia/Aspiration", ("Pneumonia/Aspiration",)),
    ("Pneumonia/Bacterial/Staphylococcus/MRSA", ("Pneumonia/Bacterial/Staphylococcus/MRSA",)),
    # NIH ChestX-ray14 labels
    ("Atelectasis", ("Atelectasis",)),
    ("Cardiomegaly", ("Cardiomegaly",)),
    ("Consolidation", ("Consolidation",)),
    ("Edema", ("Edema",)),
    ("Effusion", ("Effusion",)),
    ("Emphysema", ("Emphysema",)),
    ("Fibrosis", ("Fibrosis",)),
    ("Hernia", ("Hernia",)),
    ("Infiltration", ("Infiltration",)),
    ("Mass", ("Mass",)),
    ("Nodule", ("Nodule",)),
    ("Pleural_Thickening", ("Pleural Thickening",)),
    ("Pneumothorax", ("Pneumothorax",)),
]


@pytest.mark.parametrize(("value", "paths"), REAL_VALUES)
def test_real_values_parse_to_expected_paths(value: str, paths: tuple[str, ...]) -> None:
    parsed = parse_finding(value)
    assert parsed.status == "ok"
    assert parsed.problems == ()
    assert parsed.paths == paths
    assert all(finding.known for finding in parsed.findings)


@pytest.mark.parametrize(
    ("flat", "hierarchical"),
    [
        ("Streptococcus", "Pneumonia/Bacterial/Streptococcus"),
        ("COVID-19", COVID),
        ("Mycoplasma Bacterial Pneumonia", "Pneumonia/Bacterial/Mycoplasma"),
        ("Pneumocystis", "Pneumonia/Fungal/Pneumocystis"),
        ("Bacterial", "Pneumonia/Bacterial"),
        ("Lipoid", "Pneumonia/Lipoid"),
        ("H1N1", "Pneumonia/Viral/Influenza/H1N1"),
        ("MRSA", "Pneumonia/Bacterial/Staphylococcus/MRSA"),
    ],
)
def test_flat_and_hierarchical_forms_are_equal(flat: str, hierarchical: str) -> None:
    assert parse_finding(flat) == parse_finding(hierarchical)
    # raw is kept but is not part of equality
    assert parse_finding(flat).findings[0].raw == flat


@pytest.mark.parametrize(
    ("value", "path"),
    [
        ("covid-19", COVID),
        ("COVID19", COVID),
        ("SARS-CoV-2", COVID),
        ("  COVID-19  ", COVID),
        ("MERS", "Pneumonia/Viral/MERS-CoV"),
        ("mers-cov", "Pneumonia/Viral/MERS-CoV"),
        ("E. coli", "Pneumonia/Bacterial/E.Coli"),
        ("e.coli", "Pneumonia/Bacterial/E.Coli"),
        ("Pleural Thickening", "Pleural Thickening"),
        ("pleural_thickening", "Pleural Thickening"),
        ("Herpes", "Pneumonia/Viral/Herpes"),
        ("herpes ", "Pneumonia/Viral/Herpes"),
        ("pneumonia/viral/covid-19", COVID),
        (" Pneumonia / Viral / COVID-19 ", COVID),
        ("Bacterial Pneumonia", "Pneumonia/Bacterial"),
        ("NO FINDING", "No Finding"),
    ],
)
def test_aliases_case_and_whitespace(value: str, path: str) -> None:
    parsed = parse_finding(value)
    assert (parsed.status, parsed.paths, parsed.problems) == ("ok", (path,), ())


def test_flat_list_gives_explicit_tokens_in_canonical_order() -> None:
    parsed = parse_finding("COVID-19, ARDS")
    assert parsed.findings == (
        Finding(("Pneumonia", "Viral", "COVID-19")),
        Finding(("ARDS",)),
    )
    assert parsed.labels == ("COVID-19", "ARDS")
    assert parsed.findings[0].path_str == COVID
    assert parsed.findings[0].label == "COVID-19"
    assert parse_finding("ARDS, COVID-19") == parsed
    assert parse_finding(f"ARDS,{COVID}") == parsed


def test_duplicates_and_implied_ancestors_are_dropped() -> None:
    assert parse_finding("COVID-19, covid-19, Pneumonia/Viral/COVID-19").paths == (COVID,)
    # Pneumonia and Viral are implied by COVID-19
    assert parse_finding("Pneumonia, Viral, COVID-19").paths == (COVID,)
    # siblings are both kept
    assert parse_finding("SARS, COVID-19").paths == (COVID, "Pneumonia/Viral/SARS")


def test_nih_pipe_lists() -> None:
    parsed = parse_finding("Edema|Effusion|Infiltration|Pleural_Thickening|Pneumonia")
    assert parsed.status == "ok"
    assert parsed.paths == (
        "Pneumonia",
        "Edema",
        "Effusion",
        "Infiltration",
        "Pleural Thickening",
    )
    assert parse_finding("Effusion|Pneumonia", separator="|") == parse_finding("Effusion|Pneumonia")


def test_explicit_separator_splits_only_on_it() -> None:
    parsed = parse_finding("COVID-19, ARDS", separator="|")
    assert parsed.status == "invalid"
    assert [problem.code for problem in parsed.problems] == ["unknown_finding"]
    with pytest.raises(ValueError, match="separator must be None or a non-empty string"):
        parse_finding("COVID-19", separator="")


@pytest.mark.parametrize(
    ("value", "status"),
    [
        ("", "missing"),
        ("   ", "missing"),
        ("todo", "pending"),
        ("TODO ", "pending"),
        ("Unknown", "unknown"),
        ("unknown", "unknown"),
    ],
)
def test_special_values_are_statuses_not_findings(value: str, status: str) -> None:
    assert parse_finding(value) == ParsedFinding((), status, ())  # type: ignore[arg-type]


def test_unknown_top_level_is_reported_with_suggestion_and_not_guessed() -> None:
    parsed = parse_finding("Covd-19")
    assert parsed.status == "invalid"
    assert parsed.findings == ()
    (problem,) = parsed.problems
    assert problem.code == "unknown_finding"
    assert problem.token == "Covd-19"
    assert problem.severity == Severity.ERROR
    assert "'Covd-19' is not a known finding" in problem.message
    assert "'COVID-19' = 'Pneumonia/Viral/COVID-19'" in problem.message
    assert "'todo', 'Unknown' or blank" in problem.message


def test_unknown_top_level_keeps_the_known_tokens() -> None:
    parsed = parse_finding("COVID-19, Bronchiolitis")
    assert parsed.status == "invalid"
    assert parsed.paths == (COVID,)
    assert [(p.code, p.token) for p in parsed.problems] == [("unknown_finding", "Bronchiolitis")]


def test_unknown_path_root_is_not_guessed() -> None:
    parsed = parse_finding("Infection/Viral/COVID-19")
    assert parsed.findings == ()
    assert parsed.problems[0].code == "unknown_finding"
    assert "'Infection'" in parsed.problems[0].message


def test_unknown_leaf_under_known_branch_is_kept_and_reported() -> None:
    parsed = parse_finding("Pneumonia/Viral/NewBug ")
    assert parsed.status == "ok"
    (finding,) = parsed.findings
    assert finding.path == ("Pneumonia", "Viral", "NewBug")
    assert finding.known is False
    (problem,) = parsed.problems
    assert problem.code == "unknown_leaf"
    assert problem.severity == Severity.WARNING
    assert "'NewBug' is not a known finding under 'Pneumonia/Viral'" in problem.message
    assert "known there: COVID-19, SARS" in problem.message
    assert pathogen(finding.path) == "viral"
    assert is_under(finding.path, "viral")
    assert not is_under(finding.path, "COVID-19")


def test_unknown_leaf_typo_names_the_close_sibling() -> None:
    (problem,) = parse_finding("Pneumonia/Viral/Covd-19").problems
    assert problem.code == "unknown_leaf"
    assert "close matches: 'COVID-19'" in problem.message


def test_known_name_under_wrong_branch_is_an_error() -> None:
    parsed = parse_finding("Pneumonia/Bacterial/COVID-19")
    assert parsed.status == "invalid"
    assert parsed.findings == ()
    (problem,) = parsed.problems
    assert problem.code == "misplaced_finding"
    assert "'Pneumonia/Viral/COVID-19'" in problem.message


@pytest.mark.parametrize("value", ["Pneumonia//COVID-19", "Pneumonia/Viral/", "/Pneumonia"])
def test_empty_path_component_is_malformed(value: str) -> None:
    parsed = parse_finding(value)
    assert parsed.status == "invalid"
    assert [problem.code for problem in parsed.problems] == ["malformed_path"]


def test_empty_list_element_is_a_warning() -> None:
    parsed = parse_finding("COVID-19,,ARDS,")
    assert parsed.status == "ok"
    assert parsed.paths == (COVID, "ARDS")
    assert [(p.code, p.severity) for p in parsed.problems] == [("empty_token", Severity.WARNING)]


@pytest.mark.parametrize(
    ("value", "exclusive"),
    [
        ("No Finding, Pneumonia", "'No Finding'"),
        ("Pneumonia|No Finding", "'No Finding'"),
        ("todo, COVID-19", "'todo'"),
        ("Unknown, COVID-19", "'Unknown'"),
        ("todo, Unknown", "'todo', 'Unknown'"),
    ],
)
def test_exclusive_values_conflict_with_others(value: str, exclusive: str) -> None:
    parsed = parse_finding(value)
    assert parsed.status == "invalid"
    (problem,) = parsed.problems
    assert problem.code == "conflict"
    assert problem.message == (
        f"parse_finding: {value!r} combines {exclusive} with other findings; "
        "'No Finding', 'todo' and 'Unknown' must stand alone"
    )


def test_repeated_no_finding_is_not_a_conflict() -> None:
    assert parse_finding("No Finding|No Finding").paths == ("No Finding",)
    assert parse_finding("No Finding|No Finding").status == "ok"


def test_value_map_applies_before_the_vocabulary() -> None:
    value_map = {
        "Coronavirus Pneumonia": "COVID-19",
        "viral pneumonia (covid)": "Pneumonia/Viral/COVID-19, ARDS",
        "?": "Unknown",
        "n/a": "",
        "not yet": "todo",
    }
    check_value_map(value_map)
    assert parse_finding("coronavirus pneumonia ", value_map=value_map).paths == (COVID,)
    assert parse_finding("Coronavirus Pneumonia|Effusion", value_map=value_map).paths == (
        COVID,
        "Effusion",
    )
    # the whole value is looked up before splitting
    assert parse_finding("Viral Pneumonia (COVID)", value_map=value_map).paths == (COVID, "ARDS")
    assert parse_finding("?", value_map=value_map).status == "unknown"
    assert parse_finding("n/a", value_map=value_map).status == "missing"
    assert parse_finding("not yet", value_map=value_map).status == "pending"
    assert parse_finding("n/a, SARS", value_map=value_map).paths == ("Pneumonia/Viral/SARS",)
    # without the map these are unknown
    assert parse_finding("Coronavirus Pneumonia").status == "invalid"


def test_value_map_to_unknown_target_names_the_mapping() -> None:
    parsed = parse_finding("CP", value_map={"CP": "Covid-91"})
    assert parsed.status == "invalid"
    assert "value_map maps 'CP' to 'Covid-91'" in parsed.problems[0].message
    with pytest.raises(MappingError, match=r"'CP' -> 'Covid-91'.*not a known finding"):
        check_value_map({"CP": "Covid-91", "ok": "COVID-19"})


@pytest.mark.parametrize(
    ("name", "path"),
    [
        ("covid-19", COVID),
        ("COVID-19", COVID),
        ("viral", "Pneumonia/Viral"),
        ("Pneumonia/Viral", "Pneumonia/Viral"),
        ("bacterial pneumonia", "Pneumonia/Bacterial"),
        ("fungal", "Pneumonia/Fungal"),
        ("pleural_thickening", "Pleural Thickening"),
        ("tb", "Tuberculosis"),
        ("mers", "Pneumonia/Viral/MERS-CoV"),
    ],
)
def test_resolve_node(name: str, path: str) -> None:
    assert resolve_node(name) == path
    assert get_node(name).path_str == path


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("covd", r"resolve_node: 'covd' is not a known finding.*close matches: 'COVID-19'"),
        ("Bronchitis", r"'Bronchitis' is not a known finding; known top-level findings: No Find"),
        ("Pneumonia/Viral/NewBug", r"no 'NewBug' under 'Pneumonia/Viral' \(known there: COVID"),
        ("Pneumonia/Bacterial/SARS", r"files it as 'Pneumonia/Viral/SARS'"),
        ("todo", r"'todo' is a finding status \(pending\), not a finding node"),
        ("Unknown", r"'Unknown' is a finding status \(unknown\)"),
        ("  ", r"resolve_node: blank finding name"),
    ],
)
def test_resolve_node_errors(name: str, match: str) -> None:
    with pytest.raises(MetadataError, match=match):
        resolve_node(name)


def test_ancestors() -> None:
    assert ancestors(COVID) == ("Pneumonia", "Pneumonia/Viral", COVID)
    assert ancestors(("Pneumonia", "Viral", "COVID-19")) == ancestors("covid-19")
    assert ancestors("ARDS") == ("ARDS",)
    assert ancestors("Pneumonia/Viral/NewBug") == (
        "Pneumonia",
        "Pneumonia/Viral",
        "Pneumonia/Viral/NewBug",
    )
    with pytest.raises(MetadataError, match="'Foo' is not a known finding"):
        ancestors("Foo/Bar")


def test_is_under_is_component_wise_never_substring() -> None:
    assert is_under(COVID, "Pneumonia/Viral")
    assert is_under(COVID, COVID)
    assert is_under(COVID, "pneumonia")
    assert is_under("Pneumonia/Viral/Influenza/H1N1", "influenza")
    assert not is_under("Pneumonia/Viral2", "Pneumonia/Viral")
    assert not is_under("Pneumonia/Viral", COVID)
    assert not is_under("Pneumonia/Viral/SARS", "COVID-19")
    # "Pneumonia" is a substring of neither relationship it must not create
    assert not is_under("Pneumonia/Bacterial/Mycoplasma", "Pneumonia/Viral")
    assert not is_under("Tuberculosis", "Pneumonia/Bacterial")
    with pytest.raises(MetadataError, match="'Viral2' is not a known finding"):
        is_under(COVID, "Viral2")


def test_children_and_all_nodes() -> None:
    assert children()[:4] == ("No Finding", "Pneumonia", "ARDS", "Tuberculosis")
    assert children("Pneumonia") == (
        "Pneumonia/Viral",
        "Pneumonia/Bacterial",
        "Pneumonia/Fungal",
        "Pneumonia/Lipoid",
        "Pneumonia/Aspiration",
    )
    assert children("influenza") == ("Pneumonia/Viral/Influenza/H1N1",)
    assert children(COVID) == ()
    nodes = all_nodes()
    assert len(nodes) == len(set(nodes))
    # canonical order: parents before children, and stable
    for node in nodes:
        for ancestor in ancestors(node)[:-1]:
            assert nodes.index(ancestor) < nodes.index(node)
    assert nodes[:4] == ("No Finding", "Pneumonia", "Pneumonia/Viral", COVID)
    assert nodes[-1] == "Pneumothorax"
    assert [get_node(node).index for node in nodes] == list(range(len(nodes)))


@pytest.mark.parametrize(
    ("path", "group"),
    [
        (COVID, "viral"),
        ("Pneumonia/Viral", "viral"),
        ("Pneumonia/Viral/Influenza/H1N1", "viral"),
        ("Streptococcus", "bacterial"),
        ("Pneumonia/Bacterial/Staphylococcus/MRSA", "bacterial"),
        ("Pneumonia/Fungal/Pneumocystis", "fungal"),
        ("Aspergillosis", "fungal"),
        ("Tuberculosis", "bacterial"),
        ("Pneumonia", None),
        ("Pneumonia/Lipoid", None),
        ("Pneumonia/Aspiration", None),
        ("ARDS", None),
        ("No Finding", None),
        ("Effusion", None),
    ],
)
def test_pathogen(path: str, group: str | None) -> None:
    assert pathogen(path) == group


def test_format_finding() -> None:
    parsed = parse_finding("COVID-19, ARDS")
    assert format_finding(parsed) == "Pneumonia/Viral/COVID-19, ARDS"
    assert format_finding(parsed, "flat") == "COVID-19, ARDS"
    assert format_finding(parsed, "flat", separator="|") == "COVID-19|ARDS"
    assert format_finding(parse_finding("todo")) == "todo"
    assert format_finding(parse_finding("unknown")) == "Unknown"
    assert format_finding(parse_finding("")) == ""
    assert format_finding(["covid-19", "Pneumonia/Viral/COVID-19", "ARDS"]) == (
        "Pneumonia/Viral/COVID-19, ARDS"
    )
    # an unknown organism keeps its path in flat style, so it parses back
    new_bug = parse_finding("Pneumonia/Viral/NewBug")
    assert format_finding(new_bug, "flat") == "Pneumonia/Viral/NewBug"
    with pytest.raises(ValueError, match="style 'csv'"):
        format_finding(parsed, "csv")  # type: ignore[arg-type]


@pytest.mark.parametrize("style", ["hierarchical", "flat"])
@pytest.mark.parametrize("node", all_nodes())
def test_format_then_parse_round_trips(node: str, style: str) -> None:
    parsed = parse_finding(node)
    text = format_finding(parsed, style)  # type: ignore[arg-type]
    assert parse_finding(text) == parsed


# ---------------------------------------------------------------------------------------
# The real files.

# Rows of metadata.csv whose finding upstream changed in metadata-latest.csv (besides
# "todo" rows that got a finding). key (patientid, filename): (June 2020, latest), as
# format_finding writes them.
_ARDS_DROPPED = ("Pneumonia/Viral/COVID-19, ARDS", COVID)
KNOWN_RELABELLED = {
    # ARDS re-filed as a pneumonia
    ("5", "ARDSSevere.png"): ("ARDS", "Pneumonia"),
    ("25", "acute-respiratory-distress-syndrome-ards-1.jpg"): ("ARDS", "Pneumonia"),
    ("26", "acute-respiratory-distress-syndrome-ards.jpg"): ("ARDS", "Pneumonia"),
    ("27", "ards-secondary-to-tiger-snake-bite.png"): ("ARDS", "Pneumonia"),
    # "COVID-19, ARDS": the ARDS token was dropped
    ("96", "covid-19-pneumonia-rapidly-progressive-admission.jpg"): _ARDS_DROPPED,
    ("96", "covid-19-pneumonia-rapidly-progressive-12-hours.jpg"): _ARDS_DROPPED,
    ("96", "covid-19-pneumonia-rapidly-progressive-3-days.jpg"): _ARDS_DROPPED,
    (
        "97",
        "covid-19-rapidly-progressive-acute-respiratory-distress-syndrome-ards-admission.jpg",
    ): _ARDS_DROPPED,
    (
        "97",
        "covid-19-rapidly-progressive-acute-respiratory-distress-syndrome-ards-day-1.jpg",
    ): _ARDS_DROPPED,
    (
        "97",
        "covid-19-rapidly-progressive-acute-respiratory-distress-syndrome-ards-day-2.jpg",
    ): _ARDS_DROPPED,
    (
        "97",
        "covid-19-rapidly-progressive-acute-respiratory-distress-syndrome-ards-day-3.jpg",
    ): _ARDS_DROPPED,
    ("117", "covid-19-pneumonia-evolution-over-a-week-1-day6.jpg"): _ARDS_DROPPED,
    ("160", "ryct.2020003.fig2-a.png"): _ARDS_DROPPED,
    ("160", "ryct.2020003.fig2-b.png"): _ARDS_DROPPED,
    ("160", "ryct.2020003.fig2-c.png"): _ARDS_DROPPED,
    ("178", "16660_5_1.jpg"): _ARDS_DROPPED,
    # figshare 10.6084/m9.figshare.12275009 rows: diagnosis changed outright
    ("221", "a4318ac9.jpg"): (COVID, "Unknown"),
    ("228", "f6575117.jpg"): ("No Finding", COVID),
    ("228", "ac4f6e4e.jpg"): ("No Finding", COVID),
    ("251", "2c35005f.jpg"): (COVID, "No Finding"),
    ("252", "7afaaccc.jpg"): ("No Finding", COVID),
    ("253", "ada8c494.jpg"): (COVID, "No Finding"),
    ("255", "19073f37.jpg"): ("No Finding", COVID),
    ("256", "8fc103ca.jpg"): ("No Finding", COVID),
}


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        pytest.skip(f"shared data not found: {path.resolve()} (../shared/datasets is absent)")
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _assert_all_known(values: list[str], separator: str | None = None) -> None:
    bad = {
        value: [problem.message for problem in parsed.problems]
        for value in set(values)
        if (parsed := parse_finding(value, separator=separator)).problems
        or parsed.status == "invalid"
        or not all(finding.known for finding in parsed.findings)
    }
    assert bad == {}


@pytest.mark.shared_data
def test_real_metadata_findings_all_parse() -> None:
    folder = SHARED_DATASETS / "covid-chestxray"
    old = _read_csv(folder / "metadata.csv")
    latest = _read_csv(folder / "metadata-latest.csv")
    nih = _read_csv(SHARED_DATASETS / "nih-cxr14-subset" / "metadata.csv")
    _assert_all_known([row["finding"] for row in old])
    _assert_all_known([row["finding"] for row in latest])
    _assert_all_known([row["Finding Labels"] for row in nih], separator="|")
    statuses = {parse_finding(row["finding"]).status for row in old + latest}
    assert statuses == {"ok", "pending", "unknown"}
    # NIH's Pneumonia is the collection's Pneumonia node: half the subset has it
    with_pneumonia = [
        row for row in nih if "Pneumonia" in parse_finding(row["Finding Labels"]).paths
    ]
    assert len(with_pneumonia) == 500


@pytest.mark.shared_data
def test_june_2020_and_latest_metadata_agree_except_known_relabels() -> None:
    folder = SHARED_DATASETS / "covid-chestxray"
    old = _read_csv(folder / "metadata.csv")
    latest = {
        (row["patientid"], row["filename"]): row
        for row in _read_csv(folder / "metadata-latest.csv")
    }
    compared = 0
    relabelled: dict[tuple[str, str], tuple[str, str]] = {}
    for row in old:
        key = (row["patientid"], row["filename"])
        if key not in latest:
            continue
        before = parse_finding(row["finding"])
        after = parse_finding(latest[key]["finding"])
        if before.status == "pending":
            continue  # "todo" then; a later release assigning a finding is no disagreement
        compared += 1
        if (before.findings, before.status) != (after.findings, after.status):
            relabelled[key] = (format_finding(before), format_finding(after))
    assert compared > 600
    assert relabelled == KNOWN_RELABELLED
