"""The content key that lets a rerun reuse a measurement: equal for equal inputs however they were read."""

import json

from qat_tasks.core.tracking import content_key


def test_a_result_read_back_from_its_run_tag_keys_the_same_content():
    # A 30-block model's per-block sensitivity, fresh (numeric keys) and as the next DAG run reads it back from the
    # stage run's result tag (string keys, in the tag's order).
    fresh = {b: round(0.37 * b % 5, 3) for b in range(30)}
    read_back = json.loads(json.dumps({"block_sensitivity": fresh}, sort_keys=True))["block_sensitivity"]
    assert content_key("llm-candidate", {"method": "gptq"}, fresh) == content_key("llm-candidate", {"method": "gptq"},
                                                                                   read_back)


def test_any_changed_input_changes_the_key():
    base = content_key("llm-candidate", {"method": "gptq"}, {0: 1.0, 12: 2.0})
    assert content_key("llm-candidate", {"method": "gptq"}, {0: 1.0, 12: 2.5}) != base
    assert content_key("llm-candidate", {"method": "awq"}, {0: 1.0, 12: 2.0}) != base
    assert content_key("llm-unquantized", {"method": "gptq"}, {0: 1.0, 12: 2.0}) != base
