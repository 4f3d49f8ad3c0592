"""Block and neuron importance against naive references, padding invariance, plots, bad input."""

import math

import pytest
import torch
import torch.nn.functional as F

from hf_recover.prune import block_importance, neuron_importance, plot_block_importance


def _sequences(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 320, (n,), generator=g).tolist() for n in lengths]


def _padded_rows(sequences, length, pad=0, left=False):
    rows = []
    for seq in sequences:
        n_pad = length - len(seq)
        ids = [pad] * n_pad + seq if left else seq + [pad] * n_pad
        mask = [0] * n_pad + [1] * len(seq) if left else [1] * len(seq) + [0] * n_pad
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": ids})
    return rows


def _block_inputs_outputs(model, seq):
    """Each block's input and raw output for one unpadded sequence, captured with hooks."""
    ins, outs = [], []

    def hook(module, args, kwargs, output):
        ins.append((args[0] if args else kwargs["hidden_states"])[0])
        outs.append((output[0] if isinstance(output, tuple) else output)[0])

    handles = [layer.register_forward_hook(hook, with_kwargs=True) for layer in model.model.layers]
    with torch.no_grad():
        model(torch.tensor([seq]))
    for h in handles:
        h.remove()
    # input of block l, and x_{l+1} = output of block l, for l = 0..L-1: L + 1 states of (T, H)
    return [*ins, outs[-1]]


def _cos(a, b):
    a, b = a.double(), b.double()
    return float((a * b).sum() / (a.square().sum().sqrt() * b.square().sum().sqrt()))


def _naive_scores(model, sequences, method, n_blocks):
    """Token by token (block influence) or sequence by sequence (angular), in plain Python."""
    states = [_block_inputs_outputs(model, seq) for seq in sequences]
    n_layers = len(model.model.layers)
    scores = []
    for start in range(n_layers - n_blocks + 1):
        values = []
        for hs in states:
            a, b = hs[start], hs[start + n_blocks]
            if method == "block_influence":
                values += [1 - _cos(a[t], b[t]) for t in range(a.shape[0])]
            else:
                values.append(math.acos(max(-1.0, min(1.0, _cos(a[-1], b[-1])))) / math.pi)
        scores.append(sum(values) / len(values))
    return torch.tensor(scores, dtype=torch.float64)


@pytest.mark.parametrize("method", ["block_influence", "angular"])
def test_block_scores_equal_naive_loop_and_ignore_padding(tiny_model, method):
    _check_against_naive(tiny_model, method, n_blocks=1)


@pytest.mark.parametrize("method", ["block_influence", "angular"])
def test_runs_of_blocks_equal_naive_loop(tiny_model_factory, method):
    _check_against_naive(tiny_model_factory("gemma3_text"), method, n_blocks=2)


def _check_against_naive(model, method, n_blocks):
    tiny_model = model
    sequences = _sequences([12, 7, 10, 5])
    rows = _padded_rows(sequences, 12)
    scores = block_importance(tiny_model, rows, method=method, n_blocks=n_blocks, batch_size=3)
    assert scores.shape == (6 - n_blocks + 1,)
    assert scores.dtype == torch.float32
    expected = _naive_scores(tiny_model, sequences, method, n_blocks)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-4, atol=1e-5)


def test_padding_does_not_change_the_scores(tiny_llama):
    sequences = _sequences([9, 4, 9])
    alone = [_padded_rows([seq], len(seq))[0] for seq in sequences]  # no padding at all
    unpadded = block_importance(tiny_llama, alone, batch_size=1)
    right = block_importance(tiny_llama, _padded_rows(sequences, 16), batch_size=3)
    torch.testing.assert_close(right, unpadded, rtol=1e-5, atol=1e-6)
    angular_right = block_importance(tiny_llama, _padded_rows(sequences, 16), method="angular", batch_size=3)
    angular_alone = block_importance(tiny_llama, alone, method="angular", batch_size=1)
    torch.testing.assert_close(angular_right, angular_alone, rtol=1e-5, atol=1e-6)


def test_last_block_is_scored_on_its_raw_output(tiny_llama):
    # transformers' last hidden state is the final norm's output; scoring against it would change
    # the last block's score. The naive loop above uses the raw output, so check that difference is real.
    with torch.no_grad():
        tiny_llama.model.norm.weight.uniform_(0.2, 2.0)  # a trained norm rescales channels
    seq = _sequences([10])[0]
    rows = _padded_rows([seq], 10)
    scores = block_importance(tiny_llama, rows)
    with torch.no_grad():
        hs = tiny_llama(torch.tensor([seq]), output_hidden_states=True).hidden_states
    normed = (1 - F.cosine_similarity(hs[-2][0], hs[-1][0], dim=-1)).mean()
    assert not torch.isclose(scores[-1], normed, rtol=1e-3)


def test_max_batches_limits_the_data(tiny_llama):
    sequences = _sequences([8, 8, 8, 8])
    rows = _padded_rows(sequences, 8)
    first_two = block_importance(tiny_llama, rows[:2], batch_size=2)
    limited = block_importance(tiny_llama, rows, batch_size=2, max_batches=1)
    torch.testing.assert_close(limited, first_two)


def test_block_importance_bad_input(tiny_llama, tiny_model_factory):
    rows = _padded_rows(_sequences([5]), 5)
    with pytest.raises(ValueError, match="method must be one of"):
        block_importance(tiny_llama, rows, method="cosine")
    with pytest.raises(ValueError, match="n_blocks"):
        block_importance(tiny_llama, rows, n_blocks=7)
    with pytest.raises(ValueError, match="no real token"):
        block_importance(tiny_llama, [{"input_ids": [5, 6], "attention_mask": [0, 0]}])


def _naive_neuron_scores(mlp, method, h_norms=None):
    gate, up, down = mlp.gate_proj.weight.tolist(), mlp.up_proj.weight.tolist(), mlp.down_proj.weight
    out = []
    for j in range(len(gate)):
        g, u = gate[j], up[j]
        if method == "maw":
            out.append(max(g) + abs(min(g)) + max(u) + abs(min(u)))
        elif method == "vow":

            def var(v):
                m = sum(v) / len(v)
                return sum((x - m) ** 2 for x in v) / (len(v) - 1)

            out.append(var(g) + var(u))
        elif method == "pon":
            out.append(sum(abs(x) for x in g) * sum(abs(x) for x in u))
        else:
            out.append(math.sqrt(sum(x * x for x in down[:, j].tolist())) * h_norms[j])
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("method", ["maw", "vow", "pon"])
def test_weight_neuron_scores_equal_naive(tiny_model, method):
    scores = neuron_importance(tiny_model, method=method, layers=[0, 4])
    assert sorted(scores) == [0, 4]
    for i, score in scores.items():
        assert score.shape == (64,)
        expected = _naive_neuron_scores(tiny_model.model.layers[i].mlp, method)
        torch.testing.assert_close(score.double(), expected.double(), rtol=1e-5, atol=1e-6)


def test_activation_scores_equal_naive_and_ignore_padding(tiny_llama):
    sequences = _sequences([10, 6])
    rows = _padded_rows(sequences, 10)
    scores = neuron_importance(tiny_llama, method="activation", data=rows, batch_size=2)
    assert sorted(scores) == list(range(6))
    for i in (0, 5):
        mlp = tiny_llama.model.layers[i].mlp
        captured = []
        handle = mlp.register_forward_hook(lambda m, args, out, into=captured: into.append(args[0][0]))
        with torch.no_grad():
            for seq in sequences:  # unpadded, one by one
                tiny_llama(torch.tensor([seq]))
        handle.remove()
        with torch.no_grad():
            x = torch.cat(captured)  # (tokens, H): the MLP inputs
            h = mlp.act_fn(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)  # (tokens, I)
        h_norms = [math.sqrt(sum(v * v for v in h[:, j].tolist())) for j in range(h.shape[1])]
        expected = _naive_neuron_scores(mlp, "activation", h_norms)
        torch.testing.assert_close(scores[i].double(), expected.double(), rtol=1e-4, atol=1e-6)


def test_neuron_importance_bad_input(tiny_llama):
    with pytest.raises(ValueError, match="pass data="):
        neuron_importance(tiny_llama, method="activation")
    with pytest.raises(ValueError, match="method must be one of"):
        neuron_importance(tiny_llama, method="magnitude")
    with pytest.raises(ValueError, match="outside"):
        neuron_importance(tiny_llama, layers=[6])
    with pytest.raises(ValueError, match="more than once"):
        neuron_importance(tiny_llama, layers=[1, 1])


def test_plot_block_importance_writes_a_png(tmp_path):
    path = plot_block_importance(torch.tensor([0.3, 0.1, 0.2]), tmp_path / "plots" / "bi.png", removed=[1])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 1000
    with pytest.raises(ValueError, match="empty"):
        plot_block_importance([], tmp_path / "empty.png")


def test_the_four_importance_functions_take_the_data_second(tiny_llama):
    """`block_importance`, `neuron_importance`, `head_importance` and `hidden_importance` read `(model, data, ...)`
    alike; `neuron_importance` still takes `data=` by name, and its weight methods need none."""
    import inspect

    from hf_recover.prune import head_importance, hidden_importance

    for function in (block_importance, neuron_importance, head_importance, hidden_importance):
        assert list(inspect.signature(function).parameters)[:2] == ["model", "data"], function.__name__
    rows = _padded_rows(_sequences([10, 6]), 10)
    positional = neuron_importance(tiny_llama, rows, method="activation", layers=[1])
    by_name = neuron_importance(tiny_llama, method="activation", data=rows, layers=[1])
    torch.testing.assert_close(positional[1], by_name[1])
    assert sorted(neuron_importance(tiny_llama)) == list(range(6))
