"""VQA answer normalisation and accuracy as EvalAI scores VQAv2, VizWiz and TextVQA.

Kept under upstream's module name so ``from llava.eval.m4c_evaluator import EvalAIAnswerProcessor,
TextVQAAccuracyEvaluator`` works as in LLaVA.

Normalisation (:class:`EvalAIAnswerProcessor`), in order:

1. lower-case; delete every ``,`` and ``?``; ``'s`` becomes `` 's``; tabs and newlines become spaces.
   Commas go first, so ``"1,000"`` reads ``"1000"``.
2. punctuation ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !``: a mark that has a space on either
   side somewhere in the answer is deleted, any other mark becomes a space (all are deleted when
   the answer holds digit-comma-digit, which step 1 already removed);
3. a ``.`` not followed by a digit is deleted (``"3.5"`` keeps its point), at most 32 of them:
   EvalAI's processor passes ``re.UNICODE`` (32) where ``re.sub`` takes its count;
4. word by word: number words zero to ten become digits (``"none"`` is ``"0"``), the articles
   ``a``/``an``/``the`` are dropped, and apostrophe-less contractions are restored (``"dont"`` is
   ``"don't"``), by the tables below.

The tables are EvalAI's (via MMF and upstream LLaVA), quirks included: ``"somebody'd"`` maps to
``"somebodyd"``. They are data: changing one changes every published number.

Accuracy (:class:`TextVQAAccuracyEvaluator`): an answer given by ``k`` of the 10 annotators is worth
``min(k / 3, 1)`` against each 9-annotator subset, averaged over the 10 ways of leaving one out;
so 1, 2, 3 and 4+ matching annotators give 0.3, 0.6, 0.9 and 1.0.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence

CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}

NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}

ARTICLES = frozenset({"a", "an", "the"})

PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")

_DIGIT_COMMA_DIGIT = re.compile(r"(?<=\d),+(?=\d)")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_MAX_PERIODS_DELETED = int(re.UNICODE)  # 32, see step 3 in the module docstring

HUMAN_ANSWERS_PER_QUESTION = 10
ANSWERS_FOR_FULL_CREDIT = 3


class EvalAIAnswerProcessor:
    """Normalise a free-form answer the way EvalAI does before comparing it with human answers.

    ``EvalAIAnswerProcessor()("Two dogs.")`` is ``"2 dogs"``. Arguments are accepted and ignored,
    as upstream's constructor does.
    """

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __call__(self, answer: str) -> str:
        text = self.word_tokenize(answer)
        text = text.replace("\n", " ").replace("\t", " ").strip()
        text = self.process_punctuation(text)
        return self.process_digit_article(text)

    def word_tokenize(self, answer: str) -> str:
        """Step 1: lower-case, drop commas and question marks, split off ``'s``."""
        return answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()

    def process_punctuation(self, text: str) -> str:
        """Steps 2 and 3: delete or space out punctuation, then delete periods not before a digit."""
        delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
        out = text
        for mark in PUNCTUATION:
            # Whether a mark stands next to a space is judged on the input, not on ``out``.
            beside_space = f"{mark} " in text or f" {mark}" in text
            out = out.replace(mark, "" if beside_space or delete_all else " ")
        return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_MAX_PERIODS_DELETED)

    def process_digit_article(self, text: str) -> str:
        """Step 4: number words to digits, articles out, contractions restored."""
        words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
        return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def _check_predictions(pred_list: Sequence[Mapping]) -> None:
    if len(pred_list) == 0:
        raise ValueError("no predictions to score: pred_list is empty.")


class TextVQAAccuracyEvaluator:
    """VQA accuracy (TextVQA, VQAv2, VizWiz): soft credit against 10 human answers, leave-one-out.

    ``eval_pred_list`` takes ``[{"pred_answer": str, "gt_answers": [10 str]}, ...]`` and returns the
    mean score in [0, 1].
    """

    def __init__(self) -> None:
        self.answer_processor = EvalAIAnswerProcessor()

    def answer_scores(self, human_answers: Sequence[str]) -> dict[str, float]:
        """Score of each distinct (normalised) human answer; any other answer scores 0."""
        answers = [self.answer_processor(a) for a in human_answers]
        if len(answers) != HUMAN_ANSWERS_PER_QUESTION:
            raise ValueError(
                f"VQA accuracy needs {HUMAN_ANSWERS_PER_QUESTION} human answers per question, got "
                f"{len(answers)}: {list(human_answers)!r}. Pass the annotation's full 'answers' list."
            )
        scores = {}
        for candidate, given_by in Counter(answers).items():
            total = 0.0
            for left_out in answers:
                agreeing = given_by - (left_out == candidate)
                total += min(1, float(agreeing) / ANSWERS_FOR_FULL_CREDIT)
            scores[candidate] = total / len(answers)
        return scores

    def eval_pred_list(self, pred_list: Sequence[Mapping]) -> float:
        _check_predictions(pred_list)
        scores = [
            self.answer_scores(entry["gt_answers"]).get(self.answer_processor(entry["pred_answer"]), 0.0)
            for entry in pred_list
        ]
        return sum(scores) / len(scores)


class STVQAAccuracyEvaluator:
    """ST-VQA accuracy: 1 when the normalised prediction equals any normalised ground truth."""

    def __init__(self) -> None:
        self.answer_processor = EvalAIAnswerProcessor()

    def eval_pred_list(self, pred_list: Sequence[Mapping]) -> float:
        _check_predictions(pred_list)
        hits = 0.0
        for entry in pred_list:
            truths = {self.answer_processor(a) for a in entry["gt_answers"]}
            hits += 1.0 if self.answer_processor(entry["pred_answer"]) in truths else 0.0
        return hits / len(pred_list)


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insert, delete, substitute; each costs 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


class STVQAANLSEvaluator:
    """ST-VQA ANLS: best ``1 - edit_distance / longer length`` over ground truths, 0 below 0.5.

    Compared after lower-casing and stripping only (no EvalAI normalisation). Two empty strings
    count as a perfect match.
    """

    THRESHOLD = 0.5

    def get_anls(self, prediction: str, truth: str) -> float:
        prediction, truth = prediction.lower().strip(), truth.lower().strip()
        longer = max(len(prediction), len(truth))
        if longer == 0:
            return 1.0
        similarity = 1 - edit_distance(prediction, truth) / longer
        return similarity if similarity >= self.THRESHOLD else 0.0

    def eval_pred_list(self, pred_list: Sequence[Mapping]) -> float:
        _check_predictions(pred_list)
        total = 0.0
        for entry in pred_list:
            total += max(self.get_anls(entry["pred_answer"], truth) for truth in entry["gt_answers"])
        return total / len(pred_list)

