"""openai-whisper's public API, name by name: what its documentation promises and what its own
test files check (audio, tokenizer, timing, utils, normalizers, decode, transcribe), written here
against our engine with the bundled models."""

from __future__ import annotations

import inspect
import io
import json

import mlx.core as mx
import numpy as np
import pytest
from speech import SPEECH_DIR, model

import whisper
from whisper import models
from whisper.audio import N_FRAMES, SAMPLE_RATE
from whisper.timing import dtw_cpu, median_filter
from whisper.tokenizer import get_tokenizer
from whisper.utils import WriteTSV, get_writer, str2bool

JFK = SPEECH_DIR / "jfk.flac"


def defaults(function) -> dict[str, object]:
    return {name: p.default for name, p in inspect.signature(function).parameters.items()}


# ------------------------------------------------------------------ names and signatures


def test_package_names():
    for name in (
        "available_models",
        "load_model",
        "load_audio",
        "log_mel_spectrogram",
        "pad_or_trim",
        "DecodingOptions",
        "DecodingResult",
        "decode",
        "detect_language",
        "ModelDimensions",
        "Whisper",
        "transcribe",
    ):
        assert hasattr(whisper, name), name
    assert isinstance(whisper.__version__, str) and whisper.__version__


def test_signatures_take_openai_arguments():
    assert list(defaults(whisper.load_model).items())[:4] == [
        ("name", "base"),
        ("device", None),
        ("download_root", None),
        ("in_memory", False),
    ]
    assert defaults(whisper.load_audio) == {"file": inspect.Parameter.empty, "sr": SAMPLE_RATE}
    assert defaults(whisper.log_mel_spectrogram) == {
        "audio": inspect.Parameter.empty,
        "n_mels": 80,
        "padding": 0,
        "device": None,
    }
    assert list(defaults(whisper.decode)) == ["model", "mel", "options", "kwargs"]
    assert defaults(whisper.detect_language)["tokenizer"] is None
    transcribe = defaults(whisper.transcribe)
    openai_transcribe = {
        "verbose": None,
        "temperature": (0.0, 0.2, 0.4, 0.6, 0.8, 1.0),
        "compression_ratio_threshold": 2.4,
        "logprob_threshold": -1.0,
        "no_speech_threshold": 0.6,
        "condition_on_previous_text": True,
        "initial_prompt": None,
        "carry_initial_prompt": False,
        "word_timestamps": False,
        "prepend_punctuations": "\"'“¿([{-",
        "append_punctuations": "\"'.。,，!！?？:：”)]}、",
        "clip_timestamps": "0",
        "hallucination_silence_threshold": None,
    }
    assert list(transcribe)[:2] == ["model", "audio"]
    assert {k: transcribe[k] for k in openai_transcribe} == openai_transcribe


def test_decoding_options_fields_and_defaults():
    openai_fields = {
        "task": "transcribe",
        "language": None,
        "temperature": 0.0,
        "sample_len": None,
        "best_of": None,
        "beam_size": None,
        "patience": None,
        "length_penalty": None,
        "prompt": None,
        "prefix": None,
        "suppress_tokens": "-1",
        "suppress_blank": True,
        "without_timestamps": False,
        "max_initial_timestamp": 1.0,
        "fp16": True,
    }
    options = whisper.DecodingOptions(fp16=False)
    assert {k: getattr(whisper.DecodingOptions(), k) for k in openai_fields} == openai_fields
    assert options.fp16 is False
    result_fields = set(whisper.DecodingResult.__dataclass_fields__)
    assert {"audio_features", "language", "language_probs", "tokens", "text", "avg_logprob"} <= result_fields
    assert {"no_speech_prob", "temperature", "compression_ratio"} <= result_fields


# ------------------------------------------------------------------ audio (test_audio.py)


def test_audio():
    audio = whisper.load_audio(str(JFK))
    assert audio.ndim == 1
    assert SAMPLE_RATE * 10 < audio.shape[0] < SAMPLE_RATE * 12
    assert 0 < audio.std() < 1
    mel_from_audio = whisper.log_mel_spectrogram(audio)
    mel_from_file = whisper.log_mel_spectrogram(str(JFK), device="cuda")
    assert mel_from_audio.shape == (80, audio.shape[0] // 160)
    assert np.allclose(mel_from_audio, mel_from_file)
    assert float(mel_from_audio.max() - mel_from_audio.min()) <= 2.0
    # PyTorch code moves the spectrogram to the model's device: MLX arrays need no moving.
    assert mel_from_audio.to("cuda") is mel_from_audio


# ------------------------------------------------------------------ tokenizer (test_tokenizer.py)


@pytest.mark.parametrize("multilingual", [True, False])
def test_tokenizer(multilingual):
    tokenizer = get_tokenizer(multilingual=multilingual)
    assert tokenizer.sot in tokenizer.sot_sequence
    assert len(tokenizer.all_language_codes) == len(tokenizer.all_language_tokens)
    assert all(c < tokenizer.timestamp_begin for c in tokenizer.all_language_tokens)


def test_multilingual_tokenizer():
    gpt2_tokenizer = get_tokenizer(multilingual=False)
    multilingual_tokenizer = get_tokenizer(multilingual=True)
    text = "다람쥐 헌 쳇바퀴에 타고파"
    gpt2_tokens = gpt2_tokenizer.encode(text)
    multilingual_tokens = multilingual_tokenizer.encode(text)
    assert gpt2_tokenizer.decode(gpt2_tokens) == text
    assert multilingual_tokenizer.decode(multilingual_tokens) == text
    assert len(gpt2_tokens) > len(multilingual_tokens)


def test_split_on_unicode():
    tokenizer = get_tokenizer(multilingual=True)
    tokens = [8404, 871, 287, 6, 246, 526, 3210, 20378]
    words, word_tokens = tokenizer.split_tokens_on_unicode(tokens)
    assert words == [" elle", " est", " l", "'", "\ufffd", "é", "rit", "oire"]
    assert word_tokens == [[8404], [871], [287], [6], [246], [526], [3210], [20378]]
    words, _ = tokenizer.split_tokens_on_spaces(tokenizer.encode(" Hello, world"))
    assert words == [" Hello", ",", " world"]


def test_to_language_token():
    tokenizer = get_tokenizer(multilingual=True, language="de")
    assert tokenizer.to_language_token("de") == tokenizer.language_token == tokenizer.sot_sequence[1]
    assert tokenizer.to_language_token("en") == tokenizer.sot + 1
    with pytest.raises(KeyError, match="xx"):
        tokenizer.to_language_token("xx")


# ------------------------------------------------------------------ timing (test_timing.py)


@pytest.mark.parametrize("n, m", [(10, 20), (32, 16), (123, 1500), (234, 189)])
def test_dtw(n, m):
    """A path of cheap cells through random costs, with diagonal steps where the path turns:
    dtw_cpu must find exactly that path."""
    rng = np.random.default_rng(42)
    steps = rng.permutation(np.concatenate([np.zeros(n - 1), np.ones(m - 1)]))
    x = rng.random((n, m)).astype(np.float32)
    i = j = k = 0
    path = []
    while True:
        x[i, j] -= 1
        path.append((i, j))
        if k == len(steps):
            break
        if k + 1 < len(steps) and steps[k] != steps[k + 1]:
            i, j, k = i + 1, j + 1, k + 2
            continue
        i, j, k = i + (steps[k] == 0), j + (steps[k] == 1), k + 1
    assert np.array_equal(dtw_cpu(x), np.array(path).T)


@pytest.mark.parametrize("shape", [(13,), (2, 37), (3, 5, 101)])
@pytest.mark.parametrize("width", [3, 5, 7, 13])
def test_median_filter(shape, width):
    """Against the median of each reflect-padded window, taken one by one."""
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    pad = width // 2
    padded = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(pad, pad)], mode="reflect")
    expected = np.stack([np.median(padded[..., i : i + width], axis=-1) for i in range(shape[-1])], axis=-1)
    assert np.allclose(median_filter(x, width), expected)


# ------------------------------------------------------------------ utils (test_utils.py, writers)


@pytest.mark.parametrize(
    "value, expected",
    [("True", True), ("False", False), ("true", True), ("FALSE", False), ("1", True), ("0", False), ("yes", True)],
)
def test_str2bool(value, expected):
    assert str2bool(value) is expected


def test_str2bool_rejects_other_values():
    with pytest.raises(ValueError, match="Expected a boolean value"):
        str2bool("maybe")


@pytest.mark.parametrize("text", ["first\nsecond", "first\rsecond", "first\r\nsecond", "first\tsecond"])
def test_tsv_keeps_segment_text_in_one_row(text):
    output = io.StringIO()
    WriteTSV(".").write_result({"segments": [{"start": 0.0, "end": 1.25, "text": text}]}, output)
    rows = output.getvalue().splitlines()
    assert rows[0] == "start\tend\ttext"
    assert rows[1].split("\t")[:2] == ["0", "1250"]
    assert rows[1].split("\t")[2].split() == ["first", "second"]
    assert len(rows) == 2


def test_get_writer(tmp_path):
    words = [
        {"word": " Ask", "start": 0.0, "end": 0.4, "probability": 0.9},
        {"word": " not", "start": 0.4, "end": 0.9, "probability": 0.9},
    ]
    result = {"text": " Ask not", "language": "en", "segments": [{"start": 0.0, "end": 0.9, "text": " Ask not"}]}
    result["segments"][0]["words"] = words
    get_writer("srt", tmp_path)(result, "/somewhere/talk.m4a", {"max_words_per_line": 1, "highlight_words": False})
    # One word a line; without max_line_count the segment's lines stay in one cue, as openai's.
    assert (tmp_path / "talk.srt").read_text() == "1\n00:00:00,000 --> 00:00:00,900\nAsk\nnot\n"
    get_writer("all", tmp_path / "all")(result, "talk.wav")
    written = sorted(p.name for p in (tmp_path / "all").iterdir())
    assert written == [f"talk.{f}" for f in sorted(whisper.writers.FORMATS)]
    assert json.loads((tmp_path / "all" / "talk.json").read_text()) == result
    with pytest.raises(ValueError, match="unknown output format"):
        get_writer("docx", tmp_path)


# ------------------------------------------------------------------ normalizers (test_normalizer.py)


def test_normalizers():
    from whisper.normalizers import BasicTextNormalizer, EnglishTextNormalizer
    from whisper.normalizers.english import EnglishNumberNormalizer, EnglishSpellingNormalizer

    for std in (EnglishNumberNormalizer(), EnglishTextNormalizer()):
        assert std("two") == "2"
        assert std("nineteen ninety nine") == "1999"
        assert std("two point five million") == "2500000"
        assert std("$20 million") == "$20000000"
        assert std("thirty first") == "31st"
        assert std("ninety percent") == "90%"
        assert std("two dollars and seventy cents") == "$2.70"
    assert EnglishSpellingNormalizer()("mobilisation") == "mobilization"
    text = EnglishTextNormalizer()
    assert text("Let's") == "let us"
    assert text("Mr. Park visited Assoc. Prof. Kim Jr.") == "mister park visited associate professor kim junior"
    assert BasicTextNormalizer()("Hello, World!") == "hello world "


# ------------------------------------------------------------------ the model


def test_model_methods_and_alignment_heads():
    tiny = model("tiny.en")
    assert tiny.to("cpu") is tiny
    assert tiny.device == mx.default_device() == mx.Device(mx.cpu)
    if not mx.is_available(mx.gpu):
        with pytest.raises(ValueError, match="MLX sees no GPU"):
            tiny.to("cuda")
    config_heads = tiny.alignment_heads
    try:
        # openai-whisper's dump for tiny.en names the same heads as the bundled model's config.
        tiny.set_alignment_heads(b"ABzY8J1N>@0{>%R00Bk>$p{7v037`oCl~+#00")
        assert tiny.alignment_heads == config_heads
        tiny.set_alignment_heads(np.array([[3, 1], [2, 0]]))
        assert tiny.alignment_heads == [[3, 1], [2, 0]]
        with pytest.raises(ValueError, match="layer, head"):
            tiny.set_alignment_heads(np.array([[4, 0]]))
    finally:
        tiny.alignment_heads = config_heads


def test_transcribe():
    """openai's test_transcribe.py on the bundled tiny.en, through model.transcribe."""
    tiny = model("tiny.en").to("cpu")
    result = tiny.transcribe(str(JFK), language="en", temperature=0.0, word_timestamps=True, fp16=False)
    assert result["language"] == "en"
    assert result["text"] == "".join(s["text"] for s in result["segments"])
    transcription = result["text"].lower()
    assert "my fellow americans" in transcription
    assert "your country" in transcription
    assert "do for you" in transcription
    tokenizer = get_tokenizer(tiny.is_multilingual, num_languages=tiny.num_languages)
    all_tokens = [t for s in result["segments"] for t in s["tokens"]]
    assert tokenizer.decode(all_tokens) == result["text"]
    assert tokenizer.decode_with_timestamps(all_tokens).startswith("<|0.00|>")
    americans = [w for s in result["segments"] for w in s["words"] if w["word"].strip(" ,") == "Americans"]
    assert all(w["start"] < w["end"] for s in result["segments"] for w in s["words"])
    assert americans and americans[0]["start"] <= 1.8 <= americans[0]["end"]
    assert result == whisper.transcribe(tiny, str(JFK), language="en", temperature=0.0, word_timestamps=True)


def test_decode_takes_log_mel_spectrogram_layout():
    """openai's test_decode.py: a batch of the same window, beams; and one window in either layout."""
    tiny = model("tiny.en")
    mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(whisper.load_audio(str(JFK)))).to(tiny.device)
    assert mel.shape == (80, N_FRAMES)
    options = whisper.DecodingOptions(language="en", beam_size=2, fp16=False)
    results = tiny.decode(mx.stack([mel, mel]), options)
    assert len(results) == 2 and results[0].text == results[1].text
    assert "my fellow americans" in results[0].text.lower()
    single = whisper.decode(tiny, mel, options)
    assert isinstance(single, whisper.DecodingResult)
    assert single.text == whisper.decode(tiny, mel.T, options).text == results[0].text


def test_detect_language_returns_a_token_and_a_dict():
    """openai's README: `_, probs = model.detect_language(mel)`; `max(probs, key=probs.get)`."""
    base = model("base")
    names = ["cheetah_es.wav", "leopard_de.wav"]
    mels = [whisper.log_mel_spectrogram(whisper.pad_or_trim(whisper.load_audio(str(SPEECH_DIR / n)))) for n in names]
    tokenizer = get_tokenizer(True, num_languages=base.num_languages)
    token, probs = base.detect_language(mels[0])
    assert isinstance(probs, dict) and max(probs, key=probs.get) == "es"
    assert token.ndim == 0 and token.item() == tokenizer.to_language_token("es")
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-4)
    tokens, batch_probs = whisper.detect_language(base, mx.stack(mels))
    assert tokens.tolist() == [tokenizer.to_language_token("es"), tokenizer.to_language_token("de")]
    assert [max(p, key=p.get) for p in batch_probs] == ["es", "de"]
    assert batch_probs[0]["es"] == pytest.approx(probs["es"], abs=1e-4)
    with pytest.raises(ValueError, match="English-only"):
        model("tiny.en").detect_language(mels[0])


def test_load_model_download_root_and_in_memory(tmp_path):
    """download_root holds what load_model converts; in_memory is accepted."""
    loaded = whisper.load_model("tiny.en", "cpu", download_root=tmp_path, in_memory=True)
    assert loaded.dims == model("tiny.en").dims
    converted = list((tmp_path / "mlx").iterdir())
    assert len(converted) == 1 and models.is_mlx_folder(converted[0])
