"""The service's settings (one frozen dataclass, given to :func:`create_app`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

MB: Final = 1024 * 1024


@dataclass(frozen=True)
class Settings:
    """How the service runs.

    Attributes:
        db_url: the store's database URL (None: ``COVIDCXR_DB`` or the data dir's SQLite).
        data_dir: the store's data directory (None: ``COVIDCXR_DATA_DIR`` or the default).
        model: a model id or bundle folder (None: the shipped model).
        engine: ``auto``, ``torch`` or ``onnx``.
        max_upload_bytes: largest request body, counted while it streams in.
        max_files: most images in one prediction request.
        predict_workers: inferences run at once (a bounded thread pool).
        inference_threads: CPU threads of the network (None: the engine's default).
        predict_per_minute: predict requests per client per minute (429 beyond).
        read_open: anyone may read the store (False: a viewer account is needed).
        secret_key: signs session cookies and CSRF tokens (None: random per process).
        cookie_secure: send cookies over HTTPS only.
    """

    db_url: str | None = None
    data_dir: str | None = None
    model: str | None = None
    engine: str = "auto"
    max_upload_bytes: int = 50 * MB
    max_files: int = 32
    predict_workers: int = 1
    inference_threads: int | None = None
    predict_per_minute: int = 60
    read_open: bool = True
    secret_key: str | None = None
    cookie_secure: bool = False
