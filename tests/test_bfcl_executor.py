import decimal
import itertools

import mpmath
import pytest

from environments.bfcl import catalog
from environments.bfcl.calls import CallSyntaxError
from environments.bfcl.executor import (
    BAD_ARGUMENTS, EXCEPTION, OK, TOOL_ERROR, UNKNOWN_TOOL, ToolEnvironment, named_call, stringify_result,
)

from bfcl_eval.eval_checker.multi_turn_eval import multi_turn_utils as bfcl_utils

_names = itertools.count()


def _bfcl_results(entry, turns):
    """bfcl-eval's own executor on ground-truth call strings (the only strings it is ever given here)."""
    name = f"exectest{next(_names)}"
    out = []
    for calls in turns:
        results, _ = bfcl_utils.execute_multi_turn_func_call(
            list(calls), entry.initial_config, list(entry.involved_classes), name, entry.id,
            long_context=entry.long_context)
        out.append(results)
    for key in [k for k in vars(bfcl_utils) if k.startswith(name + "_")]:
        del vars(bfcl_utils)[key]
    return out


def test_results_match_bfcl_executor_on_all_ground_truth_calls():
    compared = 0
    for entry_id in catalog.all_entry_ids():
        entry = catalog.load_entry(entry_id)
        env = ToolEnvironment.for_entry(entry)
        theirs = _bfcl_results(entry, entry.ground_truth)
        for calls, their_turn in zip(entry.ground_truth, theirs):
            for call, their in zip(calls, their_turn):
                outcome = env.execute(call)
                # Ill-typed ground truth (entry 173 passes a string ticket id) runs here as it does there.
                assert outcome.result == their, (entry_id, call)
                compared += 1
    assert compared > 4500


def test_dict_and_object_calls_give_the_same_result():
    entry = catalog.load_entry("multi_turn_base_0")
    a, b = ToolEnvironment.for_entry(entry), ToolEnvironment.for_entry(entry)
    assert a.execute("cd(folder='workspace')").result == b.execute(
        {"name": "cd", "arguments": {"folder": "workspace"}}).result
    assert a.execute("ls()").result == b.execute({"name": "ls"}).result


def test_positional_ground_truth_arguments_bind_by_signature():
    env = ToolEnvironment(["MathAPI"], {}, False)
    assert env.execute("mean([1, 2, 3])").result == env.execute({"name": "mean", "arguments":
                                                                  {"numbers": [1, 2, 3]}}).result
    outcome = env.execute("add(1, 2, 3)")  # Python's own TypeError, as bfcl-eval's eval of the string gives
    assert outcome.kind == EXCEPTION and outcome.result == (
        "Error during execution: MathAPI.add() takes 3 positional arguments but 4 were given")


def test_named_call_binds_positional_ground_truth():
    assert named_call("sort('final_report.pdf')") == {"name": "sort", "arguments": {"file_name": "final_report.pdf"}}
    assert named_call("cd(folder='a')") == {"name": "cd", "arguments": {"folder": "a"}}
    with pytest.raises(CallSyntaxError, match="sort"):
        named_call("sort('a', 'b')")


def test_outcome_kinds_and_error_texts():
    env = ToolEnvironment(["TravelAPI", "MathAPI"], {}, False)
    ok = env.execute({"name": "add", "arguments": {"a": 1, "b": 2}})
    assert ok.kind == OK and ok.result == '{"result": 3}' and ok.class_name == "MathAPI"
    err = env.execute({"name": "divide", "arguments": {"a": 1, "b": 0}})
    assert err.kind == TOOL_ERROR and err.error == "Cannot divide by zero"
    raised = env.execute({"name": "get_flight_cost", "arguments": {
        "travel_from": "XXX", "travel_to": "YYY", "travel_date": "2024-11-15", "travel_class": "economy"}})
    assert raised.kind == EXCEPTION and raised.result == "Error during execution: No available route for the given airports."
    unknown = env.execute({"name": "teleport", "arguments": {}})
    assert unknown.kind == UNKNOWN_TOOL and unknown.result == "Error during execution: name 'teleport' is not defined"
    missing = env.execute({"name": "add", "arguments": {"a": 1}})
    assert missing.kind == EXCEPTION and missing.problem.param == "b"
    assert missing.result == "Error during execution: MathAPI.add() missing 1 required positional argument: 'b'"
    ill_typed = env.execute({"name": "add", "arguments": {"a": "1", "b": "2"}})  # runs: str + str
    assert ill_typed.kind == OK and ill_typed.result == '{"result": "12"}' and ill_typed.problem.kind == "type"
    huge = env.execute({"name": "add", "arguments": {"a": "1" * 200_000, "b": 1}})
    assert huge.kind == BAD_ARGUMENTS and huge.problem.kind == "too_large"


def test_stringify_follows_bfcl_rules():
    assert stringify_result("x") == "x"
    assert stringify_result({"a": 1.5}) == '{"a": 1.5}'
    assert stringify_result({"a": mpmath.mpf(2)}) == str({"a": mpmath.mpf(2)})  # not JSON-able: str()
    assert stringify_result([{"a": 1}]) == "[{'a': 1}]"
    assert stringify_result(None) == "None"


def test_precision_side_effects_are_restored():
    env = ToolEnvironment(["MathAPI"], {}, False)
    before_prec, before_dps = decimal.getcontext().prec, mpmath.mp.dps
    sqrt = env.execute({"name": "square_root", "arguments": {"number": 2, "precision": 40}})
    log = env.execute({"name": "logarithm", "arguments": {"value": 100, "base": 10, "precision": 30}})
    assert len(sqrt.result) > 40 and log.kind == OK
    assert (decimal.getcontext().prec, mpmath.mp.dps) == (before_prec, before_dps)


def test_errors_raised_while_stringifying_become_error_results():
    env = ToolEnvironment(["MathAPI"], {}, False)
    outcome = env.execute({"name": "power", "arguments": {"base": 7, "exponent": 100_000}})
    assert outcome.kind == EXCEPTION and outcome.result.startswith("Error during execution: Exceeds the limit")


def test_extra_keys_in_a_call_object_are_ignored_as_bfcl_eval_does():
    env = ToolEnvironment(["MathAPI"], {}, False)
    outcome = env.execute({"name": "add", "arguments": {"a": 1, "b": 2}, "id": "call_0", "type": "function"})
    assert outcome.kind == OK and outcome.result == '{"result": 3}'
