"""Exact answers from tools, not from the model: unit and temperature conversions (pint), clock
times across time zones and weekdays (zoneinfo, with the tzdata package), and arithmetic.

    from chimein.knowledge.tools import tool_answers
    tool_answers(["roast at 325 and my oven is celsius 😑"])
    # [ToolAnswer(kind='convert', text='325 °F = 162.8 °C', …)]

`tool_answers(messages)` reads the last message (and, for "what's that in miles", the quantity in
the few before it) and returns what a library computed, as short passages for the model to copy;
the model never does the arithmetic. It answers only what it recognises; anything else is [].

What it recognises:

- a quantity and a unit to convert it to: "76 cm in inches", "3.4kg is how much in pounds",
  "how many minutes is 2 hours",
  "what's that in miles" (the quantity from a message before), "28 degrees … in fahrenheit" and
  "roast at 325, my oven is celsius" (a bare number or "degrees" with a temperature scale asked
  for: the other scale), 公里 / 英里 / 摄氏 / 华氏 and other Chinese unit names;
- a clock time in one place and another place: "3pm in London, what time is that in Tokyo?";
- the weekday of a date: "what day of the week is 25 December 2026?";
- arithmetic: "what's 17% of 240", "12 * 7.5", "(3 + 4) / 2".

Results are rounded to what a person reads (4 significant digits), never computed by the model.
"""

from __future__ import annotations

import ast
import datetime as dt
import functools
import math
import operator
import re
from dataclasses import dataclass

CONTEXT_MESSAGES = 4  # messages looked back for "what's that in miles"


@dataclass(frozen=True)
class ToolAnswer:
    kind: str  # convert, time, weekday, arithmetic
    text: str  # the passage: e.g. "325 °F = 162.8 °C"
    value: float | str  # the computed result, unrounded (a number) or as text


# unit words as people write them → pint unit names; longest alternatives first in the pattern
UNITS = {
    "°c": "degC", "ºc": "degC", "c": "degC", "celsius": "degC", "centigrade": "degC", "摄氏度": "degC", "摄氏": "degC",
    "°f": "degF", "ºf": "degF", "f": "degF", "fahrenheit": "degF", "华氏度": "degF", "华氏": "degF",
    "kelvin": "kelvin",
    "mm": "millimeter", "millimeters": "millimeter", "millimetres": "millimeter", "毫米": "millimeter",
    "cm": "centimeter", "centimeters": "centimeter", "centimetres": "centimeter", "厘米": "centimeter", "公分": "centimeter",
    "m": "meter", "meters": "meter", "metres": "meter", "meter": "meter", "metre": "meter", "米": "meter",
    "km": "kilometer", "kms": "kilometer", "kilometers": "kilometer", "kilometres": "kilometer", "k": "kilometer",
    "公里": "kilometer", "千米": "kilometer",
    "in": "inch", "inch": "inch", "inches": "inch", "英寸": "inch", "寸": "inch",
    "ft": "foot", "foot": "foot", "feet": "foot", "英尺": "foot",
    "yd": "yard", "yard": "yard", "yards": "yard", "码": "yard",
    "mi": "mile", "mile": "mile", "miles": "mile", "英里": "mile",
    "g": "gram", "gram": "gram", "grams": "gram", "gr": "gram", "克": "gram",
    "kg": "kilogram", "kgs": "kilogram", "kilo": "kilogram", "kilos": "kilogram", "kilogram": "kilogram",
    "kilograms": "kilogram", "公斤": "kilogram", "千克": "kilogram",
    "lb": "pound", "lbs": "pound", "pound": "pound", "pounds": "pound", "磅": "pound",
    "oz": "ounce", "ounce": "ounce", "ounces": "ounce", "盎司": "ounce",
    "stone": "stone", "st": "stone",
    "ml": "milliliter", "milliliters": "milliliter", "millilitres": "milliliter", "毫升": "milliliter",
    "l": "liter", "liter": "liter", "liters": "liter", "litre": "liter", "litres": "liter", "升": "liter",
    "cup": "cup", "cups": "cup", "杯": "cup",
    "tbsp": "tablespoon", "tablespoon": "tablespoon", "tablespoons": "tablespoon",
    "tsp": "teaspoon", "teaspoon": "teaspoon", "teaspoons": "teaspoon",
    "fl oz": "fluid_ounce", "gallon": "gallon", "gallons": "gallon", "pint": "pint", "pints": "pint",
    "km/h": "kilometer_per_hour", "kph": "kilometer_per_hour", "kmh": "kilometer_per_hour",
    "mph": "mile_per_hour", "公里每小时": "kilometer_per_hour",
    "s": "second", "sec": "second", "secs": "second", "second": "second", "seconds": "second", "秒": "second",
    "min": "minute", "mins": "minute", "minute": "minute", "minutes": "minute", "分钟": "minute",
    "h": "hour", "hr": "hour", "hrs": "hour", "hour": "hour", "hours": "hour", "小时": "hour",
    "day": "day", "days": "day", "天": "day", "week": "week", "weeks": "week", "周": "week",
}
SYMBOLS = {"degC": "°C", "degF": "°F", "kelvin": "K", "millimeter": "mm", "centimeter": "cm", "meter": "m",
           "kilometer": "km", "inch": "in", "foot": "ft", "yard": "yd", "mile": "mi", "gram": "g",
           "kilogram": "kg", "pound": "lb", "ounce": "oz", "stone": "st", "milliliter": "ml", "liter": "l",
           "cup": "cups", "tablespoon": "tbsp", "teaspoon": "tsp", "fluid_ounce": "fl oz", "gallon": "gal",
           "pint": "pt", "kilometer_per_hour": "km/h", "mile_per_hour": "mph", "second": "s", "minute": "min",
           "hour": "h", "day": "days", "week": "weeks"}
# one-letter and ambiguous words count as units only right after a number ("76 in" is not asked)
# (and time words: "office hours" asks for no conversion; "how many minutes", "in days" do)
LOOSE = {"c", "f", "m", "k", "in", "g", "l", "st", "gr", "米", "克", "升", "杯", "码", "寸",
         *(word for word, unit in UNITS.items() if unit in ("second", "minute", "hour", "day", "week"))}
TEMPERATURE = {"degC", "degF", "kelvin"}
WARM_WORDS = re.compile(r"\bdegrees?\b|\bdeg\b|°|º|\btemp|\boven\b|\broast|\bbake|\bhot\b|\bcold\b|\bwarm\b|"
                        r"\bfever\b|度|温度|烤", re.I)
_UNIT_ALT = "|".join(re.escape(u) for u in sorted(UNITS, key=len, reverse=True))
NUMBER = r"(?<![0-9A-Za-z.])(-?\d+(?:[.,]\d+)?)"
QUANTITY = re.compile(NUMBER + r"\s*(" + _UNIT_ALT + r")(?![a-z])", re.I)
TARGET = re.compile(r"(?:\b(?:in|into|to|as|how many)\s+|换算成|换成|是多少|等于多少|多少)\s*(" + _UNIT_ALT + r")(?![a-z])|"
                    r"(?<![A-Za-z°º])(" + _UNIT_ALT + r")(?![a-z])", re.I)


@functools.cache
def _registry():
    import pint

    return pint.UnitRegistry()


def _number(text: str) -> float:
    return float(text.replace(",", "."))


def _fmt(x: float) -> str:
    """4 significant digits, no trailing zeros: 162.8, 7.496, 217.5, 59, 0.0338."""
    if x == 0:
        return "0"
    digits = max(0, 3 - math.floor(math.log10(abs(x))))
    out = f"{x:.{digits}f}"
    return out.rstrip("0").rstrip(".") if "." in out else out


def _quantities(text: str) -> list[tuple[float, str]]:
    return [(_number(n), UNITS[u.lower()]) for n, u in QUANTITY.findall(text)]


def _targets(text: str) -> list[str]:
    """Units the message asks for (after "in/to/…", or a unit word on its own, not after a number)."""
    out = []
    spans = [m.span() for m in QUANTITY.finditer(text)]
    for m in TARGET.finditer(text):
        word = m.group(1) or m.group(2)
        if any(a <= m.start(1 if m.group(1) else 2) < b for a, b in spans):
            continue  # the unit of a quantity, not a target
        if m.group(2) and word.lower() in LOOSE:
            continue  # "in", "c", "m" alone are words, not units asked for
        out.append(UNITS[word.lower()])
    return list(dict.fromkeys(out))


def _same_kind(a: str, b: str) -> bool:
    ureg = _registry()
    return a != b and ureg.Unit(a).dimensionality == ureg.Unit(b).dimensionality


def convert(messages: list[str]) -> list[ToolAnswer]:
    """Conversions the last message asks for (see the module docstring)."""
    last = messages[-1]
    targets = _targets(last)
    if not targets:
        return []
    ureg, out = _registry(), []
    found = _quantities(last)
    if not found and TEMPERATURE & set(targets):  # "325 and my oven is celsius", "15 … in F"
        bare = re.findall(NUMBER, last)
        if bare and (WARM_WORDS.search(last) or any(WARM_WORDS.search(m) for m in messages[-CONTEXT_MESSAGES:-1])
                     or any(t in TEMPERATURE for m in messages[-CONTEXT_MESSAGES:-1] for _, t in _quantities(m))):
            target = next(t for t in targets if t in TEMPERATURE)
            found = [(_number(bare[0]), "degF" if target == "degC" else "degC")]
    if not found:  # "what's that in miles": the latest quantity of the kind asked for, before it
        for earlier in reversed(messages[-CONTEXT_MESSAGES:-1]):
            if found := [q for q in _quantities(earlier) if any(_same_kind(q[1], t) for t in targets)]:
                break
    for value, unit in found:
        for target in targets:
            if not _same_kind(unit, target):
                continue
            result = ureg.Quantity(value, unit).to(target).magnitude
            out.append(ToolAnswer("convert", f"{_fmt(value)} {SYMBOLS[unit]} = {_fmt(result)} {SYMBOLS[target]}",
                                  result))
    return out[:3]


# --- time zones and weekdays -------------------------------------------------------------------

CLOCK = re.compile(r"\b(\d{1,2})(?::(\d{2}))?\s*(am|pm|a\.m\.|p\.m\.)?(?![\d:])", re.I)


@functools.cache
def _places() -> dict[str, str]:
    """'tokyo' → 'Asia/Tokyo', 'new york' → 'America/New_York', … (every zoneinfo city)."""
    import zoneinfo

    places = {}
    for name in zoneinfo.available_timezones():
        if "/" in name and not name.startswith(("Etc/", "SystemV/", "US/")):
            places.setdefault(name.rsplit("/", 1)[1].replace("_", " ").lower(), name)
    places |= {"uk": "Europe/London", "england": "Europe/London", "britain": "Europe/London",
               "japan": "Asia/Tokyo", "china": "Asia/Shanghai", "beijing": "Asia/Shanghai",
               "germany": "Europe/Berlin", "france": "Europe/Paris", "india": "Asia/Kolkata",
               "california": "America/Los_Angeles", "san francisco": "America/Los_Angeles",
               "seattle": "America/Los_Angeles", "boston": "America/New_York", "nyc": "America/New_York",
               "washington": "America/New_York", "utc": "UTC", "gmt": "UTC",
               "东京": "Asia/Tokyo", "北京": "Asia/Shanghai", "上海": "Asia/Shanghai", "伦敦": "Europe/London",
               "纽约": "America/New_York", "巴黎": "Europe/Paris", "柏林": "Europe/Berlin", "悉尼": "Australia/Sydney"}
    return places


@functools.cache
def _place_patterns() -> tuple[tuple[str, re.Pattern, str], ...]:
    """(name, its pattern, its zone) for every place: compiled once, not per message (~500 of
    them overflowed `re`'s cache, so every message compiled them all again)."""
    return tuple((place, re.compile(r"(?<![a-z])" + re.escape(place) + r"(?![a-z])"), zone)
                 for place, zone in _places().items())


def _mentioned_places(text: str) -> list[str]:
    low, found = text.lower(), []
    for place, pattern, zone in _place_patterns():
        if place in low:  # the pattern only where the name is
            found += [(m.start(), zone) for m in pattern.finditer(low)]
    return [zone for _, zone in sorted(found)]


def clock_time(messages: list[str], today: dt.date | None = None) -> list[ToolAnswer]:
    """"3pm in London — what time is that in Tokyo?": the time in the second place, on `today`'s date."""
    import zoneinfo

    last = messages[-1]
    zones = list(dict.fromkeys(_mentioned_places(last)))
    times = [m for m in CLOCK.finditer(last) if m.group(2) or m.group(3)]
    if len(zones) < 2 or not times or not re.search(r"\btime\b|几点|时间", last, re.I):
        return []
    m = times[0]
    hour, minute = int(m.group(1)) % 12 if m.group(3) else int(m.group(1)), int(m.group(2) or 0)
    if m.group(3) and m.group(3).lower().startswith("p"):
        hour += 12
    if hour > 23 or minute > 59:
        return []
    day = today or dt.date.today()
    start = dt.datetime.combine(day, dt.time(hour, minute), zoneinfo.ZoneInfo(zones[0]))
    out = []
    for zone in zones[1:]:
        there = start.astimezone(zoneinfo.ZoneInfo(zone))
        shift = "" if there.date() == start.date() else (" the next day" if there.date() > start.date() else " the day before")
        out.append(ToolAnswer("time", f"{start:%H:%M} in {zones[0]} ({day:%d %b %Y}) is {there:%H:%M}{shift} in {zone}",
                              there.isoformat()))
    return out


MONTHS = {m: i + 1 for i, m in enumerate(["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct",
                                           "nov", "dec"])}
DATE = re.compile(r"\b(\d{4})-(\d{2})-(\d{2})\b|\b(\d{1,2})(?:st|nd|rd|th)?\s+([a-z]{3})[a-z]*\.?,?\s+(\d{4})\b|"
                  r"\b([a-z]{3})[a-z]*\.?\s+(\d{1,2})(?:st|nd|rd|th)?,?\s+(\d{4})\b|(\d{4})年(\d{1,2})月(\d{1,2})日", re.I)


def weekday(messages: list[str]) -> list[ToolAnswer]:
    """"What day of the week is 25 December 2026?" → Friday."""
    last = messages[-1]
    if not re.search(r"\bwhat day\b|\bwhich day\b|\bday of the week\b|星期几|周几|礼拜几", last, re.I):
        return []
    out = []
    for m in DATE.finditer(last):
        g = m.groups()
        try:
            if g[0]:
                day = dt.date(int(g[0]), int(g[1]), int(g[2]))
            elif g[3]:
                day = dt.date(int(g[5]), MONTHS[g[4].lower()], int(g[3]))
            elif g[6]:
                day = dt.date(int(g[8]), MONTHS[g[6].lower()], int(g[7]))
            else:
                day = dt.date(int(g[9]), int(g[10]), int(g[11]))
        except (KeyError, ValueError):
            continue
        out.append(ToolAnswer("weekday", f"{day:%d %B %Y} is a {day:%A}", day.strftime("%A")))
    return out


# --- arithmetic --------------------------------------------------------------------------------

OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
       ast.Pow: operator.pow, ast.USub: operator.neg, ast.UAdd: operator.pos}
EXPRESSION = re.compile(r"[-+(]*\d[\d.,]*(?:\s*[-+*/×÷^x]\s*[-+(]*\d[\d.,]*\)*)+")
PERCENT = re.compile(r"(\d+(?:\.\d+)?)\s*%\s*of\s*(\d+(?:[.,]\d+)?)", re.I)
# arithmetic is computed only when asked for: "4-3 on serve" and "leads 2-1" are scores
ASKS = re.compile(r"\?|？|=|\b(?:what(?:'s| is)|how (?:much|many)|calculate|compute|equals?)\b|多少|等于", re.I)
SCORE = re.compile(r"\d{1,2}-\d{1,2}")


def _evaluate(node):
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in OPS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > 100:
            raise ValueError("exponent too large")
        return OPS[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in OPS:
        return OPS[type(node.op)](_evaluate(node.operand))
    raise ValueError("not arithmetic")


def arithmetic(messages: list[str]) -> list[ToolAnswer]:
    """"what's 17% of 240" → 40.8; "12 * 7.5?" → 90 (numbers and + - * / ^ only, parsed, never eval'd),
    when the message asks (a question, "=", "what's", "how much", 多少 …)."""
    last, out = messages[-1], []
    if not ASKS.search(last):
        return []
    for a, b in PERCENT.findall(last):
        value = float(a) / 100 * _number(b)
        out.append(ToolAnswer("arithmetic", f"{_fmt(float(a))}% of {_fmt(_number(b))} = {_fmt(value)}", value))
    if out:
        return out
    for m in EXPRESSION.finditer(last):
        text = m.group(0).replace("×", "*").replace("÷", "/").replace("^", "**").replace("x", "*").replace(",", "")
        if re.fullmatch(r"\d{1,4}([-/])\d{1,2}\1\d{1,4}", m.group(0).strip()) or SCORE.fullmatch(m.group(0)):
            continue  # a date or a score, not a subtraction
        try:
            value = _evaluate(ast.parse(text, mode="eval").body)
        except (SyntaxError, ValueError, ZeroDivisionError, OverflowError):
            continue
        out.append(ToolAnswer("arithmetic", f"{m.group(0).strip()} = {_fmt(float(value))}", float(value)))
    return out


def tool_answers(messages: list[str], today: dt.date | None = None) -> list[ToolAnswer]:
    """Every exact answer the tools find for the last of `messages` (the recent chat, oldest first)."""
    if not messages:
        return []
    return [*convert(messages), *clock_time(messages, today), *weekday(messages), *arithmetic(messages)]
