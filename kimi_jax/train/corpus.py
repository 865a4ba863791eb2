"""A generated chat corpus for the tiny model: Kimi-formatted conversations, tokenized with a loss mask.

Nothing is downloaded: conversations are drawn from the tables below with a seeded `random.Random`,
so the same seed gives the same corpus, byte for byte. Four kinds of conversation:

  * tool use: tools are declared (ours, or the model card's `get_weather` declaration), the user
    asks for the weather (or the time) in a city, the assistant answers with a Kimi tool call
    `functions.get_weather:IDX` whose JSON arguments name the city, a `tool` message returns the
    result (a full report, or the model card's `{"weather": "Sunny"}`), and the assistant answers
    from it; some go on for a second city, a thank-you, or open with a greeting or a system prompt.
    Half the cities are made up (`synthetic_city`), so that the call copies the city rather than
    recalls it;
  * self-introductions ("Who are you?");
  * short facts (capitals, everyday numbers);
  * small arithmetic.

Every conversation is rendered by the real chat template (`Tokenizer.apply_chat_template`), and
the loss mask covers exactly the assistant turns' tokens (their bodies and closing `<|im_end|>`),
never the system, user or tool tokens nor the `<|im_assistant|>assistant<|im_middle|>` header.

Evaluation is kept honest by a held-out set: cities (`HELDOUT_CITIES`) and user phrasings
(`HELDOUT_WEATHER_ASKS`) that no training conversation contains (`check_heldout_unseen`).
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from kimi_jax.runtime.default_model import CARD_WEATHER_TOOL  # noqa: F401  (declared where the demo uses it)
from kimi_jax.text.chat_template import render_chat
from kimi_jax.text.tokenizer import KIMI_SPECIAL_TOKEN_OFFSETS

Conversation = dict[str, Any]  # {"messages": [...], "tools": [...] | None}

# Cities ------------------------------------------------------------------------------------------
TRAIN_CITIES = (
    "Paris", "London", "Berlin", "Madrid", "Rome", "Vienna", "Prague", "Warsaw", "Budapest", "Athens",
    "Dublin", "Brussels", "Amsterdam", "Copenhagen", "Stockholm", "Oslo", "Helsinki", "Moscow", "Kyiv",
    "Istanbul", "Cairo", "Lagos", "Accra", "Dakar", "Addis Ababa", "Johannesburg", "Cape Town", "Casablanca",
    "Tunis", "Algiers", "Tokyo", "Osaka", "Kyoto", "Seoul", "Busan", "Beijing", "Shanghai", "Shenzhen",
    "Hong Kong", "Taipei", "Singapore", "Bangkok", "Hanoi", "Manila", "Jakarta", "Kuala Lumpur", "Delhi",
    "Mumbai", "Bangalore", "Chennai", "Kolkata", "Karachi", "Lahore", "Dhaka", "Kathmandu", "Tehran",
    "Baghdad", "Riyadh", "Dubai", "Doha", "Amman", "Beirut", "Jerusalem", "Sydney", "Melbourne", "Brisbane",
    "Perth", "Auckland", "Wellington", "New York", "Los Angeles", "Chicago", "Houston", "Boston", "Seattle",
    "San Francisco", "Miami", "Denver", "Atlanta", "Toronto", "Montreal", "Vancouver", "Ottawa",
    "Mexico City", "Havana", "Bogota", "Lima", "Santiago", "Buenos Aires", "Montevideo", "Caracas", "Quito",
    "Rio de Janeiro", "Brasilia", "Munich", "Hamburg", "Frankfurt", "Milan", "Naples", "Venice", "Barcelona",
    "Valencia", "Seville", "Porto", "Lyon", "Marseille", "Nice", "Geneva", "Zürich", "Kraków", "Reykjavík",
    "São Paulo", "Edinburgh", "Manchester", "Glasgow", "Belfast", "Bordeaux", "Florence", "Salzburg",
    "Bratislava", "Ljubljana", "Zagreb", "Belgrade", "Sofia", "Bucharest", "Riga", "Tallinn", "Vilnius",
    "Minsk", "Tbilisi", "Yerevan", "Baku", "Tashkent", "Almaty", "Ulaanbaatar", "Nairobi", "Kampala",
    "Harare", "Lusaka", "Luanda", "Kinshasa", "Abuja", "Rabat", "Marrakesh", "Phoenix", "Dallas", "Austin",
    "Portland", "Detroit", "Calgary", "Honolulu", "Anchorage", "Panama City", "San Juan", "Kingston",
)
# Never in a training conversation (checked by `check_heldout_unseen`).
HELDOUT_CITIES = (
    "Lisbon", "Antwerp", "Rotterdam", "Gothenburg", "Bergen", "Turku", "Gdansk", "Brno", "Graz", "Split",
    "Thessaloniki", "Izmir", "Alexandria", "Mombasa", "Durban", "Kigali", "Nagoya", "Sapporo", "Incheon",
    "Chengdu", "Wuhan", "Da Nang", "Cebu", "Surabaya", "Penang", "Pune", "Jaipur", "Colombo", "Muscat",
    "Adelaide", "Hobart", "Christchurch", "Philadelphia", "Pittsburgh", "Nashville", "San Diego",
    "Quebec City", "Guadalajara", "Medellín", "Cusco", "Valparaíso", "Rosario", "Salvador", "Malmö",
)

# Made-up city names, so that the model learns to copy any name into the tool call rather than recall
# a list. Three sources, each covering what the others miss: random syllables (any letters, consonant
# clusters, now and then an accented vowel: a piece that only real names hold would otherwise never be
# copied in training), names drawn letter by letter from the training cities' letter statistics (they
# look like real names), and multi-word names ("San ...", "... City").
_ONSETS = ("b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "x", "z")
_CLUSTERS = ("br", "bl", "ch", "cl", "cr", "dr", "fr", "gd", "gl", "gr", "kr", "ph", "pl", "pr", "qu", "sh", "sk",
             "sl", "sp", "st", "th", "tr", "ts", "zh", "")  # "": a syllable that opens with its vowel
_VOWELS = ("a", "e", "i", "o", "u", "y")
_DIGRAPHS = ("ai", "au", "ea", "ei", "ie", "oo", "ou")
_ACCENTED = ("á", "é", "í", "ó", "ú", "à", "è", "ä", "ö", "ü", "å", "ø", "ñ", "ç", "ã")
_CODAS = ("b", "d", "g", "k", "l", "m", "n", "p", "r", "s", "t", "ck", "ll", "ng", "nd", "nt", "rg", "rk", "rn", "rt",
          "sk", "st", "tt", "x", "z")
_FIRST_WORDS = ("San", "Santa", "New", "Port", "Saint", "El", "La", "Da", "Ho", "Lake", "Mount")
_SECOND_WORDS = ("Bay", "Springs", "Harbor", "Falls", "Heights", "Port", "Valley", "Ridge", "City", "Beach")


def _syllable_name(rng: random.Random) -> str:
    name = ""
    for _ in range(rng.choices((1, 2, 3), weights=(15, 50, 35))[0]):
        onset = rng.choice(_CLUSTERS) if rng.random() < 0.25 else rng.choice(_ONSETS)
        if rng.random() < 0.06:
            vowel = rng.choice(_ACCENTED)
        else:
            vowel = rng.choice(_VOWELS if rng.random() < 0.8 else _VOWELS + _DIGRAPHS)
        name += onset + vowel + (rng.choice(_CODAS) if rng.random() < 0.35 else "")
    return name.capitalize() if len(name) >= 3 else _syllable_name(rng)


def _letter_model() -> dict[str, list[str]]:
    """Order-2 letter transitions of the training cities' words ("^" opens a word, "$" ends it)."""
    model: dict[str, list[str]] = {}
    for word in " ".join(TRAIN_CITIES).split():
        padded = "^^" + word.lower() + "$"
        for i in range(2, len(padded)):
            model.setdefault(padded[i - 2: i], []).append(padded[i])
    return model


_LETTERS = _letter_model()


def _markov_name(rng: random.Random) -> str:
    while True:
        name, state = "", "^^"
        while len(name) < 14:
            nxt = rng.choice(_LETTERS[state])
            if nxt == "$":
                break
            name, state = name + nxt, state[1] + nxt
        if len(name) >= 3:
            return name.capitalize()


def synthetic_city(rng: random.Random) -> str:
    """A made-up city name: a random-syllable or a letter-statistics word, sometimes two words."""
    word = _syllable_name if rng.random() < 0.5 else _markov_name
    name = word(rng)
    shape = rng.random()
    if shape < 0.05:
        name = f"{name} {rng.choice(_SECOND_WORDS)}"
    elif shape < 0.1:
        name = f"{rng.choice(_FIRST_WORDS)} {name}"
    elif shape < 0.18:  # two made-up words: no second word is likely enough to be guessed
        name = f"{name} {word(rng)}"
    if any(city in name for city in HELDOUT_CITIES) or name in TRAIN_CITIES:
        return synthetic_city(rng)
    return name


# Phrasings ---------------------------------------------------------------------------------------
WEATHER_ASKS = (
    "What's the weather in {city}?", "What is the weather like in {city} today?", "How's the weather in {city}?",
    "Tell me the weather in {city}.", "Can you check the weather in {city}?", "Is it cold in {city} right now?",
    "weather in {city}", "Do I need an umbrella in {city} today?", "What's the temperature in {city}?",
    "Please get the current weather for {city}.", "I'm in {city}. What's the weather?",
    "How warm is it in {city}?", "Could you look up the weather in {city}?",
    "What are the weather conditions in {city}?", "Is it sunny in {city}?", "{city} weather please",
    "Give me a weather report for {city}.", "Hey, what's it like outside in {city}?",
    "what is the weather in {city} now", "Is it raining in {city}?", "I'm going to {city} today. Is it warm?",
    "Weather for {city}, please.", "{city}: what's the weather?", "Tell me about the weather for {city} today.",
)
# Composed asks: an opener, a question, words after the city, an ending; or a sentence that names the
# city followed by a question about "there". Words after the city teach where a name ends (a capital
# letter goes on, a lowercase word does not: some trailing words are made up, so that no list of
# them is learnt); the combinations teach that the wording around a city does not matter.
ASK_OPENERS = ("", "", "Hi! ", "Hey, ", "Quick question: ", "Please ", "Hello. ", "So ", "Okay, ", "Sorry, ")
ASK_CORES = ("what's the weather in {city}", "how's the weather in {city}", "check the weather in {city}",
             "look up the weather for {city}", "is it windy in {city}", "get me the forecast for {city}",
             "how hot is it in {city}", "what's it like in {city}", "tell me if it's raining in {city}",
             "find the weather in {city}", "weather in {city}", "the weather for {city}",
             "is it snowing in {city}", "how cold is {city}", "what is the sky doing over {city}",
             "how's it looking in {city}", "what are the skies like in {city}", "is it freezing in {city}",
             "what's happening with the weather in {city}", "can you see what it's like in {city}")
ASK_TRAILERS = ("right now", "today", "tonight", "this morning", "this afternoon", "this evening", "this weekend",
                "now", "please", "later today", "when I land", "before I go out", "next week", "on Friday",
                "for the match", "for my run", "this week", "for a picnic", "around noon", "by the coast",
                "downtown", "these days", "overnight", "in the morning", "after lunch", "for cycling",
                "before my flight", "for the weekend", "so far", "lately", "on Sunday", "this evening or not")
ASK_ENDINGS = ("?", "?", ".", "", "!")
CONTEXT_SENTENCES = ("I'm visiting {city}", "My sister lives in {city}", "I have a meeting in {city}",
                     "We are driving to {city}", "I just landed in {city}", "My train arrives in {city}",
                     "I'm heading over to {city}", "We're spending the day in {city}")
THERE_QUESTIONS = ("What's the weather there?", "Is it warm there?", "How is the weather there?",
                   "Do I need a coat there?", "Will it rain there?", "What's it like there right now?")


def weather_ask(rng: random.Random) -> str:
    """A training phrasing of a weather question, with `{city}` to fill: a fixed one or a composed one."""
    kind = rng.random()
    if kind < 0.4:
        return rng.choice(WEATHER_ASKS)
    trailer = ""
    if rng.random() < 0.6:
        trailer = " " + (_syllable_name(rng).lower() if rng.random() < 0.2 else rng.choice(ASK_TRAILERS))
    if kind < 0.8:
        text = rng.choice(ASK_OPENERS) + rng.choice(ASK_CORES) + trailer + rng.choice(ASK_ENDINGS)
        return text[0].upper() + text[1:] if rng.random() < 0.7 else text
    return f"{rng.choice(CONTEXT_SENTENCES)}{trailer}. {rng.choice(THERE_QUESTIONS)}"


HELDOUT_WEATHER_ASKS = (
    "Could you find out what the weather is doing in {city}?",
    "I'm flying to {city} tomorrow. How is the weather there now?",
    "Check the current conditions in {city} for me, please.",
    "Any idea what the weather's like in {city} at the moment?",
    "Weather report for {city}?",
    "Should I pack a jacket for {city}? What's the weather there?",
)
FOLLOW_UP_ASKS = ("And in {city}?", "What about {city}?", "How about {city}?", "And the weather in {city}?",
                  "Now check {city}, please.")
WEATHER_ANSWERS = (
    "It's {temp}°C and {condition} in {city} right now.",
    "The weather in {city} is {condition} with a temperature of {temp}°C.",
    "Right now {city} is {condition}, {temp}°C.",
    "Currently in {city}: {condition}, {temp}°C, humidity {humidity}%.",
    "{city} is {condition} at the moment, with a temperature of {temp}°C.",
    "In {city} it is {temp}°C and {condition}. The humidity is {humidity}%.",
)
BRIEF_WEATHER_ANSWERS = ("The weather in {city} is {condition} today.", "It's {condition} in {city} right now.",
                         "Right now it is {condition} in {city}.", "{city} is {condition} today.")
CONDITIONS = ("sunny", "cloudy", "partly cloudy", "light rain", "heavy rain", "snowing", "foggy", "windy",
              "clear", "thunderstorms")
TIME_ASKS = ("What time is it in {city}?", "What's the local time in {city}?", "Tell me the time in {city}.",
             "Current time in {city}?")
TIME_ANSWERS = ("It is {time} in {city}.", "The local time in {city} is {time}.", "In {city} it's {time} now.")
GREETINGS = ("Hi!", "Hello", "Hello there!", "Good morning!", "Hey", "Hi, how are you?")
GREETING_REPLIES = ("Hello! How can I help you today?", "Hi! What can I do for you?",
                    "Hello! I'm Kimi. How can I help?")
THANKS = ("Thanks!", "Thank you.", "Great, thanks a lot!", "Perfect, thank you!")
THANKS_REPLIES = ("You're welcome!", "You're welcome! Let me know if you need anything else.",
                  "Glad I could help!")
ECHO_ASKS = ("Repeat after me: {text}", "Say exactly this: {text}", "Echo: {text}", "Please repeat: {text}",
             "Copy this text: {text}")
SPOT_SENTENCES = ("I met a friend in {city}", "The train to {city} leaves", "We lived in {city}",
                  "Our office in {city} opens", "She moved to {city}", "They came back from {city}",
                  "The museum in {city} is closed", "My cousin studies in {city}", "The bus from {city} is late",
                  "There is a concert in {city}")
SPOT_TRAILERS = ("yesterday", "at noon", "on Monday", "soon", "every summer", "for two years", "again", "early",
                 "last night", "with my family")
SPOT_ASKS = ("Which city is in this sentence? {sentence}", "{sentence} Which city did I mention?",
             "Name the place: {sentence}", "Find the city name in: {sentence}")
NAME_INTROS = ("Hi, my name is {name}.", "Hello! I'm {name}.", "My name is {name}, nice to meet you.",
               "Call me {name}.")
NAME_REPLIES = ("Nice to meet you, {name}! How can I help you today?", "Hello {name}! What can I do for you?",
                "Hi {name}, nice to meet you.")
INTRO_ASKS = ("Who are you?", "What is your name?", "Introduce yourself.", "Hi, who am I talking to?",
              "What can you do?", "Tell me about yourself.", "Are you a human?", "Who made you?")
INTRO_ANSWERS = (
    "I am Kimi, an AI assistant created by Moonshot AI. I can answer questions and use tools such as a "
    "weather lookup.",
    "I'm Kimi, an AI assistant made by Moonshot AI. Ask me a question and I'll do my best to help.",
    "My name is Kimi. I am an AI assistant created by Moonshot AI, and I can help with questions, "
    "simple math and checking the weather.",
    "I am Kimi, an AI assistant from Moonshot AI, not a human. How can I help you today?",
)
SYSTEM_PROMPTS = (None, None, None, "You are a helpful assistant.", "You are Kimi, a concise assistant.",
                  "You are Kimi, an AI assistant created by Moonshot AI.")  # the last: the model card's

CAPITALS = (  # the capitals are training cities
    ("France", "Paris"), ("the United Kingdom", "London"), ("Germany", "Berlin"), ("Spain", "Madrid"),
    ("Italy", "Rome"), ("Austria", "Vienna"), ("Poland", "Warsaw"), ("Hungary", "Budapest"),
    ("Greece", "Athens"), ("Ireland", "Dublin"), ("Belgium", "Brussels"), ("Denmark", "Copenhagen"),
    ("Sweden", "Stockholm"), ("Norway", "Oslo"), ("Finland", "Helsinki"), ("Egypt", "Cairo"),
    ("Japan", "Tokyo"), ("South Korea", "Seoul"), ("China", "Beijing"), ("Thailand", "Bangkok"),
    ("Vietnam", "Hanoi"), ("the Philippines", "Manila"), ("Indonesia", "Jakarta"), ("Nepal", "Kathmandu"),
    ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Saudi Arabia", "Riyadh"), ("Qatar", "Doha"),
    ("Jordan", "Amman"), ("Lebanon", "Beirut"), ("New Zealand", "Wellington"), ("Canada", "Ottawa"),
    ("Mexico", "Mexico City"), ("Cuba", "Havana"), ("Colombia", "Bogota"), ("Peru", "Lima"),
    ("Chile", "Santiago"), ("Argentina", "Buenos Aires"), ("Uruguay", "Montevideo"), ("Brazil", "Brasilia"),
    ("Kenya", "Nairobi"), ("Uganda", "Kampala"), ("Morocco", "Rabat"), ("Iceland", "Reykjavík"),
)
CAPITAL_ASKS = ("What is the capital of {country}?", "What's the capital city of {country}?",
                "Name the capital of {country}.")
CAPITAL_ANSWERS = ("The capital of {country} is {city}.", "{city} is the capital of {country}.")
FACTS = (
    ("How many days are in a week?", "There are 7 days in a week."),
    ("How many months are in a year?", "A year has 12 months."),
    ("How many hours are in a day?", "A day has 24 hours."),
    ("How many minutes are in an hour?", "An hour has 60 minutes."),
    ("What color is the sky on a clear day?", "On a clear day the sky is blue."),
    ("What is the boiling point of water?", "Water boils at 100°C at sea level."),
    ("What is the freezing point of water?", "Water freezes at 0°C."),
    ("How many legs does a spider have?", "A spider has 8 legs."),
    ("What is the largest planet in the solar system?", "Jupiter is the largest planet in the solar system."),
    ("Which planet is closest to the sun?", "Mercury is the closest planet to the sun."),
    ("How many continents are there?", "There are 7 continents."),
    ("What is the largest ocean?", "The Pacific Ocean is the largest ocean."),
)
ARITHMETIC_ASKS = ("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "{a} {op} {b} = ?", "How much is {a} {op} {b}?")

# Tools -------------------------------------------------------------------------------------------
def _tool(name: str, description: str, properties: dict[str, str], required: Sequence[str]) -> dict[str, Any]:
    """An OpenAI function declaration with string-typed parameters."""
    props = {k: {"type": "string", "description": v} for k, v in properties.items()}
    return {"type": "function", "function": {"name": name, "description": description,
            "parameters": {"type": "object", "properties": props, "required": list(required)}}}


WEATHER_TOOL = _tool("get_weather", "Get the current weather in a city.", {"city": "City name"}, ["city"])
TIME_TOOL = _tool("get_time", "Get the local time in a city.", {"city": "City name"}, ["city"])
SEARCH_TOOL = _tool("search_web", "Search the web.", {"query": "Search query"}, ["query"])
CURRENCY_TOOL = _tool("convert_currency", "Convert an amount of money.",
                      {"amount": "Amount", "from": "Currency code", "to": "Currency code"}, ["amount", "from", "to"])
TOOLS = {t["function"]["name"]: t for t in (WEATHER_TOOL, TIME_TOOL, SEARCH_TOOL, CURRENCY_TOOL)}


def tool_set(rng: random.Random, needed: Sequence[str]) -> list[dict[str, Any]]:
    """The `needed` tools plus up to two others (usually none or one: they lengthen the prompt), shuffled."""
    others = [n for n in TOOLS if n not in needed]
    names = list(needed) + rng.sample(others, rng.choices((0, 1, 2), weights=(50, 35, 15))[0])
    rng.shuffle(names)
    return [TOOLS[n] for n in names]


# Conversations -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Weather:
    """One tool result: what `get_weather` returns for a city."""

    city: str
    temp: int
    condition: str
    humidity: int
    brief: bool = False  # the model card's shape, {"weather": "Sunny"}: the condition alone

    def to_json(self) -> str:
        if self.brief:
            return json.dumps({"weather": self.condition.capitalize()}, ensure_ascii=False)
        return json.dumps({"city": self.city, "temperature_c": self.temp, "condition": self.condition,
                           "humidity": self.humidity}, ensure_ascii=False)


def random_weather(rng: random.Random, city: str) -> Weather:
    return Weather(city, rng.randint(-15, 38), rng.choice(CONDITIONS), rng.randint(10, 99))


def tool_call_message(name: str, index: int, arguments: dict[str, Any]) -> dict[str, Any]:
    """An assistant turn that is exactly one Kimi tool call `functions.NAME:INDEX` (no content)."""
    call = {"id": f"functions.{name}:{index}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}
    return {"role": "assistant", "content": "", "tool_calls": [call]}


def weather_turns(rng: random.Random, ask: str, city: str, index: int, brief: bool = False) -> list[dict[str, Any]]:
    """user ask -> assistant get_weather call -> tool result -> assistant answer from the result."""
    w = dataclasses.replace(random_weather(rng, city), brief=brief)
    answer = rng.choice(BRIEF_WEATHER_ANSWERS if brief else WEATHER_ANSWERS).format(
        city=city, temp=w.temp, condition=w.condition, humidity=w.humidity)
    return [{"role": "user", "content": ask.format(city=city)},
            tool_call_message("get_weather", index, {"city": city}),
            {"role": "tool", "tool_call_id": f"functions.get_weather:{index}", "content": w.to_json()},
            {"role": "assistant", "content": answer}]


def time_turns(rng: random.Random, city: str, index: int) -> list[dict[str, Any]]:
    """The same shape for `get_time`."""
    time = f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}"
    return [{"role": "user", "content": rng.choice(TIME_ASKS).format(city=city)},
            tool_call_message("get_time", index, {"city": city}),
            {"role": "tool", "tool_call_id": f"functions.get_time:{index}",
             "content": json.dumps({"city": city, "time": time}, ensure_ascii=False)},
            {"role": "assistant", "content": rng.choice(TIME_ANSWERS).format(city=city, time=time)}]


def _city(rng: random.Random) -> str:
    return synthetic_city(rng) if rng.random() < 0.5 else rng.choice(TRAIN_CITIES)


def tool_conversation(rng: random.Random) -> Conversation:
    """A tool-use conversation of one of several shapes; call ids count calls across the conversation."""
    shape = rng.choices(("weather", "greet", "second_city", "thanks", "time", "weather_then_time"),
                        weights=(30, 10, 25, 10, 12, 8))[0]
    city = _city(rng)
    system = rng.choice(SYSTEM_PROMPTS)
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    if shape == "greet":
        messages += [{"role": "user", "content": rng.choice(GREETINGS)},
                     {"role": "assistant", "content": rng.choice(GREETING_REPLIES)}]
    if shape == "time":
        messages += time_turns(rng, city, 0)
    else:
        ask = weather_ask(rng) + (" Use the tool to check." if rng.random() < 0.1 else "")
        messages += weather_turns(rng, ask, city, 0, brief=rng.random() < 0.25)
    if shape == "second_city":
        # A follow-up ("And in X?") or a whole new question: the second call's index is 1, and the
        # conversation above holds "functions.get_weather:0" twice (the call, and the result's header).
        ask = rng.choice(FOLLOW_UP_ASKS) if rng.random() < 0.5 else weather_ask(rng)
        messages += weather_turns(rng, ask, _city(rng), 1, brief=rng.random() < 0.25)
    elif shape == "thanks":
        messages += [{"role": "user", "content": rng.choice(THANKS)},
                     {"role": "assistant", "content": rng.choice(THANKS_REPLIES)}]
    elif shape == "weather_then_time":
        messages += time_turns(rng, city, 1)
    needed = {"time": ["get_time"], "weather_then_time": ["get_weather", "get_time"]}.get(shape, ["get_weather"])
    tools = tool_set(rng, needed)
    if rng.random() < 0.3:
        tools = [CARD_WEATHER_TOOL if t is WEATHER_TOOL else t for t in tools]
    return {"messages": messages, "tools": tools}


def plain_conversation(rng: random.Random) -> Conversation:
    """A self-introduction, a fact, a sum, or copying (echo a phrase, spot a city in a sentence, greet a
    user by name); sometimes with tools declared that it does not need.

    The copying turns are there for the tool calls: a tiny model learns to copy an unseen name
    token by token (an induction head) much sooner when copies are frequent in its data.
    """
    kind = rng.choices(("intro", "capital", "fact", "arithmetic", "greet", "echo", "spot", "name"),
                       weights=(12, 12, 8, 13, 5, 25, 15, 10))[0]
    if kind in ("echo", "spot", "name"):
        q, a = copy_turn(rng, kind)
    elif kind == "intro":
        q, a = rng.choice(INTRO_ASKS), rng.choice(INTRO_ANSWERS)
    elif kind == "capital":
        country, city = rng.choice(CAPITALS)
        q = rng.choice(CAPITAL_ASKS).format(country=country)
        a = rng.choice(CAPITAL_ANSWERS).format(country=country, city=city)
        a = a[0].upper() + a[1:]  # "the United Kingdom" may open the sentence
    elif kind == "fact":
        q, a = rng.choice(FACTS)
    elif kind == "greet":
        q, a = rng.choice(GREETINGS), rng.choice(GREETING_REPLIES)
    else:
        op = rng.choice("+-*")
        a_, b_ = (rng.randint(0, 50), rng.randint(0, 50)) if op != "*" else (rng.randint(0, 12), rng.randint(0, 12))
        if op == "-" and b_ > a_:
            a_, b_ = b_, a_
        value = {"+": a_ + b_, "-": a_ - b_, "*": a_ * b_}[op]
        q = rng.choice(ARITHMETIC_ASKS).format(a=a_, op=op, b=b_)
        a = f"{a_} {op} {b_} = {value}."
    system = rng.choice(SYSTEM_PROMPTS)
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return {"messages": messages, "tools": tool_set(rng, []) if rng.random() < 0.3 else None}


def copy_turn(rng: random.Random, kind: str) -> tuple[str, str]:
    """(question, answer) of a copying exchange: "echo" repeats 1–3 names, numbers or conditions;
    "spot" picks the city out of a sentence where lowercase words follow it (where a name ends is
    what a tool call's arguments get wrong most); "name" greets the user by a made-up name."""
    if kind == "spot":
        city = _city(rng)
        trailer = _syllable_name(rng).lower() if rng.random() < 0.2 else rng.choice(ASK_TRAILERS + SPOT_TRAILERS)
        sentence = f"{rng.choice(SPOT_SENTENCES).format(city=city)} {trailer}."
        return rng.choice(SPOT_ASKS).format(sentence=sentence), city
    if kind == "echo":
        phrase = " ".join(rng.choice((_city(rng), _city(rng), str(rng.randint(0, 999)), rng.choice(CONDITIONS)))
                          for _ in range(rng.randint(1, 3)))
        return rng.choice(ECHO_ASKS).format(text=phrase), phrase
    name = synthetic_city(rng).split()[0]
    return rng.choice(NAME_INTROS).format(name=name), rng.choice(NAME_REPLIES).format(name=name)


def generate_conversations(n: int, seed: int = 0, tool_fraction: float = 0.55) -> list[Conversation]:
    """`n` training conversations, deterministic from `seed`; `tool_fraction` of them use tools."""
    rng = random.Random(seed)
    return [tool_conversation(rng) if rng.random() < tool_fraction else plain_conversation(rng) for _ in range(n)]


def generate_copy_conversations(n: int, seed: int = 0) -> list[Conversation]:
    """`n` copying conversations of 3–5 turns (mostly echo, some greet-by-name), for the copy phase.

    A tiny model trained on the chat mix alone learns to copy slowly: the copies are a small part
    of its loss, and it can lower the rest without them. Copying first forms the heads that the
    tool calls then reuse; several copy turns per conversation put ~3x more copied tokens in a
    batch than one turn after a system prompt (measured: held-out name copying at 43% of tokens
    after 400 steps, against 25%).
    """
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        messages = []
        for _ in range(rng.randint(3, 5)):
            q, a = copy_turn(rng, rng.choices(("echo", "spot", "name"), weights=(50, 30, 20))[0])
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        out.append({"messages": messages, "tools": None})
    return out


def check_heldout_unseen(conversations: Sequence[Conversation]) -> None:
    """Raise if a held-out city or phrasing occurs anywhere in the training conversations."""
    text = "\n".join(json.dumps(c, ensure_ascii=False) for c in conversations)
    seen = [c for c in HELDOUT_CITIES if c in text]
    seen += [a for a in HELDOUT_WEATHER_ASKS if a.split("{city}")[0] in text and a.split("{city}")[0]]
    if seen:
        raise ValueError(f"held-out cities or phrasings occur in the training corpus: {seen[:5]}")


# Held-out evaluation cases -------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class WeatherCase:
    """A held-out weather question and the tool result that the answer must use."""

    messages: tuple[dict[str, Any], ...]  # the conversation so far, ending with the user's ask
    tools: tuple[dict[str, Any], ...]
    weather: Weather

    def with_result(self) -> list[dict[str, Any]]:
        """The conversation after the reference tool call and its result: the model must answer next."""
        index = sum(len(m.get("tool_calls") or ()) for m in self.messages)
        return [*self.messages, tool_call_message("get_weather", index, {"city": self.weather.city}),
                {"role": "tool", "tool_call_id": f"functions.get_weather:{index}", "content": self.weather.to_json()}]


def heldout_weather_cases(n: int | None = None, seed: int = 1) -> list[WeatherCase]:
    """One case per held-out city (the first `n`), each with a held-out phrasing and a random tool set.

    Every third case opens with an earlier exchange (a greeting, or a training-city weather lookup),
    so the call index and the multi-turn shape vary too.
    """
    rng = random.Random(seed)
    cases = []
    for i, city in enumerate(HELDOUT_CITIES[:n]):
        prefix: list[dict[str, Any]] = []
        if i % 3 == 1:
            prefix = [{"role": "user", "content": rng.choice(GREETINGS)},
                      {"role": "assistant", "content": rng.choice(GREETING_REPLIES)}]
        elif i % 3 == 2:
            prefix = weather_turns(rng, rng.choice(WEATHER_ASKS), rng.choice(TRAIN_CITIES), 0)
        ask = {"role": "user", "content": HELDOUT_WEATHER_ASKS[i % len(HELDOUT_WEATHER_ASKS)].format(city=city)}
        cases.append(WeatherCase(tuple(prefix + [ask]), tuple(tool_set(rng, ["get_weather"])),
                                 random_weather(rng, city)))
    return cases


# Tokenization ------------------------------------------------------------------------------------
def train_tokenizer(conversations: Sequence[Conversation], vocab_size: int = 1536) -> bytes:
    """A sentencepiece BPE model (serialized) trained on the rendered conversations.

    Lossless settings: identity normalisation, whitespace kept as is, no dummy-prefix space, byte
    fallback for any character the pieces miss. Kimi's special tokens are user-defined pieces with
    their release names, which is what `kimi_jax.text.tokenizer.SentencePieceTokenizer` looks for.

    Two choices make copying learnable for a tiny model: one piece per digit, and a space is a
    piece of its own, so a word tokenizes the same after a space as after a quote. Otherwise
    "weather in Lisbon" holds " L|is|bon" while the arguments {"city": "Lisbon"} hold "L|is|bon":
    the model would have to translate an unseen city, not copy it. (It costs ~30% more tokens.)
    Single-threaded, so the model is a function of the corpus alone.
    """
    import io

    import sentencepiece as spm


    texts = [render_chat(c["messages"], c["tools"], add_generation_prompt=False) for c in conversations]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True, character_coverage=1.0,
        user_defined_symbols=[*KIMI_SPECIAL_TOKEN_OFFSETS, "\u2581"], max_sentence_length=1 << 16,
        input_sentence_size=0, shuffle_input_sentence=False, num_threads=1,
        bos_id=-1, eos_id=-1, pad_id=-1, unk_id=0, minloglevel=2)
    return model.getvalue()


def encode_conversation(tokenizer, conversation: Conversation) -> tuple[np.ndarray, np.ndarray]:
    """(token ids [T] int32, loss mask [T] bool): the rendered conversation and its assistant tokens.

    The mask marks each assistant turn's body and its `<|im_end|>`, found by encoding the
    conversation up to that turn's header: every turn boundary is a special token, so the prefix
    encodes to a prefix of the whole (checked).
    """
    messages, tools = conversation["messages"], conversation["tools"]
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"a training conversation must end with an assistant turn, not {messages[-1]['role']!r}")
    ids = tokenizer.apply_chat_template(messages, tools, add_generation_prompt=False) + [tokenizer.im_end_id]
    mask = np.zeros(len(ids), bool)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = tokenizer.apply_chat_template(messages[:i], tools, add_generation_prompt=True)
        end = len(tokenizer.apply_chat_template(messages[: i + 1], tools, add_generation_prompt=False)) + 1
        if ids[: len(prefix)] != prefix or ids[end - 1] != tokenizer.im_end_id:
            raise ValueError(f"assistant turn {i} does not tokenize as a prefix of its conversation")
        mask[len(prefix):end] = True
    return np.asarray(ids, np.int32), mask


def encode_corpus(tokenizer, conversations: Sequence[Conversation],
                  max_len: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Encode every conversation; those longer than `max_len` tokens are dropped."""
    out = [encode_conversation(tokenizer, c) for c in conversations]
    return [(ids, mask) for ids, mask in out if len(ids) <= max_len]


@dataclasses.dataclass(frozen=True)
class Batch:
    """Right-padded rows: tokens, positions (−1 on padding) and loss weights (float32), all [B, T]."""

    tokens: np.ndarray
    positions: np.ndarray
    mask: np.ndarray


def pad_batch(examples: Sequence[tuple[np.ndarray, np.ndarray]], length: int, pad_id: int,
              context_weight: float = 0.0) -> Batch:
    """Stack examples into a `Batch` of `length` columns.

    The loss weight is 1 on assistant tokens, `context_weight` on every other real token (system,
    user and tool text, headers) and 0 on padding.
    """
    b = len(examples)
    tokens = np.full((b, length), pad_id, np.int32)
    positions = np.full((b, length), -1, np.int32)
    mask = np.zeros((b, length), np.float32)
    for row, (ids, m) in enumerate(examples):
        tokens[row, : len(ids)] = ids
        positions[row, : len(ids)] = np.arange(len(ids))
        mask[row, : len(ids)] = np.where(m, 1.0, context_weight)
    return Batch(tokens, positions, mask)


def batches(examples: Sequence[tuple[np.ndarray, np.ndarray]], tokens_per_batch: int, buckets: Sequence[int],
            pad_id: int, seed: int = 0, context_weight: float = 0.0) -> Iterator[Batch]:
    """Endless shuffled batches; each batch holds examples of one length bucket, padded to it.

    A bucket of length L gets tokens_per_batch // L rows, so every step costs about the same and
    there is one compiled shape per bucket. Each epoch reshuffles; a bucket's incomplete last
    batch is left for the next epoch's shuffle.
    """
    buckets = sorted(buckets)
    by_bucket: dict[int, list[int]] = {b: [] for b in buckets}
    for i, (ids, _) in enumerate(examples):
        fit = [b for b in buckets if b >= len(ids)]
        if not fit:
            raise ValueError(f"example {i} has {len(ids)} tokens, longer than the largest bucket {buckets[-1]}")
        by_bucket[fit[0]].append(i)
    rng = np.random.default_rng(seed)
    while True:
        plan = []
        for length, idx in by_bucket.items():
            rows = max(1, tokens_per_batch // length)
            order = rng.permutation(idx)
            plan += [(length, order[s: s + rows]) for s in range(0, len(order) - rows + 1, rows)]
        if not plan:
            raise ValueError("no bucket holds a full batch: lower tokens_per_batch or add examples")
        for k in rng.permutation(len(plan)):
            length, rows = plan[k]
            yield pad_batch([examples[i] for i in rows], length, pad_id, context_weight)
