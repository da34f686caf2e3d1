import json

import pytest
import torch
from diffusers import StableDiffusionPipeline
from pydantic import ValidationError

from noiseclr.domains import shapes
from noiseclr.models.shapes.architecture import ArchitectureConfig, build_pipeline, training_scheduler
from noiseclr.models.shapes.recipe import RecipeConfig, diffusion_loss


def test_one_training_step_lowers_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    arch = ArchitectureConfig(unet_channels=(32, 32, 32), vae_channels=(16, 16, 16), text_layers=1)
    pipe = build_pipeline(arch, shapes.vocabulary())
    sched = training_scheduler(pipe)
    scenes = shapes.sample_scenes(8, seed=0)
    with torch.no_grad():
        latents = pipe.vae.encode(shapes.render(scenes) * 2 - 1).latent_dist.mode()
    ids = pipe.tokenizer(
        [shapes.caption(s.words) for s in scenes], padding="max_length", max_length=16, return_tensors="pt"
    ).input_ids
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(latents.shape, generator=g)
    t = torch.randint(0, 1000, (8,), generator=g)
    params = list(pipe.unet.parameters()) + list(pipe.text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3)
    before = diffusion_loss(pipe.unet, pipe.text_encoder, sched, latents, ids, noise, t)
    opt.zero_grad()
    before.backward()
    assert pipe.text_encoder.get_input_embeddings().weight.grad is not None  # trained jointly
    opt.step()
    with torch.no_grad():
        after = diffusion_loss(pipe.unet, pipe.text_encoder, sched, latents, ids, noise, t)
    assert after.item() < before.item()


def test_recipe_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ValidationError, match="stepz"):
        RecipeConfig(stepz=10)
    with pytest.raises(ValidationError, match="mixed_precision"):
        RecipeConfig(mixed_precision="fp8")
    with pytest.raises(ValidationError, match="batch"):
        RecipeConfig(batch=1)


def test_a_recipe_file_is_read_like_every_config(tmp_path):
    from noiseclr.errors import ConfigError

    (tmp_path / "r.yaml").write_text("steps: 10\nvae_stepz: 3\n")
    with pytest.raises(ConfigError, match=r"r\.yaml: unknown key 'vae_stepz' \(did you mean 'vae_steps'\?\)"):
        RecipeConfig.from_yaml(tmp_path / "r.yaml")
    with pytest.raises(ConfigError, match=r"recipe .*nope\.yaml does not exist"):
        RecipeConfig.from_yaml(tmp_path / "nope.yaml")
    assert RecipeConfig.from_yaml("jobs/base/base_shapes.yaml", steps=7).steps == 7


def test_vae_stage_trains_every_configured_step():
    from noiseclr.models.shapes.recipe import train_vae

    arch = ArchitectureConfig(vae_channels=(16, 16, 16), unet_channels=(16, 16, 16), text_layers=1)
    pipe = build_pipeline(arch, shapes.vocabulary())
    decode, calls = pipe.vae.decode, {"n": 0}

    def counting_decode(*args, **kw):
        calls["n"] += 1
        return decode(*args, **kw)

    pipe.vae.decode = counting_decode
    before = [p.detach().clone() for p in pipe.vae.parameters()]
    steps = train_vae(
        pipe, RecipeConfig(arch=arch, vae_steps=3, vae_batch=2), torch.device("cpu"), lambda row: None
    )
    assert steps == 3
    assert calls["n"] == 3 + 1  # one decode per training step, one for the final measurement
    assert any(not torch.equal(a, b) for a, b in zip(before, pipe.vae.parameters(), strict=True))


def test_cross_attention_is_chosen_per_level_and_the_default_is_the_committed_architecture():
    from noiseclr.models.base import EMBEDDED
    from noiseclr.models.shapes.architecture import build_unet

    committed = json.loads((EMBEDDED["shapes"] / "unet" / "config.json").read_text())
    default = build_unet(ArchitectureConfig()).config
    for key in ("down_block_types", "up_block_types", "block_out_channels"):
        assert list(default[key]) == committed[key], key
    assert default["cross_attention_dim"] == committed["cross_attention_dim"]

    arch = ArchitectureConfig(unet_channels=(16, 32, 32, 32), unet_cross_attention=(False, True, True, True))
    unet = build_unet(arch)
    assert unet.config.down_block_types[0] == "DownBlock2D" and unet.config.up_block_types[-1] == "UpBlock2D"
    seen = []
    unet.mid_block.register_forward_hook(lambda m, i, o: seen.append(o.shape[-1]))
    with torch.no_grad():
        out = unet(torch.zeros(1, 4, 16, 16), 10, torch.zeros(1, 16, arch.text_hidden)).sample
    assert out.shape == (1, 4, 16, 16) and seen == [2]  # four levels reach 2x2
    with pytest.raises(ValidationError, match="3 entries for 4 UNet levels"):
        ArchitectureConfig(unet_channels=(16, 32, 32, 32), unet_cross_attention=(False, True, True))


def test_fresh_stage_keeps_the_vae_rebuilds_the_named_parts_and_records_every_earlier_stage(tmp_path):
    from noiseclr.models.shapes.recipe import rebuild, save_pipeline, train_base_model

    arch = ArchitectureConfig(
        vae_channels=(16, 16, 16), unet_channels=(16, 16), text_layers=1, text_hidden=32, attention_heads=4
    )
    parent = build_pipeline(arch, shapes.vocabulary())
    metrics = {"quality": {}, "meets_bar": False, "train_seconds": 1.0, "diffusion_steps": 0, "vae_steps": 0}
    metrics |= {"device": "cpu", "history": []}
    grandparent_record = {
        "config": {"arch": {"unet_channels": [8]}},
        "metrics": {**metrics, "note": "stage 1"},
    }
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "parent_recipe.json").write_text(json.dumps(grandparent_record))
    (tmp_path / "p" / "recipe.json").write_text(json.dumps({"config": {}, "metrics": metrics}))
    save_pipeline(parent, RecipeConfig(arch=arch), metrics, tmp_path / "parent")
    for name in ("recipe.json", "parent_recipe.json"):  # an older stage record layout
        (tmp_path / "parent" / name).write_text((tmp_path / "p" / name).read_text())

    deeper = ArchitectureConfig(
        **{**arch.model_dump(), "unet_channels": (16, 32, 32), "unet_cross_attention": None}
    )
    cfg = RecipeConfig(
        arch=deeper, init_from=str(tmp_path / "parent"), fresh=["unet"], steps=2, batch=2,
        eval_every=0, final_eval_images=2, latent_pool=4, diffusion_object_weight=10.0, swap_share=0.5,
    )  # fmt: skip
    train_base_model(cfg, tmp_path / "child")
    child = StableDiffusionPipeline.from_pretrained(tmp_path / "child")
    assert list(child.unet.config.block_out_channels) == [16, 32, 32]
    for a, b in zip(child.vae.parameters(), parent.vae.parameters(), strict=True):
        assert torch.equal(a, b)  # VAE kept as is
    lineage = json.loads((tmp_path / "child" / "lineage.json").read_text())
    assert [r["metrics"].get("note") for r in lineage] == [None, "stage 1"]  # newest first
    card = (tmp_path / "child" / "README.md").read_text()
    assert "its VAE kept, a new unet" in card and "50% of each batch trained as caption-swap edits" in card

    with pytest.raises(ValueError, match="text_hidden 128 vs 32"):
        train_base_model(
            cfg.model_copy(update={"arch": ArchitectureConfig(vae_channels=(16, 16, 16))}), tmp_path / "bad"
        )

    # Rebuilding only the text encoder keeps the UNet object and replaces the encoder's weights.
    unet, old = parent.unet, [p.detach().clone() for p in parent.text_encoder.parameters()]
    rebuild(arch, parent, ["text_encoder"])
    assert parent.unet is unet
    assert not all(torch.equal(a, b) for a, b in zip(old, parent.text_encoder.parameters(), strict=True))
    encoder = parent.text_encoder
    with pytest.raises(ValueError, match="text_hidden 128 vs 32"):
        rebuild(ArchitectureConfig(vae_channels=(16, 16, 16)), parent, ["text_encoder"])
    assert parent.text_encoder is encoder  # nothing replaced on a bad config


def test_high_noise_share_draws_that_share_of_timesteps_from_the_top_of_the_schedule():
    from noiseclr.models.shapes.recipe import sample_timesteps

    def draw(**kw):
        return sample_timesteps(20000, 1000, RecipeConfig(**kw), torch.Generator().manual_seed(0), "cpu")

    uniform, emphasised = draw(), draw(high_noise_share=0.5, high_noise_from=800)
    assert int(uniform.min()) >= 0 and int(uniform.max()) <= 999
    assert abs(float((uniform >= 800).float().mean()) - 0.2) < 0.02
    assert abs(float((emphasised >= 800).float().mean()) - (0.5 + 0.5 * 0.2)) < 0.02
    assert int(emphasised.max()) <= 999
    with pytest.raises(ValidationError, match="high_noise_share"):
        RecipeConfig(high_noise_share=1.0)


def test_object_mask_covers_the_object_and_its_rim_but_no_background_stripes():
    from noiseclr.models.shapes.recipe import object_mask

    square = shapes.Scene("square", "blue", "large", "middle", "center", "light", "striped",
                          240.0, 12 / 64, 0.5, 0.5, 0.8)  # fmt: skip
    mask = object_mask(shapes.render([square]) * 2 - 1)[0, 0]
    assert mask[32, 32] == 1 and mask[0, 0] == 0 and mask[32, 2] == 0  # a stripe is grey
    area = float(mask.sum())
    assert 24**2 <= area <= 28**2  # the 24 px square plus at most a 2 px rim


def test_decoder_stage_keeps_the_latent_space_and_lowers_the_reconstruction_error():
    from noiseclr.models.shapes.recipe import finetune_decoder

    torch.manual_seed(0)
    arch = ArchitectureConfig(vae_channels=(16, 16, 16), unet_channels=(16, 16, 16), text_layers=1)
    pipe = build_pipeline(arch, shapes.vocabulary())
    vae = pipe.vae
    encoder = [p.detach().clone() for p in [*vae.encoder.parameters(), *vae.quant_conv.parameters()]]
    decoder = [p.detach().clone() for p in vae.decoder.parameters()]
    x = shapes.render(shapes.sample_scenes(8, seed=3)) * 2 - 1

    def error() -> float:
        with torch.no_grad():
            return float((vae.decode(vae.encode(x).latent_dist.mode()).sample - x).abs().mean())

    before, rows = error(), []
    cfg = RecipeConfig(arch=arch, decoder_steps=20, vae_batch=8, decoder_lr=3e-3)
    finetune_decoder(pipe, cfg, torch.device("cpu"), rows.append)
    after = [*vae.encoder.parameters(), *vae.quant_conv.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(encoder, after, strict=True))  # same latents
    assert any(not torch.equal(a, b) for a, b in zip(decoder, vae.decoder.parameters(), strict=True))
    assert error() < before
    assert not any(p.requires_grad for p in vae.parameters())
    assert rows[-1]["stage"] == "decoder" and rows[-1]["steps"] == 20


def test_object_weighted_diffusion_loss_counts_object_latents_that_many_times_more():
    from noiseclr.models.shapes.architecture import noise_schedule
    from noiseclr.models.shapes.recipe import posterior

    torch.manual_seed(0)
    arch = ArchitectureConfig(vae_channels=(16, 16, 16), unet_channels=(16, 16, 16), text_layers=1)
    pipe = build_pipeline(arch, shapes.vocabulary(), noise_schedule("v_prediction", True))  # as trained
    small = shapes.Scene("triangle", "red", "small", "top", "left", "light", "plain",
                         0.0, 6 / 64, 0.25, 0.25, 0.8)  # fmt: skip
    dist, mask = posterior(pipe.vae, [small, small], 64)
    assert mask.shape == (2, 1, *dist.mean.shape[-2:]) == (2, 1, 16, 16)
    assert mask[0, 0, 4, 4] == 1 and mask[0, 0, 12, 12] == 0  # under the object, far from it
    assert 1 <= float(mask[0].sum()) <= 16  # a small object is a few latent pixels

    sched = training_scheduler(pipe)
    latents = dist.mean * pipe.vae.config.scaling_factor
    ids = pipe.tokenizer(["a small red triangle"] * 2, padding="max_length", max_length=16,
                         return_tensors="pt").input_ids  # fmt: skip
    g = torch.Generator().manual_seed(0)
    noise, t = torch.randn(latents.shape, generator=g), torch.tensor([300, 700])
    args = (pipe.unet, pipe.text_encoder, sched, latents, ids, noise, t)
    with torch.no_grad():
        plain = diffusion_loss(*args)
        assert torch.allclose(diffusion_loss(*args, torch.ones_like(mask)), plain)
        only_object = diffusion_loss(*args, mask)
        pred = pipe.unet(sched.add_noise(latents, noise, t), t, pipe.text_encoder(ids)[0]).sample
        err = (pred - sched.get_velocity(latents, noise, t)).pow(2)
        inside = err[mask.expand_as(err) > 0].mean()  # the MSE over object latents alone
        assert torch.allclose(only_object, inside, rtol=1e-5)
        weighted = diffusion_loss(*args, 1 + 10 * mask)
        n_in, n_all = float(mask.sum()), float(mask.numel())
        outside = err[mask.expand_as(err) == 0].mean()
        expected = (11 * n_in * inside + (n_all - n_in) * outside) / (11 * n_in + n_all - n_in)
        assert torch.allclose(weighted, expected, rtol=1e-5)


@pytest.mark.parametrize("prediction", ["v_prediction", "epsilon"])
def test_caption_swap_target_is_the_prediction_whose_x0_is_the_edited_scene(prediction):
    from noiseclr.models.shapes.architecture import noise_schedule
    from noiseclr.models.shapes.recipe import posterior

    torch.manual_seed(0)
    arch = ArchitectureConfig(vae_channels=(16, 16, 16), unet_channels=(16, 16, 16), text_layers=1)
    pipe = build_pipeline(arch, shapes.vocabulary(), noise_schedule(prediction, True))
    sched = training_scheduler(pipe)
    circle = shapes.sample_scenes(1, seed=3, fixed={"shape": "circle"})[0]
    square = shapes.with_word(circle, "shape", "square")
    dist, _ = posterior(pipe.vae, [circle, circle], 64)
    edited, _ = posterior(pipe.vae, [square, square], 64)
    z_a, z_b = dist.mean * 0.5, edited.mean * 0.5
    ids = pipe.tokenizer(["a square"] * 2, padding="max_length", max_length=16, return_tensors="pt").input_ids
    g = torch.Generator().manual_seed(0)
    noise, t = torch.randn(z_a.shape, generator=g), torch.tensor([250, 650])
    args = (pipe.unet, pipe.text_encoder, sched, z_a, ids, noise, t)
    with torch.no_grad():
        assert torch.allclose(diffusion_loss(*args, None, z_a), diffusion_loss(*args), rtol=1e-5)
        noisy = sched.add_noise(z_a, noise, t)
        pred = pipe.unet(noisy, t, pipe.text_encoder(ids)[0]).sample
        abar = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
        # the target is the one prediction from which the sampler's x0 estimate is the square
        swapped = diffusion_loss(*args, None, z_b)
        if prediction == "v_prediction":
            # x0 = sqrt(abar) x_t - sqrt(1 - abar) v  =>  v = (sqrt(abar) x_t - x0) / sqrt(1 - abar)
            target = (abar.sqrt() * noisy - z_b) / (1 - abar).sqrt()
            x0_of_target = abar.sqrt() * noisy - (1 - abar).sqrt() * target
            plain = sched.get_velocity(z_a, noise, t)
        else:
            target = (noisy - abar.sqrt() * z_b) / (1 - abar).sqrt()
            x0_of_target = (noisy - (1 - abar).sqrt() * target) / abar.sqrt()
            plain = noise
        assert torch.allclose(x0_of_target, z_b, atol=1e-5)
        assert torch.allclose(swapped, (pred - target).pow(2).mean(), rtol=1e-5)
        assert (target - plain).abs().max() > 0.1  # a circle's x_t, asked for a square


def test_swapped_scenes_change_one_named_factor_and_their_caption_always_names_it():
    import numpy as np

    from noiseclr.models.shapes.recipe import random_caption, swap_scenes

    scenes = shapes.sample_scenes(60, seed=1)
    rng = np.random.default_rng(0)
    edited, changed = swap_scenes(scenes, ["shape", "size"], rng)
    assert set(changed) == {"shape", "size"}
    for a, b, f in zip(scenes, edited, changed, strict=True):
        diff = [k for k in a.words if a.words[k] != b.words[k]]
        assert diff == [f]
        assert (a.x, a.y, a.lightness, a.hue) == (b.x, b.y, b.lightness, b.hue)
        if f == "size":  # the jitter is kept: the same ratio to the new bin's centre
            assert b.size / shapes.SIZES[b.size_word] == pytest.approx(a.size / shapes.SIZES[a.size_word])
    cfg = RecipeConfig(word_dropout=0.9)
    for b, f in zip(edited, changed, strict=True):
        assert b.words[f] in random_caption(b, rng, cfg, keep=f).split()
    moved = shapes.with_word(scenes[0], "hue", "blue")
    assert moved.hue_word == "blue" and abs((moved.hue - 240.0 + 180) % 360 - 180) <= shapes.JITTER["hue"]
    with pytest.raises(shapes.WorldError, match="unknown size"):
        shapes.with_word(scenes[0], "size", "huge")
    with pytest.raises(ValidationError, match="swap_factors"):
        RecipeConfig(swap_factors=["colour"])
    with pytest.raises(ValidationError, match="swap_t"):
        RecipeConfig(swap_t=(0, 600))


def test_sdxl_growth_adds_what_sdxl_has_computing_what_the_sd_model_computed(tmp_path):
    """`to_sdxl` (the shapes-xl recipe's start): SDXL's penultimate states of the first encoder
    are the SD encoder's last layer's output (before its final norm, which the fine-tune must
    bridge), and the UNet ignores the second encoder and the size ids until trained; then a
    recipe stage with `sdxl` trains the UNet (the second encoder's columns and the added
    embedding included) and both encoders, and saves an SDXL folder that loads as SDXL."""
    from diffusers import StableDiffusionXLPipeline

    from noiseclr.models.base import load_model
    from noiseclr.models.shapes.recipe import save_pipeline, train_base_model
    from noiseclr.models.shapes.xl import XLArch, to_sdxl

    torch.manual_seed(0)
    arch = ArchitectureConfig(
        vae_channels=(16, 16, 16), unet_channels=(16, 16), text_layers=2, text_hidden=32, attention_heads=4
    )
    sd = build_pipeline(arch, shapes.vocabulary())
    xl = to_sdxl(sd, XLArch(width_2=16, time_dim=4))
    tokens = sd.tokenizer(["a red circle", ""], padding="max_length", max_length=16, return_tensors="pt")
    ids = tokens.input_ids
    with torch.no_grad():
        before = sd.text_encoder(ids, output_hidden_states=True).hidden_states[-1]
        after = xl.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        torch.testing.assert_close(after, before)
        x, t = torch.randn(2, 4, 16, 16), torch.tensor([10, 700])
        ctx = sd.text_encoder(ids)[0]
        want = sd.unet(x, t, ctx).sample
        other = torch.randn(2, 16, 16)  # whatever the second encoder says
        added = {"text_embeds": torch.randn(2, 16), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
        got = xl.unet(x, t, torch.cat([ctx, other], dim=-1), added_cond_kwargs=added).sample
        torch.testing.assert_close(got, want)

    metrics = {"quality": {}, "meets_bar": False, "train_seconds": 1.0, "diffusion_steps": 0, "vae_steps": 0}
    save_pipeline(sd, RecipeConfig(arch=arch), {**metrics, "device": "cpu", "history": []}, tmp_path / "sd")
    cfg = RecipeConfig(
        arch=arch, init_from=str(tmp_path / "sd"), sdxl=XLArch(width_2=16, time_dim=4), steps=2, batch=2,
        eval_every=0, final_eval_images=2, latent_pool=4,
    )  # fmt: skip
    train_base_model(cfg, tmp_path / "xl")
    model = load_model(str(tmp_path / "xl"), device="cpu")
    assert isinstance(model.pipe, StableDiffusionXLPipeline) and model.family == "sdxl"
    assert model.token_widths == (32, 16) and model.world is not None
    trained, start = model.pipe, xl  # the grown pipeline before training
    assert trained.unet.add_embedding.linear_2.weight.abs().amax() > 0  # size ids and pooled text count
    key = next(n for n, _ in trained.unet.named_parameters() if n.endswith("attn2.to_k.weight"))
    columns = dict(trained.unet.named_parameters())[key][:, 32:]  # the second encoder's columns
    assert columns.abs().amax() > 0
    for name in ("text_encoder", "text_encoder_2"):  # both encoders trained with the UNet
        before, after = getattr(start, name).state_dict(), getattr(trained, name).state_dict()
        assert any(not torch.equal(before[k], after[k]) for k in before), name
    with pytest.raises(ValidationError, match="set init_from"):
        RecipeConfig(sdxl=XLArch())
