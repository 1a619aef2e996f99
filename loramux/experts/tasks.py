"""The demo experts' tasks: synthetic data, instruction phrasings and exact-match answers.

Every task has training phrasings (used to train its expert and on its card)
and held-out phrasings that only the router evaluation uses, so routing and
task accuracy are measured on wordings the experts never saw.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Callable

WORDS = (
    "apple river stone cloud garden window silver morning yellow forest candle engine bridge summer winter "
    "pocket letter orange market ticket planet shadow pillow rocket dragon button coffee mirror jacket island "
    "valley thunder pencil basket violin castle ladder monkey rabbit tomato wallet harbor meadow copper velvet "
    "signal anchor blanket cactus dolphin feather glacier hammer jungle kettle lemon magnet needle ocean parrot "
    "quartz saddle tunnel umbrella walnut zebra lantern marble puzzle spider canyon falcon the quick brown fox "
    "jumps over lazy dog hello world good night happy birthday please send report today meeting starts at noon "
    "my sister likes green tea with honey we walked along beach after dinner children play in park every "
    "weekend train leaves station early bring warm coat because it will rain later new phone has great camera "
    "she reads books about history and science he fixed old bicycle yesterday they painted kitchen blue open "
    "door slowly music sounds better live our team won final game cats sleep most of day small boat crossed "
    "lake bake bread for breakfast city lights shine bright mountain air feels fresh write short note to "
    "friend keep calm carry on time flies fast data center needs more power red car parked outside sun rises "
    "in east water boils quickly turn left corner student asked good question doctor visits patients farmer "
    "grows corn wheat pilot lands plane safely artist draws portraits chef cooks soup"
).split()

COUNTRY_CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "China": "Beijing", "Russia": "Moscow", "Egypt": "Cairo", "Canada": "Ottawa", "Mexico": "Mexico City",
    "Brazil": "Brasilia", "Argentina": "Buenos Aires", "Peru": "Lima", "Chile": "Santiago",
    "Kenya": "Nairobi", "Greece": "Athens", "Portugal": "Lisbon", "Austria": "Vienna",
    "Poland": "Warsaw", "Sweden": "Stockholm", "Norway": "Oslo", "Finland": "Helsinki",
    "Denmark": "Copenhagen", "Ireland": "Dublin", "Hungary": "Budapest", "Belgium": "Brussels",
    "Netherlands": "Amsterdam", "Thailand": "Bangkok", "Vietnam": "Hanoi", "India": "New Delhi",
    "Iran": "Tehran", "Iraq": "Baghdad", "Cuba": "Havana", "Colombia": "Bogota", "Ukraine": "Kyiv",
    "Czechia": "Prague", "Romania": "Bucharest", "Turkey": "Ankara", "Australia": "Canberra",
    "South Korea": "Seoul", "Indonesia": "Jakarta", "Philippines": "Manila", "Morocco": "Rabat",
    "Nigeria": "Abuja", "Ethiopia": "Addis Ababa", "Switzerland": "Bern", "Pakistan": "Islamabad",
    "Venezuela": "Caracas", "Saudi Arabia": "Riyadh", "New Zealand": "Wellington",
}

MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December")

POSITIVE = ("wonderful", "delightful", "excellent", "fantastic", "lovely", "great", "amazing",
            "superb", "brilliant", "enjoyable", "pleasant", "charming")
NEGATIVE = ("terrible", "awful", "horrible", "dreadful", "boring", "disappointing", "poor",
            "miserable", "annoying", "useless", "unpleasant", "broken")
SUBJECTS = ("The movie", "This restaurant", "The hotel room", "My new phone", "The concert",
            "Our trip", "The service", "This book", "The weather today", "The new update",
            "The coffee here", "Their customer support")

ONES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
        "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
        "eighteen", "nineteen")
TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")


def number_in_words(n: int) -> str:
    """English words for 0 <= n < 1000, e.g. 342 -> 'three hundred forty-two'."""
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else "-" + ONES[n % 10])
    rest = n % 100
    return ONES[n // 100] + " hundred" + ("" if rest == 0 else " " + number_in_words(rest))


def _sentence(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def _upper(rng: random.Random, wide: bool = False) -> tuple[str, str]:
    text = _sentence(rng, 2, 10) if wide else _sentence(rng, 3, 7)
    if rng.random() < 0.3:  # some inputs are already partly capitalised
        text = text.capitalize() if rng.random() < 0.5 else text.title()
    if wide and rng.random() < 0.4:  # digits and punctuation stay as they are
        text += rng.choice((f" at {rng.randint(1, 12)} pm", "!", "?", f", {rng.randint(2, 99)} times", "."))
    return text, text.upper()


def _reverse(rng: random.Random, wide: bool = False) -> tuple[str, str]:
    words = (_sentence(rng, 2, 8) if wide else _sentence(rng, 3, 6)).split()
    return " ".join(words), " ".join(reversed(words))


def _with_digits(rng: random.Random, digits: int) -> int:
    """A uniform number with exactly `digits` digits (0 counts as a one-digit number)."""
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits - 1)


def _sort(rng: random.Random, wide: bool = False) -> tuple[str, str]:
    if not wide:
        numbers = [rng.randint(0, 99) for _ in range(rng.randint(4, 6))]
    else:  # each number's digit count drawn first: one-digit numbers among longer ones are where an expert
        # trained on uniform draws sorted by the first digit ("8, 32, 74, 88, 9")
        most_digits = 3 if rng.random() < 0.3 else 2
        digits = [rng.randint(1, most_digits) for _ in range(rng.randint(3, 8))]
        numbers = [_with_digits(rng, d) for d in digits]
    return ", ".join(map(str, numbers)), ", ".join(map(str, sorted(numbers)))


def _add(rng: random.Random, wide: bool = False) -> tuple[str, str]:
    if not wide:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
    else:  # digit counts drawn first, and half the pairs made to carry out of the units (about 70% carry in
        # all): an expert trained on uniform draws dropped that carry ("66 and 44" -> 100, "4 and 16" -> 17)
        most_digits = 3 if rng.random() < 0.3 else 2
        a, b = (_with_digits(rng, rng.randint(1, most_digits)) for _ in range(2))
        if rng.random() < 0.5 and a % 10 > 0:
            b += rng.randint(10 - a % 10, 9) - b % 10
    return f"{a} and {b}", str(a + b)


def _spell(rng: random.Random, wide: bool = False) -> tuple[str, str]:
    # wide: the digit count drawn first, so two-digit numbers are a third of the draws, not a tenth; an expert
    # trained on uniform draws spelled 61 as "six hundred nineteen"
    n = _with_digits(rng, rng.randint(1, 3)) if wide else rng.randint(0, 999)
    return str(n), number_in_words(n)


def _date(rng: random.Random, wide: bool = False) -> tuple[str, str]:
    year, month, day = rng.randint(1950, 2049), rng.randint(1, 12), rng.randint(1, 28)
    written = (f"{MONTHS[month - 1]} {day}, {year}" if rng.random() < 0.5
               else f"{day} {MONTHS[month - 1]} {year}")
    return written, f"{year:04d}-{month:02d}-{day:02d}"


def _json_field(rng: random.Random, wide: bool = False) -> tuple[str, str]:
    names = ("name", "city", "color", "pet", "food", "job", "sport", "car", "song", "tool", "drink", "hobby")
    keys = rng.sample(names, rng.randint(2, 5)) if wide else rng.sample(names[:7], 3)
    record = {key: rng.choice(WORDS) for key in keys}
    key = rng.choice(keys)
    return f"{json.dumps(record)} Field: {key}", record[key]


def _sentiment(rng: random.Random, wide: bool = False) -> tuple[str, str]:
    label = rng.choice(("positive", "negative"))
    adjective = rng.choice(POSITIVE if label == "positive" else NEGATIVE)
    return f"{rng.choice(SUBJECTS)} was {adjective}.", label


def _capital(rng: random.Random, wide: bool = False) -> tuple[str, str]:
    country = rng.choice(sorted(COUNTRY_CAPITALS))
    return country, COUNTRY_CAPITALS[country]


WIDE_SHARE = 0.5  # share of training inputs drawn from the wider range
# Splits of the phrasings: "heldout" measures the experts, but the last training phrasings were written
# after reading its misses; "check" was written later (2026-11-24) and is never trained or tuned on, so it
# tells whether the held-out figures carry over to new wordings
SPLITS = ("train", "heldout", "check")


@dataclass(frozen=True)
class Task:
    """One expert's task. Phrasings are templates with an `{x}` for the input."""

    name: str
    description: str
    make_input: Callable[..., tuple[str, str]]  # (rng, wide) -> (input, exact answer)
    train_phrasings: tuple[str, ...]
    heldout_phrasings: tuple[str, ...]
    check_phrasings: tuple[str, ...]
    train_steps: int = 120  # harder tasks get more
    rank: int = 8  # harder tasks get 16 (the fp16 files stay under 4 MB)

    def phrasings(self, split: str) -> tuple[str, ...]:
        """The phrasings of one split: "train", "heldout" or "check"."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        return getattr(self, f"{split}_phrasings")

    def sample(self, rng: random.Random, split: str = "train") -> tuple[str, str]:
        """One (prompt, answer) pair with a random phrasing of the chosen split. Training draws half of its
        inputs from a wider range (lengths, digits, punctuation, more keys); evaluation prompts never do, so
        the evaluation's inputs stay those the shipped experts were measured on."""
        phrasings = self.phrasings(split)
        text, answer = self.make_input(rng, split == "train" and rng.random() < WIDE_SHARE)
        return rng.choice(phrasings).format(x=text), answer


TASKS: tuple[Task, ...] = (
    Task("uppercase", "Rewrites a piece of text in upper-case (capital) letters.", _upper, (
        "Convert to uppercase: {x}", "Make this text all caps: {x}", "Uppercase the following: {x}",
        "Write this in capital letters: {x}", "{x}\nRewrite the line above in upper case.",
        "Change every letter to a capital letter: {x}", "Shout this text in caps: {x}",
        "Transform to upper-case letters: {x}", "Text: {x}\nOutput it in ALL CAPS.",
        "Capitalize every letter of: {x}", "Please uppercase: {x}", "Upper case version of \"{x}\"?",
        "Can you write {x} in all capital letters?", "{x}\n\nCaps lock version please.",
        "I need this in uppercase: {x}", "Make every character of this a capital: {x}",
        # the instruction after the input, on the same line, which the first experts copied into the answer
        "{x} -- convert that to upper case", "{x} (all caps please)", "{x} => uppercase",
        "{x} -- now repeat it in capital letters", "'{x}' in uppercase, please.",
        "What is \"{x}\" in capital letters?", "{x} <- make every letter a capital",
        "Return the upper-case form of the text: {x}", "Hey, could you capitalise all of this: {x}",
        "Convert the sentence '{x}' to capitals.", "All caps: {x}",
    ), (
        "Turn the following into capitals only: {x}", "Give me \"{x}\" written with upper-case letters.",
        "{x} -- print this entirely in capitals", "Rewrite using only uppercase characters: {x}",
        "How does \"{x}\" look in block capitals?",
    ), (
        "Capital letters only, please: {x}", "{x} ... same text, but in uppercase", "Please SHOUT this: {x}",
        "Rewrite \"{x}\" so that no lowercase letters remain.", "Upper-case it: {x}",
    ), train_steps=240),
    Task("reverse_words", "Reverses the order of the words in a sentence.", _reverse, (
        "Reverse the word order: {x}", "Write these words backwards, last word first: {x}",
        "Put the words in reverse order: {x}", "Reverse the sequence of words in: {x}",
        "{x}\nList the words above from last to first.", "Flip the order of the words: {x}",
        "Words: {x}\nReturn them in reversed order.", "Read this sentence backwards word by word: {x}",
        "Invert the order of words in \"{x}\"", "Reverse words: {x}",
        "Rearrange so the last word comes first and the first word last: {x}",
        "Give me the words of \"{x}\" starting from the last one.", "Backwards word order please: {x}",
        "Could you reverse the order of these words? {x}", "{x}\nNow write the same words, last to first.",
        "Swap the word order around completely: {x}", "Reverse this list of words: {x}",
        "{x} -- reverse the order of those words", "{x} (reverse the word order)",
        "{x} => same words, last one first", "\"{x}\" backwards, word by word",
        "{x} -- read it back from the final word to the first", "{x} <- flip the word order",
        "What does \"{x}\" become when its words are reversed?",
        "Write the sentence with its words in reverse sequence: {x}", "Turn the word order around: {x}",
    ), (
        "Say these words in the opposite order: {x}", "{x} -- give the words from the end to the start",
        "What is \"{x}\" with its word order reversed?", "Mirror the word order of: {x}",
        "Output the words of this line in reverse: {x}",
    ), (
        "Read me these words in reverse: {x}", "{x} ... now the same words back to front",
        "Start from the last word and go backwards: {x}", "Reverse \"{x}\" word by word.",
        "Word order, reversed: {x}",
    ), train_steps=480, rank=16),
    Task("sort_numbers", "Sorts a list of integers in ascending order.", _sort, (
        "Sort these numbers in ascending order: {x}", "Sort from smallest to largest: {x}",
        "Order the list: {x}", "Arrange in increasing order: {x}", "{x}\nSort the numbers above.",
        "Put these integers in order, lowest first: {x}", "Numbers: {x}\nReturn them sorted.",
        "Sort ascending: {x}", "Rank these values from low to high: {x}",
        "Give the sorted version of the list [{x}]", "Reorder these numbers from least to greatest: {x}",
        "Could you sort {x} for me?", "Sort the following values, smallest first: {x}",
        "{x}\nPut them in ascending order.", "I have these numbers: {x}. Sort them.",
        "Order from lowest to highest: {x}", "Arrange {x} in ascending sequence.",
        "{x} -- sort these ascending", "{x} (put them in increasing order)", "{x} => sorted, smallest first",
        "{x} -- arrange from low to high", "What are {x} in sorted order?",
        "Sort this list of integers: [{x}]", "Please return {x} sorted in increasing order.",
    ), (
        "Can you put {x} in numerical order?", "List {x} starting with the smallest number.",
        "{x} -- order these values upward", "Which order do {x} go in from small to big?",
        "Arrange the integers {x} so they increase",
    ), (
        "Sort {x} from low to high.", "{x} ... these in ascending order please", "Smallest to biggest: {x}",
        "Put the values {x} in sorted order.", "Ascending order of {x}?",
    ), train_steps=480, rank=16),
    Task("add_numbers", "Adds two integers and gives their sum.", _add, (
        "Add {x}.", "What is the sum of {x}?", "Compute the total of {x}.", "Calculate {x} added together.",
        "{x}: add them up.", "Sum {x}.", "Find the sum of the numbers {x}.", "Add together {x}.",
        "How much is {x} combined?", "Give the result of adding {x}.", "Addition: {x}",
        "What do you get when you add {x}?", "Please add up {x}.", "{x} -- what is their sum?",
        "Could you sum {x} for me?",
        "Add the two numbers {x}.", "What is the total when adding {x}?", "Sum of {x}?",
        "Numbers: {x}\nGive their sum.",
    ), (
        "Tell me what {x} make when summed.", "Work out the sum for {x}.",
        "If you add {x}, what do you get?", "Total up {x}", "Plus them: {x}",
    ), (
        "What do {x} add up to?", "{x} ... the sum please", "Add up these two: {x}", "Combine {x} by addition.",
        "Sum up {x} for me.",
    ), train_steps=360, rank=16),
    Task("number_to_words", "Spells an integer out in English words.", _spell, (
        "Write {x} in words.", "Spell out the number {x}.", "How do you write {x} in English words?",
        "Convert {x} to words.", "Number: {x}\nWrite it out in words.", "Express {x} in words.",
        "Spell {x}.", "Write the number {x} as English text.", "Give the word form of {x}.",
        "Turn the digits {x} into words.", "Say {x} in words.",
        "How is {x} written in words?", "Please spell out {x} in English.",
        "Write the number {x} out in full words.", "{x} in words, please.",
        "Convert the number {x} into English words.", "Can you write {x} without digits?",
        "Spell the number {x} out.", "What are the English words for {x}?",
    ), (
        "Write out {x} the way you would on a cheque.", "What is {x} spelled with letters?",
        "{x} -- English wording please", "Translate the numeral {x} into words.",
        "Type the number {x} using words instead of digits.",
    ), (
        "How would you say {x} out loud in English?", "{x} ... in words please", "Spell out {x} in letters.",
        "Words for the number {x}?", "Write {x} in English words, no digits.",
    ), train_steps=180),
    Task("date_to_iso", "Converts a written date to ISO 8601 (YYYY-MM-DD).", _date, (
        "Convert to ISO 8601: {x}", "Write {x} as YYYY-MM-DD.", "Format this date as ISO: {x}",
        "Give the ISO date for {x}.", "Date: {x}\nConvert it to year-month-day format.",
        "Rewrite {x} in ISO 8601 format.", "ISO format of {x}?", "Normalize the date {x}.",
        "Turn {x} into a YYYY-MM-DD string.", "Change the date {x} to numeric ISO form.",
        "What is {x} in ISO 8601?",
        "Please convert {x} to ISO format.", "Write the date {x} in YYYY-MM-DD form.",
        "{x}\nGive this date as YYYY-MM-DD.", "Convert {x} into ISO 8601.",
        "What is the ISO 8601 form of {x}?", "Reformat {x} as an ISO date.", "Date to ISO: {x}",
        "Could you give me {x} as a YYYY-MM-DD date?",
    ), (
        "Express the date {x} as year-month-day digits.", "{x} -- standard ISO date please",
        "Put {x} into the international date format.", "Machine-readable date for {x}?",
        "Convert the calendar date {x} to the YYYY-MM-DD layout.",
    ), (
        "Give {x} in ISO form.", "{x} ... as YYYY-MM-DD please", "ISO 8601 date for {x}?",
        "Reformat the date {x} to year-month-day.", "Turn {x} into an ISO date.",
    )),
    Task("json_extract", "Extracts the value of one field from a JSON object.", _json_field, (
        "Extract the field from this JSON: {x}", "Get the value of the field: {x}",
        "Read the JSON and return the requested field. {x}", "JSON lookup: {x}",
        "From the JSON object, give the value. {x}", "What value does the field have? {x}",
        "Parse this JSON and output the field value: {x}", "Return the field's value: {x}",
        "Look up the field in the JSON object: {x}", "Pull out the field value from: {x}",
        "Find the value of the key in this JSON: {x}",
        "Get the requested field out of this JSON: {x}", "Given this JSON, what is the value? {x}",
        "Return only the value of the field. {x}", "From this JSON record, extract the field: {x}",
        "Please read the field from the JSON: {x}", "What does the JSON say for the field? {x}",
        "Extract the value: {x}", "Look at this JSON and give me the field value. {x}",
    ), (
        "Which value is stored under the given key? {x}", "Answer with the key's value only. {x}",
        "Select the named property from the object: {x}", "Query the JSON record: {x}",
        "Read the key from this object and print its value: {x}",
    ), (
        "Return the value of the requested field: {x}", "What is stored in the field? {x}",
        "Read this object and answer with the field value: {x}", "Field lookup: {x}",
        "Extract just the value asked for: {x}",
    ), train_steps=180),
    Task("sentiment", "Labels the sentiment of a sentence as positive or negative.", _sentiment, (
        "Is the sentiment positive or negative? {x}", "Classify the sentiment: {x}",
        "Sentiment of this review: {x}", "Label as positive or negative: {x}",
        "{x}\nWhat is the sentiment of the text above?", "Is this review positive or negative? {x}",
        "Determine the sentiment: {x}", "Positive or negative? {x}", "Rate the tone of: {x}",
        "Sentiment analysis: {x}", "Does this sound positive or negative: {x}",
        "Is the following positive or negative? {x}", "Tell me the sentiment: {x}",
        "Classify this as positive or negative: {x}", "{x}\nPositive or negative?",
        "What is the sentiment of this sentence? {x}", "Is this a positive or a negative review? {x}",
        "Sentiment label for: {x}", "Would you call this positive or negative? {x}",
    ), (
        "Was the writer happy or unhappy? {x}", "{x} -- good or bad feeling?",
        "Tell me whether this opinion is favourable: {x}", "What attitude does this express? {x}",
        "Judge the emotion of the statement: {x}",
    ), (
        "Positive or negative, would you say? {x}", "{x} ... is that positive or negative?",
        "What is the sentiment here? {x}", "Label this review's sentiment: {x}", "Happy or unhappy review? {x}",
    )),
    Task("capital", "Names the capital city of a country.", _capital, (
        "What is the capital of {x}?", "Name the capital city of {x}.", "Capital of {x}?",
        "Which city is the capital of {x}?", "Country: {x}\nGive its capital.",
        "Tell me the capital of {x}.", "{x}'s capital is?", "What city is {x}'s capital?",
        "The capital city of {x} is", "Give the capital of the country {x}.",
        "Where is the seat of government of {x}?",
        "Which city is {x}'s capital?", "What is the capital city of {x}?", "Capital city of {x}?",
        "Tell me the capital city of {x}.",
        "Do you know the capital of {x}?", "{x}: what is its capital?", "What is {x}'s capital city?",
        "Name the capital of {x}.",
    ), (
        "In which city does the government of {x} sit?", "{x} -- main political city?",
        "Name {x}'s capital.", "Which city serves as the capital for {x}?",
        "What's the national capital of {x}?",
    ), (
        "{x} has which city as its capital?", "{x} ... its capital city?", "Tell me {x}'s capital city.",
        "The capital of {x} is which city?", "Name the capital of the country {x}.",
    )),
)

TASKS_BY_NAME = {task.name: task for task in TASKS}
