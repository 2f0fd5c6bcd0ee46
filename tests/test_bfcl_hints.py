import pytest

from environments.bfcl import catalog, hints
from environments.bfcl.episode import Episode

# (entry, calls, substring the hint of the LAST call must contain): one realistic failure per class at least.
CASES = [
    ("multi_turn_base_0", [{"name": "cd", "arguments": {"folder": "workspace/document"}}], "cd one directory"),
    ("multi_turn_base_0", [{"name": "cat", "arguments": {"file_name": "missing.txt"}}], "ls"),
    ("multi_turn_base_0", [{"name": "cd", "arguments": {"folder": "workspace"}},
                           {"name": "mv", "arguments": {"source": "document", "destination": "a/b"}}], "bare name"),
    ("multi_turn_base_15", [{"name": "divide", "arguments": {"a": 1, "b": 0}}], "non-zero"),
    ("multi_turn_base_15", [{"name": "mean", "arguments": {"numbers": []}}], "non-empty"),
    ("multi_turn_base_6", [{"name": "send_message", "arguments": {"receiver_id": "USR999", "message": "hi"}}],
     "message_login"),
    ("multi_turn_base_0", [{"name": "post_tweet", "arguments": {"content": "hello"}}], "authenticate_twitter"),
    ("multi_turn_base_173", [{"name": "get_ticket", "arguments": {"ticket_id": 987654}}], "get_user_tickets"),
    ("multi_turn_base_23", [{"name": "edit_ticket", "arguments": {"ticket_id": 7423, "updates": {"owner": "x"}}}],
     "title, description, status and priority"),
    ("multi_turn_base_151", [{"name": "get_flight_cost", "arguments": {
        "travel_from": "Paris", "travel_to": "LAX", "travel_date": "2024-11-15", "travel_class": "economy"}}],
     "list_all_airports"),
    ("multi_turn_base_151", [{"name": "compute_exchange_rate", "arguments": {
        "base_currency": "USD", "target_currency": "XYZ", "value": 10.0}}], "RMB, EUR"),
    ("multi_turn_base_151", [{"name": "book_flight", "arguments": {
        "access_token": "wrong", "card_id": "1", "travel_date": "2024-11-15", "travel_from": "SFO",
        "travel_to": "LAX", "travel_class": "economy"}}], "authenticate_travel"),
]


def _entry_with(class_name: str) -> str:
    return next(i for i in catalog.entry_ids("base") if class_name in catalog.load_entry(i).involved_classes)


def _last_result(entry_id, calls, augment):
    return Episode(entry_id, augment=augment).step(calls)[-1]


def test_every_class_has_table_rows():
    covered = {rule.class_name for rule in hints.HINT_TABLE}
    assert covered == set(catalog.CLASS_NAMES)


def test_hints_for_realistic_failures():
    import re

    for entry_id, calls, expected in CASES:
        entry = catalog.load_entry(entry_id)
        names = {c["name"] for c in calls}
        if not names <= set(entry.tool_names_at(0)):
            cls = catalog.tool_doc(calls[-1]["name"])[0]
            entry_id = _entry_with(cls)
        plain = _last_result(entry_id, calls, augment=False)
        augmented = _last_result(entry_id, calls, augment=True)
        assert hints.HINT_PREFIX not in plain
        assert augmented.startswith(plain + hints.HINT_PREFIX), (entry_id, calls, augmented)
        assert re.search(expected, augmented.split(hints.HINT_PREFIX, 1)[1]), (calls, augmented)


def test_hints_for_vehicle_and_trading_dependency_order():
    vehicle = _entry_with("VehicleControlAPI")
    result = _last_result(vehicle, [{"name": "setCruiseControl", "arguments": {
        "speed": 65, "activate": True, "distanceToNextVehicle": 100}}], augment=True)
    assert "Call startEngine(ignitionMode='START') first" in result
    result = _last_result(vehicle, [{"name": "startEngine", "arguments": {"ignitionMode": "START"}}], True)
    assert "pressBrakePedal(pedalPosition=1.0)" in result
    result = _last_result(vehicle, [{"name": "estimate_distance", "arguments": {
        "cityA": "Rivermist", "cityB": "Stonebrook"}}], True)
    assert "get_zipcode_based_on_city" in result
    weather = _last_result(vehicle, [{"name": "get_outside_temperature_from_weather_com", "arguments": {}}], True)
    assert "get_outside_temperature_from_google" in weather
    trading = _entry_with("TradingBot")
    result = _last_result(trading, [{"name": "get_stock_info", "arguments": {"symbol": "ZZZZQ"}}], augment=True)
    assert "get_symbol_by_name" in result


def test_call_level_hints():
    entry = "multi_turn_base_0"
    unknown = _last_result(entry, [{"name": "change_dir", "arguments": {"folder": "x"}}], augment=True)
    assert "Closest valid tools" in unknown or "Valid tools" in unknown
    typo = _last_result(entry, [{"name": "mkdirr", "arguments": {"dir_name": "x"}}], augment=True)
    assert "Closest valid tools: mkdir" in typo
    missing = _last_result(entry, [{"name": "mv", "arguments": {"source": "a"}}], augment=True)
    assert "required parameter 'destination' (string)" in missing
    wrong_type = _last_result(entry, [{"name": "tail", "arguments": {"file_name": "a", "lines": "5"}}], True)
    assert "'lines' must be a JSON integer" in wrong_type
    extra = _last_result(entry, [{"name": "pwd", "arguments": {"path": "/"}}], augment=True)
    assert "pwd takes only: no arguments" in extra


def test_successful_calls_get_no_hint():
    assert hints.HINT_PREFIX not in _last_result("multi_turn_base_0", [{"name": "ls", "arguments": {}}], True)


def test_format_error_feedback():
    plain = Episode("multi_turn_base_0").record_format_error("invalid JSON")
    augmented = Episode("multi_turn_base_0", augment=True).record_format_error("invalid JSON")
    assert "invalid JSON" in plain and hints.HINT_PREFIX not in plain
    assert "<tool_call>" in augmented


@pytest.mark.parametrize("rule", hints.HINT_TABLE, ids=lambda r: f"{r.class_name}:{r.pattern.pattern[:30]}")
def test_rules_name_only_real_tools(rule):
    # Hints must not send the model to tools that do not exist.
    import re

    all_tools = {n for c in catalog.CLASS_NAMES for n in catalog.class_tool_names(c)}
    mentioned = set(re.findall(r"\b([a-z_A-Z]+)\(", rule.hint)) | set(
        w for w in re.findall(r"\b([a-z]+_[a-z_]+)\b", rule.hint))
    params = {p for n in all_tools for p in catalog.tool_schema(n)["function"]["parameters"]["properties"]}
    assert mentioned - params <= all_tools, mentioned - params - all_tools
    assert rule.tools <= all_tools
