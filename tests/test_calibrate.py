"""TEAL-style calibration on a tiny random Llama."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache

from spqt_mlx.calibrate import apply_thresholds, block_output_errors, calibrate, input_sparsity
from spqt_mlx.patch import achieved_sparsity, patch_model, record_stats, set_thresholds, zigzag_layers

from lm_fixtures import random_tokens, tiny_llama


@pytest.fixture(scope="module")
def patched():
    model = tiny_llama()
    patch_model(model)
    return model


@pytest.fixture(scope="module")
def calibration_tokens():
    return random_tokens(256, seed=11)


def teacher_forced_decode(model, tokens, prefill):
    """Prefill ``tokens[:, :prefill]``, then feed the rest one at a time (single-token calls)."""
    cache = make_prompt_cache(model)
    mx.eval(model(tokens[:, :prefill], cache=cache))
    for t in range(prefill, tokens.shape[1]):
        mx.eval(model(tokens[:, t : t + 1], cache=cache))


def block_sparsity(model, sparsities, block):
    """Parameter-weighted sparsity of one block's projections."""
    layers = zigzag_layers(model)
    paths = [p for p in sparsities if p.startswith(f"model.layers.{block}.")]
    sizes = np.array([layers[p].input_dims * layers[p].output_dims for p in paths], dtype=float)
    return float(np.array([sparsities[p] for p in paths]) @ sizes / sizes.sum())


def test_uniform_hits_the_target_on_held_out_tokens(patched, calibration_tokens):
    thresholds = calibrate(patched, calibration_tokens, 0.5, method="uniform", progress=False)
    assert set(thresholds) == set(zigzag_layers(patched))
    assert all(t > 0 for t in thresholds.values())
    apply_thresholds(patched, thresholds)
    try:
        record_stats(patched)
        # Held-out positions in the range the calibration sequence covered (attention outputs
        # shrink as the context grows, so position matters).
        teacher_forced_decode(patched, random_tokens(176, seed=12), prefill=128)
        sparsity, calls = achieved_sparsity(patched)
        assert calls == 48
        assert abs(sparsity - 0.5) < 0.05
        # Projection by projection too, not just on average.
        for path, layer in zigzag_layers(patched).items():
            n, active = layer.stats()
            assert abs(1 - active / (n * layer.input_dims) - 0.5) < 0.1, path
    finally:
        record_stats(patched, False)
        apply_thresholds(patched, 0.0)


def test_uniform_thresholds_are_quantiles_of_the_calibration_inputs(patched, calibration_tokens):
    for target in (0.2, 0.7):
        thresholds = calibrate(patched, calibration_tokens, target, progress=False)
        measured = input_sparsity(patched, calibration_tokens, thresholds)
        for path, s in measured.items():
            assert abs(s - target) < 0.01, path
    zero = calibrate(patched, calibration_tokens, 0.0, progress=False)
    assert set(zero.values()) == {0.0}


def test_greedy_beats_uniform_at_the_same_weighted_sparsity(patched, calibration_tokens):
    uniform = calibrate(patched, calibration_tokens, 0.5, method="uniform", progress=False)
    # Greedy scores on all calibration tokens here, so its errors compare exactly with uniform's.
    greedy = calibrate(patched, calibration_tokens, 0.5, method="greedy", greedy_tokens=256, step=0.1, progress=False)
    assert set(greedy) == set(uniform)
    measured = input_sparsity(patched, calibration_tokens, greedy)
    for block in range(2):
        assert abs(block_sparsity(patched, measured, block) - 0.5) < 0.02
    # Greedy allocates: projections of one block get different sparsities.
    block0 = [s for p, s in measured.items() if p.startswith("model.layers.0.")]
    assert max(block0) - min(block0) > 0.1
    # The block-output error it minimizes: never higher than uniform's, and clearly lower overall.
    err_uniform = block_output_errors(patched, calibration_tokens, uniform)
    err_greedy = block_output_errors(patched, calibration_tokens, greedy)
    assert all(g <= u * (1 + 1e-6) for g, u in zip(err_greedy, err_uniform)), (err_greedy, err_uniform)
    assert sum(err_greedy) < 0.95 * sum(err_uniform)
    # Errors are measured against the dense block: zero thresholds give zero error.
    assert block_output_errors(patched, calibration_tokens, {p: 0.0 for p in uniform}) == [0.0, 0.0]


def test_greedy_is_judged_on_tokens_its_search_did_not_see(patched, calibration_tokens, monkeypatch):
    """With calibration sequences longer than the search's prefix, each block keeps greedy's
    allocation only if it beats uniform on the positions after that prefix; else uniform's."""
    import spqt_mlx.calibrate as calibrate_module

    judged = []
    real = calibrate_module._block_errors

    def spy(block, calls, probes, thresholds, reference, starts=None):
        errors = real(block, calls, probes, thresholds, reference, starts)
        if starts is not None:
            judged.append((list(probes), starts, [c[0][0].shape[1] for c in calls], errors))
        return errors

    monkeypatch.setattr(calibrate_module, "_block_errors", spy)
    uniform = calibrate(patched, calibration_tokens, 0.5, method="uniform", progress=False)
    greedy = calibrate(patched, calibration_tokens, 0.5, method="greedy", greedy_tokens=64, step=0.1, progress=False)
    assert len(judged) == 2  # one verdict per block
    for paths, starts, lengths, (greedy_error, uniform_error) in judged:
        assert starts == [64] and lengths == [128]  # scored on positions 64..127, searched on 0..63
        kept_uniform = all(greedy[p] == uniform[p] for p in paths)
        assert kept_uniform == (uniform_error <= greedy_error), (paths, greedy_error, uniform_error)
    # Sequences no longer than the prefix have nothing held out: greedy is judged in-sample.
    judged.clear()
    calibrate(patched, calibration_tokens[:, :64], 0.5, method="greedy", greedy_tokens=64, step=0.25, progress=False)
    assert judged == []


def test_calibrating_the_float_model_names_the_same_layers(calibration_tokens):
    model = tiny_llama()
    thresholds = calibrate(model, calibration_tokens, 0.4, progress=False)
    paths = patch_model(model, thresholds=thresholds)
    assert set(paths) == set(thresholds)
    assert all(zigzag_layers(model)[p].threshold == t for p, t in thresholds.items())


def test_the_model_is_left_unchanged(patched, calibration_tokens):
    before = {p: type(m) for p, m in patched.named_modules()}
    tokens = random_tokens(6, seed=3)
    logits = np.array(patched(tokens))
    calibrate(patched, calibration_tokens[:, :64], 0.5, method="greedy", step=0.25, progress=False)
    assert {p: type(m) for p, m in patched.named_modules()} == before
    np.testing.assert_array_equal(np.array(patched(tokens)), logits)


def test_bad_arguments(patched, calibration_tokens):
    with pytest.raises(ValueError):
        calibrate(patched, calibration_tokens, 1.0)
    with pytest.raises(TypeError):
        calibrate(patched, calibration_tokens, "0.5")
    with pytest.raises(ValueError, match="method"):
        calibrate(patched, calibration_tokens, 0.5, method="teal")
    with pytest.raises(TypeError):
        calibrate(patched, mx.zeros((1, 16)), 0.5)
    with pytest.raises(ValueError):
        calibrate(patched, mx.zeros((1, 1), dtype=mx.int32), 0.5)


def test_mlx_products_match_numpy_products(patched, calibration_tokens, monkeypatch):
    """The probes compute through NumPy on the CPU and through MLX elsewhere: same thresholds."""
    import spqt_mlx.calibrate as calibrate_module

    via_numpy = calibrate(patched, calibration_tokens, 0.5, progress=False)
    monkeypatch.setattr(calibrate_module, "_use_numpy", lambda: False)
    via_mlx = calibrate(patched, calibration_tokens, 0.5, progress=False)
    assert set(via_mlx) == set(via_numpy)
    for path in via_numpy:
        assert via_mlx[path] == pytest.approx(via_numpy[path], rel=1e-3), path
    errors = block_output_errors(patched, calibration_tokens, via_numpy)
    assert all(e > 0 for e in errors)


def test_recording_holds_one_projection_weight_at_a_time(calibration_tokens):
    """Calibration's dense pass dequantizes each projection to float32 for its product; it must
    drop that copy after the call, or a 70B model needs 280 GB to calibrate."""
    import tracemalloc

    model = tiny_llama(hidden_size=256, intermediate_size=1024, num_hidden_layers=8)
    patch_model(model)
    float_bytes = sum(4 * layer.input_dims * layer.output_dims for layer in zigzag_layers(model).values())
    largest = max(4 * layer.input_dims * layer.output_dims for layer in zigzag_layers(model).values())
    tracemalloc.start()
    try:
        calibrate(model, calibration_tokens[:64], 0.5, max_samples=256, progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * largest < float_bytes / 4, (peak, largest, float_bytes)


@pytest.mark.parametrize("bad", [-1, 320, 1 << 20])
@pytest.mark.parametrize("entry", ["calibrate(model, tokens, 0.5, progress=False)", "input_sparsity(model, tokens, {})"])
def test_token_ids_outside_the_vocabulary_are_refused(bad, entry):
    """Out-of-range ids would read past the embedding table (a crash, or silent garbage): refused
    first. In a subprocess, so that a crash fails this test only."""
    from isolated import expect_error

    expect_error(f"""
from lm_fixtures import tiny_llama
from spqt_mlx.calibrate import calibrate, input_sparsity
from spqt_mlx.patch import patch_model
model = tiny_llama()
patch_model(model)
tokens = [3, 7, {bad}, 11]
{entry}
""", "ValueError", "vocabulary")


def test_sparsity_auto_takes_the_largest_within_the_budget(patched, calibration_tokens):
    """choose_sparsity: thresholds from the first half of the tokens, perplexity on the second;
    the largest candidate within the budget is set on the model."""
    from spqt_mlx.calibrate import AUTO_CANDIDATES, choose_sparsity, describe_choice
    from spqt_mlx.patch import get_thresholds

    tokens = calibration_tokens[0, :96].tolist()
    chosen, thresholds, rows = choose_sparsity(patched, tokens, max_increase=1e9)
    assert chosen == max(AUTO_CANDIDATES) and get_thresholds(patched) == thresholds
    assert [r["sparsity"] for r in rows] == [0.0, *sorted(AUTO_CANDIDATES)] and rows[0]["increase"] == 0.0
    for budget in (0.0, 3.0, 30.0):
        chosen, thresholds, rows = choose_sparsity(patched, tokens, max_increase=budget)
        within = [r for r in rows if r["sparsity"] <= chosen]
        assert all(r["increase"] <= budget for r in within)
        beyond = [r for r in rows if r["sparsity"] > chosen]
        assert not beyond or beyond[0]["increase"] > budget
        assert get_thresholds(patched) == thresholds
        assert f"sparsity auto: {chosen:.0%}" in describe_choice(chosen, rows, budget, "test text")
    with pytest.raises(ValueError, match="at least 32 tokens"):
        choose_sparsity(patched, tokens[:20])
    with pytest.raises(ValueError, match="budget"):
        choose_sparsity(patched, tokens, max_increase=-1)
    set_thresholds(patched, 0.0)  # the module's other tests start dense


def test_greedy_is_kept_only_where_the_model_scores_no_worse_than_uniform(patched, monkeypatch):
    """sparsify: greedy's allocation against uniform thresholds, by perplexity on the calibration
    tokens after those greedy's search and block verdicts saw."""
    import spqt_mlx.calibrate as calibration
    from spqt_mlx.calibrate import GREEDY_TOKENS, sparsify
    from spqt_mlx.patch import get_thresholds
    from spqt_mlx.perplexity import perplexity

    tokens = random_tokens(2 * GREEDY_TOKENS + 96, seed=21)[0].tolist()
    greedy = calibrate(patched, tokens, 0.5, method="greedy", progress=False)
    uniform = calibrate(patched, tokens, 0.5, progress=False)
    assert greedy != uniform
    scores = {}
    for name, thresholds in (("greedy", greedy), ("uniform", uniform)):
        set_thresholds(patched, thresholds)
        scores[name] = perplexity(patched, tokens[2 * GREEDY_TOKENS:], window=96, bos=1, progress=False)["perplexity"]
    chosen = sparsify(patched, tokens, 0.5, "greedy", bos=1, progress=False)
    assert chosen == (greedy if scores["greedy"] <= scores["uniform"] else uniform)
    assert get_thresholds(patched) == chosen

    # Both verdicts, with the judge's scores forced; it sees the held-out tokens and the BOS.
    seen = []
    for winner in ("greedy", "uniform"):
        def scored(model, thresholds, judged, bos, window=256, winner=winner):
            seen.append((judged, bos))
            return 1.0 if thresholds == (greedy if winner == "greedy" else uniform) else 2.0

        monkeypatch.setattr(calibration, "_scored", scored)
        assert sparsify(patched, tokens, 0.5, "greedy", bos=7, progress=False) == (
            greedy if winner == "greedy" else uniform)
        assert get_thresholds(patched) == (greedy if winner == "greedy" else uniform)
    assert seen and all(judged == [tokens[2 * GREEDY_TOKENS:]] and bos == 7 for judged, bos in seen)
    # Too few tokens after the search's: the judge scores all of them.
    seen.clear()
    sparsify(patched, tokens[:2 * GREEDY_TOKENS + 10], 0.5, "greedy", progress=False)
    assert seen and all(judged == [tokens[:2 * GREEDY_TOKENS + 10]] for judged, _ in seen)
    # Several sequences: greedy searched a prefix of each (GREEDY_TOKENS spread over the rows) and
    # judged its blocks on as many positions after it; each sequence is scored on its own rest.
    seen.clear()
    batch = np.array(random_tokens(2 * 300, seed=22)).reshape(2, 300)
    sparsify(patched, batch, 0.5, "greedy", progress=False)
    after = 2 * (GREEDY_TOKENS // 2)
    assert seen and all(judged == [batch[0, after:].tolist(), batch[1, after:].tolist()] for judged, _ in seen)
    # choose_sparsity keeps, per candidate, whichever of the two scores lower on its held-out half.
    half = tokens[:len(tokens) // 2]
    options = {"greedy": calibrate(patched, half, 0.3, method="greedy", progress=False),
               "uniform": calibrate(patched, half, 0.3, progress=False)}
    for winner in ("greedy", "uniform"):
        monkeypatch.setattr(calibration, "_scored", lambda model, thresholds, judged, bos, window=256, winner=winner:
                            1.0 if thresholds == options[winner] else 2.0)
        chosen_sparsity, thresholds, rows = calibration.choose_sparsity(patched, tokens, max_increase=0.0,
                                                                        method="greedy", candidates=(0.3,))
        assert chosen_sparsity == 0.3 and thresholds == options[winner] and rows[-1]["perplexity"] == 1.0
    set_thresholds(patched, 0.0)


def test_the_greedy_judge_refuses_sequences_too_short_to_score(patched):
    from spqt_mlx.calibrate import _scored

    with pytest.raises(ValueError, match="two tokens"):
        _scored(patched, {}, [[5], []], None)
