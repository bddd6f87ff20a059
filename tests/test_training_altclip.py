"""AltCLIP's two phases (altjax.training.tasks.altclip): the distillation loss, frozen parameters, the
parallel-text pipeline, the recipes."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from altjax import train
from altjax.data import parallel
from altjax.data.preprocess import TextField
from altjax.data.tokenizers import scenes_clip_tokenizer, scenes_xlmr_tokenizer
from altjax.models import stack
from altjax.models.altclip import AltCLIPConfig, AltCLIPModel
from altjax.models.clip import CLIPConfig, CLIPModel
from altjax.models.clip_text import CLIPTextConfig
from altjax.models.vit import CLIPVisionConfig
from altjax.models.xlm_roberta import XLMRobertaConfig
from altjax.training import optim
from altjax.training.step import init_state, loss_and_grads, make_train_step, split_model
from altjax.training.tasks import altclip as altclip_task
from altjax.training.tasks import clip as clip_task

VISION = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                          image_size=16, patch_size=8, projection_dim=8)


def tiny_models(target: str = "pooled", text_width: int = 16, projection_dim: int = 8):
    clip = CLIPModel(CLIPConfig(
        text_config=CLIPTextConfig(vocab_size=1024, hidden_size=text_width, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, max_position_embeddings=16, pad_token_id=1023,
                                   bos_token_id=1022, eos_token_id=1023),
        vision_config=VISION, projection_dim=projection_dim), rngs=nnx.Rngs(1))
    project_dim = text_width if target == "pooled" else projection_dim
    student = AltCLIPModel(AltCLIPConfig(
        text_config=XLMRobertaConfig(vocab_size=200, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, max_position_embeddings=24, project_dim=project_dim),
        vision_config=VISION, projection_dim=projection_dim), rngs=nnx.Rngs(2))
    altclip_task.copy_image_tower(student, clip)
    teacher = clip.text_teacher()
    altclip_task.set_text_projection(student, teacher, target)
    return altclip_task.DistillModel(student, teacher)


def recipe(name: str):
    return train.load_config(name)


def clip_objective():
    """Phase 2's objective as its recipe configures it."""
    return clip_task.objective(recipe("altclip_contrastive"))


def text_batch(n=8, seed=0):
    rng = np.random.default_rng(seed)
    teacher = rng.integers(0, 1000, (n, 10)).astype(np.int32)
    teacher[:, 0], teacher[:, 7:] = 1022, 1023
    student = rng.integers(5, 200, (n, 12)).astype(np.int32)
    student[:, 0], student[:, 9], student[:, 10:] = 0, 2, 1
    return {"teacher_input_ids": teacher, "teacher_attention_mask": (np.arange(10) < 8).astype(np.int32)[None].repeat(n, 0),
            "student_input_ids": student, "student_attention_mask": (student != 1).astype(np.int32),
            "same_language": (np.arange(n) % 2).astype(np.int32)}


def test_mse_hand_computed():
    objective = altclip_task.distill_objective(target="pooled")
    s = np.array([[1.0, 2.0, 3.0], [0.0, -1.0, 4.0]], np.float32)
    t = np.array([[1.5, 2.0, 1.0], [2.0, -1.0, 4.0]], np.float32)
    # ((0.5^2 + 0 + 2^2) + (2^2 + 0 + 0)) / 6 = 8.25 / 6
    value, metrics = objective.loss(None, {"student": s, "teacher": t, "same_language": np.array([1.0, 0.0])}, None)
    assert abs(float(value) - 8.25 / 6) < 1e-7, f"MSE {float(value)} != {8.25 / 6} by {abs(float(value) - 8.25 / 6)}"
    assert float(metrics["same_language_fraction"]) == 0.5


@pytest.mark.parametrize("target", altclip_task.TARGETS)
def test_student_equal_to_teacher_gives_zero(target):
    model = tiny_models(target)
    objective = altclip_task.distill_objective(target=target)
    feats = objective.features(model, text_batch())
    want = 16 if target == "pooled" else 8
    assert feats["teacher"].shape == (8, want) and feats["student"].shape == (8, want), \
        f"{target}: shapes {feats['teacher'].shape} {feats['student'].shape}"
    value, metrics = objective.loss(model, {**feats, "student": feats["teacher"]}, None)
    assert float(value) == 0.0, f"{target}: loss {float(value)} with the student's output set to the teacher's"
    assert abs(float(metrics["cosine"]) - 1) < 1e-6, f"{target}: cosine {float(metrics['cosine'])}"
    value, _ = objective.loss(model, feats, None)
    direct = np.mean((np.asarray(feats["student"]) - np.asarray(feats["teacher"])) ** 2)
    assert abs(float(value) - direct) < 1e-6 * max(direct, 1), f"{target}: loss {float(value)} vs numpy {direct}"
    # The student's text features equal its CLIP-space projection of the target: identical to the
    # teacher's projected features when its pooled output matches the teacher's target.
    proj = model.student.text_projection(feats["teacher"])
    teacher_proj = model.teacher.get_text_features(jnp.asarray(text_batch()["teacher_input_ids"]),
                                                   jnp.asarray(text_batch()["teacher_attention_mask"]))
    err = float(jnp.max(jnp.abs(proj - teacher_proj)))
    assert err < 1e-5, f"{target}: student projection of the teacher target differs from the teacher's features by {err}"


def _train(model, freeze: str, objective, batch, steps=3, lr=1e-2):
    model.train()
    opt = recipe("demo").optimizer
    opt.update(dict(name="adamw", learning_rate=lr, warmup_steps=0, decay="constant", weight_decay=0.1,
                    grad_clip_norm=1.0, eps=1e-8))
    trainable = optim.trainable_filter(freeze)
    tx = optim.build(opt, steps, nnx.state(model, trainable))
    before = jax.tree.map(np.array, nnx.state(model, nnx.Param))
    graphdef, state = init_state(model, trainable, tx)
    step = make_train_step(graphdef, objective, tx, mesh=None)
    losses, metrics = [], None
    for _ in range(steps):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    after = nnx.state(nnx.merge(graphdef, state["params"], state["frozen"], state["rest"]), nnx.Param)
    flat_before = dict(nnx.to_flat_state(before))
    changed = {"/".join(map(str, k)): not np.array_equal(np.asarray(flat_before[k][...]), np.asarray(v[...]))
               for k, v in nnx.to_flat_state(after)}
    return changed, losses, metrics


def test_phase1_teacher_frozen_bit_identical_and_loss_falls():
    model = tiny_models()
    changed, losses, metrics = _train(model, recipe("altclip_distill").freeze,
                                      altclip_task.distill_objective(target="pooled"), text_batch())
    moved = [k for k, c in changed.items() if c and not k.startswith("student/text_model/")]
    assert not moved, f"frozen parameters changed in phase 1: {moved}"
    assert all(changed[k] for k in changed if k.startswith("student/text_model/roberta/encoder")), \
        "a student encoder parameter did not train"
    assert losses[-1] < losses[0], f"phase-1 loss did not fall: {losses}"
    assert float(metrics["same_language_fraction"]) == 0.5


def test_phase2_freezes_image_tower_bit_for_bit():
    model = tiny_models().student
    rng = np.random.default_rng(0)
    b = text_batch()
    batch = {"pixel_values": rng.normal(size=(8, 16, 16, 3)).astype(np.float32),
             "input_ids": b["student_input_ids"], "attention_mask": b["student_attention_mask"]}
    changed, losses, _ = _train(model, recipe("altclip_contrastive").freeze, clip_objective(), batch)
    vision = [k for k in changed if k.startswith(("vision_model", "visual_projection"))]
    assert vision and not any(changed[k] for k in vision), \
        f"image tower parameters changed: {[k for k in vision if changed[k]]}"
    assert changed["text_projection/kernel"] and changed["logit_scale"], "the text side did not train"
    assert losses[-1] < losses[0], f"phase-2 loss did not fall: {losses}"


@pytest.mark.parametrize("phase", ["phase1", "phase2"])
def test_remat_of_either_phase_changes_nothing_but_rounding(phase):
    """``remat`` works for AltCLIP's tasks as for ALIGN's: the same loss and gradients with every
    layer rematerialised."""
    model = tiny_models()
    if phase == "phase1":
        batch, freeze = text_batch(), recipe("altclip_distill").freeze
        objective = altclip_task.distill_objective(target="pooled")
    else:
        model, b = model.student, text_batch()
        batch = {"pixel_values": np.random.default_rng(0).normal(size=(8, 16, 16, 3)).astype(np.float32),
                 "input_ids": b["student_input_ids"], "attention_mask": b["student_attention_mask"]}
        freeze = recipe("altclip_contrastive").freeze
        objective = clip_task.objective(recipe("altclip_contrastive"))
    model.train()
    got = {}
    for policy in (None, "nothing_saveable"):
        stack.set_remat(model, policy)
        graphdef, params, frozen, rest = split_model(model, optim.trainable_filter(freeze))
        got[policy] = jax.jit(lambda p, r, b: loss_and_grads(graphdef, objective, p, frozen, r, b, mesh=None))(
            params, rest, batch)
    (value, _, grads, _), (remat_value, _, remat_grads, _) = got[None], got["nothing_saveable"]
    assert abs(float(value) - float(remat_value)) < 1e-6, f"{phase}: loss {float(value)} vs {float(remat_value)} with remat"
    # As for ALIGN's towers (tests/test_training_step.py): within 1e-6 of the largest gradient.
    scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(grads))
    err = max(jax.tree.leaves(jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(x - y))), grads, remat_grads)))
    assert err <= 1e-6 * scale, f"{phase}: gradients differ by {err} with remat (largest gradient {scale})"


def test_parallel_pairs_files_and_resume(tmp_path):
    tsv = tmp_path / "p.tsv"
    tsv.write_text("a red circle\t一个红色圆形\n\na blue square\t一个蓝色正方形\n", encoding="utf-8")
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("".join(json.dumps({"en": f"text {i}", "zh": f"文本 {i}"}, ensure_ascii=False) + "\n"
                             for i in range(10)), encoding="utf-8")
    assert parallel.read_pairs(str(tsv)) == [("a red circle", "一个红色圆形"), ("a blue square", "一个蓝色正方形")]
    pairs = parallel.expand_pairs(parallel.read_pairs(str(jsonl)))
    assert len(pairs) == 20 and sum(p[2] for p in pairs) == 10
    assert all(a == b for a, b, same in pairs if same) and all(a != b for a, b, same in pairs if not same)
    tok_t = scenes_clip_tokenizer(str(tmp_path / "t"))
    tok_s = scenes_xlmr_tokenizer(str(tmp_path / "s"))
    make = lambda: parallel.ParallelTextPipeline(pairs, batch_size=6, teacher=TextField(tok_t, max_length=12),  # noqa: E731
                                                 student=TextField(tok_s, max_length=12), seed=3)
    first = make()
    batches = [next(first) for _ in range(5)]
    assert sum(int(b["same_language"].sum()) for b in batches[:3]) == 9, "an epoch holds half EN-EN pairs"
    resumed = make()
    state = None
    probe = make()
    for _ in range(2):
        next(probe)
    state = probe.get_state()
    resumed.set_state(state)
    for want in batches[2:]:
        got = next(resumed)
        assert all(np.array_equal(got[k], want[k]) for k in want), "resumed pipeline gives other batches"


def test_phase2_pipeline_reads_bilingual_webdataset_shards(tmp_path):
    """Phase 2 from WebDataset shards with ``KEY.en.txt`` and ``KEY.zh.txt``: every text is one of
    the record's two captions, both languages occur, and a source without caption_keys is refused."""
    from altjax.data import scenes, webdataset

    records = [scenes.generate_example(0, "train", i, 32) for i in range(16)]
    webdataset.write_shard(tmp_path / "shard-0.tar", [
        {"__key__": f"{i:04d}", "jpg": scenes.encode_jpeg(r["image"]), "en.txt": r["caption_en"],
         "zh.txt": r["caption_zh"]} for i, r in enumerate(records)])
    c = recipe("altclip_contrastive")
    c.batch_size, c.model.vision.image_size, c.data.max_length = 8, 32, 40
    c.data.source, c.data.files, c.data.image_key = "webdataset", str(tmp_path / "shard-*.tar"), "jpg"
    tokenizer = scenes_xlmr_tokenizer(str(tmp_path / "tok"))
    processor = clip_task.processor_for(tokenizer, 32, str(tmp_path / "proc"), 40)
    with pytest.raises(ValueError, match=r"data.caption_keys"):
        clip_task.pipeline(c, processor, str(tmp_path / "proc"), None)

    c.data.caption_keys = ("en.txt", "zh.txt")
    pipeline = clip_task.pipeline(c, processor, str(tmp_path / "proc"), None)  # one process: every row
    rows = [tuple(row) for _ in range(6) for row in next(pipeline)["input_ids"].tolist()]
    pipeline.close()
    tokens = {lang: {tuple(ids) for ids in tokenizer([r[f"caption_{lang}"] for r in records], padding="max_length",
                                                      truncation=True, max_length=40)["input_ids"]}
              for lang in ("en", "zh")}
    strangers = [r for r in rows if r not in tokens["en"] | tokens["zh"]]
    assert not strangers, f"{len(strangers)} of {len(rows)} texts are no record's caption"
    counts = {lang: sum(r in tokens[lang] for r in rows) for lang in tokens}
    assert min(counts.values()) >= 12, f"captions drawn per language over 48 examples: {counts}"


def test_tokenizers_cover_the_languages(tmp_path):
    from altjax.data import scenes

    rng = np.random.default_rng(1)
    caps = {lang: [scenes.caption(scenes.sample_scene(rng, allow_held_out=True), lang, rng) for _ in range(300)]
            for lang in ("en", "zh")}
    xlmr = scenes_xlmr_tokenizer(str(tmp_path / "s"))
    for lang, texts in caps.items():
        unknown = sum(ids.count(xlmr.unk_token_id) for ids in xlmr(texts)["input_ids"])
        assert unknown == 0, f"student tokenizer: {unknown} unknown tokens in {lang} captions"
    clip = scenes_clip_tokenizer(str(tmp_path / "t"))
    ids = clip(caps["en"])["input_ids"]
    assert all(i[0] == 1022 and i[-1] == 1023 for i in ids) and not any(clip.unk_token_id in i for i in ids)


@pytest.mark.parametrize("name,numbers", [
    ("altclip_distill", dict(batch_size=1024, lr=1e-4, wd=0.1, warmup=500, clip=1.0, task="altclip_distill")),
    ("altclip_contrastive", dict(batch_size=1024, lr=2e-6, wd=0.05, warmup=2000, clip=5.0,
                                 task="altclip_contrastive")),
])
def test_recipes_have_the_paper_numbers(name, numbers):
    c = recipe(name)
    got = dict(batch_size=c.batch_size, lr=c.optimizer.learning_rate, wd=c.optimizer.weight_decay,
               warmup=c.optimizer.warmup_steps, clip=c.optimizer.grad_clip_norm, task=c.task)
    assert got == numbers, f"{name}: {got} != {numbers}"
    assert c.optimizer.name == "adamw"
    if c.task == "altclip_contrastive":
        assert c.loss.label_smoothing == 0.0 and c.loss.kind == "softmax"
        assert c.freeze == r"^vision_model|^visual_projection"
    else:
        assert c.data.same_language_pairs
        assert c.freeze == r"^teacher/|^student/(vision_model|visual_projection|text_projection|logit_scale)"


@pytest.mark.parametrize("head", ["XLMRobertaModel", "XLMRobertaForMaskedLM"])
def test_load_xlm_roberta_matches_transformers(tmp_path, head):
    """An HF XLM-R checkpoint (bare, or with ``roberta.`` keys and an LM head) loaded into the
    student's encoder gives transformers' hidden states; AltCLIP's own pre_LN and transformation
    keep their initialisation."""
    import torch
    import transformers

    from helpers import assert_rel_close
    from test_align import randomise_

    hf_config = transformers.XLMRobertaConfig(vocab_size=200, hidden_size=16, intermediate_size=32,
                                              num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=24,
                                              type_vocab_size=1)
    hf = randomise_(getattr(transformers, head)(hf_config), seed=3).eval()
    hf.save_pretrained(tmp_path)
    student = AltCLIPModel(AltCLIPConfig(
        text_config=XLMRobertaConfig(vocab_size=200, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, max_position_embeddings=24, project_dim=8),
        vision_config=VISION, projection_dim=8), rngs=nnx.Rngs(0))
    kept = {name: np.array(getattr(student.text_model, name).kernel[...]) for name in ("transformation",)}
    kept["pre_LN"] = np.array(student.text_model.pre_LN.scale[...])
    altclip_task.load_xlm_roberta(student, str(tmp_path))

    ids = text_batch()["student_input_ids"]
    mask = (ids != 1).astype(np.int32)
    with torch.no_grad():
        encoder = hf if head == "XLMRobertaModel" else hf.roberta
        want = encoder(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).last_hidden_state
    got = student.text_model.roberta(ids, mask).last_hidden_state
    assert_rel_close(got, want.numpy(), rtol=1e-5, what=f"student encoder after load_xlm_roberta({head}) vs transformers")
    assert np.array_equal(kept["transformation"], student.text_model.transformation.kernel[...]), "transformation changed"
    assert np.array_equal(kept["pre_LN"], student.text_model.pre_LN.scale[...]), "pre_LN changed"


def test_load_xlm_roberta_names_a_mismatched_checkpoint(tmp_path):
    import transformers

    transformers.XLMRobertaModel(transformers.XLMRobertaConfig(
        vocab_size=200, hidden_size=24, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=24, type_vocab_size=1)).save_pretrained(tmp_path)
    student = tiny_models().student
    with pytest.raises(ValueError, match=r"shape mismatches .*has \(200, 24\), the model expects \(200, 16\)") as error:
        altclip_task.load_xlm_roberta(student, str(tmp_path))
    assert str(tmp_path) in str(error.value) and "\n" not in str(error.value), f"unclear error: {error.value}"
