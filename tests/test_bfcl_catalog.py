import inspect

import pytest

from environments.bfcl import catalog
from environments.bfcl.executor import api_class


def test_four_categories_of_200_entries_with_answers():
    for category in catalog.CATEGORIES:
        ids = catalog.entry_ids(category)
        assert len(ids) == 200
        assert [catalog.parse_entry_id(i)[1] for i in ids] == list(range(200))
    entry = catalog.load_entry("multi_turn_base_0")
    assert entry.category == "base" and entry.index == 0 and not entry.long_context
    assert entry.num_turns == len(entry.question) == 4
    assert entry.ground_truth[0] and all(isinstance(c, str) for c in entry.ground_truth[0])
    assert set(entry.involved_classes) == {"GorillaFileSystem", "TwitterAPI"}
    assert catalog.load_entry("multi_turn_long_context_7").long_context


def test_bad_ids_are_named_in_the_error():
    with pytest.raises(ValueError, match="multi_turn_base_999"):
        catalog.load_entry("multi_turn_base_999")
    with pytest.raises(ValueError, match="simple_3"):
        catalog.load_entry("simple_3")
    with pytest.raises(ValueError, match="composite"):
        catalog.entry_ids("composite")


def test_documented_tools_are_exactly_the_public_methods_of_each_class():
    total = 0
    for cls_name in catalog.CLASS_NAMES:
        cls = api_class(cls_name)
        public = {n for n, f in vars(cls).items() if inspect.isfunction(f) and not n.startswith("_")}
        assert set(catalog.class_tool_names(cls_name)) == public, cls_name
        total += len(public)
    assert total == 128


def test_schema_conversion_maps_bfcl_types_and_drops_response():
    doc = {
        "name": "demo",
        "description": "d",
        "parameters": {
            "type": "dict",
            "properties": {
                "f": {"type": "float", "description": "x"},
                "t": {"type": "tuple", "items": {"type": "float"}},
                "d": {"type": "dict", "properties": {"i": {"type": "integer"}, "a": {"type": "any"}}},
                "x": {"type": "any", "description": "anything"},
                "l": {"type": "array", "items": {"type": "dict", "properties": {"b": {"type": "boolean"}}}},
            },
            "required": ["f"],
        },
        "response": {"type": "dict", "properties": {"r": {"type": "float"}}},
    }
    tool = catalog.to_json_schema_tool(doc)
    assert tool["type"] == "function" and set(tool["function"]) == {"name", "description", "parameters"}
    params = tool["function"]["parameters"]
    assert params["type"] == "object" and params["required"] == ["f"]
    props = params["properties"]
    assert props["f"] == {"type": "number", "description": "x"}
    assert props["t"] == {"type": "array", "items": {"type": "number"}}
    assert props["d"] == {"type": "object", "properties": {"i": {"type": "integer"}, "a": {}}}
    assert props["x"] == {"description": "anything"}
    assert props["l"]["items"] == {"type": "object", "properties": {"b": {"type": "boolean"}}}
    assert "dict" not in str(catalog.class_tool_schemas("TicketAPI"))
    assert all("response" not in t["function"] for t in catalog.class_tool_schemas("TravelAPI"))


def test_miss_func_tools_are_held_back_until_their_turn():
    entry = catalog.load_entry("multi_turn_miss_func_0")
    assert entry.missed_function == {3: ("sort",)}
    names_before = [t["function"]["name"] for t in catalog.tool_schemas_at(entry, 2)]
    names_after = [t["function"]["name"] for t in catalog.tool_schemas_at(entry, 3)]
    assert "sort" not in names_before and "sort" in names_after
    assert entry.question[3] == ()
    assert entry.turn_messages(3) == [{"role": "user", "content": catalog.ADDED_FUNCTIONS_MESSAGE}]
    assert entry.turn_messages(2) == [dict(m) for m in entry.question[2]]
    # Every miss_func entry holds back tools, and their reveal turn has no question of its own.
    for entry_id in catalog.entry_ids("miss_func"):
        e = catalog.load_entry(entry_id)
        assert e.missed_function and all(e.question[t] == () for t in e.missed_function)


def test_entries_are_immutable_to_callers():
    entry = catalog.load_entry("multi_turn_base_1")
    messages = entry.turn_messages(0)
    messages[0]["content"] = "changed"
    assert catalog.load_entry("multi_turn_base_1").turn_messages(0)[0]["content"] != "changed"
    schema = catalog.tool_schema("cd")
    schema["function"]["name"] = "changed"
    assert catalog.tool_schema("cd")["function"]["name"] == "cd"
