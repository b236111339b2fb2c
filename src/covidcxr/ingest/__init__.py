"""Reading sources into the store: tables, mappings, scans, reports, duplicates."""
