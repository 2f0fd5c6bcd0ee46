"""The scripts that teacher-force episodes: the wrong-argument replay differs from the ground truth exactly in
each call's first argument value, with a value of the same type."""

from t3rl_jax.rollout.scripted import FINAL_TEXT, ground_truth_reply, wrong_argument_reply, wrong_value


def test_wrong_values_keep_the_type_and_differ():
    for value, wrong in [(12446, 12447), (2.5, 3.5), (True, False), ("AMZN", "NZMA"), ("abba", "abbax"),
                         (["AAPL", "GOOG"], ["LPAA", "GOOG"]), ({"a": 1, "b": 2}, {"a": 2, "b": 2})]:
        assert wrong_value(value) == wrong and type(wrong_value(value)) is type(value)


def test_wrong_argument_replay_changes_only_the_first_argument_of_each_call():
    # multi_turn_base_122: place_order(order_type='Buy', symbol='AAPL', price=150, amount=100), then
    # get_order_details(order_id=12446), cancel_order(order_id=12446), trading_logout().
    entry = "multi_turn_base_122"
    for turn in range(4):
        truth, wrong = ground_truth_reply(entry, turn, 0), wrong_argument_reply(entry, turn, 0)
        assert [c["name"] for c in wrong["tool_calls"]] == [c["name"] for c in truth["tool_calls"]]
        for t, w in zip(truth["tool_calls"], wrong["tool_calls"]):
            assert list(w["arguments"]) == list(t["arguments"])
            changed = [k for k in t["arguments"] if t["arguments"][k] != w["arguments"][k]]
            assert changed == list(t["arguments"])[:1]
    assert wrong_argument_reply(entry, 0, 0)["tool_calls"][0]["arguments"] == {
        "order_type": "yuB", "symbol": "AAPL", "price": 150, "amount": 100}
    assert wrong_argument_reply(entry, 3, 0) == ground_truth_reply(entry, 3, 0)  # trading_logout() has none
    assert wrong_argument_reply(entry, 0, 1) == {"role": "assistant", "content": FINAL_TEXT}
