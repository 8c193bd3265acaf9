"""The decoder's step over its fixed-size cache against a plain pass over the whole sequence."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map
from speech import SPEECH_DIR

import whisper
from whisper import kernels
from whisper.audio import N_SAMPLES, load_audio
from whisper.decoding import (
    ApplyTimestampRules,
    DecodingOptions,
    DecodingTask,
    DeviceRules,
    GreedyDecoder,
    Inference,
    TimestampState,
    _greedy_choice,
    _greedy_pick,
    log_softmax,
    timestamp_ranges,
)
from whisper.model import ResidualAttentionBlock, TextDecoder
from whisper.tokenizer import get_tokenizer

TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def traced_model():
    """tiny.en loaded while its decoder's step counts how often MLX traces it."""
    calls = []
    original = TextDecoder._step

    def counting(self, *args):
        calls.append(args[0].shape)
        return original(self, *args)

    TextDecoder._step = counting
    try:
        model = whisper.load_model("tiny.en")
    finally:
        TextDecoder._step = original
    audio = load_audio(SPEECH_DIR / "jfk.flac")
    mel = whisper.log_mel_spectrogram(np.concatenate([audio, np.zeros(N_SAMPLES - len(audio), np.float32)]))
    return model, model.embed_audio(mel.T[None, :3000]), calls


@pytest.fixture(params=["kernels' cache", "padded heads"])
def cache_layout(request):
    """Both layouts of the self-attention cache: the CPU kernels' and the one GPUs use."""
    if request.param == "padded heads":
        with kernels.fallback():
            yield request.param
    elif not kernels.available():
        pytest.skip("the compiled kernels do not run here")
    else:
        yield request.param


def test_steps_give_the_logits_of_a_whole_pass_and_trace_once(traced_model, cache_layout):
    model, features, calls = traced_model
    calls.clear()
    rng = np.random.default_rng(3)
    # Two sequences that share their start.
    tokens = np.concatenate([[[50257, 50362]] * 2, rng.integers(0, 50256, size=(2, 40))], axis=1)
    tokens[1, :5] = tokens[0, :5]
    features = mx.repeat(features, 2, axis=0)
    inference = Inference(model, features)
    stepped = [inference.logits(tokens[:, :3], positions=3)]
    stepped += [inference.logits(tokens[:, : n + 1]) for n in range(3, tokens.shape[1])]
    stepped = np.concatenate(stepped, axis=1)
    whole = np.array(model.logits(mx.array(tokens), features))
    assert np.abs(stepped - whole).max() < TOLERANCE
    assert len(calls) == 1, f"the step was traced {len(calls)} times"


def test_a_kept_prefix_of_the_cache_decodes_on_from_there(traced_model, cache_layout):
    model, features, _ = traced_model
    tokens = np.array([[50257, 50362, 400, 523, 616, 7875, 7840]])
    inference = Inference(model, features)
    inference.logits(tokens, positions=tokens.shape[1])
    # Keep the first four positions (as the streaming transcriber does with an accepted guess);
    # the rejected ones stay in the cache and must not be read.
    inference.rewind(4)
    other = np.array([[*tokens[0, :4], 1029]])
    expected = np.array(model.logits(mx.array(other), features))[:, -1:]
    assert np.abs(inference.logits(other) - expected).max() < TOLERANCE


def test_the_step_uses_the_weights_it_is_given(traced_model, cache_layout):
    model = whisper.load_model("tiny.en")
    inference = Inference(model, traced_model[1])
    tokens = np.array([[50257, 50362, 400]])
    inference.logits(tokens[:, :2], positions=2)
    before = inference.logits(tokens)
    # Weights replaced after the first trace (a conversion, a reload) must be the ones used.
    model.decoder.ln.weight = model.decoder.ln.weight * 2
    attention = model.decoder.blocks[0].attn
    attention.value.weight = attention.value.weight * 2
    again = Inference(model, traced_model[1])
    again.logits(tokens[:, :2], positions=2)
    after = again.logits(tokens)
    expected = np.array(model.logits(mx.array(tokens), traced_model[1]))[:, -1:]
    assert np.abs(after - expected).max() < TOLERANCE
    assert np.abs(after - before).max() > 1


@pytest.mark.parametrize("first_step", [True, False])
@pytest.mark.parametrize("boost", [0.0, 3.5, 14.0])
def test_greedy_choice_where_the_logits_are_equals_the_host_filters(traced_model, boost, first_step):
    model = traced_model[0]
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
    # Compiled as the decoding loop runs it (one kernel call on a CPU with the kernels), and
    # MLX's own ops.
    with kernels.fallback():
        mlx_ops = _greedy_choice(task.timestamp_begin)(mx.array(logits), *rules(tokens))
    for chosen, logprobs in (_greedy_pick(task.timestamp_begin)(mx.array(logits), *rules(tokens)), mlx_ops):
        assert np.array(chosen).tolist() == expected.tolist()
        np.testing.assert_allclose(np.array(logprobs), log_softmax(host)[np.arange(3), expected], atol=1e-5)


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
def test_steps_sent_ahead_with_the_rules_on_the_device_give_the_host_loop_s_tokens(traced_model, monkeypatch, batch):
    """The GPU's decoding loop, run here: the same tokens and log-probabilities as the host's."""
    model = traced_model[0]
    names = ["jfk.flac", "mfa_acoustic_corpus.wav", "librivox_sns01_0870.wav"][:batch]
    mel = mx.stack([whisper.log_mel_spectrogram(load_audio(SPEECH_DIR / n), padding=N_SAMPLES).T[:3000] for n in names])
    options = DecodingOptions(language="en")
    host = whisper.decode(model, mel, options)
    monkeypatch.setattr(DecodingTask, "_chooses_on_device", lambda self, decoder: isinstance(decoder, GreedyDecoder))
    ahead = whisper.decode(model, mel, options)
    assert [r.tokens for r in ahead] == [r.tokens for r in host]
    np.testing.assert_allclose([r.avg_logprob for r in ahead], [r.avg_logprob for r in host], atol=1e-5)


def test_the_vocabulary_in_half_precision_gives_the_same_logits():
    model = whisper.load_model("tiny.en")
    embedding = model.decoder.token_embedding.weight
    assert embedding.dtype == mx.float32
    x = mx.array(np.random.default_rng(5).standard_normal((1, 1, 384)).astype(np.float32))
    expected = kernels.linear(x, embedding)
    model.decoder.store_weights_in_half()
    half = model.decoder.token_embedding.weight
    assert half.dtype == (mx.float16 if kernels.available() else mx.float32)
    # The bundled checkpoint is float16: no value changes, and the logits are the same bits.
    assert mx.array_equal(half.astype(mx.float32), embedding).item()
    assert mx.array_equal(kernels.linear(x, half), expected).item()


def weights_of(block: ResidualAttentionBlock) -> dict[str, mx.array]:
    """A block's weights as the step's kernel takes them: by their parameter paths."""
    return dict(tree_flatten(block.parameters()))


@pytest.mark.skipif(not kernels.available(), reason="the compiled kernels do not run here")
def test_the_step_names_the_weights_it_lacks():
    block = ResidualAttentionBlock(64, 2, cross_attention=True)
    weights = weights_of(block)
    del weights["mlp1.bias"], weights["attn.key.weight"]
    x, cache = mx.zeros((1, 1, 64)), (mx.zeros((1, 8, 64)), mx.zeros((1, 8, 64)))
    audio = (mx.zeros((1, 10, 64)), mx.zeros((1, 10, 64)))
    with pytest.raises(ValueError, match=r"lack attn\.key\.weight, mlp1\.bias"):
        kernels.decoder_layer_step(x, mx.array([0], dtype=mx.int32), cache, audio, weights, 2, 1e-5)
    weights = weights_of(block)
    weights["mlp2.bias"] = mx.zeros(63)
    with pytest.raises(ValueError, match=r"mlp2\.bias: expected a vector \(64,\)"):
        kernels.decoder_layer_step(x, mx.array([0], dtype=mx.int32), cache, audio, weights, 2, 1e-5)


@pytest.mark.skipif(not kernels.available(), reason="the compiled kernels do not run here")
@pytest.mark.parametrize(
    ("batch", "offset", "half", "views"), [(1, 0, False, False), (2, 37, True, False), (3, 447, False, True)]
)
def test_a_layer_step_in_one_kernel_call_gives_the_bits_of_the_layers_own_ops(monkeypatch, batch, offset, half, views):
    rng = np.random.default_rng(offset)
    n_ctx, n_audio, state = 448, 300, 128

    def random(*shape: int) -> mx.array:
        if views:  # every array a view whose elements are not in row order in its memory
            return mx.array(rng.standard_normal((*shape, 2)).astype(np.float32))[..., 0]
        return mx.array(rng.standard_normal(shape).astype(np.float32))

    block = ResidualAttentionBlock(state, 2, cross_attention=True)
    block.update(tree_map(lambda p: random(*p.shape), block.parameters()))
    if half:  # as store_weights_in_half leaves them
        for layer in (block.attn.query, block.attn.value, block.cross_attn.out, block.mlp1, block.mlp2):
            layer.weight = layer.weight.astype(mx.float16)
    x, cross_kv = random(batch, 1, state), (random(batch, n_audio, state), random(batch, n_audio, state))
    position = mx.array([offset], dtype=mx.int32)

    def step(fused: bool) -> tuple[np.ndarray, ...]:
        cache = (random(batch, n_ctx, state), random(batch, n_ctx, state))
        mx.eval(cache)
        before = np.array(cache[0])
        if fused:
            out, (k, v) = kernels.decoder_layer_step(x, position, cache, cross_kv, weights_of(block), 2, 1e-5)
        else:
            out, (k, v) = block(x, cache=cache, cross=cross_kv, offset=position)
        return before, *(np.array(a) for a in (out, k, v))

    state_before = rng.bit_generator.state
    before, *fused = step(fused=True)
    rng.bit_generator.state = state_before
    with monkeypatch.context() as patch:
        patch.setattr(kernels, "decoder_layer_step", lambda *args, **kwargs: None)
        _, *own_ops = step(fused=False)
    for ours, expected in zip(fused, own_ops):
        assert np.array_equal(ours, expected)
    # The token's key went to its position; the others stayed.
    changed = np.flatnonzero((fused[1] != before).any(axis=(0, 2)))
    assert changed.tolist() == [offset]


@pytest.mark.skipif(not kernels.runs_avx512(), reason="the step over the audio features needs AVX-512 kernels")
@pytest.mark.parametrize(("batch", "half"), [(1, False), (3, True)])
def test_a_layer_step_over_the_audio_features_matches_the_step_over_their_keys_and_values(batch, half):
    rng = np.random.default_rng(batch)
    n_ctx, n_audio, state, offset = 448, 300, 128, 21  # 300 frames: the last panel part padding

    def random(*shape: int) -> mx.array:
        return mx.array(rng.standard_normal(shape).astype(np.float32))

    decoder = TextDecoder(n_vocab=64, n_ctx=n_ctx, n_state=state, n_head=2, n_layer=1)
    decoder.update(tree_map(lambda p: 0.3 * random(*p.shape), decoder.parameters()))
    block = decoder.blocks[0]
    if half:
        for layer in (block.cross_attn.key, block.cross_attn.value, block.mlp1):
            layer.weight = layer.weight.astype(mx.float16)
    features, x = random(batch, n_audio, state), random(batch, 1, state)
    position = mx.array([offset], dtype=mx.int32)
    cached = [rng.standard_normal((batch, n_ctx, state)).astype(np.float32) for _ in range(2)]
    results = []
    for cross, over_features in ((decoder.cross_kv(features)[0], False), (kernels.pack_features(features), True)):
        cache = tuple(mx.array(c) for c in cached)
        stepped = kernels.decoder_layer_step(
            x, position, cache, cross, weights_of(block), 2, 1e-5, over_features=over_features
        )
        out, (k, v) = stepped
        results.append([np.array(a) for a in (out, k, v)])
    (out_kv, k_kv, v_kv), (out_features, k_features, v_features) = results
    # The same sums in another order: float32 rounding apart.
    assert np.abs(out_features - out_kv).max() < 1e-4 * np.abs(out_kv).max()
    assert np.array_equal(k_features[:, offset], k_kv[:, offset])
    assert np.array_equal(v_features[:, offset], v_kv[:, offset])


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
            audio = decoder.cross_kv(audio_features)[0]
        cache, position = tuple(mx.array(c) for c in cached), mx.array([offset], dtype=mx.int32)
        out, (k, v) = kernels.decoder_layer_step(
            x, position, cache, audio, weights_of(block), 2, 1e-5, over_features=over_features, group=rows_per_audio
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
def test_decoding_over_the_audio_features_gives_the_tokens_of_decoding_over_keys_and_values(traced_model):
    model, features, _ = traced_model
    over_features = model.decoder.audio_memory(features)
    assert isinstance(over_features, dict)
    runs = []
    for memory in (over_features, model.decoder.cross_kv(features)):
        inference = Inference(model, features)
        inference.audio = memory
        chosen = np.array([[50257, 50362]])
        for _ in range(20):
            chosen = np.concatenate([chosen, inference.logits(chosen)[:, -1].argmax(-1)[:, None]], axis=1)
        runs.append(chosen)
    assert np.array_equal(runs[0], runs[1])
