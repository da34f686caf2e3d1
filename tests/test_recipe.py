import pytest
import torch
from pydantic import ValidationError

from noiseclr.domains import shapes
from noiseclr.models.architecture import ArchitectureConfig, build_pipeline, training_scheduler
from noiseclr.models.recipe import RecipeConfig, diffusion_loss


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


def test_vae_stage_trains_every_configured_step():
    from noiseclr.models.recipe import train_vae

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
