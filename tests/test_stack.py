"""``altjax.models.stack``: repeated layers unrolled or scanned, each rematerialised on its own.

Whether remat acts per layer is read from the program: the gradient's jaxpr holds one
``checkpoint`` per layer when unrolled, and one inside the scan's body when scanned. Values with and
without remat agree to float rounding (1e-6 of the largest gradient, as the training tests).
"""
import dataclasses

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from altjax import sharding
from altjax.model_io.pretrained import with_scan_layers
from altjax.models import stack
from altjax.models.align import AlignConfig, AlignModel
from altjax.models.altclip import AltCLIPConfig, AltCLIPModel
from altjax.models.bert import Bert, BertConfig
from altjax.models.efficientnet import EfficientNet, EfficientNetConfig

LAYERS = 3


def bert(scan: bool) -> Bert:
    config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=LAYERS, num_attention_heads=2,
                        intermediate_size=24, max_position_embeddings=12, scan_layers=scan)
    return Bert(config, rngs=nnx.Rngs(0))


def efficientnet() -> EfficientNet:
    config = EfficientNetConfig(image_size=16, width_coefficient=1.0, depth_coefficient=1.0, kernel_sizes=(3, 3),
                                in_channels=(32, 16), out_channels=(16, 24), strides=(1, 2),
                                num_block_repeats=(1, 2), expand_ratios=(1, 2), hidden_dim=16)
    return EfficientNet(config, rngs=nnx.Rngs(0))


def text_inputs():
    ids = np.random.default_rng(0).integers(1, 40, (2, 7)).astype(np.int32)
    return (jnp.asarray(ids),)


def image_inputs():
    return (jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)),)


def grad_fn(model, inputs):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params, rest):
        # copy=True: the Variables must belong to the differentiated trace (remat updates them there).
        return jnp.mean(nnx.merge(graphdef, params, rest, copy=True).forward(*inputs).last_hidden_state.astype(jnp.float32) ** 2)

    return jax.value_and_grad(loss), (params, rest)


def checkpoints(jaxpr) -> tuple[int, int]:
    """``(top, nested)``: the checkpoint equations of ``jaxpr`` at its top level and inside others."""
    top = nested = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("checkpoint", "remat2"):  # the name differs across JAX versions
            top += 1
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            t, n = checkpoints(sub)
            nested += t + n
    return top, nested


@pytest.mark.parametrize("case", ["bert", "bert-scanned", "efficientnet"])
def test_remat_acts_on_every_layer_and_changes_nothing_but_rounding(case):
    model = efficientnet() if case == "efficientnet" else bert(scan=case.endswith("scanned"))
    inputs = image_inputs() if case == "efficientnet" else text_inputs()
    count = len(model.encoder.blocks) if case == "efficientnet" else LAYERS
    fn, args = grad_fn(model, inputs)
    assert checkpoints(jax.make_jaxpr(fn)(*args).jaxpr) == (0, 0), f"{case}: checkpoints before set_remat"
    value, grads = jax.jit(fn)(*args)

    stack.set_remat(model, "nothing_saveable")
    fn, args = grad_fn(model, inputs)
    found = checkpoints(jax.make_jaxpr(fn)(*args).jaxpr)
    # Unrolled: one checkpoint per layer at the top; scanned: one, inside the scan's body.
    expected = (0, 1) if case == "bert-scanned" else (count, 0)
    assert found == expected, f"{case}: checkpoints (top level, nested) {found}, expected {expected}"
    remat_value, remat_grads = jax.jit(fn)(*args)
    assert abs(float(remat_value) - float(value)) <= 1e-6, f"{case}: loss {remat_value} vs {value} with remat"
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads))
    err = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(grads)))
    assert err <= 1e-6 * scale, f"{case}: gradients differ by {err:.3e} with remat (largest {scale:.3e})"

    stack.set_remat(model, None)
    fn, args = grad_fn(model, inputs)
    assert checkpoints(jax.make_jaxpr(fn)(*args).jaxpr) == (0, 0), f"{case}: set_remat(None) left checkpoints"


def test_set_remat_refuses_an_unknown_policy():
    with pytest.raises(ValueError, match="not a jax.checkpoint_policies name"):
        stack.set_remat(bert(scan=False), "nothing_saved")


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_hidden_states_are_the_input_and_every_layer_output(scan):
    model = bert(scan)
    out = model.forward(*text_inputs(), output_hidden_states=True)
    assert len(out.hidden_states) == LAYERS + 1, f"{len(out.hidden_states)} hidden states for {LAYERS} layers"
    np.testing.assert_array_equal(np.asarray(out.hidden_states[-1]), np.asarray(out.last_hidden_state),
                                  err_msg="the last hidden state is not the last layer's output")
    assert model.forward(*text_inputs()).hidden_states is None, "hidden states returned unasked"


@pytest.mark.parametrize("model_class, config", [
    (AlignModel, dataclasses.replace(AlignConfig.from_preset("align-tiny"), vision_config=EfficientNetConfig(
        image_size=16, width_coefficient=1.0, depth_coefficient=1.0, kernel_sizes=(3, 3), in_channels=(32, 16),
        out_channels=(16, 40), strides=(1, 2), num_block_repeats=(1, 3), expand_ratios=(1, 2), hidden_dim=16))),
    (AltCLIPModel, AltCLIPConfig.from_preset("altclip-tiny")),
], ids=["align", "altclip"])
def test_layer_axis_names_exactly_the_stacked_variables(model_class, config):
    """``sharding.layer_axis`` (what sharding and the optimizer read) against the conversion tables:
    each tensor of transformers' state dict is, in the scanned model, a variable that layer_axis
    calls stacked exactly when the table fills one index of it, with the unrolled variable's shape
    under a leading layer axis; and no variable of the unrolled model is called stacked."""
    def shapes(scan):
        model = nnx.eval_shape(lambda: model_class(with_scan_layers(config, scan)[0], rngs=nnx.Rngs(0)))
        return {sharding.path_to_str(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(nnx.state(model))}

    def rows(scan):
        return {r.torch: r for r in model_class.conversion_table(with_scan_layers(config, scan)[0]).rows}

    scanned, unrolled = shapes(True), shapes(False)
    scanned_rows, unrolled_rows = rows(True), rows(False)
    assert set(scanned_rows) == set(unrolled_rows), "the two layouts' tables cover other tensors"
    assert not [p for p in unrolled if sharding.layer_axis(p) is not None], "unrolled variables taken as stacked"
    stacked = 0
    for key, row in scanned_rows.items():
        path, want = row.nnx.replace(".", "/"), unrolled[unrolled_rows[key].nnx.replace(".", "/")]
        got, axis = scanned[path], sharding.layer_axis(path)
        if row.index is None:
            assert axis is None and got == want, f"{key}: {path} {got}, layer axis {axis}; unrolled {want}"
        else:
            stacked += 1
            assert axis == 0 and got[1:] == want and row.index < got[0], \
                f"{key}: stacked {path} {got} (layer axis {axis}) does not hold index {row.index} of shape {want}"
    towers = {key.split(".")[0] for key, row in scanned_rows.items() if row.index is not None}
    assert stacked and towers == {"text_model", "vision_model"}, f"stacked tensors only in {towers}"
