"""The default VLM's pipeline on a tiny config: the scene generator (checked against the pixels it
draws and against the scene it describes), deterministic batches that score only the answers, and
the HF LLaVA export loading through kvjax.load with the trained weights."""

import dataclasses

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

import kvjax
from kvjax import scenes
from kvjax.testing import write_checkpoint
from kvjax.vision import prompter_for
from training import vlm


def test_scenes_are_seeded_and_splits_differ():
    assert scenes.task("train", 3) == scenes.task("train", 3)
    assert scenes.task("train", 3)[0] != scenes.task("validation", 3)[0]
    with pytest.raises(kvjax.KVJaxError, match="split"):
        scenes.task("dev", 0)


def test_rendered_shapes_have_their_colour_at_their_centre():
    for index in range(20):
        scene, _ = scenes.task("train", index)
        image = np.asarray(scene.render(112))
        cell = 112 / scenes.GRID
        for s in scene.shapes:
            half = scenes.SIZES[s.size] * cell / 2
            x = (s.col + 0.5) * cell + s.dx * (cell / 2 - half)
            y = (s.row + 0.5) * cell + s.dy * (cell / 2 - half)
            assert tuple(image[int(y), int(x)]) == scenes.COLOURS[s.colour], (index, s)
        taken = {(s.row, s.col) for s in scene.shapes}
        for row, col in {(r, c) for r in range(scenes.GRID) for c in range(scenes.GRID)} - taken:
            assert tuple(image[int((row + 0.5) * cell), int((col + 0.5) * cell)]) == scene.background


def test_patch_cells_name_what_each_patch_shows():
    colours = list(scenes.COLOURS)
    for index in range(10):
        scene, _ = scenes.task("train", index)
        image, cells = np.asarray(scene.render(112)), scenes.patch_cells(scene, 8).reshape(8, 8)
        for r in range(8):
            for c in range(8):
                pixels = image[14 * r:14 * r + 14, 14 * c:14 * c + 14].reshape(-1, 3)
                drawn = {tuple(p) for p in pixels} - {scene.background}
                if cells[r, c] == 0:
                    assert not drawn, (index, r, c)
                else:  # anti-aliasing aside, a labelled patch shows only its shape's colour
                    assert drawn <= {scenes.COLOURS[colours[(cells[r, c] - 1) // len(scenes.SHAPES)]]}, (index, r, c)
        for s in scene.shapes:  # each shape's label sits on the 2 x 2 patches of its cell
            want = 1 + colours.index(s.colour) * len(scenes.SHAPES) + scenes.SHAPES.index(s.kind)
            assert (cells[2 * s.row:2 * s.row + 2, 2 * s.col:2 * s.col + 2] == want).all()
        assert (cells > 0).sum() == 4 * len(scene.shapes)


def test_answers_follow_from_the_scene():
    kinds_seen = set()
    for index in range(200):
        scene, questions = scenes.task("validation", index)
        shapes = scene.shapes
        assert 2 <= len(shapes) <= 8 and len({(s.row, s.col) for s in shapes}) == len(shapes)
        for q in questions:
            kinds_seen.add(q.kind)
            words = q.text.rstrip("?").replace(",", "").split()
            if q.kind == "count":
                kind = words[2].removesuffix("s")
                assert q.answer == str(sum(s.kind == kind for s in shapes))
            elif q.kind == "tally":
                assert q.answer == str(sum(s.colour == words[2] for s in shapes))
            elif q.kind == "colour":
                (only,) = [s for s in shapes if s.kind == words[-1]]
                assert q.answer == only.colour
            elif q.kind == "shape":
                (only,) = [s for s in shapes if s.colour == words[4]]
                assert q.answer == only.kind
            elif q.kind == "exists":
                assert q.answer == ("yes" if any(s.name == f"{words[3]} {words[4]}" for s in shapes) else "no")
            else:  # "Which is further left / higher, the A B or the C D"
                names = q.text.rstrip("?").split(", the ")[1].split(" or the ")
                a, b = ([s for s in shapes if s.name == n][0] for n in names)
                coordinate = "col" if q.kind == "left" else "row"
                first = a if getattr(a, coordinate) < getattr(b, coordinate) else b
                assert a.kind != b.kind and q.answer == first.kind
    assert kinds_seen == set(scenes.KINDS)
    shapes = (scenes.Shape("square", "red", "small", 1, 0, 0, 0), scenes.Shape("circle", "blue", "large", 0, 3, 0, 0),
              scenes.Shape("diamond", "green", "small", 1, 2, 0, 0))
    scene = scenes.Scene(shapes, (0, 0, 0))
    assert scenes.listing(scene) == "blue circle, red square, green diamond"  # row by row, left to right
    q = scenes.Question("colour", "What colour is the circle?", "red")
    assert q.is_answered_by("Red.") and q.is_answered_by(" red circle") and not q.is_answered_by("a red one")
    assert not q.is_answered_by("")


CFG = vlm.VLMConfig(image_size=28, patch_size=14, vision_hidden_size=32, vision_intermediate_size=64, vision_layers=2,
                    vision_heads=2, batch_size=2, questions=2, seq_len=128, steps=2, warmup_steps=1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm")
    lm_dir = write_checkpoint(root / "lm", "llama", tie_word_embeddings=True)
    cfg = dataclasses.replace(CFG, lm_from=str(lm_dir))
    template = vlm.write_template(cfg, root / "work" / "model")
    model, vlm_cfg, tokenizer = vlm.new_model(cfg, template)
    return cfg, template, model, vlm_cfg, tokenizer, root


def test_batches_are_deterministic_and_score_only_the_answers(setup):
    cfg, template, model, vlm_cfg, tokenizer, _ = setup
    prompter = prompter_for(model, tokenizer, vlm_cfg, template)
    batches = vlm.Batches(prompter, tokenizer, cfg)
    one = batches(4)
    for key, value in batches(4).items():
        np.testing.assert_array_equal(one[key], value)
    assert not np.array_equal(one["pixels"], batches(5)["pixels"])
    assert one["tokens"].shape == (2, cfg.seq_len + 1) and one["pixels"].shape == (2, 3, 28, 28)
    assert (one["image_mask"].sum(1) == vlm_cfg.num_image_tokens).all()
    rng = np.random.default_rng((cfg.seed, 4))
    for row in range(2):
        index = int(rng.integers(10_000_000))  # the scene Batches drew for this row
        scene, questions = scenes.task("train", index)
        asked = [questions[i] for i in rng.permutation(len(questions))[:cfg.questions]]
        if rng.random() < cfg.list_share:
            asked.insert(int(rng.integers(len(asked) + 1)), scenes.Question("list", "", scenes.listing(scene)))
        np.testing.assert_array_equal(one["cells"][row], scenes.patch_cells(scene, 2))
        scored = one["tokens"][row, 1:][one["weights"][row] > 0]
        want = "".join(f" {q.answer}{tokenizer.eos_token}" for q in asked)
        assert tokenizer.decode(scored) == want


def test_export_loads_with_the_trained_weights(setup):
    cfg, template, model, vlm_cfg, tokenizer, root = setup
    prompter = prompter_for(model, tokenizer, vlm_cfg, template)
    batch = {k: jnp.asarray(v) for k, v in vlm.Batches(prompter, tokenizer, cfg)(0).items()}
    graphdef, params = nnx.graphdef(model), vlm.train_params(model)
    tx = vlm.optimizer(cfg, params)
    # the cell loss adds the probe's cross-entropy over the image tokens, computed here in numpy
    answers, _ = vlm._loss(params, graphdef, batch, 0.0)
    both, _ = vlm._loss(params, graphdef, batch, 2.0)
    features = np.asarray(model.image_features(batch["pixels"]))
    logits = features @ np.asarray(params["cell_head"]["kernel"]) + np.asarray(params["cell_head"]["bias"])
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ce = -np.take_along_axis(logp, np.asarray(batch["cells"])[..., None], -1).mean()
    np.testing.assert_allclose(float(both) - float(answers), 2.0 * ce, rtol=1e-4)
    params, _, out = vlm.make_train_step(cfg)(params, graphdef, tx.init(params), batch, tx)
    assert np.isfinite(float(out["loss"]))
    trained = nnx.merge(graphdef, params["model"])
    out_dir = vlm.export(trained, template, root / "export", {"config": dataclasses.asdict(cfg)})
    loaded, loaded_tok, loaded_cfg = kvjax.load(out_dir, dtype="float32")
    assert loaded_cfg.num_image_tokens == vlm_cfg.num_image_tokens
    assert loaded_tok.convert_tokens_to_ids(vlm.IMAGE_TOKEN) == vlm_cfg.image_token_id
    want = dict(nnx.to_flat_state(nnx.state(trained, nnx.Param)))
    got = dict(nnx.to_flat_state(nnx.state(loaded, nnx.Param)))
    assert set(got) == set(want)
    for path, var in want.items():  # the export is bf16: every weight, rounded, lands where it was
        rounded = np.asarray(var.get_value()).astype(ml_dtypes.bfloat16).astype(np.float32)
        np.testing.assert_array_equal(np.asarray(got[path].get_value()), rounded, err_msg=str(path))
    # transformers reads the export too: the hub key layout, every weight found, the same logits
    import torch
    import transformers

    hf, info = transformers.LlavaForConditionalGeneration.from_pretrained(out_dir, dtype=torch.float32,
                                                                           output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids, mask, pixels = batch["tokens"][:1, :40], batch["image_mask"][:1, :40], batch["pixels"][:1]
    with torch.no_grad():
        want_logits = hf.eval()(input_ids=torch.tensor(np.asarray(ids)), pixel_values=torch.tensor(
            np.asarray(pixels))).logits.numpy()
    embeds = loaded.embed_multimodal(ids, mask, pixels)
    got_logits, _ = kvjax.prefill(loaded.language_model, kvjax.KVCache.for_model(loaded_cfg.text, 1, 40), ids,
                                  embeds=embeds, all_logits=True)
    np.testing.assert_allclose(np.asarray(got_logits), want_logits, atol=2e-4, rtol=1e-3)
    scene, questions = scenes.task("test", 0)
    loaded_prompter = prompter_for(loaded, loaded_tok, loaded_cfg, out_dir)
    reply = vlm.answer(loaded, loaded_prompter, loaded_tok, questions[0].text,
                       loaded_prompter.pixels(scene.render(28)), max_new_tokens=2)
    assert isinstance(reply, str)
