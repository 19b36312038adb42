"""The ``reviews`` task: a synthetic language of short movie reviews with a hidden gold reward.

The language
------------
Reviews are 1-3 sentences over a lexicon of ~250 words. Every sentence follows one automaton (``ARCS``)::

    sentence := [OPENER ","] clause ("," CONJ clause)* ("." | "!")
    clause   := DET NOUN VERB ["not"] [INTENS] ADJ ["and" [INTENS] ADJ]      the acting was truly wonderful
              | PRON [ADVERB] OPINION_VERB DET NOUN                           i really loved the soundtrack

e.g. ``the acting was truly wonderful , but the plot felt slow .``. Texts are canonical when their tokens
(words and the punctuation ``. , !``) are separated by single spaces. Prompts are ``"Review : "`` followed by
the first 2-4 tokens of a grammatical review; SFT completions continue the review and start with one
space, so ``prompt + completion`` is the whole review (the trainer appends EOS).

Gold reward (hidden from the reward model)
------------------------------------------
The gold reward scores the whole review ``r`` = the prompt's opening + the response (special tokens and the
``Review :`` marker removed), tokenised into ``n`` tokens::

    gold = 2 * tanh(raw / 4)                       sentiment, bounded in (-2, 2)
           - 0.5 * repeats                         each reuse of a content word (adjective, intensifier,
                                                   noun, opinion verb, opener) after its first use
           - 1.0 * bad_sentences                   sentences (split at "." / "!") that do not parse, incl.
                                                   an unfinished trailing fragment or unknown words
           - 0.5 * [r does not end with "." or "!"]
           - 0.1 * (max(0, 8 - n) + max(0, n - 40))  too short / too long

    raw = sum over the FIRST occurrence of each sentiment word w (adjective, opinion verb, opener) of
          weight(w) * min(3, product of the intensifier multipliers just before w) * (-0.5 if negated)

where "negated" means a ``not`` earlier in the same clause (up to the next "," "." or "!"). A repeated
positive adjective is therefore worth nothing the second time and costs 0.5: the degenerate
``great great great great great`` has five positive words but scores far below a fluent, mildly positive
review. Scores are a pure function of the text. ``docs/tasks.md`` explains the task for users.

Rated data (``rated.jsonl``, for multi-objective reward models): each row holds ``RATED_COMPLETIONS`` responses to
one prompt and, for each, K = 4 attribute ratings that are the gold reward's own terms, so they sum to ``gold``::

    sentiment = the bounded sentiment term           fluency = -(1.0 * bad_sentences + 0.5 * no_final_punct)
    variety   = -0.5 * repeats                       length  = -0.1 * length_excess
"""

from __future__ import annotations

import math
import random
import re

from alignflow.config import TaskConfig
from alignflow.tasks.common import SPECIAL_TOKENS, UNK, TaskSpec, make_pair, sample_unique, split_of, task_rng

NAME = "reviews"
PROMPT_PREFIX = "Review :"
NUM_PROMPTS = 1024  # RL training prompts
NUM_EVAL_PROMPTS = 256  # held-out prompts (their openings never appear in sft/prompts/pairs)
MIN_LEN, MAX_LEN = 8, 40  # review length in tokens without a length penalty
REPEAT_COST, BAD_SENTENCE_COST, NO_PUNCT_COST, LENGTH_COST = 0.5, 1.0, 0.5, 0.1
SENTIMENT_SCALE, SENTIMENT_BOUND, MAX_INTENSITY, NEGATION = 4.0, 2.0, 3.0, -0.5

# ------------------------------------------------------------------------------------------------ lexicon
POSITIVE = dict(
    wonderful=2.5,
    great=2.0,
    brilliant=2.5,
    excellent=2.5,
    superb=2.5,
    fantastic=2.5,
    outstanding=2.5,
    masterful=3.0,
    charming=1.5,
    moving=1.8,
    clever=1.5,
    beautiful=2.0,
    gripping=2.0,
    delightful=2.0,
    fresh=1.2,
    funny=1.2,
    engaging=1.5,
    stunning=2.5,
    powerful=2.0,
    touching=1.8,
    memorable=1.8,
    elegant=1.5,
    smart=1.3,
    lovely=1.8,
    thrilling=2.0,
    witty=1.4,
    solid=1.0,
    strong=1.2,
    vivid=1.4,
    warm=1.2,
    sharp=1.2,
    inventive=1.6,
    good=1.0,
    nice=0.8,
    fine=0.5,
    decent=0.6,
    pleasant=0.8,
    enjoyable=1.3,
    satisfying=1.4,
    compelling=1.8,
    heartfelt=1.6,
    tender=1.2,
    playful=1.0,
    confident=1.0,
    polished=1.2,
    gorgeous=2.2,
    haunting=1.5,
    riveting=2.0,
    joyful=1.6,
    sincere=1.1,
    graceful=1.4,
    rich=1.2,
    bold=1.1,
    crisp=1.0,
    lively=1.1,
    uplifting=1.7,
)
NEGATIVE = dict(
    slow=-1.0,
    boring=-2.0,
    dull=-1.8,
    awful=-2.5,
    terrible=-2.5,
    weak=-1.5,
    messy=-1.4,
    bland=-1.4,
    clumsy=-1.5,
    predictable=-1.2,
    tedious=-2.0,
    flat=-1.3,
    lifeless=-2.0,
    confusing=-1.3,
    forgettable=-1.5,
    painful=-2.2,
    shallow=-1.4,
    silly=-1.0,
    stiff=-1.2,
    poor=-1.8,
    dreadful=-2.5,
    lazy=-1.6,
    tired=-1.2,
    awkward=-1.3,
    cliched=-1.3,
    hollow=-1.5,
    muddled=-1.5,
    sloppy=-1.6,
    uneven=-1.0,
    overlong=-1.2,
    pointless=-2.0,
    annoying=-1.8,
    cheap=-1.4,
    dreary=-1.7,
    grating=-1.6,
    lame=-1.7,
    mediocre=-1.3,
    bad=-1.8,
    horrible=-2.5,
    unbearable=-2.7,
    stale=-1.3,
    wooden=-1.4,
    sluggish=-1.3,
    disappointing=-1.8,
    bloated=-1.3,
    incoherent=-2.0,
    joyless=-1.8,
    cold=-0.8,
    thin=-0.9,
    noisy=-0.8,
)
NEUTRAL = tuple(
    "long short loud quiet simple familiar unusual dark bright modern classic old fast strange different "
    "typical serious light busy calm plain complex brief subtle small new colourful minimal steady sparse "
    "stylised gentle".split()
)
OPINION_VERBS = dict(
    loved=2.5,
    liked=1.5,
    enjoyed=1.8,
    admired=1.8,
    adored=2.5,
    appreciated=1.2,
    hated=-2.5,
    disliked=-1.5,
    loathed=-2.5,
    resented=-1.8,
    regretted=-1.5,
    noticed=0.0,
    watched=0.0,
    expected=0.0,
    followed=0.0,
    remember=0.0,
)
OPENERS = dict(
    overall=0.0,
    honestly=0.0,
    frankly=0.0,
    still=0.0,
    admittedly=0.0,
    clearly=0.0,
    sadly=-1.0,
    unfortunately=-1.2,
    regrettably=-1.2,
    happily=1.0,
    thankfully=1.2,
    luckily=1.0,
)
INTENSIFIERS = dict(
    very=1.5,
    really=1.5,
    truly=1.6,
    quite=1.2,
    so=1.5,
    extremely=2.0,
    incredibly=2.0,
    remarkably=1.7,
    deeply=1.6,
    utterly=1.8,
    pretty=1.2,
    rather=1.1,
    fairly=0.8,
    somewhat=0.6,
    slightly=0.5,
    mildly=0.5,
    surprisingly=1.3,
    genuinely=1.5,
    thoroughly=1.7,
    oddly=1.0,
    absolutely=1.8,
    simply=1.3,
)
VERB_ADVERBS = ("really", "truly", "genuinely", "absolutely", "simply", "honestly")  # before an opinion verb
NOUNS = tuple(
    "film movie plot story acting cast script dialogue soundtrack music score ending opening finale pacing "
    "direction cinematography editing lighting premise twist villain hero lead romance humour atmosphere "
    "setting camera sequel performance climax structure tone".split()
)
CLASSES = {  # word class -> words
    "DET": ("the", "this", "that"),
    "NOUN": NOUNS,
    "PRON": ("i", "we"),
    "NOT": ("not",),
    "AND": ("and",),
    "VERB": ("was", "is", "felt", "seemed", "looked", "sounded", "remained", "stayed", "became"),
    "ADJ": tuple(POSITIVE) + tuple(NEGATIVE) + NEUTRAL,
    "INT": tuple(INTENSIFIERS),
    "ADVV": VERB_ADVERBS,
    "OPV": tuple(OPINION_VERBS),
    "OPEN": tuple(OPENERS),
    "CONJ": ("and", "but", "yet", "while", "although"),
    "COMMA": (",",),
    "END": (".", "!"),
}
WORD_CLASSES: dict = {}
for _cls, _words in CLASSES.items():
    for _w in _words:
        WORD_CLASSES.setdefault(_w, set()).add(_cls)
SENTIMENT = {**POSITIVE, **NEGATIVE, **{w: 0.0 for w in NEUTRAL}, **OPINION_VERBS, **OPENERS}
CONTENT = set(CLASSES["ADJ"]) | set(INTENSIFIERS) | set(VERB_ADVERBS) | set(NOUNS) | set(OPINION_VERBS) | set(OPENERS)
VOCAB = tuple(sorted(WORD_CLASSES)) + tuple(PROMPT_PREFIX.split())

# ------------------------------------------------------------------------------------------------ grammar
# state -> ((word class, next state, generation weight), ...). "S" starts a sentence, "ACC" follows its end.
_CLAUSE = (("DET", "A1", 0.75), ("PRON", "B1", 0.25))
_CLAUSE_END = (("COMMA", "K", 0.4), ("END", "ACC", 0.6))
ARCS = {
    "S": (("OPEN", "O1", 0.15),) + tuple((c, s, w * 0.85) for c, s, w in _CLAUSE),
    "O1": (("COMMA", "C", 1.0),),
    "C": _CLAUSE,
    "K": (("CONJ", "C", 1.0),),
    "A1": (("NOUN", "A2", 1.0),),
    "A2": (("VERB", "A3", 1.0),),
    "A3": (("NOT", "A4", 0.08), ("INT", "A5", 0.4), ("ADJ", "A6", 0.52)),
    "A4": (("INT", "A5", 0.4), ("ADJ", "A6", 0.6)),
    "A5": (("ADJ", "A6", 1.0),),
    "A6": (("AND", "A7", 0.25),) + tuple((c, s, w * 0.75) for c, s, w in _CLAUSE_END),
    "A7": (("INT", "A8", 0.3), ("ADJ", "E", 0.7)),
    "A8": (("ADJ", "E", 1.0),),
    "E": _CLAUSE_END,
    "B1": (("ADVV", "B2", 0.3), ("OPV", "B3", 0.7)),
    "B2": (("OPV", "B3", 1.0),),
    "B3": (("DET", "B4", 1.0),),
    "B4": (("NOUN", "B5", 1.0),),
    "B5": _CLAUSE_END,
    "ACC": (),
}
CLAUSE_ENDS = frozenset({"A6", "E", "B5"})


def _step(states: set, token: str) -> set:
    classes = WORD_CLASSES.get(token, ())
    return {nxt for s in states for cls, nxt, _ in ARCS[s] if cls in classes}


def parse(tokens: list) -> str:
    """'ok' for one complete sentence, 'unpunctuated' when only the final "." / "!" is missing, else 'bad'."""
    states = {"S"}
    for tok in tokens:
        states = _step(states, tok)
        if not states:
            return "bad"
    if "ACC" in states:
        return "ok"
    return "unpunctuated" if states & CLAUSE_ENDS else "bad"


def tokenize(text: str) -> list:
    """Split text like the task tokenizer does (words, single punctuation marks); special tokens are dropped."""
    for special in SPECIAL_TOKENS:
        if special != UNK:
            text = text.replace(special, " ")
    return re.findall(r"\w+|[^\w\s]", text)


def sentences(tokens: list) -> list:
    """Split at "." and "!" (kept with their sentence); an unfinished tail is the last item."""
    out, cur = [], []
    for tok in tokens:
        cur.append(tok)
        if tok in CLASSES["END"]:
            out.append(cur)
            cur = []
    return out + ([cur] if cur else [])


def review_tokens(prompt: str, response: str) -> list:
    """The review a (prompt, response) pair forms: the prompt's opening (marker removed) + the response."""
    head = tokenize(prompt)
    marker = PROMPT_PREFIX.split()
    if head[: len(marker)] == marker:
        head = head[len(marker) :]
    return head + tokenize(response)


# ------------------------------------------------------------------------------------------------ gold reward
def sentiment_raw(tokens: list) -> float:
    """Sum of first-occurrence sentiment weights x intensifier multipliers, flipped and halved by ``not``."""
    raw, mult, negated, seen = 0.0, 1.0, False, set()
    for tok in tokens:
        if tok in (",", ".", "!"):
            mult, negated = 1.0, False
        elif tok == "not":
            negated = True
        elif tok in INTENSIFIERS and tok not in SENTIMENT:
            mult *= INTENSIFIERS[tok]
        elif tok in SENTIMENT:
            if tok not in seen:
                raw += SENTIMENT[tok] * min(mult, MAX_INTENSITY) * (NEGATION if negated else 1.0)
            seen.add(tok)
            mult = 1.0
    return raw


def gold_components(prompt: str, response: str) -> dict:
    """Every term of the gold reward for one review (see the module docstring), and their total ``gold``."""
    toks = review_tokens(prompt, response)
    counts: dict = {}
    repeats = 0
    for tok in toks:
        if tok in CONTENT:
            repeats += counts.get(tok, 0) > 0
            counts[tok] = counts.get(tok, 0) + 1
    parsed = [parse(s) for s in sentences(toks)]
    n = len(toks)
    c = {
        "sentiment": SENTIMENT_BOUND * math.tanh(sentiment_raw(toks) / SENTIMENT_SCALE),
        "repeats": float(repeats),
        "bad_sentences": float(sum(p == "bad" for p in parsed) + (not parsed)),
        "no_final_punct": float(not toks or toks[-1] not in CLASSES["END"]),
        "length_excess": float(max(0, MIN_LEN - n) + max(0, n - MAX_LEN)),
    }
    c["gold"] = (
        c["sentiment"]
        - REPEAT_COST * c["repeats"]
        - BAD_SENTENCE_COST * c["bad_sentences"]
        - NO_PUNCT_COST * c["no_final_punct"]
        - LENGTH_COST * c["length_excess"]
    )
    return c


def gold_reward(prompts: list, responses: list) -> list:
    """Hidden gold reward of each (prompt, response); deterministic. Formula in the module docstring."""
    if len(prompts) != len(responses):
        raise ValueError(f"gold_reward: {len(prompts)} prompts but {len(responses)} responses")
    return [gold_components(p, r)["gold"] for p, r in zip(prompts, responses, strict=False)]


def naive_sentiment(text: str) -> float:
    """Positive minus negative word count: what a shallow reward learns, and what the gold reward is not."""
    toks = tokenize(text)
    return float(sum(t in POSITIVE for t in toks) - sum(t in NEGATIVE for t in toks))


# ------------------------------------------------------------------------------------------------ generator
TONES = {"positive": (0.75, 0.2, 0.05), "neutral": (0.2, 0.6, 0.2), "negative": (0.05, 0.2, 0.75)}


def _by_sign(weights: dict) -> tuple:
    """(positive, neutral, negative) words of a weight table."""
    return tuple(
        tuple(w for w, s in weights.items() if keep(s)) for keep in (lambda s: s > 0, lambda s: s == 0, lambda s: s < 0)
    )


_POLAR = {
    "ADJ": _by_sign({**POSITIVE, **{w: 0.0 for w in NEUTRAL}, **NEGATIVE}),
    "OPV": _by_sign(OPINION_VERBS),
    "OPEN": _by_sign(OPENERS),
}
STOP_AFTER = {1: 0.3, 2: 0.55}  # P(stop) after the n-th sentence; always stop after the third


def _pick_word(rng: random.Random, cls: str, tone: tuple, used: set) -> str:
    """A word of class ``cls``: polarity drawn from ``tone`` for sentiment classes; content words not reused."""
    if cls == "END":
        return "!" if rng.random() < 0.15 else "."
    pool = CLASSES[cls]
    if cls in _POLAR:
        pool = _POLAR[cls][rng.choices(range(3), weights=tone)[0]]
    word = rng.choice(pool)
    if word not in used:
        return word
    fresh = [w for w in pool if w not in used] or [w for w in CLASSES[cls] if w not in used] or list(pool)
    return rng.choice(fresh)


def _walk(rng: random.Random, tone: tuple, forced: list, limit: int = 10**6) -> list:
    """One review by a random walk over ``ARCS`` (at most ``limit`` tokens); it starts with ``forced``."""
    out, used, state, n_sent, n_clause = [], set(), "S", 0, 1
    while len(out) < limit:
        if state == "ACC":
            n_sent += 1
            if len(out) >= len(forced) and (n_sent >= 3 or rng.random() < STOP_AFTER[n_sent]):
                return out
            state, n_clause = "S", 1
        arcs = ARCS[state]
        if len(out) < len(forced):
            tok = forced[len(out)]
            match = [(c, s) for c, s, _ in arcs if c in WORD_CLASSES.get(tok, ())]
            if not match:
                raise ValueError(f"forced prefix {forced} is not grammatical at {tok!r}")
            cls, nxt = match[0]
        else:
            weights = [0.0 if (c == "COMMA" and n_clause >= 2) else w for c, _, w in arcs]
            cls, nxt, _ = rng.choices(arcs, weights=weights)[0]
            tok = _pick_word(rng, cls, tone, used)
        n_clause += cls == "CONJ"
        if tok in CONTENT:
            used.add(tok)
        out.append(tok)
        state = nxt
    return out


def sample_review(rng: random.Random, tone: str, forced: tuple = ()) -> list:
    """A grammatical review of MIN_LEN..MAX_LEN tokens in the given tone, starting with ``forced``."""
    for _ in range(1000):
        toks = _walk(rng, TONES[tone], list(forced))
        if MIN_LEN <= len(toks) <= MAX_LEN:
            return toks
    raise RuntimeError(f"could not sample a {tone} review of {MIN_LEN}-{MAX_LEN} tokens starting {forced}")


def _opening(rng: random.Random, split: str, seed: int, full: bool = True) -> tuple:
    """(opening tokens, the full review or None) with the opening's split as asked; openings are 2-4 tokens."""
    while True:
        tone, k = rng.choice(tuple(TONES)), rng.randint(2, 4)
        opening = _walk(rng, TONES[tone], [], limit=k)
        if split_of(" ".join(opening), seed) == split:
            return opening, sample_review(rng, tone, tuple(opening)) if full else None


def as_prompt(opening: list) -> str:
    return f"{PROMPT_PREFIX} {' '.join(opening)}"


def as_completion(tokens: list) -> str:
    """A completion continues the prompt: one leading space, then canonical text."""
    return " " + " ".join(tokens)


def _degrade(rng: random.Random, tail: list) -> list:
    """One damage the gold reward sees (varied pair quality); unchanged when the damage does not apply."""
    tail = list(tail)
    kind = rng.choice(("repeat", "no_punct", "truncate", "swap", "spam", "ramble"))
    if kind == "repeat":
        words = [t for t in tail if t in SENTIMENT or t in INTENSIFIERS] or ["great"]
        w = rng.choice(words)
        tail.insert(rng.randint(0, len(tail)), w)
    elif kind == "no_punct" and tail and tail[-1] in CLASSES["END"]:
        tail.pop()
    elif kind == "truncate" and len(tail) > 1:
        tail = tail[: rng.randint(1, len(tail) - 1)]
    elif kind == "swap" and len(tail) > 2:
        i = rng.randrange(len(tail) - 1)
        tail[i], tail[i + 1] = tail[i + 1], tail[i]
    elif kind == "spam":
        tail += rng.choices(tuple(POSITIVE), k=rng.randint(2, 6))
    elif kind == "ramble":
        tail += sample_review(rng, rng.choice(tuple(TONES))) + sample_review(rng, rng.choice(tuple(TONES)))
    return tail


def _pair_response(rng: random.Random, opening: list) -> str:
    tail = sample_review(rng, rng.choice(tuple(TONES)), tuple(opening))[len(opening) :]
    if rng.random() < 0.35:
        tail = _degrade(rng, tail)
    return as_completion(tail)


def _prompt_rows(seed: int, split: str, n: int) -> list:
    rng = task_rng(NAME, seed, split + "_prompts")
    return sample_unique(
        lambda: {"prompt": as_prompt(_opening(rng, split, seed, full=False)[0])}, n, f"{split} prompts"
    )


RATED_COMPLETIONS = 4


def attribute_ratings(prompt: str, response: str) -> dict:
    """The K = 4 attribute ratings of one response (module docstring); their sum is the gold reward."""
    c = gold_components(prompt, response)
    return {
        "sentiment": c["sentiment"],
        "fluency": -(BAD_SENTENCE_COST * c["bad_sentences"] + NO_PUNCT_COST * c["no_final_punct"]),
        "variety": -REPEAT_COST * c["repeats"],
        "length": -LENGTH_COST * c["length_excess"],
    }


def _rated_rows(cfg: TaskConfig) -> list:
    """``num_pairs // 2`` rated rows of RATED_COMPLETIONS distinct responses each (the pairs' response mix)."""
    rng, rows = task_rng(NAME, cfg.seed, "rated"), []
    for _ in range(max(1, cfg.num_pairs // 2)):
        opening = _opening(rng, "train", cfg.seed, full=False)[0]
        prompt, completions = as_prompt(opening), []
        while len(completions) < RATED_COMPLETIONS:
            c = _pair_response(rng, opening)
            if c not in completions:
                completions.append(c)
        rows.append(
            {
                "prompt": prompt,
                "completions": completions,
                "ratings": [attribute_ratings(prompt, c) for c in completions],
            }
        )
    return rows


def make_rows(cfg: TaskConfig) -> dict:
    """The task's data: {"sft_path": rows, "prompts_path": rows, "eval_prompts_path": rows, "pairs_path": rows}."""
    rng = task_rng(NAME, cfg.seed, "sft")
    sft = []
    for _ in range(cfg.num_sft):
        opening, toks = _opening(rng, "train", cfg.seed)
        sft.append({"prompt": as_prompt(opening), "completion": as_completion(toks[len(opening) :])})
    rng = task_rng(NAME, cfg.seed, "pairs")
    pairs = []
    for _ in range(cfg.num_pairs):
        opening = _opening(rng, "train", cfg.seed, full=False)[0]
        prompt, a = as_prompt(opening), _pair_response(rng, opening)
        b = a
        while b == a:
            b = _pair_response(rng, opening)
        ga, gb = gold_reward([prompt, prompt], [a, b])
        pairs.append(make_pair(rng, prompt, a, b, ga, gb, cfg.label_noise))
    return {
        "sft_path": sft,
        "prompts_path": _prompt_rows(cfg.seed, "train", NUM_PROMPTS),
        "eval_prompts_path": _prompt_rows(cfg.seed, "eval", NUM_EVAL_PROMPTS),
        "pairs_path": pairs,
        "rated_path": _rated_rows(cfg),
    }


def ungrammatical_cost(prompts: list, responses: list, **_) -> list:
    """Cost of a ``reviews`` response (Safe RLHF demo): its sentences that do not parse, plus 1 when the review
    does not end with "." or "!" (the gold reward's grammar terms, without the weights). 0 = fluent."""
    out = []
    for p, r in zip(prompts, responses, strict=False):
        c = gold_components(p, r)
        out.append(c["bad_sentences"] + c["no_final_punct"])
    return out


TASK = TaskSpec(
    name=NAME,
    vocab=VOCAB,
    join=" ",
    make_rows=make_rows,
    gold_reward=gold_reward,
    rewards={"gold": gold_reward},
    costs={"ungrammatical": ungrammatical_cost},
)
