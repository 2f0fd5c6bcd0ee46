from environments.bfcl import catalog
from environments.bfcl.arguments import MAX_DEPTH, MAX_STRING_CHARS, check_arguments

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "count": {"type": "integer"},
        "ratio": {"type": "number"},
        "flag": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "opts": {"type": "object", "properties": {"level": {"type": "integer"}}},
        "anything": {},
    },
    "required": ["name", "count"],
}


def kinds(arguments):
    problem = check_arguments(arguments, SCHEMA)
    return None if problem is None else (problem.kind, problem.param)


def test_valid_arguments_pass():
    assert kinds({"name": "a", "count": 3}) is None
    assert kinds({"name": "a", "count": 3, "ratio": 2, "flag": False, "tags": ["x"], "opts": {"level": 1,
                  "extra": "ok"}, "anything": [1, {"a": None}]}) is None
    assert kinds({"name": "a", "count": 3, "ratio": None}) is None  # optional may be null
    assert kinds({"name": "a", "count": 3, "tags": ("x", "y")}) is None


def test_each_problem_kind_names_the_parameter():
    assert kinds({"count": 3}) == ("missing", "name")
    assert kinds({"name": "a", "count": 3, "colour": 1}) == ("unexpected", "colour")
    assert kinds({"name": "a", "count": "3"}) == ("type", "count")
    assert kinds({"name": "a", "count": True}) == ("type", "count")  # bool is not an integer in JSON
    assert kinds({"name": "a", "count": 1.5}) == ("type", "count")
    assert kinds({"name": "a", "count": 1, "ratio": True}) == ("type", "ratio")
    assert kinds({"name": "a", "count": 1, "tags": ["x", 2]}) == ("type", "tags[1]")
    assert kinds({"name": "a", "count": 1, "opts": {"level": "high"}}) == ("type", "opts.level")
    assert kinds({"name": None, "count": 1}) == ("type", "name")  # required may not be null
    assert kinds("not a dict") == ("type", "")


def test_size_and_depth_limits():
    assert kinds({"name": "x" * (MAX_STRING_CHARS + 1), "count": 1})[0] == "too_large"
    deep = []
    for _ in range(100_000):  # far deeper than the interpreter stack; must not recurse
        deep = [deep]
    assert kinds({"name": "a", "count": 1, "anything": deep})[0] == "too_deep"
    shallow = [[[1]]]
    assert kinds({"name": "a", "count": 1, "anything": shallow}) is None
    assert MAX_DEPTH >= 4
    assert kinds({"name": "a", "count": 1, "anything": list(range(20_000))})[0] == "too_large"


def test_type_error_message_carries_the_value():
    problem = check_arguments({"name": "a", "count": "ticket_001"}, SCHEMA)
    assert "'ticket_001'" in problem.message and problem.expected == "integer"


def test_real_schemas_accept_ints_for_numbers():
    params = catalog.tool_schema("add")["function"]["parameters"]
    assert check_arguments({"a": 1, "b": 2.5}, params) is None
    assert check_arguments({"a": "1", "b": 2.5}, params).param == "a"
