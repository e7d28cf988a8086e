"""The OpenAPI document describes the speech server as it behaves.

Schemathesis, with all its default checks, fuzzes the speech, voices and health routes with a key:
every status, content type, body and header must be documented, every request valid by the
document must be accepted and every invalid one refused (400), an undocumented method must get 405
with `Allow`, and nothing may fail with a 5xx. The shared server caps every sentence at 40 frames
(`--max-frames 40`), which bounds the longest synthesis a generated request can ask for.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.engine

EXAMPLES_PER_ROUTE = 15  # with the coverage and fuzzing phases: CI time (was 30, ~106 s)


def test_schemathesis_with_its_default_checks_finds_no_failure(speech_server, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "run", f"{speech_server.base}/openapi.json",
         "--include-path-regex", "^/(v1/audio|ready|health)", "--max-examples", str(EXAMPLES_PER_ROUTE),
         "-H", "Authorization: Bearer alice-key", "--request-timeout", "120", "--generation-deterministic",
         "--phases", "examples,coverage,fuzzing", "--no-color"],
        capture_output=True, text=True, timeout=900, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-2000:]
    assert "6 selected" in proc.stdout  # speech, the voice list, upload and deletion, /ready and /health
