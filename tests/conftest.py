from __future__ import annotations

import pytest
from checkpoints import CASES, write_case


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    """Every checkpoint case of CASES, written once per test session."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {name: write_case(name, str(root)) for name in CASES}
