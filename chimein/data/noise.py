"""Real-chat noise for the offline corpus: what busy group chats and support channels have and the
hand-written chats lack. The assistant stays silent at all of it.

    noisy = add_noise(conv, seed)   # the same chat, with a few noisy lines at silent turns

The corpus chats are small groups with first names. Real chats also have:
- questions aimed at a person by nickname, in the channel's own style ("k3v: so how do i resize
  it?", "deb_r, what does that flag do?"), and that person's answer;
- commands meant for other bots (`!seen marco`, `/giphy cat`, `.weather oslo`);
- links, pasted logs and error lines;
- one-word lines and greetings from people who were not in the talk ("ty", "+1", "o/");
- more people: the noise comes from new participants with nick-style names.

The lines go only where the assistant was silent, right after a user message it did not answer,
so every decision of the original chat is kept. Nothing is taken from the shipped benchmark (a
test checks that the benchmark and the offline data share no message).
"""

from __future__ import annotations

import random

from chimein.conversation import Conversation, Message

NICKS = ("k3v", "deb_r", "marco91", "wols_", "tinfoil", "pj_", "lunaM", "zed0", "ravi_k", "nullbyte", "hbar",
         "sk8r_jo", "mira.s", "oskar__", "fenn", "t0ni", "gus_w", "ibis", "yuki_t", "drw", "vee", "ozzy42")
COMMANDS = ("!help", "!seen {nick}", "/giphy {thing}", ".weather {city}", "!remind me in 10m to {task}",
            "/poll lunch at 1?", "!roll d20", "!karma {nick}", ".np", "!standup", "/shrug", "!ticket 4412",
            "!deploy status", "?tag {thing}", "!quote add \"{thing} again\"")
PASTES = (
    "https://github.com/{org}/{repo}/issues/{n}",
    "https://gitlab.com/{org}/{repo}/-/merge_requests/{n}",
    "E: Unable to locate package {pkg}",
    "error: failed to push some refs to 'origin'",
    "Traceback (most recent call last):\n  File \"app.py\", line {n}, in <module>\n    main()\nKeyError: '{pkg}'",
    "npm ERR! code ERESOLVE\nnpm ERR! ERESOLVE unable to resolve dependency tree",
    "$ systemctl status {pkg}\n● {pkg}.service - {pkg} daemon\n   Active: failed (Result: exit-code)",
    "WARN  [{pkg}] connection reset by peer, retrying in {n}s",
    "https://pastebin.com/raw/{code}",
    "https://imgur.com/a/{code}",
)
SHORT = ("ty", "thx", "+1", "?", "brb", "back", "o/", "lol", "same", "ack", "k", "👀", "nvm", "yup", "^ this",
         "gm", "afk", "ping", "bump")
# a question to someone by nick (the nick first, the channel's style) and that person's answer
TO_NICK = (
    ("{nick}: so how do i {task}?", "{asker} check the docs, it's under settings"),
    ("{nick}: did you get {thing} working in the end?", "yeah, had to restart it twice"),
    ("{nick} whats the command for {task}", "{asker} I'll dm you, it's long"),
    ("{nick}, what does {term} do again?", "it's just a wrapper, nothing magic"),
    ("{nick}: you around? need a hand with {thing}", "in 10 min"),
    ("@{nick} did {thing} finish?", "not yet, 80% or so"),
    ("{nick}: is {thing} still broken for you?", "works for me since this morning"),
    ("{nick} can you review my PR when you get a sec", "sure, after lunch"),
    ("{nick}: which branch are you on", "main, rebased an hour ago"),
    ("{nick}, did you ever sort out {thing}?", "nope, gave up 😅"),
)
THINGS = ("the build", "the vpn", "the printer", "the cron", "the backup", "grafana", "the raid", "docker",
          "the wiki", "the bot", "the new router", "the staging db")
TASKS = ("resize it", "reset my password", "mount the share", "rotate the logs", "clear the cache",
         "get admin rights", "add a webhook", "roll it back")
TERMS = ("that flag", "the -f option", "sudo -E", "the middleware", "the sidecar", "that env var", "git rebase -i")
CITIES = ("oslo", "lisbon", "osaka", "leeds", "quito", "tartu")
PKGS = ("libssl-dev", "nginx", "postgres", "redis", "python3-venv", "node", "cups")
ORGS = ("acme", "homelab", "club-site", "infra", "tools")
REPOS = ("api", "web", "dotfiles", "bot", "ansible")


def _fill(rng: random.Random, template: str, nick: str, asker: str) -> str:
    code = "".join(rng.choice("abcdefghijkmnpqrstuvwxyz23456789") for _ in range(7))
    return template.format(nick=nick, asker=asker, thing=rng.choice(THINGS), task=rng.choice(TASKS),
                           term=rng.choice(TERMS), city=rng.choice(CITIES), pkg=rng.choice(PKGS),
                           org=rng.choice(ORGS), repo=rng.choice(REPOS), n=rng.randint(2, 999), code=code)


def noise_lines(rng: random.Random, people: list[str]) -> list[tuple[str, str]]:
    """One bit of noise: (name, text) lines, from nick-named newcomers and the chat's people."""
    newcomer, other = rng.sample(NICKS, 2)
    kind = rng.choices(("nick", "command", "paste", "short"), weights=(4, 2, 2, 2))[0]
    if kind == "nick":  # two newcomers, or a newcomer and one of the chat's people
        asked = rng.choice([other, *people]) if people else other
        question, answer = rng.choice(TO_NICK)
        return [(newcomer, _fill(rng, question, asked, newcomer)), (asked, _fill(rng, answer, asked, newcomer))]
    if kind == "command":
        return [(newcomer, _fill(rng, rng.choice(COMMANDS), rng.choice([other, *people]), newcomer))]
    if kind == "paste":
        return [(newcomer, _fill(rng, rng.choice(PASTES), other, newcomer))]
    return [(newcomer, rng.choice(SHORT))]


def add_noise(conv: Conversation, seed: int, most: int = 3) -> Conversation:
    """`conv` with 1..most bits of noise at its silent turns (after a user message the assistant
    did not answer, never before the first message). Deterministic in `seed`."""
    rng = random.Random(seed)
    msgs = list(conv.messages)
    people = list(dict.fromkeys(m.name for m in msgs if m.role == "user"))
    slots = [i for i in range(len(msgs)) if msgs[i].role == "user" and (i + 1 == len(msgs) or msgs[i + 1].role == "user")]
    for _ in range(rng.randint(1, most)):
        if not slots:
            break
        at = rng.choice(slots) + 1
        lines = [Message("user", text, name) for name, text in noise_lines(rng, people)]
        msgs[at:at] = lines
        slots = [s + len(lines) * (s >= at) for s in slots] + [at + len(lines) - 1]
    return Conversation(tuple(msgs))
