"""Metrics of OpenFlamingo's few-shot benchmarks: VQA accuracy, CIDEr, ROC-AUC and top-1 accuracy.

The VQA accuracy reproduces the official VQA evaluation as OpenFlamingo runs it: both the prediction and every
annotator answer are normalised (punctuation, articles, number words, contractions), and an answer scores
`min(#matching other annotators / 3, 1)` averaged over the leave-one-annotator-out subsets. CIDEr is pycocoevalcap's
CIDEr-D on PTB-tokenised captions, exactly the steps `COCOEvalCap.evaluate` takes for that one metric.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Hashable, Mapping, Sequence

__all__ = [
    "compute_cider",
    "compute_vqa_accuracy",
    "normalize_vqa_answer",
    "roc_auc_score",
    "top1_accuracy",
    "vqa_accuracy",
]

# --------------------------------------------------------------------------------------------------------------------
# VQA answer normalisation (the tables of the official VQA evaluation script)

# The official table: an apostrophe-less spelling -> its contraction (sic "somebody'd" -> "somebodyd").
_CONTRACTIONS = dict(
    entry.split("=", 1)
    for entry in """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've hadn'tve=hadn't've
hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's howd=how'd howll=how'll hows=how's
Id've=I'd've I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd itd've=it'd've it'dve=it'd've itll=it'll let's=let's
maam=ma'am mightnt=mightn't mightnt've=mightn't've mightn'tve=mightn't've mightve=might've mustnt=mustn't
mustve=must've neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at
'ow'sat='ow's'at shant=shan't shed've=she'd've she'dve=she'd've she's=she's shouldve=should've shouldnt=shouldn't
shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd somebodyd've=somebody'd've
somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's someoned=someone'd
someoned've=someone'd've someone'dve=someone'd've someonell=someone'll someones=someone's
somethingd=something'd somethingd've=something'd've something'dve=something'd've somethingll=something'll
thats=that's thered=there'd thered've=there'd've there'dve=there'd've therere=there're theres=there's
theyd=they'd theyd've=they'd've they'dve=they'd've theyll=they'll theyre=they're theyve=they've twas='twas
wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've werent=weren't whatll=what'll whatre=what're whats=what's
whatve=what've whens=when's whered=where'd wheres=where's whereve=where've whod=who'd whod've=who'd've
who'dve=who'd've wholl=who'll whos=who's whove=who've whyll=why'll whyre=why're whys=why's wont=won't
wouldve=would've wouldnt=wouldn't wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll
y'allll=y'all'll yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've
you'dve=you'd've youll=you'll youre=you're youve=you've
""".split()
)

_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = [
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
]
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# The official pattern is "(?!<=\d)(\.)(?!\d)": its first group is a (no-op) lookahead, so it removes every period not
# followed by a digit, at most 32 of them (`re.UNICODE` is passed where `count` goes).
_PERIOD = re.compile(r"\.(?!\d)")
_MAX_PERIODS_REMOVED = int(re.UNICODE)


def _strip_punctuation(text: str) -> str:
    result = text
    keep_glued = _DIGIT_COMMA_DIGIT.search(text) is not None
    for mark in _PUNCTUATION:
        # A mark next to a space (or any mark, in a text with "1,000"-style numbers) is deleted; one inside a word
        # becomes a space. Both tests look at the original text.
        if keep_glued or f"{mark} " in text or f" {mark}" in text:
            result = result.replace(mark, "")
        else:
            result = result.replace(mark, " ")
    return _PERIOD.sub("", result, count=_MAX_PERIODS_REMOVED)


def _normalize_words(text: str) -> str:
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words)


def normalize_vqa_answer(answer: str) -> str:
    """Normalises an answer like the official VQA evaluation (as OpenFlamingo runs it, on every answer).

    Newlines and tabs become spaces; punctuation is removed or turned into spaces; periods not followed by a digit are
    removed; the text is lower-cased; number words up to ten become digits; articles are dropped; apostrophe-less
    contractions get their apostrophe back (`"dont"` -> `"don't"`).

    Args:
        answer (`str`): A predicted or annotated answer.

    Returns:
        `str`: The normalised answer.
    """
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return _normalize_words(_strip_punctuation(answer))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The VQA accuracy of one prediction against its annotators' answers (usually 10).

    For each annotator, the prediction scores `min(#other annotators giving it / 3, 1)`; the result is the mean over
    annotators, i.e. over the subsets of `len(answers) - 1` answers. With 10 answers of which `m` match, this is 1 for
    `m >= 4`, 0.9 for `m = 3`, 0.6 for `m = 2`, 0.3 for `m = 1` and 0 for `m = 0`.

    Args:
        prediction (`str`): The model's (post-processed) answer.
        answers (`Sequence[str]`): The annotators' answers.

    Returns:
        `float` in [0, 1].
    """
    if not answers:
        raise ValueError("vqa_accuracy needs at least one annotator answer, got none.")
    prediction = normalize_vqa_answer(prediction)
    matches = [normalize_vqa_answer(answer) == prediction for answer in answers]
    total = sum(matches)
    # Leaving annotator i out removes one match exactly when annotator i matched.
    scores = [min(1.0, (total - int(matched)) / 3) for matched in matches]
    return sum(scores) / len(scores)


def compute_vqa_accuracy(predictions: Mapping[Hashable, str], answers: Mapping[Hashable, Sequence[str]]) -> float:
    """Overall VQA accuracy in percent, rounded to 2 decimals like the official script.

    Args:
        predictions (`Mapping`): question id -> predicted answer.
        answers (`Mapping`): question id -> annotator answers. Every predicted question must have answers.

    Returns:
        `float`: 100 x the mean of [`vqa_accuracy`] over the predicted questions.
    """
    if not predictions:
        raise ValueError("compute_vqa_accuracy got no predictions.")
    missing = [question_id for question_id in predictions if question_id not in answers]
    if missing:
        raise KeyError(f"No annotations for {len(missing)} predicted question ids, e.g. {missing[:3]}.")
    scores = [vqa_accuracy(prediction, answers[qid]) for qid, prediction in predictions.items()]
    return round(100 * sum(scores) / len(scores), 2)


# --------------------------------------------------------------------------------------------------------------------
# CIDEr


def compute_cider(predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]) -> float:
    """CIDEr (pycocoevalcap's CIDEr-D) x 100, as OpenFlamingo reports it.

    Follows `COCOEvalCap.evaluate` for the images that have a prediction: the references and predictions are
    tokenised with the Stanford PTB tokenizer (needs `java`) and scored with `Cider`. The document frequencies come
    from the references of the predicted images only, as in `COCOEvalCap`.

    Args:
        predictions (`Mapping`): image id -> generated caption.
        references (`Mapping`): image id -> reference captions (5 for COCO and Flickr30K).

    Returns:
        `float`: the corpus CIDEr x 100.
    """
    try:
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    except ImportError as error:  # pragma: no cover - depends on the installation
        raise ImportError(
            "CIDEr needs pycocoevalcap: pip install 'hf-flamingo[eval]' (and a java runtime)."
        ) from error
    if not predictions:
        raise ValueError("compute_cider got no predictions.")
    if shutil.which("java") is None:
        raise RuntimeError(
            "CIDEr needs a Java runtime on PATH: pycocoevalcap's PTB tokenizer runs `java` (e.g. `apt-get install "
            "default-jre-headless`, or `conda install openjdk`)."
        )
    missing = [image_id for image_id in predictions if not references.get(image_id)]
    if missing:
        raise KeyError(f"No reference captions for {len(missing)} predicted image ids, e.g. {missing[:3]}.")
    # One java run for references and predictions: the tokenizer works line by line (`-preserveLines`), so this
    # gives the same tokens as COCOEvalCap's two runs.
    captions = {("ref", i): [{"caption": ref} for ref in references[i]] for i in predictions}
    captions.update({("res", i): [{"caption": caption}] for i, caption in predictions.items()})
    tokenized = PTBTokenizer().tokenize(captions)
    gts = {i: tokenized[("ref", i)] for i in predictions}
    res = {i: tokenized[("res", i)] for i in predictions}
    score, _ = Cider().compute_score(gts, res)
    return float(score) * 100.0


# --------------------------------------------------------------------------------------------------------------------
# Classification


def roc_auc_score(labels: Sequence[int], scores: Sequence[float]) -> float:
    """Area under the ROC curve, from ranks (Mann-Whitney U); tied scores get their average rank.

    Args:
        labels (`Sequence[int]`): 1 for the positive class, 0 for the negative class.
        scores (`Sequence[float]`): Higher means more likely positive.

    Returns:
        `float` in [0, 1]: the probability that a random positive scores above a random negative (ties count 1/2).
    """
    if len(labels) != len(scores):
        raise ValueError(f"labels and scores differ in length: {len(labels)} vs {len(scores)}.")
    if set(labels) - {0, 1}:
        raise ValueError(f"labels must be 0 or 1, got {sorted(set(labels) - {0, 1})}.")
    num_positive = sum(labels)
    num_negative = len(labels) - num_positive
    if num_positive == 0 or num_negative == 0:
        raise ValueError("ROC-AUC is undefined with only one class among the labels.")
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and scores[order[end + 1]] == scores[order[start]]:
            end += 1
        average_rank = (start + end) / 2 + 1  # ranks are 1-based
        for position in range(start, end + 1):
            ranks[order[position]] = average_rank
        start = end + 1
    positive_rank_sum = sum(rank for rank, label in zip(ranks, labels, strict=True) if label == 1)
    u_statistic = positive_rank_sum - num_positive * (num_positive + 1) / 2
    return u_statistic / (num_positive * num_negative)


def top1_accuracy(predicted: Sequence[Hashable], targets: Sequence[Hashable]) -> float:
    """Fraction of predictions equal to their target."""
    if len(predicted) != len(targets) or not targets:
        raise ValueError(f"need equally many (>0) predictions and targets, got {len(predicted)} and {len(targets)}.")
    return sum(p == t for p, t in zip(predicted, targets, strict=True)) / len(targets)
