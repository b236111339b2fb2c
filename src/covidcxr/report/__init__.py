"""Reports as self-contained HTML + JSON: local validation of any model on a site's
labelled images (:mod:`~covidcxr.report.validation`) and the store's datasheet
(:mod:`~covidcxr.report.datasheet`)."""
