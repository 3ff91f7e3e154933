"""OpenFlamingo's evaluation prompts, separators, decoding settings and post-processing, per task.

Every prompt is a demonstration template; the query uses the same template with an empty answer and no
`<|endofchunk|>`. Captioning and VQA demonstrations are each followed by `"\\n"`; classification demonstrations are
concatenated without a separator. With 0 shots, OpenFlamingo (following Flamingo) uses 2 demonstrations with their
`<image>` tokens removed, and only the query image.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

MEDIA_TOKEN = "<image>"
END_OF_CHUNK_TOKEN = "<|endofchunk|>"
ZERO_SHOT_TEXT_DEMONSTRATIONS = 2

__all__ = [
    "END_OF_CHUNK_TOKEN",
    "GenerationSettings",
    "MEDIA_TOKEN",
    "OKVQAStemmer",
    "build_prompt",
    "caption_prompt",
    "effective_num_shots",
    "hateful_memes_prompt",
    "imagenet_prompt",
    "postprocess_caption",
    "postprocess_vqa",
    "vqa_prompt",
]


def caption_prompt(caption: str | None = None) -> str:
    """`<image>Output:{caption}<|endofchunk|>`; with no caption, the query `<image>Output:`."""
    if caption is None:
        return f"{MEDIA_TOKEN}Output:"
    return f"{MEDIA_TOKEN}Output:{caption}{END_OF_CHUNK_TOKEN}"


def vqa_prompt(question: str, answer: str | None = None) -> str:
    """`<image>Question:{question} Short answer:{answer}<|endofchunk|>`; with no answer, the query form."""
    prompt = f"{MEDIA_TOKEN}Question:{question} Short answer:"
    return prompt if answer is None else f"{prompt}{answer}{END_OF_CHUNK_TOKEN}"


def imagenet_prompt(label: str | None = None) -> str:
    """`<image>Output:{label}<|endofchunk|>`; with no label, the query `<image>Output:`."""
    return caption_prompt(label)


def hateful_memes_prompt(ocr: str, label: str | None = None) -> str:
    """`<image>is an image with: '{ocr}' written on it. Is it hateful? Answer:{label}<|endofchunk|>`."""
    prompt = f"{MEDIA_TOKEN}is an image with: '{ocr}' written on it. Is it hateful? Answer:"
    return prompt if label is None else f"{prompt}{label}{END_OF_CHUNK_TOKEN}"


def effective_num_shots(num_shots: int) -> int:
    """Number of demonstrations in the prompt: `num_shots`, or 2 text-only ones for 0 shots (as Flamingo)."""
    if num_shots < 0:
        raise ValueError(f"num_shots must be >= 0, got {num_shots}.")
    return num_shots if num_shots > 0 else ZERO_SHOT_TEXT_DEMONSTRATIONS


def build_prompt(demonstrations: Sequence[str], query: str, *, separator: str, num_shots: int) -> str:
    """Joins demonstration prompts and the query prompt the way OpenFlamingo's harness does.

    Args:
        demonstrations (`Sequence[str]`): Filled demonstration templates, most relevant last.
        query (`str`): The query template (no answer).
        separator (`str`): Appended after every demonstration (`"\\n"` for captioning/VQA, `""` for classification).
        num_shots (`int`): The requested number of shots; 0 removes `<image>` from the demonstrations' text.

    Returns:
        `str`: The prompt; it holds `len(demonstrations) + 1` `<image>` tokens, or 1 when `num_shots == 0`.
    """
    context = "".join(f"{demonstration}{separator}" for demonstration in demonstrations)
    if num_shots == 0:
        context = context.replace(MEDIA_TOKEN, "")
    return context + query


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding settings of OpenFlamingo's harness (its `evaluate.py`): beam search, stop at `<|endofchunk|>`.

    Args:
        max_new_tokens (`int`): 20 for captioning, 5 for VQA, 10 for TextVQA.
        min_new_tokens (`int`, defaults to 0): Minimum generation length.
        num_beams (`int`, defaults to 3): Beams.
        length_penalty (`float`, defaults to 0.0): Beam-search length penalty (0: raw sum of log-probabilities).
    """

    max_new_tokens: int
    min_new_tokens: int = 0
    num_beams: int = 3
    length_penalty: float = 0.0


CAPTION_GENERATION = GenerationSettings(max_new_tokens=20)
VQA_GENERATION = GenerationSettings(max_new_tokens=5)
TEXTVQA_GENERATION = GenerationSettings(max_new_tokens=10)


def postprocess_caption(text: str) -> str:
    """Keeps the text before the first `"Output"` and removes double quotes."""
    return text.split("Output", 1)[0].replace('"', "")


def postprocess_vqa(text: str) -> str:
    """Keeps the text before the first `Question`, `Answer` or `Short`, then before the first `", "`."""
    answer = re.split("Question|Answer|Short", text, maxsplit=1)[0]
    return answer.split(", ", 1)[0]


# --------------------------------------------------------------------------------------------------------------------
# OK-VQA stemming (OK-VQA v1.1 annotations hold stemmed answers, so predictions are stemmed the same way)

# Words the automatic rules miss or get wrong, with the stem OK-VQA v1.1 expects.
_OK_VQA_MANUAL_STEMS = dict(
    entry.split("=")
    for entry in """
police=police las=las vegas=vegas yes=yes jeans=jean hell's=hell domino's=domino morning=morn clothes=cloth are=are
riding=ride leaves=leaf dangerous=danger clothing=cloth texting=text kiting=kite firefighters=firefight ties=tie
married=married teething=teeth gloves=glove tennis=tennis dining=dine directions=direct waves=wave
christmas=christmas drives=drive pudding=pud coding=code plating=plate quantas=quanta hornes=horn graves=grave
mating=mate paned=pane alertness=alert sunbathing=sunbath tenning=ten wetness=wet urinating=urine sickness=sick
braves=brave firefighting=firefight lenses=lens reflections=reflect backpackers=backpack eatting=eat
designers=design curiousity=curious playfulness=play blindness=blind hawke=hawk tomatoe=tomato rodeoing=rodeo
brightness=bright circuses=circus skateboarders=skateboard staring=stare electronics=electron electicity=elect
mountainous=mountain socializing=social hamburgers=hamburg caves=cave transitions=transit wading=wade
creame=cream toileting=toilet sautee=saute buildings=build belongings=belong stockings=stock walle=wall
cumulis=cumuli travelers=travel conducter=conduct browsing=brows pooping=poop haircutting=haircut toppings=top
hearding=heard sunblocker=sunblock bases=base markings=mark mopeds=mope kindergartener=kindergarten pies=pie
scrapbooking=scrapbook couponing=coupon meetings=meet elevators=elev lowes=low men's=men childrens=children
shelves=shelve paintings=paint raines=rain paring=pare expressions=express routes=rout pease=peas vastness=vast
awning=awn boy's=boy drunkenness=drunken teasing=teas conferences=confer ripeness=ripe suspenders=suspend
earnings=earn reporters=report kid's=kid containers=contain corgie=corgi porche=porch microwaves=microwave
batter's=batter sadness=sad apartments=apart oxygenize=oxygen striping=stripe purring=pure
professionals=profession piping=pipe farmer's=farmer potatoe=potato emirates=emir womens=women
veteran's=veteran wilderness=wilder propellers=propel alpes=alp charioteering=chariot swining=swine illness=ill
crepte=crept adhesives=adhesive regent's=regent decorations=decor rabbies=rabbi overseas=oversea
travellers=travel casings=case smugness=smug doves=dove nationals=nation mustange=mustang ringe=ring
gondoliere=gondolier vacationing=vacate reminders=remind baldness=bald settings=set glaced=glace
coniferous=conifer revelations=revel personals=person daughter's=daughter badness=bad projections=project
polarizing=polar vandalizers=vandal minerals=miner protesters=protest controllers=control weddings=wed
sometimes=sometime earing=ear
""".split()
)


_NLTK_DATA_HINT = (
    "python -m nltk.downloader punkt_tab averaged_perceptron_tagger_eng wordnet (older nltk: punkt, "
    "averaged_perceptron_tagger), or disable OK-VQA stemming."
)


class OKVQAStemmer:
    """The OK-VQA v1.1 stemming rule that OpenFlamingo applies to OK-VQA predictions.

    Each word of the tokenised, POS-tagged answer is replaced by its manual stem if it has one; otherwise a word
    ending in "ing" is lemmatised as a verb (WordNet), and a plural noun (`NNS`/`NNPS`) is singularised (`inflection`).

    The default back-ends are nltk (`word_tokenize`, `pos_tag`, `WordNetLemmatizer`, which need nltk's tokenizer,
    tagger and WordNet data) and `inflection`; each can be replaced.

    Args:
        tokenize (`Callable[[str], list[str]]`, *optional*): Word tokenizer.
        pos_tag (`Callable[[list[str]], list[tuple[str, str]]]`, *optional*): Penn Treebank tagger.
        lemmatize_verb (`Callable[[str], str]`, *optional*): Verb lemmatiser.
        singularize (`Callable[[str], str]`, *optional*): Plural-to-singular.
    """

    def __init__(
        self,
        tokenize: Callable[[str], list[str]] | None = None,
        pos_tag: Callable[[list[str]], list[tuple[str, str]]] | None = None,
        lemmatize_verb: Callable[[str], str] | None = None,
        singularize: Callable[[str], str] | None = None,
    ):
        if None in (tokenize, pos_tag, lemmatize_verb):
            try:
                import nltk
            except ImportError as error:
                raise ImportError(
                    f"OK-VQA post-processing stems answers with nltk: pip install nltk inflection, then {_NLTK_DATA_HINT}"
                ) from error
            lemmatizer = nltk.stem.WordNetLemmatizer()
            tokenize = tokenize or nltk.tokenize.word_tokenize
            pos_tag = pos_tag or nltk.pos_tag
            lemmatize_verb = lemmatize_verb or (lambda word: lemmatizer.lemmatize(word, "v"))
            try:  # fail now, not after the first batch, when nltk's data is missing
                pos_tag(tokenize("riding bikes"))
                lemmatize_verb("riding")
            except LookupError as error:
                raise LookupError(f"OK-VQA stemming needs nltk data: {_NLTK_DATA_HINT}") from error
        if singularize is None:
            try:
                import inflection
            except ImportError as error:
                raise ImportError("OK-VQA post-processing needs inflection: pip install inflection.") from error
            singularize = inflection.singularize
        self._tokenize = tokenize
        self._pos_tag = pos_tag
        self._lemmatize_verb = lemmatize_verb
        self._singularize = singularize

    def stem_word(self, word: str, tag: str) -> str:
        """Stems one word given its Penn Treebank tag."""
        if word in _OK_VQA_MANUAL_STEMS:
            return _OK_VQA_MANUAL_STEMS[word]
        if word.endswith("ing"):
            return self._lemmatize_verb(word)
        if tag.startswith("NNS") or tag.startswith("NNPS"):
            return self._singularize(word)
        return word

    def __call__(self, text: str) -> str:
        """Stems every word of `text` and joins them with single spaces."""
        return " ".join(self.stem_word(word, tag) for word, tag in self._pos_tag(self._tokenize(text)))
