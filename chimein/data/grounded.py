"""Grounded training chats: group chats about an invented organisation, with its documents.

A grounded chat teaches the model to read the passages of the group's documents that come with a
message (chimein.formatting) and to use them only when they answer: the group's documents are a
handbook made up for the chat (an invented club, building, trip …, with drawn values: fees,
times, rooms, names), so the fact can only come from the passage, never from the model's memory.
The passages are attached exactly as at run time (chimein.knowledge.grounding, over a real index
of the chat's documents), so the model sees what it will see:

- a question the documents answer, addressed to the assistant or asked of nobody in particular →
  the reply copies the fact from the passage;
- the same question put to a named friend → silence, whatever the passages say;
- an addressed question the documents do not answer → "The documents don't say …".
  A question asked of nobody that they do not answer is left out: in the ordinary chats the
  assistant fills in such a fact from what it knows, and silence here taught it to miss those
  (the shipped benchmark's missed interventions rose from 0.115 to 0.17-0.21);
- small talk, with whatever passages it happens to retrieve → silence.

A fact whose passage was not retrieved is treated as one the documents do not answer: the reply
never says more than the model was shown.

The offline source mixes them into its output (`GenerationSettings.grounded`); the grounded
benchmark (chimein/evaluate/grounded/) is written by hand about other organisations.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from chimein.conversation import Conversation, Message

WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December")
SURNAMES = ("Okafor", "Lindqvist", "Moreau", "Tanaka", "Costa", "Novak", "Haddad", "Kowalski", "Brennan",
            "Achterberg", "Mensah", "Ferreira", "Iyer", "Castillo", "Whitfield", "Dubois", "Petrov", "Quinn")
FIRST = ("Marta", "Kofi", "Ines", "Tomasz", "Hana", "Raúl", "Greta", "Samir", "Leila", "Owen", "Yuki",
         "Bruno", "Alma", "Dev", "Noor", "Felix", "Ruth", "Mateo")
PLACES = ("Elm", "Harbour", "Linden", "Quarry", "Beacon", "Mill", "Orchard", "Heron", "Kestrel",
          "Willow", "Granite", "Copper", "Juniper", "Foxglove", "Saltmarsh", "Thistle")


def _time(rng: random.Random) -> str:
    return f"{rng.randint(7, 21)}:{rng.choice(['00', '15', '30', '45'])}"


def _values(rng: random.Random) -> dict[str, str]:
    """Everything a template may ask for, drawn once per chat."""
    person = lambda: f"{rng.choice(FIRST)} {rng.choice(SURNAMES)}"  # noqa: E731
    return {
        "place": rng.choice(PLACES), "person": person(), "person2": person(), "person3": person(),
        "day": rng.choice(WEEKDAYS), "day2": rng.choice(WEEKDAYS), "time": _time(rng), "time2": _time(rng),
        "price": str(rng.choice([5, 8, 12, 15, 20, 25, 30, 35, 40, 45, 60, 75, 90, 120])),
        "price2": str(rng.choice([2, 3, 4, 5, 6, 10])), "room": f"{rng.choice('ABCDEFG')}{rng.randint(1, 4)}{rng.randint(0, 2)}{rng.randint(1, 9)}",
        "floor": rng.choice(["second", "third", "fourth", "fifth", "ground"]), "n": str(rng.randint(2, 9)),
        "n2": str(rng.randint(10, 40)), "code": str(rng.randint(1000, 9999)),
        "date": f"{rng.randint(1, 28)} {rng.choice(MONTHS)}", "month": rng.choice(MONTHS),
        "bus": str(rng.randint(3, 99)), "email_user": rng.choice(["info", "hello", "office", "desk", "team"]),
    }


@dataclass(frozen=True)
class Fact:
    heading: str
    text: str  # the document's sentences; {…} from _values, {org} the organisation
    questions: tuple[str, ...]  # lower-case, as people type
    answer: str  # the assistant's reply, copying the fact
    topic: str  # "when the AGM is": for "The documents don't say {topic}"


@dataclass(frozen=True)
class Domain:
    kind: str  # "sports club": the title is "{place} {kind}"
    file: str
    openers: tuple[str, ...]
    facts: tuple[Fact, ...]


def F(heading, text, questions, answer, topic) -> Fact:  # noqa: N802 — a table row
    return Fact(heading, text, tuple(questions), answer, topic)


DOMAINS: tuple[Domain, ...] = (
    Domain("Badminton Club", "handbook.md",
           ("who's coming to badminton this week?", "my arm still hurts from last session 😅",
            "ok new season at the {org}, let's actually go regularly"),
           (F("Membership", "Membership of the {org} costs {price} euros a year, paid to the treasurer, {person}.",
              ["how much is the membership again?", "what do we pay per year for the club?"],
              "Membership is {price} euros a year, paid to the treasurer, {person}.", "what membership costs"),
            F("Sessions", "Club nights are on {day}s from {time} in the sports hall of the {place} school.",
              ["what day is club night?", "when are the sessions?"],
              "Club nights are {day}s from {time}, in the sports hall of the {place} school.", "when the sessions are"),
            F("Guests", "Guests may play {n} times a season for {price2} euros a night.",
              ["can i bring a friend to play?", "how many times can a guest come?"],
              "Guests can play {n} times a season, {price2} euros a night.", "whether guests can come"),
            F("Shuttlecocks", "Feather shuttlecocks are sold at the desk for {price2} euros a tube; the club provides nylon ones.",
              ["do we have to buy our own shuttles?", "how much is a tube of shuttlecocks?"],
              "Feather shuttles are {price2} euros a tube at the desk; nylon ones are provided.", "what shuttlecocks cost"),
            F("Committee", "The club captain is {person2}. Match selection questions go to the captain.",
              ["who's the captain this year?", "who picks the team for matches?"],
              "The captain is {person2}; match selection goes through them.", "who the captain is"),
            F("Annual meeting", "The annual general meeting is held on {date} at {time2}.",
              ["when is the agm?", "when's the annual meeting?"],
              "The annual general meeting is on {date} at {time2}.", "when the annual meeting is"))),
    Domain("Court residents", "house-rules.md",
           ("did anyone else hear the lift making that noise?", "new neighbours moved into the {floor} floor",
            "reminder that the {org} meeting thing is coming up"),
           (F("Bins", "Recycling is collected every {day}; bins go out after {time} the evening before.",
              ["when is recycling collected?", "what day do the bins go out?"],
              "Recycling is collected on {day}s; bins go out after {time} the evening before.", "when the bins go out"),
            F("Caretaker", "The caretaker, {person}, is in the office on the ground floor on weekdays until {time2}.",
              ["who's the caretaker again?", "when is the caretaker around?"],
              "The caretaker is {person}, in the ground-floor office on weekdays until {time2}.", "when the caretaker is in"),
            F("Bicycles", "Bicycles are kept in the basement store; the door code is {code}.",
              ["where can i put my bike?", "what's the code for the bike store?"],
              "Bikes go in the basement store; the door code is {code}.", "where bikes are kept"),
            F("Quiet hours", "Quiet hours are from 22:00 to {time} on weekdays.",
              ["what are the quiet hours?", "until when do we have to keep it down in the morning?"],
              "Quiet hours are 22:00 to {time} on weekdays.", "what the quiet hours are"),
            F("Laundry", "The laundry room is on the {floor} floor; a wash costs {price2} euros.",
              ["where's the laundry room?", "how much is a wash?"],
              "The laundry room is on the {floor} floor, and a wash is {price2} euros.", "what a wash costs"),
            F("Parking", "Each flat has {n} visitor parking permits a month; ask {person3} for them.",
              ["how do visitors park here?", "who gives out the parking permits?"],
              "Each flat gets {n} visitor permits a month, from {person3}.", "how visitors park"))),
    Domain("School trip", "trip-letter.md",
           ("the kids are SO excited about the {org}", "has everyone signed the form?",
            "packing list panic has begun"),
           (F("Departure", "The coach leaves the {place} school gates at {time} on {date}.",
              ["what time does the coach leave?", "when do we drop them off?"],
              "The coach leaves the {place} school gates at {time} on {date}.", "when the coach leaves"),
            F("Return", "We are back at the school on {day2} at about {time2}.",
              ["when are they back?", "what time do we pick them up?"],
              "They're back at the school on {day2} at about {time2}.", "when they are back"),
            F("Cost", "The trip costs {price} euros, due by {month}; ask {person} about help with the cost.",
              ["how much is the trip?", "when is the payment due?"],
              "It's {price} euros, due by {month}; {person} can help with the cost.", "what the trip costs"),
            F("Pocket money", "Children may bring up to {n2} euros pocket money.",
              ["how much pocket money can they take?", "is there a limit on spending money?"],
              "Up to {n2} euros of pocket money.", "how much pocket money they can bring"),
            F("Phones", "Phones are collected on the coach and handed back each evening from {time2} for half an hour.",
              ["can they take their phones?", "when can we call them?"],
              "Phones are collected on the coach and handed back each evening from {time2} for half an hour.", "when the children can call"),
            F("Contact", "In an emergency call the trip leader, {person2}.",
              ["who do we call in an emergency?", "who's the trip leader?"],
              "The trip leader is {person2} — call them in an emergency.", "who to call in an emergency"))),
    Domain("Community Garden", "garden-guide.md",
           ("the tomatoes are finally going red 🍅", "someone left the gate open again",
            "anyone up for a work day at the {org}?"),
           (F("Plots", "A plot costs {price} euros a year; the waiting list is kept by {person}.",
              ["how much is a plot?", "who runs the waiting list?"],
              "A plot is {price} euros a year; {person} keeps the waiting list.", "what a plot costs"),
            F("Water", "The water is on from {month} to October; the tap key hangs in the shed, lock code {code}.",
              ["where's the key for the tap?", "what's the shed code?"],
              "The tap key hangs in the shed, lock code {code}.", "where the tap key is"),
            F("Work days", "Work days are the first {day} of each month from {time}.",
              ["when's the next work day?", "what day are work days?"],
              "Work days are the first {day} of each month from {time}.", "when the work days are"),
            F("Compost", "Compost bays {n} and {n2} take garden waste only; no cooked food.",
              ["can i put food scraps in the compost?", "which compost bay do we use?"],
              "Bays {n} and {n2} take garden waste only, no cooked food.", "what goes in the compost"),
            F("Tools", "Shared tools are signed out with {person2} and returned by {time2}.",
              ["who do i ask for the tools?", "can i borrow the rotavator?"],
              "Tools are signed out with {person2} and go back by {time2}.", "how to borrow tools"),
            F("Bees", "The hives are looked after by {person3}; keep {n} metres away when they are open.",
              ["who looks after the bees?", "how close can we get to the hives?"],
              "{person3} looks after the hives; keep {n} metres away when they're open.", "who looks after the bees"))),
    Domain("Conference", "attendee-guide.md",
           ("flights booked for the {org}!", "who's giving a talk this year?", "badge pick-up queues were awful last time"),
           (F("Registration", "Badges are picked up at the registration desk in the {place} hall from {time} on day one.",
              ["where do we get badges?", "when does registration open?"],
              "Badges are at the registration desk in the {place} hall, from {time} on day one.", "when registration opens"),
            F("Keynote", "The opening keynote is by {person} at {time2} in room {room}.",
              ["who's doing the keynote?", "what time is the keynote?"],
              "The keynote is {person} at {time2} in room {room}.", "when the keynote is"),
            F("Wi-Fi", "The Wi-Fi network is {place}-Guest; the password is printed on the back of the badge.",
              ["what's the wifi?", "what's the wifi password?"],
              "The network is {place}-Guest; the password is on the back of your badge.", "what the wifi is"),
            F("Transport", "Bus {bus} runs from the central station to the venue every {n2} minutes.",
              ["how do we get from the station?", "which bus goes to the venue?"],
              "Bus {bus} runs from the central station every {n2} minutes.", "how to get there"),
            F("Dinner", "The conference dinner is on {day} at {time2}; tickets are {price} euros.",
              ["when's the dinner?", "how much are dinner tickets?"],
              "The dinner is on {day} at {time2}, tickets {price} euros.", "when the dinner is"),
            F("Speakers", "Speakers upload slides by {date} and meet {person2} in the speaker room, {room}.",
              ["when do slides have to be in?", "where's the speaker room?"],
              "Slides are due by {date}; the speaker room is {room}, with {person2}.", "when the slides are due"))),
    Domain("Coworking", "members-faq.md",
           ("anyone at the {org} today?", "the coffee machine is fixed!!", "so much noise on the {floor} floor today"),
           (F("Opening hours", "The space is open from {time} to 20:00 on weekdays; members get a key card for weekends.",
              ["when does the space open?", "can we get in at the weekend?"],
              "It's open from {time} to 20:00 on weekdays, and the key card works at weekends.", "the opening hours"),
            F("Meeting rooms", "Meeting room {room} is booked through {person}; the first {n} hours a month are free.",
              ["how do i book a meeting room?", "how many free meeting hours do we get?"],
              "Book room {room} through {person}; the first {n} hours a month are free.", "how to book a meeting room"),
            F("Printing", "The printer is on the {floor} floor; print jobs cost {price2} cents a page.",
              ["where's the printer?", "how much does printing cost?"],
              "The printer's on the {floor} floor, {price2} cents a page.", "what printing costs"),
            F("Mail", "Post is held at reception for {n} days and can be collected until {time2}.",
              ["how long do they keep our post?", "when can i collect a parcel?"],
              "Post is held at reception for {n} days, collectable until {time2}.", "how long post is held"),
            F("Guests", "Members may bring guests for up to {n2} days a month; sign them in at reception.",
              ["can i bring a guest?", "how often can a guest come in?"],
              "Guests can come up to {n2} days a month; sign them in at reception.", "guest rules"),
            F("Community manager", "The community manager is {person2}; events are posted on {day}s.",
              ["who's the community manager?", "when do they post the events?"],
              "The community manager is {person2}; events are posted on {day}s.", "who the community manager is"))),
)

ADDRESS = ("bot, {q}", "@chimeinbot {q}", "hey assistant, {q}", "assistant — {q}", "bot {q}")
OPEN_ASK = ("{q}", "does anyone know {q}", "wait {q}", "sorry if this was said already: {q}", "{q} anyone?")
FRIEND_ASK = ("{f}, {q}", "{f} do you know {q}", "@{f} {q}")
SMALL_TALK = ("haha yes", "same", "ok thanks", "perfect 👍", "good to know", "lol", "nice", "cool cool",
              "i'll put it in the calendar", "right, makes sense", "noted", "brilliant")
FRIEND_REPLY = ("I think it's in the handbook somewhere, let me look", "no idea tbh", "I'll check tonight",
                "pretty sure we got an email about it")
NOT_SAID = "The documents don't say {topic} — best ask the organisers."


FILLERS = ("Please keep this page handy.", "Questions about anything else go to the committee.",
           "This page is updated at the start of each season.", "Thank you for helping things run smoothly.",
           "Details may change; check the noticeboard.", "New members are always welcome.")


def document(org: str, facts: list[Fact], values: dict[str, str], rng: random.Random) -> str:
    """The organisation's page: its facts in sections of one to three (so a passage holds more than
    the answer, and the reply must pick it out), now and then with a sentence that says nothing."""
    sections, i = [], 0
    while i < len(facts):
        group = facts[i:i + rng.choice([1, 2, 2, 3])]
        i += len(group)
        text = " ".join(f.text.format(org=org, **values) for f in group)
        if rng.random() < 0.3:
            text += " " + rng.choice(FILLERS)
        heading = group[0].heading if len(group) == 1 else f"{group[0].heading} and {group[1].heading.lower()}"
        sections.append(f"## {heading}\n\n{text}")
    return f"# {org}\n\n" + "\n\n".join(sections) + "\n"


def grounded_chat(seed: int, names: list[str], index=None) -> Conversation:
    """One grounded chat, drawn from `seed`; `names` are the pool of participants. `index` is the
    chat's documents as a KnowledgeIndex factory (tests pass a lexical one); by default the
    knowledge index of run time."""
    from chimein.knowledge.grounding import recent_passages, with_passages
    from chimein.knowledge.index import KnowledgeIndex, chunk

    rng = random.Random(seed)
    domain, other = rng.sample(DOMAINS, 2)
    values, other_values = _values(rng), _values(rng)
    org, other_org = f"{values['place']} {domain.kind}", f"{other_values['place']} {other.kind}"
    facts = list(domain.facts)
    rng.shuffle(facts)
    withheld = [facts.pop() for _ in range(rng.choice([1, 1, 2]))]  # facts the documents do not say
    passages = chunk(domain.file, document(org, facts, values, rng)) + \
        chunk(f"other/{other.file}", document(other_org, list(other.facts), other_values, rng))
    knowledge = (index or KnowledgeIndex.build)(passages)
    people = rng.sample(names, 3)

    msgs: list[Message] = []

    def retrieved(who: str, text: str) -> list[str]:  # what saying it would show, without saying it
        return recent_passages(msgs + [with_passages(knowledge, msgs, Message("user", text, who))[0]])

    def say(who: str, text: str) -> list[str]:
        msg, _ = with_passages(knowledge, msgs, Message("user", text, who))
        msgs.append(msg)
        return recent_passages(msgs)

    def reply(text: str) -> None:
        msgs.append(Message("assistant", text))

    say(people[0], rng.choice(domain.openers).format(org=org, **values))
    say(people[1], rng.choice(SMALL_TALK))
    for fact in facts[:rng.choice([1, 2, 2, 3])]:
        q = rng.choice(fact.questions)
        asker, friend = rng.sample(people, 2)
        style = rng.choices(["address", "open", "friend"], [0.45, 0.35, 0.2])[0]
        if style == "friend":
            say(asker, rng.choice(FRIEND_ASK).format(f=friend, q=q))
            say(friend, rng.choice(FRIEND_REPLY))
            continue
        text = fact.text.format(org=org, **values)
        if style == "open" and not any(text in p for p in retrieved(asker, rng.choice(OPEN_ASK).format(q=q))):
            style = "address"  # asked of nobody and not retrieved: left out (see the module's docstring)
        shown = say(asker, rng.choice(ADDRESS if style == "address" else OPEN_ASK).format(q=q))
        if any(text in p for p in shown):
            reply(fact.answer.format(org=org, **values))
        elif style == "address":  # not retrieved: the assistant was not shown it, so it cannot say
            reply(NOT_SAID.format(topic=fact.topic))
        if rng.random() < 0.7:
            say(rng.choice(people), rng.choice(SMALL_TALK))
    for fact in withheld:  # addressed questions the documents do not answer
        if rng.random() < 0.5:
            say(rng.choice(people), rng.choice(ADDRESS).format(q=rng.choice(fact.questions)))
            reply(NOT_SAID.format(topic=fact.topic))
    say(rng.choice(people), rng.choice(SMALL_TALK))
    return Conversation(tuple(msgs))
