"""Metrics and post-processing against hand-computed values and against the reference implementations."""

from __future__ import annotations

import json
import sys

import pytest
from evaluation_fixtures import requires_java

from hf_flamingo.evaluation.metrics import (
    compute_cider,
    compute_vqa_accuracy,
    normalize_vqa_answer,
    roc_auc_score,
    top1_accuracy,
    vqa_accuracy,
)
from hf_flamingo.evaluation.prompts import (
    OKVQAStemmer,
    build_prompt,
    caption_prompt,
    effective_num_shots,
    hateful_memes_prompt,
    postprocess_caption,
    postprocess_vqa,
    vqa_prompt,
)

# --------------------------------------------------------------------------------------------------------------------
# VQA accuracy


@pytest.mark.parametrize(
    ("num_matching", "expected"),
    # 10 annotators, m of them give the prediction. Leaving annotator i out: min(matches among the other 9 / 3, 1).
    # m=1: 9 subsets keep 1 match (1/3), 1 subset keeps 0 -> 9/3/10 = 0.3
    # m=2: 8 subsets keep 2 (2/3), 2 keep 1 (1/3) -> (16/3 + 2/3)/10 = 0.6
    # m=3: 7 subsets keep 3 (1), 3 keep 2 (2/3) -> (7 + 2)/10 = 0.9
    # m=4: every subset keeps >= 3 -> 1.0
    [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)],
)
def test_vqa_accuracy_leave_one_out_rule(num_matching, expected):
    answers = ["two"] * num_matching + ["three"] * (10 - num_matching)
    assert vqa_accuracy("2", answers) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("Two", "2"),  # lower-case, number word
        ("the dog", "dog"),  # article
        ("A red car.", "red car"),  # article, final period
        ("dont", "don't"),  # contraction
        ("Yes!", "yes"),  # punctuation next to nothing: becomes a space, stripped by split
        ("black,white", "black white"),  # comma inside a word: a space
        ("black, white", "black white"),  # comma before a space: removed
        ("1,000", "1000"),  # digit,digit: every punctuation mark is removed
        ("3.5", "3.5"),  # a period before a digit stays
        ("none", "0"),
        ("  ten\tdogs\n", "10 dogs"),
        ("hot-dog", "hot dog"),
    ],
)
def test_normalize_vqa_answer_hand_examples(raw, normalized):
    assert normalize_vqa_answer(raw) == normalized


def test_normalize_matches_openflamingo_vqa_eval():
    from open_flamingo.eval import vqa_metric

    reference = vqa_metric.VQAEval(None, None)
    samples = [
        "Two dogs.",
        "the Red, white and blue",
        "1,000 people!",
        "dont know",
        "youre right",
        "It's a (big) cat?",
        "a/b",
        'he said "no"',
        "3.14",
        "e.g. the end.",
        "ten",
        "Im here",
        "x_y-z",
        "well...",
        "somebody'd",
    ]
    for sample in samples:
        expected = reference.processDigitArticle(reference.processPunctuation(sample.strip()))
        assert normalize_vqa_answer(sample) == expected, sample


def test_vqa_accuracy_with_normalization_and_ten_answers():
    # 2 annotators say "Dog", 1 says "the dog.", 7 say "cat": after normalisation 3 match "A dog!" -> 0.9.
    answers = ["Dog", "Dog", "the dog.", "cat", "cat", "cat", "cat", "cat", "cat", "cat"]
    assert vqa_accuracy("A dog!", answers) == pytest.approx(0.9)
    assert vqa_accuracy("cats", answers) == 0.0  # no stemming in the standard metric


def test_compute_vqa_accuracy_is_the_mean_in_percent():
    answers = {
        1: ["yes"] * 10,  # prediction "yes" -> 1.0
        2: ["2"] + ["3"] * 9,  # prediction "two" -> 1 match -> 0.3
        3: ["red"] * 2 + ["blue"] * 8,  # prediction "green" -> 0
    }
    predictions = {1: "Yes", 2: "two", 3: "green"}
    assert compute_vqa_accuracy(predictions, answers) == pytest.approx(round(100 * 1.3 / 3, 2))
    assert compute_vqa_accuracy(predictions, answers) == 43.33
    with pytest.raises(KeyError, match="No annotations"):
        compute_vqa_accuracy({4: "x"}, answers)


# --------------------------------------------------------------------------------------------------------------------
# CIDEr


@requires_java
def test_cider_perfect_distinct_captions_is_1000():
    # CIDEr-D of a prediction equal to its only reference is 10 per image (cosine 1 for n = 1..4, averaged, x10),
    # provided the images share no n-gram (otherwise idf changes nothing here, but shared n-grams would make the
    # log(N/df) weights differ); x100 -> 1000.
    references = {1: ["alpha beta gamma delta"], 2: ["epsilon zeta eta theta"]}
    predictions = {1: "alpha beta gamma delta", 2: "epsilon zeta eta theta"}
    assert compute_cider(predictions, references) == pytest.approx(1000.0)


@requires_java
def test_cider_matches_pycocoevalcap_coco_eval_steps(tmp_path):
    """Our CIDEr equals COCOEvalCap's steps run directly: COCO + loadRes, PTBTokenizer, Cider."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    from pycocotools.coco import COCO

    references = {
        11: ["A man riding a wave on top of a surfboard.", "A surfer rides a large wave.", "Person surfing."],
        12: ["Two dogs play in the snow.", "A pair of dogs running through snow.", "Dogs in winter."],
        13: ["A plate of food with broccoli.", "Broccoli and rice on a plate.", "A healthy meal."],
    }
    predictions = {11: "a man riding a wave on a surfboard", 12: "two dogs running in the snow", 13: "a plate"}
    annotations = {
        "images": [{"id": image_id} for image_id in references],
        "annotations": [
            {"image_id": image_id, "id": 100 * image_id + k, "caption": caption}
            for image_id, captions in references.items()
            for k, caption in enumerate(captions)
        ],
        "type": "captions",
        "info": {},
        "licenses": [],
    }
    annotations_path = tmp_path / "captions.json"
    annotations_path.write_text(json.dumps(annotations))
    results_path = tmp_path / "results.json"
    results_path.write_text(json.dumps([{"image_id": i, "caption": c} for i, c in predictions.items()]))
    coco = COCO(str(annotations_path))
    coco_result = coco.loadRes(str(results_path))
    image_ids = coco_result.getImgIds()
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: coco.imgToAnns[i] for i in image_ids})
    res = tokenizer.tokenize({i: coco_result.imgToAnns[i] for i in image_ids})
    expected, _ = Cider().compute_score(gts, res)

    ours = compute_cider(predictions, references)
    assert ours == pytest.approx(float(expected) * 100, abs=1e-9)
    assert 0 < ours < 1000


# --------------------------------------------------------------------------------------------------------------------
# ROC-AUC and accuracy


def test_roc_auc_hand_example():
    # Pairs (positive, negative): (0.35, 0.1) yes, (0.35, 0.4) no, (0.8, 0.1) yes, (0.8, 0.4) yes -> 3/4.
    assert roc_auc_score([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)


def test_roc_auc_ties_count_half():
    # Positives 0.5, 0.9; negatives 0.5, 0.2: 0.5 vs 0.5 is a tie (1/2), the other 3 pairs are won -> 3.5/4.
    assert roc_auc_score([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9]) == pytest.approx(0.875)
    assert roc_auc_score([1, 0], [0.3, 0.3]) == pytest.approx(0.5)
    assert roc_auc_score([1, 1, 0], [0.0, 0.1, 0.9]) == 0.0


def test_roc_auc_rejects_a_single_class():
    with pytest.raises(ValueError, match="only one class"):
        roc_auc_score([1, 1], [0.2, 0.3])


def test_top1_accuracy():
    assert top1_accuracy([0, 2, 1, 1], [0, 1, 1, 2]) == 0.5


# --------------------------------------------------------------------------------------------------------------------
# Prompts and post-processing


def test_prompt_templates():
    assert caption_prompt("A dog.") == "<image>Output:A dog.<|endofchunk|>"
    assert caption_prompt() == "<image>Output:"
    assert vqa_prompt("What color?", "red") == "<image>Question:What color? Short answer:red<|endofchunk|>"
    assert vqa_prompt("What color?") == "<image>Question:What color? Short answer:"
    assert (
        hateful_memes_prompt("hi", "no") == "<image>is an image with: 'hi' written on it. Is it hateful? Answer:no"
        "<|endofchunk|>"
    )


def test_build_prompt_separators_and_zero_shot():
    demos = [caption_prompt("A."), caption_prompt("B.")]
    assert build_prompt(demos, caption_prompt(), separator="\n", num_shots=2) == (
        "<image>Output:A.<|endofchunk|>\n<image>Output:B.<|endofchunk|>\n<image>Output:"
    )
    # 0 shots: 2 text-only demonstrations, one image (the query's).
    assert effective_num_shots(0) == 2 and effective_num_shots(4) == 4
    zero = build_prompt(demos, caption_prompt(), separator="\n", num_shots=0)
    assert zero == "Output:A.<|endofchunk|>\nOutput:B.<|endofchunk|>\n<image>Output:"
    assert zero.count("<image>") == 1


def test_postprocessing():
    assert postprocess_caption(' a "big" dog Output: a cat') == " a big dog "
    assert postprocess_vqa("yes Question: what") == "yes "
    assert postprocess_vqa("red, white Short answer: x") == "red"
    assert postprocess_vqa("blue Answer: x") == "blue "


def test_ok_vqa_stemmer_rules():
    tags = {"riding": "VBG", "boxes": "NNS", "leaves": "NNS", "running": "VBG", "red": "JJ", "cats": "NNS"}
    stemmer = OKVQAStemmer(
        tokenize=str.split,
        pos_tag=lambda words: [(word, tags[word]) for word in words],
        lemmatize_verb=lambda word: {"running": "run"}[word],
        singularize=lambda word: word[:-2] if word.endswith("es") else word[:-1],
    )
    # "riding"/"leaves": manual table; "running": verb lemma; "boxes"/"cats": plural nouns; "red": unchanged.
    assert stemmer("riding leaves running boxes cats red") == "ride leaf run box cat red"


def test_ok_vqa_stemmer_without_nltk_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "nltk", None)  # makes `import nltk` fail
    with pytest.raises(ImportError, match="pip install nltk inflection"):
        OKVQAStemmer()


def test_cider_without_java_says_what_is_missing(monkeypatch):
    import hf_flamingo.evaluation.metrics as metrics

    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="CIDEr needs a Java runtime on PATH"):
        compute_cider({1: "a dog"}, {1: ["a dog"]})
