"""Each backend's decoder passes against the plain model's (`whisper.backends.Backend`): the same
logits over a cache, the same greedy choices, beams that share a window's audio, and the CPU
kernels' fused step against their own ops."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_map
from speech import SPEECH_DIR

import whisper
from whisper import kernels
from whisper.audio import N_SAMPLES, load_audio
from whisper.backends import Backend
from whisper.backends.cpu import CpuBackend, step_weights
from whisper.backends.gpu import GpuBackend
from whisper.decoding import (
    ApplyTimestampRules,
    DecodingOptions,
    DecodingTask,
    DeviceRules,
    Inference,
    ranked_candidates,
    top_tokens,
)
from whisper.model import ResidualAttentionBlock, TextDecoder
from whisper.rules import TimestampState, log_softmax, timestamp_ranges
from whisper.tokenizer import get_tokenizer

TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def tiny():
    """tiny.en as loaded, and the features of jfk.flac."""
    model = whisper.load_model("tiny.en")
    audio = load_audio(SPEECH_DIR / "jfk.flac")
    mel = whisper.log_mel_spectrogram(np.concatenate([audio, np.zeros(N_SAMPLES - len(audio), np.float32)]))
    return model, model.embed_audio(mel.T[None, :3000])


BACKENDS = {"plain": Backend, "cpu kernels": CpuBackend, "gpu layout": GpuBackend}


@pytest.fixture(params=list(BACKENDS))
def backend(request, tiny):
    """Each backend, on the model (the GPU's layout and passes run on a CPU too); put back after."""
    model = tiny[0]
    if request.param == "cpu kernels" and not kernels.available():
        pytest.skip("the compiled kernels do not run here")
    loaded = model.backend
    model.backend = BACKENDS[request.param](model)
    yield model.backend
    model.backend = loaded


def plain_logits(model, tokens: np.ndarray, features: mx.array) -> np.ndarray:
    return np.array(model.logits(mx.array(tokens), features).astype(mx.float32))


def test_steps_give_the_logits_of_a_whole_pass_and_trace_once(tiny, backend, monkeypatch):
    model, features = tiny
    traced = []
    if isinstance(backend, type(backend)) and hasattr(type(backend), "_compiled_step"):
        original = type(backend)._step
        monkeypatch.setattr(type(backend), "_step", lambda self, *a: traced.append(1) or original(self, *a))
    rng = np.random.default_rng(3)
    # Two sequences that share their start, over two windows of audio.
    tokens = np.concatenate([[[50257, 50362]] * 2, rng.integers(0, 50256, size=(2, 40))], axis=1)
    tokens[1, :5] = tokens[0, :5]
    two = mx.concatenate([features, features * 0.5])
    inference = Inference(model, two)
    stepped = [inference.logits(tokens[:, :3], positions=3)]
    stepped += [inference.logits(tokens[:, : n + 1]) for n in range(3, tokens.shape[1])]
    assert np.abs(np.concatenate(stepped, axis=1) - plain_logits(model, tokens, two)).max() < TOLERANCE
    if hasattr(type(backend), "_compiled_step"):
        assert len(traced) == 1, f"the step was traced {len(traced)} times"


def test_beams_share_their_window_and_follow_their_sources(tiny, backend):
    """Three rows of one window: one prompt pass, then each row's own tokens, then rows reordered
    as beam search does; each row's logits are those of its own sequence."""
    model, features = tiny
    rng = np.random.default_rng(7)
    prompt = np.array([[50257, 50362, 400]] * 3)
    inference = Inference(model, features, group=3)
    inference.logits(prompt, positions=3)
    tokens = np.concatenate([prompt, rng.integers(0, 50256, size=(3, 2))], axis=1)
    inference.logits(tokens[:, :4])
    inference.logits(tokens)
    inference.reorder([2, 2, 0])
    tokens = tokens[[2, 2, 0]]
    tokens = np.concatenate([tokens, rng.integers(0, 50256, size=(3, 1))], axis=1)
    ours = inference.logits(tokens)
    expected = plain_logits(model, tokens, mx.repeat(features, 3, axis=0))[:, -1:]
    assert np.abs(ours - expected).max() < TOLERANCE


def test_a_kept_prefix_of_the_cache_decodes_on_from_there(tiny, backend):
    model, features = tiny
    tokens = np.array([[50257, 50362, 400, 523, 616, 7875, 7840]])
    inference = Inference(model, features)
    inference.logits(tokens, positions=tokens.shape[1])
    # Keep the first four positions (as the streaming transcriber does with an accepted guess).
    inference.rewind(4)
    other = np.array([[*tokens[0, :4], 1029]])
    assert np.abs(inference.logits(other) - plain_logits(model, other, features)[:, -1:]).max() < TOLERANCE


def test_the_step_uses_the_weights_it_is_given(tiny, backend):
    model, features = tiny
    tokens = np.array([[50257, 50362, 400]])
    inference = Inference(model, features)
    inference.logits(tokens[:, :2], positions=2)
    before = inference.logits(tokens)
    # Weights replaced after the first trace (a conversion, a reload) must be the ones used.
    saved = model.decoder.ln.weight
    model.decoder.ln.weight = saved * 2
    try:
        again = Inference(model, features)
        again.logits(tokens[:, :2], positions=2)
        after = again.logits(tokens)
        assert np.abs(after - plain_logits(model, tokens, features)[:, -1:]).max() < TOLERANCE
        assert np.abs(after - before).max() > 1
    finally:
        model.decoder.ln.weight = saved


@pytest.mark.parametrize("first_step", [True, False])
@pytest.mark.parametrize("boost", [0.0, 3.5, 14.0])
def test_greedy_choice_where_the_logits_are_equals_the_host_filters(tiny, backend, boost, first_step):
    model = tiny[0]
    task = DecodingTask(model, DecodingOptions(language="en"))
    begin = task.tokenizer.timestamp_begin
    start = task.initial_tokens
    if first_step:
        tokens = np.array([start] * 3)
    else:
        # After text, after an open and after a closed timestamp pair.
        ends = [[400, 523, 616], [400, 523, begin + 20], [400, begin + 20, begin + 20]]
        tokens = np.array([[*start, begin, *end] for end in ends])
    rng = np.random.default_rng(int(boost))
    logits = (rng.standard_normal((3, model.dims.n_vocab)) * 4).astype(np.float32)
    # Text wins; the timestamps together win though a text token is likelier than each; one wins.
    logits[:, begin:] += boost
    host = logits.copy()
    for logit_filter in task.logit_filters:
        logit_filter.apply(host, tokens)
    rules = DeviceRules(task.logit_filters, model.dims.n_vocab)
    expected = host.argmax(axis=-1)
    chosen, logprobs = backend.greedy_choice(mx.array(logits), *rules(tokens), task.timestamp_begin)
    assert np.array(chosen).tolist() == expected.tolist()
    np.testing.assert_allclose(np.array(logprobs), log_softmax(host)[np.arange(3), expected], atol=1e-5)


@pytest.mark.parametrize("first_step", [True, False])
@pytest.mark.parametrize("boost", [0.0, 3.5, 14.0])
def test_a_beam_s_candidates_where_the_logits_are_equal_the_host_filters(tiny, backend, boost, first_step):
    model = tiny[0]
    task = DecodingTask(model, DecodingOptions(language="en", beam_size=5))
    begin = task.tokenizer.timestamp_begin
    start = task.initial_tokens
    ends = [[400, 523, 616], [400, 523, begin + 20], [400, begin + 20, begin + 20]]
    tokens = np.array([start] * 3) if first_step else np.array([[*start, begin, *end] for end in ends])
    rng = np.random.default_rng(int(boost) + 1)
    logits = (rng.standard_normal((3, model.dims.n_vocab)) * 4).astype(np.float32)
    logits[:, begin:] += boost
    logits[0, 100:103] = logits[0].max() + 1  # three equal best: the lower ids first
    host = logits.copy()
    for logit_filter in task.logit_filters:
        logit_filter.apply(host, tokens)
    host_logprobs = log_softmax(host)
    rules = DeviceRules(task.logit_filters, model.dims.n_vocab)
    ids, logprobs = backend.top_choices(mx.array(logits), *rules(tokens), task.timestamp_begin, 6)
    ids, logprobs = ranked_candidates(np.array(ids), np.array(logprobs))
    assert ids.tolist() == [top_tokens(row, 6).tolist() for row in host_logprobs]
    # The kernel sums the vocabulary's exponentials in eight float32 lanes, numpy pairwise.
    np.testing.assert_allclose(logprobs, np.take_along_axis(host_logprobs, ids, -1), atol=1e-4)


@pytest.mark.skipif(not kernels.available(), reason="the compiled kernels do not run here")
def test_the_greedy_choice_kernel_on_edge_cases():
    begin, vocab = 6, 10
    values = np.array([1.0, 3.5, 3.5, 0.0, 0.0, 0.0, 2.0, 2.5, 0.0, 0.0])
    logits = mx.array(np.stack([values] * 4).astype(np.float32))
    forbidden = mx.array([[False] * vocab, [False] * vocab, [True] * vocab, [False] * 3 + [True] * 7])
    # Row 1's ranges forbid the text tokens 1-2; row 3's stop lies past the vocabulary.
    ranges = mx.array([[[0, 0]], [[1, 3]], [[0, 0]], [[2, 2**31 - 1]]], dtype=mx.int32)
    chosen, logprobs = kernels.greedy_choice(logits, forbidden, ranges, begin)
    # Row 0: the first of two equal text logits (3.5 beats the timestamps' logsumexp, 3.07);
    # row 1: the timestamps win over the 1.0 left of text; row 2: nothing allowed; row 3: tokens
    # 0 and 1 are what is left.
    assert np.array(chosen).tolist() == [1, 7, 0, 1]

    def log_probability(logit: float, allowed: np.ndarray) -> float:
        return logit - np.log(np.exp(allowed).sum())

    expected = [log_probability(3.5, values), log_probability(2.5, values[6:]), log_probability(3.5, values[:2])]
    np.testing.assert_allclose(np.array(logprobs)[[0, 1, 3]], expected, rtol=1e-6)
    assert np.isnan(np.array(logprobs)[2])
    no_rule, _ = kernels.greedy_choice(logits, forbidden[:1], ranges[:, :0], None)
    assert np.array(no_rule).tolist() == [1, 1, 1, 1]


def test_the_timestamp_rules_state_advanced_on_the_device_gives_the_host_ranges():
    tokenizer = get_tokenizer(False)
    begin = tokenizer.timestamp_begin
    rules = ApplyTimestampRules(tokenizer, sample_begin=3, max_initial_timestamp_index=50)
    rng = np.random.default_rng(11)
    for _ in range(300):
        n = int(rng.integers(1, 9))
        text = rng.integers(0, tokenizer.eot, size=(4, n))
        stamps = rng.integers(begin, begin + 1500, size=(4, n))
        tokens = np.concatenate([np.full((4, 3), tokenizer.sot), np.where(rng.random((4, n)) < 0.5, text, stamps)], 1)
        state = TimestampState(*(mx.array(a) for a in rules.state(tokens[:, :4]).arrays()))
        for column in tokens[:, 4:].T:
            state = state.advance(mx.array(column.astype(np.int32)), begin, mx)
        device = np.array(timestamp_ranges(state, begin, tokenizer.eot, mx))
        assert np.array_equal(device, rules.ranges(tokens)), tokens


@pytest.mark.parametrize("batch", [1, 3])
def test_steps_sent_ahead_with_the_rules_on_the_device_give_the_host_loop_s_tokens(tiny, backend, monkeypatch, batch):
    """The loop that sends steps ahead (GPUs, CPU kernels) gives the host loop's tokens."""
    model = tiny[0]
    names = ["jfk.flac", "mfa_acoustic_corpus.wav", "librivox_sns01_0870.wav"][:batch]
    mel = mx.stack([whisper.log_mel_spectrogram(load_audio(SPEECH_DIR / n), padding=N_SAMPLES).T[:3000] for n in names])
    options = DecodingOptions(language="en")
    monkeypatch.setattr(backend, "chooses_on_device", False)
    host = whisper.decode(model, mel, options)
    monkeypatch.setattr(backend, "chooses_on_device", True)
    ahead = whisper.decode(model, mel, options)
    assert [r.tokens for r in ahead] == [r.tokens for r in host]
    # The CPU kernel's exp and sums in float32 against numpy's pairwise sums: ~1e-6 a token.
    np.testing.assert_allclose([r.avg_logprob for r in ahead], [r.avg_logprob for r in host], atol=1e-4)


@pytest.mark.skipif(not kernels.available(), reason="the compiled kernels do not run here")
def test_the_vocabulary_in_half_precision_gives_the_same_logits(tiny):
    half = tiny[0].decoder.token_embedding.weight
    # The bundled checkpoint is float16: the CPU backend keeps it so, and the logits are the same bits.
    assert half.dtype == mx.float16
    x = mx.array(np.random.default_rng(5).standard_normal((1, 1, 384)).astype(np.float32))
    assert mx.array_equal(kernels.linear(x, half), kernels.linear(x, half.astype(mx.float32))).item()


@pytest.mark.skipif(not kernels.available(), reason="the compiled kernels do not run here")
@pytest.mark.parametrize("over_features", [True, False])
@pytest.mark.parametrize("rows", [1, 3])
def test_the_step_in_one_kernel_call_per_layer_gives_the_bits_of_its_own_ops(tiny, monkeypatch, rows, over_features):
    model, features = tiny
    if over_features and not kernels.runs_avx512():
        pytest.skip("the step over the audio features needs AVX-512 kernels")
    if not over_features:
        monkeypatch.setattr(kernels, "steps_over_features", lambda *args: False)
    backend = CpuBackend(model)
    tokens = np.random.default_rng(rows).integers(0, 50256, size=(rows, 12))
    runs = []
    for kernel in (kernels.decoder_layer_step, lambda *args, **kwargs: None):
        monkeypatch.setattr(kernels, "decoder_layer_step", kernel)
        audio = backend.audio_memory(mx.repeat(features, rows, axis=0))
        cache = backend.new_cache(rows)
        logits = []
        for i in range(tokens.shape[1]):
            step, cache = backend._step(mx.array(tokens[:, i : i + 1]), audio, cache, mx.array([i], mx.int32))
            logits.append(np.array(step))
        runs.append(np.stack(logits))
    if over_features:  # the kernel's sums over the features in another order: float32 rounding apart
        assert np.abs(runs[0] - runs[1]).max() < TOLERANCE
    else:
        assert np.array_equal(runs[0], runs[1])


@pytest.mark.skipif(not kernels.available(), reason="the compiled kernels do not run here")
def test_a_window_s_rows_read_the_positions_they_share_once_with_the_same_bits(tiny, monkeypatch):
    """Beams part after a window's first pass: their steps read the prompt's positions from the
    window's first row, for all its rows; the logits and caches are those of each row reading its own."""
    model, features = tiny
    monkeypatch.setattr(kernels, "steps_over_features", lambda *args: False)  # each row's own keys and values
    backend = CpuBackend(model)
    audio = backend.audio_memory(features, 3)
    prompt = mx.array([[50257, 50362, 400, 523, 616]], dtype=mx.int32)
    _, cache = backend.forward(prompt, audio, backend.new_cache(1), 0, positions=1)
    parted = backend.reorder(cache, [0, 0, 0], prompt.shape[1])
    assert parted["alike"].item() == prompt.shape[1]
    tokens = np.random.default_rng(5).integers(0, 50256, size=(3, 6))
    runs = []
    for alike in (parted["alike"], mx.array([0], dtype=mx.int32)):
        cache = {**parted, "layers": tree_map(lambda t: t * 1, parted["layers"]), "alike": alike}  # written in place
        logits = []
        for i in range(tokens.shape[1]):
            if i == 3:  # beams reordered: only their own positions move
                cache = backend.reorder(cache, [2, 0, 0], prompt.shape[1] + i)
            offset = mx.array([prompt.shape[1] + i], mx.int32)
            step, cache = backend._step(mx.array(tokens[:, i : i + 1]), audio, cache, offset)
            logits.append(np.array(step))
        runs.append((np.stack(logits), [np.array(t) for layer in cache["layers"] for t in layer]))
    assert np.array_equal(runs[0][0], runs[1][0])
    assert all(np.array_equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


@pytest.mark.skipif(not kernels.available(), reason="the compiled kernels do not run here")
def test_the_step_names_the_weights_it_lacks():
    block = ResidualAttentionBlock(64, 2, cross_attention=True)
    weights = step_weights(block)
    del weights["mlp1.bias"], weights["attn.key.weight"]
    x, cache = mx.zeros((1, 1, 64)), (mx.zeros((1, 8, 64)), mx.zeros((1, 8, 64)))
    audio = (mx.zeros((1, 10, 64)), mx.zeros((1, 10, 64)))
    with pytest.raises(ValueError, match=r"lack attn\.key\.weight, mlp1\.bias"):
        kernels.decoder_layer_step(x, mx.array([0], dtype=mx.int32), cache, audio, weights, 2, 1e-5)
    weights = step_weights(block)
    weights["mlp2.bias"] = mx.zeros(63)
    with pytest.raises(ValueError, match=r"mlp2\.bias: expected a vector \(64,\)"):
        kernels.decoder_layer_step(x, mx.array([0], dtype=mx.int32), cache, audio, weights, 2, 1e-5)


@pytest.mark.skipif(not kernels.available(), reason="the compiled kernels do not run here")
@pytest.mark.parametrize("over_features", [False, True])
@pytest.mark.parametrize(("group", "n_audio"), [(1, 3), (2, 3), (5, 1)])
def test_rows_sharing_an_audio_step_as_over_repeated_copies_of_it(group, n_audio, over_features):
    if over_features and not kernels.runs_avx512():
        pytest.skip("the step over the audio features needs AVX-512 kernels")
    rng = np.random.default_rng(group)
    n_ctx, frames, state, offset = 448, 300, 128, 9
    rows = n_audio * group

    def random(*shape: int) -> mx.array:
        return mx.array(rng.standard_normal(shape).astype(np.float32))

    decoder = TextDecoder(n_vocab=64, n_ctx=n_ctx, n_state=state, n_head=2, n_layer=1)
    decoder.update(tree_map(lambda p: 0.3 * random(*p.shape), decoder.parameters()))
    block = decoder.blocks[0]
    features, x = random(n_audio, frames, state), random(rows, 1, state)
    cached = [rng.standard_normal((rows, n_ctx, state)).astype(np.float32) for _ in range(2)]

    def step(audio_features: mx.array, rows_per_audio: int) -> list[np.ndarray]:
        if over_features:
            audio = kernels.pack_features(audio_features)
        else:
            audio = (block.cross_attn.key(audio_features), block.cross_attn.value(audio_features))
        cache, position = tuple(mx.array(c) for c in cached), mx.array([offset], dtype=mx.int32)
        out, (k, v) = kernels.decoder_layer_step(
            x, position, cache, audio, step_weights(block), 2, 1e-5, over_features=over_features, group=rows_per_audio
        )
        return [np.array(a) for a in (out, k, v)]

    shared = step(features, group)
    repeated = step(mx.repeat(features, group, axis=0), 1)
    # Row r of the repeated audio is audio r // group: the same bits show that each row read its own.
    for ours, expected in zip(shared, repeated):
        assert np.array_equal(ours, expected)


@pytest.mark.skipif(not kernels.runs_avx512(), reason="the step over the audio features needs AVX-512 kernels")
def test_audio_features_are_packed_as_the_step_reads_them():
    features = mx.arange(2 * 40 * 64, dtype=mx.float32).reshape(2, 40, 64)
    frame_panels, channel_panels = (np.array(a) for a in kernels.pack_features(features))
    f = np.array(features)
    assert frame_panels.shape == (2, 2, 64, 32) and channel_panels.shape == (2, 2, 40, 32)
    assert frame_panels[1, 1, 5, 3] == f[1, 32 + 3, 5]
    assert (frame_panels[:, 1, :, 8:] == 0).all()  # frames 40-63 do not exist
    assert channel_panels[1, 1, 7, 3] == f[1, 7, 32 + 3]


@pytest.mark.skipif(not kernels.runs_avx512(), reason="the step over the audio features needs AVX-512 kernels")
def test_decoding_over_the_audio_features_gives_the_tokens_of_decoding_over_keys_and_values(tiny, monkeypatch):
    model, features = tiny
    runs = []
    for over_features in (True, False):
        if not over_features:
            monkeypatch.setattr(kernels, "steps_over_features", lambda *args: False)
        inference = Inference(model, features)
        assert ("features" in inference.audio) == over_features
        chosen = np.array([[50257, 50362]])
        for _ in range(20):
            chosen = np.concatenate([chosen, inference.logits(chosen)[:, -1].argmax(-1)[:, None]], axis=1)
        runs.append(chosen)
    assert np.array_equal(runs[0], runs[1])
