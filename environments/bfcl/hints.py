"""Actionable environment augmentation: a corrective hint appended to failed tool results.

Written for this project from the classes' documented behaviour; one table of (class, tool, error pattern, hint)
rows covers every class, and call-level problems (unknown tool, bad arguments) get hints built from the schema.
With augmentation off none of this is used and results are plain bfcl-eval feedback.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from environments.bfcl import catalog
from environments.bfcl.executor import BAD_ARGUMENTS, BAD_CALL, EXCEPTION, TOOL_ERROR, UNKNOWN_TOOL, CallOutcome

HINT_PREFIX = "\nHint: "

_FS_NAVIGATE = ("Names are relative to the current directory: call pwd and ls to see where you are, "
                "find(path='.', name=...) to locate an item, and cd one directory level at a time to reach it.")
_CURRENCIES = "USD, RMB, EUR, JPY, GBP, CAD, AUD, INR, RUB, BRL, MXN"


@dataclass(frozen=True)
class HintRule:
    class_name: str
    pattern: re.Pattern
    hint: str
    tools: frozenset[str] = frozenset()  # empty: any tool of the class


def _rule(class_name: str, pattern: str, hint: str, tools: tuple[str, ...] = ()) -> HintRule:
    return HintRule(class_name, re.compile(pattern, re.IGNORECASE), hint, frozenset(tools))


# First matching row wins, so specific rows come before general ones of the same class.
HINT_TABLE: tuple[HintRule, ...] = (
    # GorillaFileSystem
    _rule("GorillaFileSystem", r"Unsupported path|Only one folder level",
          "Paths are not allowed: use cd one directory at a time (cd(folder='a') then cd(folder='b')), "
          "and cd(folder='..') to go up one level."),
    _rule("GorillaFileSystem", r"path not allowed in destination",
          "Give the destination as a bare name in the current directory, not a path; cd into the right "
          "directory first."),
    _rule("GorillaFileSystem", r"Invalid character",
          "File and directory names cannot contain '/': cd into the parent directory and pass the bare name."),
    _rule("GorillaFileSystem", r"Is a directory",
          "That name is a directory: cd into it or ls it; cat, tail, wc, sort and grep work on files."),
    _rule("GorillaFileSystem", r"Not a directory",
          "The destination exists but is a file; pass a directory name (create it with mkdir first if needed)."),
    _rule("GorillaFileSystem", r"File exists",
          "An item with that name already exists here; check with ls or choose another name."),
    _rule("GorillaFileSystem", r"Directory not empty",
          "rmdir only removes empty directories; remove the files inside with rm first."),
    _rule("GorillaFileSystem", r"already the root",
          "You are at the root directory; cd into one of its subdirectories instead."),
    _rule("GorillaFileSystem", r"invalid mode",
          "wc mode must be 'l' (lines), 'w' (words) or 'c' (characters)."),
    _rule("GorillaFileSystem", r"No such (file|directory)|Not a file or directory", _FS_NAVIGATE),
    # MathAPI
    _rule("MathAPI", r"divide by zero", "The divisor must be non-zero."),
    _rule("MathAPI", r"empty list", "Pass a non-empty list of numbers."),
    _rule("MathAPI", r"negative number", "square_root needs a non-negative number."),
    _rule("MathAPI", r"Whole value cannot be zero", "percentage needs a non-zero whole value."),
    _rule("MathAPI", r"Conversion from .* is not supported",
          "Use the unit names listed in the description of si_unit_conversion or imperial_si_conversion."),
    _rule("MathAPI", r"must be (a number|numbers|an integer)|invalid operation",
          "Pass JSON numbers (not strings) for numeric arguments, and an integer where one is required."),
    # MessageAPI
    _rule("MessageAPI", r"No user is currently logged in",
          "Call message_login(user_id=...) first; get_user_id(user=<name>) gives the id of a user name."),
    _rule("MessageAPI", r"Receiver ID .* not found|User .* not found",
          "Message functions take user ids, not names: call get_user_id(user=<name>) first, or list_users to "
          "see who exists."),
    _rule("MessageAPI", r"already exists", "That user is already a contact; no need to add it again."),
    # TwitterAPI
    _rule("TwitterAPI", r"not authenticated",
          "Call authenticate_twitter(username=..., password=...) first, then retry."),
    _rule("TwitterAPI", r"Tweet with ID .* not found",
          "Find the tweet id with get_user_tweets(username=...) or search_tweets(keyword=...)."),
    # TicketAPI
    _rule("TicketAPI", r"not authenticated",
          "Call ticket_login(username=..., password=...) first, then retry."),
    _rule("TicketAPI", r"Ticket with ID .* not found",
          "Ticket ids are integers: list them with get_user_tickets, or use the id returned by create_ticket."),
    _rule("TicketAPI", r"already (closed|resolved)", "That ticket is already in that state; no action needed."),
    _rule("TicketAPI", r"Invalid priority", "priority must be an integer from 1 (lowest) to 5 (highest)."),
    _rule("TicketAPI", r"Invalid fields for update",
          "edit_ticket updates may only contain the keys title, description, status and priority."),
    # TradingBot
    _rule("TradingBot", r"not authenticated",
          "Call trading_login(username=..., password=...) first, then retry."),
    _rule("TradingBot", r"Stock with symbol .* not found|Invalid stock symbol",
          "Get a valid symbol with get_symbol_by_name(name=...) or get_available_stocks(sector=...)."),
    _rule("TradingBot", r"Order with ID .* not found",
          "List your order ids with get_order_history, or use the id returned by place_order."),
    _rule("TradingBot", r"Order is already completed", "Completed orders cannot be cancelled."),
    _rule("TradingBot", r"not found in watchlist", "See the watched symbols with get_watchlist first."),
    _rule("TradingBot", r"Market is closed", "Transactions need an open market; check get_current_time."),
    _rule("TradingBot", r"Insufficient funds", "Check the balance with get_account_info first."),
    _rule("TradingBot", r"must be positive", "Amounts and prices must be positive numbers."),
    # TravelAPI
    _rule("TravelAPI", r"Token not initialized|Invalid access token|Token expired",
          "Call authenticate_travel(...) first and pass the access_token it returns."),
    _rule("TravelAPI", r"airport code|No available route",
          "Use valid airport codes: list_all_airports lists them and get_nearest_airport_by_city(location=...) "
          "maps a city to its airport."),
    _rule("TravelAPI", r"No available exchange rate",
          f"Supported currencies are {_CURRENCIES}; every rate is between USD and one of the others."),
    _rule("TravelAPI", r"Card not registered|Credit card not registered",
          "See registered card ids with get_all_credit_cards, or add the card with register_credit_card first."),
    _rule("TravelAPI", r"Card already registered", "That card is already registered; use its card_id."),
    _rule("TravelAPI", r"Booking not found", "Find booking ids with get_booking_history."),
    _rule("TravelAPI", r"Invalid travel class", "travel_class must be one of economy, business or first."),
    _rule("TravelAPI", r"date (of birth )?format", "Dates use the format YYYY-MM-DD."),
    _rule("TravelAPI", r"another user",
          "Use the traveler's name as registered (see authenticate_travel's user_first_name)."),
    _rule("TravelAPI", r"Insufficient funds|Balance is less than budget limit|Exceeded budget limit",
          "Check get_credit_card_balance and get_budget_fiscal_year first; set_budget_limit changes the limit."),
    # VehicleControlAPI
    _rule("VehicleControlAPI", r"doors must be locked",
          "Call lockDoors(unlock=False, door=[...]) with every unlocked door first."),
    _rule("VehicleControlAPI", r"Brake pedal needs to be pressed|press the brake fully",
          "Call pressBrakePedal(pedalPosition=1.0) first."),
    _rule("VehicleControlAPI", r"Start the engine before",
          "Call startEngine(ignitionMode='START') first (doors locked and brake pressed)."),
    _rule("VehicleControlAPI", r"Fuel tank is empty", "Refuel with fillFuelTank(fuelAmount=...) first."),
    _rule("VehicleControlAPI", r"above the tank capacity",
          "The tank holds 50 gallons: check displayCarStatus(option='fuel') and add at most the difference."),
    _rule("VehicleControlAPI", r"distance not found",
          "estimate_distance takes zipcodes: call get_zipcode_based_on_city(city=...) for each city first."),
    _rule("VehicleControlAPI", r"^404$",
          "This weather service is unavailable; use get_outside_temperature_from_google instead.",
          ("get_outside_temperature_from_weather_com",)),
    _rule("VehicleControlAPI", r"must be between",
          "Keep the value inside the range given in the tool description."),
    _rule("VehicleControlAPI", r"Invalid",
          "Use one of the values listed in the tool's parameter description."),
)


def _param_list(tool_name: str) -> str:
    params = catalog.tool_schema(tool_name)["function"]["parameters"]
    required = set(params.get("required", []))
    parts = [
        f"{name} ({spec.get('type', 'any')}{', required' if name in required else ''})"
        for name, spec in params.get("properties", {}).items()
    ]
    return ", ".join(parts) if parts else "no arguments"


def _unknown_tool_hint(name: str, visible_tools: list[str]) -> str:
    close = difflib.get_close_matches(name, visible_tools, n=3, cutoff=0.5)
    if close:
        return f"There is no tool '{name}'. Closest valid tools: {', '.join(close)}."
    return f"There is no tool '{name}'. Valid tools: {', '.join(visible_tools)}."


def _argument_hint(outcome: CallOutcome) -> str:
    problem = outcome.problem
    params = _param_list(outcome.name)
    if problem is None:
        return f"{outcome.name} takes: {params}."
    if problem.kind == "missing":
        return (f"Add the required parameter '{problem.param}' ({problem.expected or 'any'}); "
                f"{outcome.name} takes: {params}.")
    if problem.kind == "type":
        return f"Parameter '{problem.param}' must be a JSON {problem.expected}; {outcome.name} takes: {params}."
    if problem.kind == "unexpected":
        return f"{outcome.name} takes only: {params}."
    return "Keep arguments short and shallow: plain strings, numbers, lists and objects as the schema says."


def hint_for(outcome: CallOutcome, visible_tools: list[str]) -> str | None:
    """The corrective hint for a failed call, or None when the call succeeded or nothing useful applies."""
    if outcome.kind == UNKNOWN_TOOL:
        return _unknown_tool_hint(outcome.name, visible_tools)
    if outcome.kind == BAD_CALL:
        return 'A tool call is a JSON object {"name": <tool name>, "arguments": {<parameter>: <value>, ...}}.'
    if outcome.kind == BAD_ARGUMENTS or (outcome.problem is not None and outcome.kind in (TOOL_ERROR, EXCEPTION)):
        return _argument_hint(outcome)  # a call that failed with arguments off the schema: the schema is the hint
    if outcome.kind in (TOOL_ERROR, EXCEPTION) and outcome.error is not None:
        for rule in HINT_TABLE:
            if rule.class_name != outcome.class_name or (rule.tools and outcome.name not in rule.tools):
                continue
            if rule.pattern.search(outcome.error):
                return rule.hint
        if outcome.kind == EXCEPTION:
            return f"Check the argument values against the description of {outcome.name}: {_param_list(outcome.name)}."
    return None


def format_error_hint() -> str:
    return ('Write each call as <tool_call>{"name": <tool name>, "arguments": {...}}</tool_call> with valid JSON, '
            "using only the listed tools.")
