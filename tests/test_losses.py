"""contrastive_loss: the reference against PyTorch, the sharded versions against the reference.

Tolerances: the reference matches torch to 1e-6 relative (fp32 vs fp32, different reduction
orders); the sharded versions match the reference to 5e-6 relative, in value and in the gradients
with respect to both embeddings, the scale and the bias, for 1, 2, 4 and 8 devices.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from altjax import losses
from altjax.losses import contrastive_loss
from altjax.sharding import make_mesh
from tests.helpers import assert_rel_close

RTOL = 5e-6


def _embeddings(seed, b, d, alignment):
    """Unit vectors; ``alignment`` > 0 makes the pairs correlated like a trained model's."""
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(b, d))
    text = alignment * image + rng.normal(size=(b, d))
    norm = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return norm(image), norm(text)


# --- the reference against PyTorch ---------------------------------------------------------------


def _torch_softmax(image, text, scale, label_smoothing):
    # As transformers' ALIGN / AltCLIP: S = logits_per_text, loss = (CE(S) + CE(S^T)) / 2.
    logits_per_text = text @ image.T * scale
    labels = torch.arange(len(image))
    ce = torch.nn.functional.cross_entropy
    return (ce(logits_per_text, labels, label_smoothing=label_smoothing)
            + ce(logits_per_text.T, labels, label_smoothing=label_smoothing)) / 2


def _torch_sigmoid(image, text, scale, bias):
    logits = image @ text.T * scale + bias
    z = 2 * torch.eye(len(image)) - 1
    return -torch.nn.functional.logsigmoid(z * logits).sum() / len(image)


@pytest.mark.parametrize("b, d, label_smoothing, kind_of_scale", [
    (1, 8, 0.1, "align"), (5, 16, 0.1, "align"), (12, 32, 0.0, "altclip"), (32, 640, 0.1, "align"),
    (32, 768, 0.0, "altclip"), (7, 8, 0.3, "altclip")])
def test_softmax_reference_matches_torch(b, d, label_smoothing, kind_of_scale):
    image, text = _embeddings(b + d, b, d, alignment=0.3)
    # ALIGN divides by a temperature (init 1.0); AltCLIP multiplies by exp(logit_scale) (init 2.6592).
    raw, torch_scale, jax_scale = {"align": (0.37, lambda t: 1 / t, lambda t: 1 / t),
                                   "altclip": (2.6592, torch.exp, jnp.exp)}[kind_of_scale]

    t_image, t_text = (torch.tensor(x, requires_grad=True) for x in (image, text))
    t_raw = torch.tensor(raw, requires_grad=True)
    t_loss = _torch_softmax(t_image, t_text, torch_scale(t_raw), label_smoothing)
    t_loss.backward()

    def loss(image, text, raw):
        return contrastive_loss(image, text, kind="softmax", logit_scale=jax_scale(raw),
                                label_smoothing=label_smoothing)

    value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(image, text, jnp.float32(raw))
    assert_rel_close(value, t_loss, rtol=1e-6, what="softmax loss vs torch")
    for name, got, ref in zip(("image", "text", "scale"), grads, (t_image.grad, t_text.grad, t_raw.grad)):
        assert_rel_close(got, ref, rtol=1e-5, what=f"d loss / d {name} vs torch")


@pytest.mark.parametrize("b, d", [(1, 8), (6, 16), (32, 64)])
def test_sigmoid_reference_matches_torch(b, d):
    image, text = _embeddings(b, b, d, alignment=2.0)
    scale, bias = 10.0, -10.0  # SigLIP's initialisation
    t_args = [torch.tensor(x, requires_grad=True) for x in (image, text, np.float32(scale), np.float32(bias))]
    t_loss = _torch_sigmoid(*t_args)
    t_loss.backward()

    def loss(image, text, scale, bias):
        return contrastive_loss(image, text, kind="sigmoid", logit_scale=scale, logit_bias=bias)

    value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(
        image, text, jnp.float32(scale), jnp.float32(bias))
    assert_rel_close(value, t_loss, rtol=1e-6, what="sigmoid loss vs torch")
    for name, got, ref in zip(("image", "text", "scale", "bias"), grads, (a.grad for a in t_args)):
        assert_rel_close(got, ref, rtol=1e-5, what=f"d loss / d {name} vs torch")


# --- sharded against the reference --------------------------------------------------------------

VARIANTS = [("softmax", 0.0), ("softmax", 0.1), ("sigmoid", 0.0)]
MESHES = [(1, 1), (2, 1), (4, 1), (8, 1), (4, 2)]  # (data, model): 1, 2, 4, 8 batch devices


def _value_and_grads(image, text, scale, bias, *, kind, label_smoothing, mesh, impl):
    def loss(image, text, scale, bias):
        return contrastive_loss(image, text, kind=kind, logit_scale=scale, logit_bias=bias,
                                label_smoothing=label_smoothing, mesh=mesh, impl=impl)

    argnums = (0, 1, 2, 3) if kind == "sigmoid" else (0, 1, 2)
    if kind == "softmax":
        bias = None
    return jax.jit(jax.value_and_grad(loss, argnums=argnums))(image, text, scale, bias)


@pytest.mark.parametrize("impl", ["gather", "ring"])
@pytest.mark.parametrize("kind, label_smoothing", VARIANTS)
def test_sharded_matches_reference(kind, label_smoothing, impl):
    rng = np.random.default_rng(7)
    # Independent pairs, and pairs correlated like a partly trained model's (not so well
    # separated that the loss and its gradients are themselves fp32 rounding noise).
    # Same shapes, so the second set reuses the compiled functions.
    for seed, alignment in enumerate([0.0, 0.5]):
        b, d = 32, 16
        image, text = _embeddings(seed, b, d, alignment)
        scale = jnp.float32(np.exp(rng.uniform(0.0, np.log(100.0))))  # 1 .. 100
        bias = jnp.float32(rng.uniform(-10.0, 0.0))
        common = dict(kind=kind, label_smoothing=label_smoothing)
        ref_value, ref_grads = _value_and_grads(image, text, scale, bias, mesh=None, impl="gather", **common)
        for data, model in MESHES:
            mesh = make_mesh(data, model, devices=jax.devices()[: data * model])
            value, grads = _value_and_grads(image, text, scale, bias, mesh=mesh, impl=impl, **common)
            where = f"{kind} e={label_smoothing} {impl} data={data} model={model} B={b} scale={float(scale):.3g}"
            assert_rel_close(value, ref_value, rtol=RTOL, what=f"{where}: loss")
            for name, got, ref in zip(("image", "text", "scale", "bias"), grads, ref_grads):
                assert_rel_close(got, ref, rtol=RTOL, what=f"{where}: d loss / d {name}")


@pytest.mark.parametrize("impl", ["gather", "ring"])
def test_sharded_inputs_under_jit(impl):
    """Embeddings already sharded over the batch, loss inside a jitted step under jax.set_mesh."""
    mesh = make_mesh(data=8)
    image, text = _embeddings(3, 16, 8, alignment=1.0)
    sharding = jax.sharding.NamedSharding(mesh, jax.P("data"))
    image_s, text_s = jax.device_put(image, sharding), jax.device_put(text, sharding)

    @jax.jit
    def step(image, text):
        return contrastive_loss(image, text, kind="softmax", logit_scale=14.3, label_smoothing=0.1,
                                mesh=mesh, impl=impl)

    with jax.set_mesh(mesh):
        value = step(image_s, text_s)
    ref = contrastive_loss(image, text, kind="softmax", logit_scale=14.3, label_smoothing=0.1)
    assert_rel_close(value, ref, rtol=RTOL, what=f"{impl} on pre-sharded inputs under jit")


def test_bfloat16_embeddings_are_upcast():
    mesh = make_mesh(data=4, devices=jax.devices()[:4])
    image, text = (jnp.asarray(x, jnp.bfloat16) for x in _embeddings(4, 8, 8, alignment=1.0))
    ref = contrastive_loss(image.astype(jnp.float32), text.astype(jnp.float32), kind="sigmoid",
                           logit_scale=10.0, logit_bias=-10.0)
    for impl in ("gather", "ring"):
        value = jax.jit(lambda image, text: contrastive_loss(
            image, text, kind="sigmoid", logit_scale=10.0, logit_bias=-10.0, mesh=mesh, impl=impl))(image, text)
        assert value.dtype == jnp.float32, f"{impl}: loss dtype {value.dtype}, expected float32"
        assert_rel_close(value, ref, rtol=RTOL, what=f"{impl} on bf16 embeddings")


def test_indivisible_batch_is_a_clear_error():
    mesh = make_mesh(data=8)
    image, text = _embeddings(0, 12, 8, alignment=0.0)
    with pytest.raises(ValueError, match="global batch 12 is not divisible by the 8 devices"):
        contrastive_loss(image, text, kind="softmax", logit_scale=1.0, mesh=mesh, impl="ring")


def test_ring_memory_scales_with_local_block():
    """Compiled per-device temporaries: ring ~ (B/N)^2, gather ~ B^2/N (value and grad)."""
    b, d, num = 2048, 32, 8
    mesh = make_mesh(data=num)
    shape = jax.ShapeDtypeStruct((b, d), jnp.float32)

    def temp_bytes(impl):
        def loss(image, text, scale):
            return contrastive_loss(image, text, kind="softmax", logit_scale=scale, mesh=mesh, impl=impl)

        compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(
            shape, shape, jax.ShapeDtypeStruct((), jnp.float32)).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    block = (b // num) ** 2 * 4  # one (B/N) x (B/N) fp32 block of logits
    ring, gather = temp_bytes("ring"), temp_bytes("gather")
    assert ring <= 8 * block, f"ring temporaries {ring} B exceed 8 local blocks ({8 * block} B)"
    assert gather >= num * block, f"gather temporaries {gather} B, expected >= one (B/N) x B block ({num * block} B)"


def test_benchmark_smoke():
    """benchmarks/loss_memory.py at toy sizes: every variant compiles, runs and is tabulated."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "loss_memory.py"
    spec = importlib.util.spec_from_file_location("loss_memory", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(["--sizes", "64,128", "--dim", "16", "--repeats", "1"])
    assert [(r["B"], r["impl"], r["status"]) for r in rows] == [
        (b, impl, "ok") for b in (64, 128) for impl in ("naive", "gather", "ring")], rows
    assert all(len(r["times"]) == 1 for r in rows), rows


@pytest.mark.parametrize("batch", [2, 8, 64])
def test_chance_loss_is_the_loss_of_a_model_that_learned_nothing(batch):
    """Every embedding alike: the softmax loss is log B whatever the scale; the sigmoid loss with
    the bias that predicts 1/B for every pair is the best constant prediction's."""
    same = jnp.ones((batch, 4)) / 2.0
    softmax = float(losses.contrastive_loss(same, same, kind="softmax", logit_scale=jnp.float32(37.0),
                                            label_smoothing=0.1))
    assert abs(softmax - losses.chance_loss("softmax", batch)) < 1e-5, f"B={batch}: softmax {softmax}"
    bias = jnp.float32(np.log(1.0 / (batch - 1)))  # sigmoid(bias) = 1/B
    sigmoid = float(losses.contrastive_loss(same, same, kind="sigmoid", logit_scale=jnp.float32(0.0),
                                            logit_bias=bias))
    assert abs(sigmoid - losses.chance_loss("sigmoid", batch)) < 1e-4, f"B={batch}: sigmoid {sigmoid}"
    for p in (0.5 / batch, 1.5 / batch):  # any other constant prediction costs more
        worse = float(losses.contrastive_loss(same, same, kind="sigmoid", logit_scale=jnp.float32(0.0),
                                              logit_bias=jnp.float32(np.log(p / (1 - p)))))
        assert worse > sigmoid, f"B={batch}: p={p} gives {worse} <= {sigmoid}"
