"""The ``README.md`` dataset card written into every ML export folder."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from covidcxr import RESEARCH_USE_ONLY
from covidcxr.dataset.splits import Split

_HOW_TO_LOAD = {
    "webdataset": (
        "```python\nimport webdataset as wds\n"
        'ds = wds.WebDataset("PATH/train-{000000..000000}.tar").decode("pil")\n'
        "```\n"
        "Each sample has the image (`png` or `jpg`) and `json`: `labels` (one value per "
        "label name), and for a binary task `label`, the class index. Fold K is the "
        "shards `K-*.tar`."
    ),
    "hf": (
        '```python\nimport datasets\nds = datasets.load_dataset("PATH")\n```\n'
        "The configs in this card's header give the features: for a binary task, `label` "
        "is a `ClassLabel`. For a k-fold, source or region split, the default config has "
        'every sample in `train` (with a `fold` column) and `load_dataset("PATH", '
        '"fold-K")` gives train = the other folds, test = fold K.'
    ),
    "imagefolder": (
        "```python\nfrom torchvision.datasets import ImageFolder\n"
        'ds = ImageFolder("PATH/train")\n```\n'
        "One folder per fold, then one per class: `0_not_X` and `1_X`, so that "
        "ImageFolder's sorted `class_to_idx` gives class index = the task's label."
    ),
}


def _yaml_dtype(values: Sequence[Any]) -> dict[str, Any]:
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, list) for v in present):
        items = [x for v in present for x in v if x is not None]
        numeric = all(isinstance(x, int | float) and not isinstance(x, bool) for x in items)
        return {"sequence": "float64" if numeric else "string"}
    if present and all(isinstance(v, bool) for v in present):
        return {"dtype": "bool"}
    if present and all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        return {"dtype": "int64"}
    if present and all(isinstance(v, int | float) and not isinstance(v, bool) for v in present):
        return {"dtype": "float64"}
    return {"dtype": "string"}


def hf_features(
    rows: Sequence[Mapping[str, Any]], names: tuple[str, str] | None
) -> list[dict[str, Any]]:
    """The ``datasets`` features of metadata rows, in the card's YAML list form."""
    columns = sorted({key for row in rows for key in row} - {"file_name", "label"})
    features: list[dict[str, Any]] = [{"name": "image", "dtype": "image"}]
    if names is not None:
        coding = {str(index): name for index, name in enumerate(names)}
        features.append({"name": "label", "dtype": {"class_label": {"names": coding}}})
    for column in columns:
        features.append({"name": column, **_yaml_dtype([row.get(column) for row in rows])})
    return features


def hf_card_yaml(
    folders: Sequence[str],
    split: Split | None,
    rows: Sequence[Mapping[str, Any]],
    names: tuple[str, str] | None,
) -> str:
    """The card header for ``datasets``: configs with data files and features."""
    features = hf_features(rows, names)
    if split is None or split.scheme == "holdout":
        files = [{"split": folder, "path": f"{folder}/**"} for folder in folders]
        configs = [{"config_name": "default", "default": True, "data_files": files}]
    else:
        every = [f"{folder}/**" for folder in folders]
        configs = [
            {
                "config_name": "default",
                "default": True,
                "data_files": [{"split": "train", "path": every}],
            }
        ]
        for fold in folders:
            others = [f"{other}/**" for other in folders if other != fold]
            configs.append(
                {
                    "config_name": f"fold-{fold}",
                    "data_files": [
                        {"split": "train", "path": others},
                        {"split": "test", "path": f"{fold}/**"},
                    ],
                }
            )
    for config in configs:
        config["features"] = features
    # JSON is YAML: one line per key keeps the header exact without a YAML writer.
    return f"configs: {json.dumps(configs)}\n"


def _label_coding(doc: Mapping[str, Any]) -> str:
    names = doc.get("class_names")
    task = doc["task"]
    if names:
        return f"class index = label: 0 = `{names[0]}`, 1 = `{names[1]}` (in every format)."
    labels = ", ".join(f"`{label}`" for label in task.get("labels", []))
    return (
        f"`labels` is a vector in this order: {labels}; 1 = present, 0 = absent, "
        "null = unknown (mask it in the loss)."
        if task.get("kind") != "regression"
        else f"`labels` holds the targets {labels}; null = unknown."
    )


def dataset_card(
    fmt: str, doc: Mapping[str, Any], licences: Counter[str], *, hf_yaml: str = ""
) -> str:
    """The card: task, label coding, selection, split, counts, licences, how to load."""
    task, split = doc["task"], doc["split"]
    header = f"---\n{hf_yaml}---\n\n" if hf_yaml else ""
    folds = "\n".join(f"| {fold} | {n} |" for fold, n in doc["folds"].items())
    excluded = ", ".join(f"{reason}: {n}" for reason, n in doc["excluded"].items()) or "none"
    split_text = (
        "none (every sample in one fold, `all`)"
        if split is None
        else f"{split['scheme']}, seed {split['seed']}, folds {', '.join(split['folds'])}, "
        f"membership sha256 `{split['membership_sha256']}`"
    )
    licence_lines = "\n".join(f"- {name}: {n} image(s)" for name, n in licences.most_common())
    return (
        f"{header}# covidcxr export ({fmt}): task `{task['name']}`\n\n"
        f"**{RESEARCH_USE_ONLY.capitalize()}.** Images and metadata come from the "
        "public COVID-19 image data collection and the other sources named below; each "
        "image keeps its own licence.\n\n"
        f"- task: `{task['name']}` ({task['kind']})\n"
        f"- label coding: {_label_coding(doc)}\n"
        f"- selection: `{json.dumps(doc['selection'], sort_keys=True)}`\n"
        f"- split: {split_text}\n"
        f"- samples: {doc['samples']}; left out: {excluded}\n"
        f"- written by covidcxr {doc['covidcxr_version']}; every detail in "
        "`covidcxr-export.json`\n\n"
        f"| fold | samples |\n|---|---|\n{folds}\n\n"
        f"## Licences\n\n{licence_lines or '- none'}\n\n"
        f"## Loading\n\n{_HOW_TO_LOAD[fmt]}\n"
    )
