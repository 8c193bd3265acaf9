"""Whisper's byte-level BPE tokenizer (tiktoken) with its special tokens."""

from __future__ import annotations

import base64
import string
from dataclasses import dataclass, field
from functools import cache, cached_property
from pathlib import Path

import tiktoken

ASSETS = Path(__file__).parent / "assets"

# Language code and English name, in the order of the language tokens.
_LANGUAGE_TABLE = """
    en:english zh:chinese de:german es:spanish ru:russian ko:korean fr:french ja:japanese
    pt:portuguese tr:turkish pl:polish ca:catalan nl:dutch ar:arabic sv:swedish it:italian
    id:indonesian hi:hindi fi:finnish vi:vietnamese he:hebrew uk:ukrainian el:greek ms:malay
    cs:czech ro:romanian da:danish hu:hungarian ta:tamil no:norwegian th:thai ur:urdu hr:croatian
    bg:bulgarian lt:lithuanian la:latin mi:maori ml:malayalam cy:welsh sk:slovak te:telugu
    fa:persian lv:latvian bn:bengali sr:serbian az:azerbaijani sl:slovenian kn:kannada et:estonian
    mk:macedonian br:breton eu:basque is:icelandic hy:armenian ne:nepali mn:mongolian bs:bosnian
    kk:kazakh sq:albanian sw:swahili gl:galician mr:marathi pa:punjabi si:sinhala km:khmer sn:shona
    yo:yoruba so:somali af:afrikaans oc:occitan ka:georgian be:belarusian tg:tajik sd:sindhi
    gu:gujarati am:amharic yi:yiddish lo:lao uz:uzbek fo:faroese ht:haitian_creole ps:pashto
    tk:turkmen nn:nynorsk mt:maltese sa:sanskrit lb:luxembourgish my:myanmar bo:tibetan tl:tagalog
    mg:malagasy as:assamese tt:tatar haw:hawaiian ln:lingala ha:hausa ba:bashkir jw:javanese
    su:sundanese yue:cantonese
"""
LANGUAGES: dict[str, str] = {
    code: name.replace("_", " ") for code, name in (item.split(":") for item in _LANGUAGE_TABLE.split())
}
TO_LANGUAGE_CODE: dict[str, str] = {
    **{name: code for code, name in LANGUAGES.items()},
    "burmese": "my",
    "valencian": "ca",
    "flemish": "nl",
    "haitian": "ht",
    "letzeburgesch": "lb",
    "pushto": "ps",
    "panjabi": "pa",
    "moldavian": "ro",
    "moldovan": "ro",
    "sinhalese": "si",
    "castilian": "es",
    "mandarin": "zh",
}

# GPT-2's pre-tokenisation pattern.
_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def language_code(language: str) -> str:
    """A language code from a code or an English name ("German" -> "de")."""
    language = language.lower()
    if language in LANGUAGES:
        return language
    if language in TO_LANGUAGE_CODE:
        return TO_LANGUAGE_CODE[language]
    raise ValueError(f"unsupported language: {language!r}; use a code such as 'en' or a name such as 'english'")


@cache
def get_encoding(name: str = "gpt2", num_languages: int = 99) -> tiktoken.Encoding:
    lines = (ASSETS / f"{name}.tiktoken").read_text().splitlines()
    ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in lines if line)}
    specials = [
        "<|endoftext|>",
        "<|startoftranscript|>",
        *[f"<|{code}|>" for code in list(LANGUAGES)[:num_languages]],
        "<|translate|>",
        "<|transcribe|>",
        "<|startoflm|>",
        "<|startofprev|>",
        "<|nospeech|>",
        "<|notimestamps|>",
        *[f"<|{i * 0.02:.2f}|>" for i in range(1501)],
    ]
    special_tokens = {token: len(ranks) + i for i, token in enumerate(specials)}
    return tiktoken.Encoding(
        name=f"{name}-{num_languages}",
        explicit_n_vocab=len(ranks) + len(special_tokens),
        pat_str=_SPLIT_PATTERN,
        mergeable_ranks=ranks,
        special_tokens=special_tokens,
    )


@dataclass
class Tokenizer:
    """Text <-> tokens, and the ids of Whisper's special tokens."""

    encoding: tiktoken.Encoding
    num_languages: int
    language: str | None = None
    task: str | None = None
    sot_sequence: tuple[int, ...] = ()
    special_tokens: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for special in self.encoding.special_tokens_set:
            self.special_tokens[special] = self.encoding.encode_single_token(special)
        sequence = [self.sot]
        if self.language is not None:
            sequence.append(self.sot + 1 + self.all_language_codes.index(self.language))
        if self.task is not None:
            sequence.append(self.transcribe if self.task == "transcribe" else self.translate)
        self.sot_sequence = tuple(sequence)

    def encode(self, text: str, **kwargs) -> list[int]:
        return self.encoding.encode(text, **kwargs)

    def decode(self, tokens: list[int], **kwargs) -> str:
        """Text of the tokens; timestamps and other specials are dropped."""
        return self.encoding.decode([t for t in tokens if t < self.timestamp_begin], **kwargs)

    def decode_with_timestamps(self, tokens: list[int], **kwargs) -> str:
        """Text with timestamps shown as <|1.08|>."""
        return self.encoding.decode(tokens, **kwargs)

    @cached_property
    def eot(self) -> int:
        return self.encoding.eot_token

    @cached_property
    def sot(self) -> int:
        return self.special_tokens["<|startoftranscript|>"]

    @cached_property
    def transcribe(self) -> int:
        return self.special_tokens["<|transcribe|>"]

    @cached_property
    def translate(self) -> int:
        return self.special_tokens["<|translate|>"]

    @cached_property
    def sot_lm(self) -> int:
        return self.special_tokens["<|startoflm|>"]

    @cached_property
    def sot_prev(self) -> int:
        return self.special_tokens["<|startofprev|>"]

    @cached_property
    def no_speech(self) -> int:
        return self.special_tokens["<|nospeech|>"]

    @cached_property
    def no_timestamps(self) -> int:
        return self.special_tokens["<|notimestamps|>"]

    @cached_property
    def timestamp_begin(self) -> int:
        return self.special_tokens["<|0.00|>"]

    @cached_property
    def language_token(self) -> int:
        if self.language is None:
            raise ValueError("this tokenizer has no language")
        return self.to_language_token(self.language)

    def to_language_token(self, language: str) -> int:
        """The token of a language code ("de")."""
        if (token := self.special_tokens.get(f"<|{language}|>")) is None:
            raise KeyError(f"language {language!r} is not in this tokenizer; use a code such as 'en'")
        return token

    @cached_property
    def all_language_codes(self) -> tuple[str, ...]:
        return tuple(list(LANGUAGES)[: self.num_languages])

    @cached_property
    def all_language_tokens(self) -> tuple[int, ...]:
        return tuple(self.special_tokens[f"<|{code}|>"] for code in self.all_language_codes)

    @cached_property
    def sot_sequence_including_notimestamps(self) -> tuple[int, ...]:
        return (*self.sot_sequence, self.no_timestamps)

    @cached_property
    def non_speech_tokens(self) -> tuple[int, ...]:
        """Tokens of symbols that are never spoken, suppressed so they are not invented.

        Kept: the space-prefixed dash and apostrophe, which often start spoken words.
        """
        symbols = list('"#()*+/:;<=>@[\\]^_`{|}~「」『』')
        symbols += [
            "<<",
            ">>",
            "<<<",
            ">>>",
            "--",
            "---",
            "-(",
            "-[",
            "('",
            '("',
            "((",
            "))",
            "(((",
            ")))",
            "[[",
            "]]",
            "{{",
            "}}",
            "♪♪",
            "♪♪♪",
        ]
        musical = set("♩♪♫♬♭♮♯")
        result = {self.encoding.encode(" -")[0], self.encoding.encode(" '")[0]}
        for symbol in symbols + sorted(musical):
            for tokens in (self.encoding.encode(symbol), self.encoding.encode(" " + symbol)):
                if len(tokens) == 1 or symbol in musical:
                    result.add(tokens[0])
        return tuple(sorted(result))

    def split_to_word_tokens(self, tokens: list[int]) -> tuple[list[str], list[list[int]]]:
        """Words and their tokens; languages written without spaces split per character."""
        if self.language in {"zh", "ja", "th", "lo", "my", "yue"}:
            return self.split_tokens_on_unicode(tokens)
        return self.split_tokens_on_spaces(tokens)

    def split_tokens_on_unicode(self, tokens: list[int]) -> tuple[list[str], list[list[int]]]:
        """Pieces of text and their tokens, each piece whole characters (a token may end inside one)."""
        full = self.decode_with_timestamps(tokens)
        words: list[str] = []
        word_tokens: list[list[int]] = []
        current: list[int] = []
        offset = 0
        for token in tokens:
            current.append(token)
            decoded = self.decode_with_timestamps(current)
            # A token may end inside a multi-byte character; wait until it is whole.
            if "\ufffd" not in decoded or full[offset + decoded.index("\ufffd")] == "\ufffd":
                words.append(decoded)
                word_tokens.append(current)
                current = []
                offset += len(decoded)
        return words, word_tokens

    def split_tokens_on_spaces(self, tokens: list[int]) -> tuple[list[str], list[list[int]]]:
        """Words (each starting with its space) and punctuation marks, and their tokens."""
        words: list[str] = []
        word_tokens: list[list[int]] = []
        for subword, pieces in zip(*self.split_tokens_on_unicode(tokens)):
            special = pieces[0] >= self.eot
            starts_word = subword.startswith(" ")
            punctuation = subword.strip() in string.punctuation
            if special or starts_word or punctuation or not words:
                words.append(subword)
                word_tokens.append(pieces)
            else:
                words[-1] += subword
                word_tokens[-1].extend(pieces)
        return words, word_tokens


@cache
def get_tokenizer(
    multilingual: bool,
    *,
    num_languages: int = 99,
    language: str | None = None,
    task: str | None = None,
) -> Tokenizer:
    """The tokenizer of a model: English-only (GPT-2 vocabulary) or multilingual."""
    if language is not None:
        language = language_code(language)
    if multilingual:
        encoding = get_encoding("multilingual", num_languages)
        task = task or "transcribe"
    else:
        encoding = get_encoding("gpt2", num_languages)
        language, task = None, None
    return Tokenizer(encoding=encoding, num_languages=num_languages, language=language, task=task)
