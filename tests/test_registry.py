"""altjax.models.registry: every registered model's parts fit together and fit transformers'.

For each model_type: the config writes that model_type, transformers' class of that name takes the
config, and the model's table lists exactly the tensors of both sides (the transformers model's
state dict and the altjax model's parameters) for the model's tiny preset.
"""
import pytest
import transformers
from flax import nnx
from transformers.initialization import no_init_weights

from altjax.model_io import engine
from altjax.model_io.directories import CheckpointError
from altjax.models import registry


@pytest.mark.parametrize("model_type", list(registry.MODELS))
def test_each_kind_matches_its_transformers_model(model_type):
    kind = registry.get(model_type)
    assert kind.model_type == model_type and kind.model.config_class is kind.config
    config = kind.config.from_preset(f"{model_type}-tiny")
    hf = config.to_hf()
    assert hf["model_type"] == model_type
    with no_init_weights():
        torch_model = getattr(transformers, kind.transformers_class)(
            transformers.AutoConfig.for_model(hf.pop("model_type"), **hf))
    table = kind.table(config)
    torch_keys, table_keys = set(torch_model.state_dict()), {r.torch for r in table.rows}
    assert torch_keys == table_keys, f"{model_type}: {sorted(torch_keys ^ table_keys)[:10]}"
    ours = set(engine.model_shapes(nnx.eval_shape(lambda: kind.model(config, rngs=nnx.Rngs(0)))))
    assert ours == {r.nnx for r in table.rows}, f"{model_type}: {sorted(ours ^ {r.nnx for r in table.rows})[:10]}"


def test_unknown_model_types_are_named_with_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match="unknown model_type 'bert'; known: 'align', 'altclip', 'clip'"):
        registry.get("bert")
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(CheckpointError, match="model_type is 'bert', expected 'align' or 'altclip' or 'clip'"):
        registry.of_directory(tmp_path)
