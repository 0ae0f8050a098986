import os

# Tests never touch a model or dataset hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

#: Tests of the slow tier (make test-slow) besides every e2e test: zoo training runs and the heaviest checks.
SLOW_TESTS = {
    "tests/unit/test_zoo_blip2.py::test_blip2_stage_two_from_itm_is_bit_reproducible",
    "tests/unit/test_gptq_kernel.py::test_gptq_quantize_triton_matches_torch_for_every_grouping",
}


def pytest_collection_modifyitems(config, items):
    """End-to-end runs through the real CLIs (marker ``e2e``) and :data:`SLOW_TESTS` form the slow tier."""
    for item in items:
        if item.get_closest_marker("e2e") or item.nodeid.split("[")[0] in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
