"""NoiseCLRPipeline held to StableDiffusionPipeline's contract: every scheduler, every `__call__`
argument, every loading path, with and without edits.

The reference for an edit is the method written out plainly (`reference`): one UNet call per
row, no batching, no hook. With no edit the reference is diffusers' own StableDiffusionPipeline
on the same components, and equality is exact.
"""

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UniPCMultistepScheduler,
)

from noiseclr.bank import DirectionBank
from noiseclr.conditioning import encode_directions
from noiseclr.editing import request, sampler
from noiseclr.editing.pipeline import NoiseCLRPipeline
from noiseclr.errors import EditError
from noiseclr.models.base import EMBEDDED, PRETRAINED_DIR
from records import bank_pipeline

BANK = PRETRAINED_DIR / "banks" / "shapes"
TOLERANCE = 2 / 255
SCHEDULERS = [
    DDIMScheduler,
    EulerDiscreteScheduler,
    EulerAncestralDiscreteScheduler,
    DPMSolverMultistepScheduler,
    UniPCMultistepScheduler,
    PNDMScheduler,
]


@pytest.fixture(scope="module")
def pipe():
    return bank_pipeline()


@pytest.fixture
def fresh(pipe):
    """The module's pipeline with its own scheduler, and SD's pipeline on the same components."""
    original = pipe.scheduler
    sd = StableDiffusionPipeline(**pipe.components)
    sd.set_progress_bar_config(disable=True)
    yield pipe, sd
    pipe.scheduler = original


def gens(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


@torch.no_grad()
def reference(pipe, x_T, cond, uncond, edits, guidance, steps, cfg_steps=None):
    """x_0 latents of the method written out with DDIM: eps = uncond + g (cond - uncond)
    + sum_i lambda_i [t in window_i] (eps(d_i) - eps(empty)), each row its own UNet call; after
    `cfg_steps` steps, eps = cond + sum ... (CFG cut off)."""
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(steps)
    dirs = encode_directions(pipe.text_encoder, pipe.tokenizer, torch.stack([e.vector for e in edits]))
    x = x_T * sched.init_noise_sigma
    for i, t in enumerate(sched.timesteps):
        if cfg_steps is not None and i >= cfg_steps:
            uncond = None

        def eps(ctx, x=x, t=t):
            return pipe.unet(x, t, ctx.expand(len(x), -1, -1)).sample

        e = eps(cond) if uncond is None else eps(uncond) + guidance * (eps(cond) - eps(uncond))
        empty = eps(dirs[-1:])
        for i, edit in enumerate(edits):
            if edit.t_low <= t <= edit.t_high:
                e = e + edit.scale * (eps(dirs[i : i + 1]) - empty)
        x = sched.step(e, t, x).prev_sample
    return x


def encoded(pipe, text: str) -> torch.Tensor:
    return pipe.encode_prompt(text, pipe.device, 1, False)[0]


@pytest.mark.parametrize("cls", SCHEDULERS, ids=lambda c: c.__name__)
def test_every_scheduler_generates_as_sd_and_edits_as_the_cli(fresh, cls):
    """pipe.scheduler = X: without edits SD's image bit for bit; with edits the image the CLI's
    sampler gives with X (Euler ancestral's noise included); and not DDIM's edited image."""
    pipe, sd = fresh
    kw = dict(guidance_scale=4.0, num_inference_steps=4, output_type="np")
    ddim_edited = pipe(edits="3=1", seed=2, num_inference_steps=4, output_type="np").images
    ddim_sd = sd("a shape", generator=gens(1), **kw).images
    pipe.scheduler = sd.scheduler = cls.from_config(pipe.scheduler.config)
    theirs = sd("a shape", generator=gens(1), **kw).images
    ours = pipe("a shape", generator=gens(1), **kw).images
    np.testing.assert_array_equal(ours, theirs)

    edited = pipe(edits="3=1", seed=2, num_inference_steps=4, output_type="np").images
    model = pipe._model()
    start = request.from_seeds(model, [2], pipe.banks.values(), steps=4)  # what `noiseclr edit` runs
    x0 = sampler.sample(
        model, start.x_T, pipe._edits("3=1"), prompt=start.prompt, guidance_scale=start.guidance,
        steps=4, generator=start.generators(),
    )  # fmt: skip
    assert np.abs(edited - sampler.decode(model, x0)).max() <= TOLERANCE
    if cls is not DDIMScheduler:  # the swap is honoured, and moves the image as it moves SD's
        ours, sds = np.abs(edited - ddim_edited).max(), np.abs(theirs - ddim_sd).max()
        assert ours > 1e-3 and 0.2 < ours / sds < 5, (ours, sds)


def test_negative_prompt_embeds_and_no_cfg_mean_what_they_mean_in_sd(pipe):
    """Negative prompts and prompt_embeds replace the unconditional / text rows; the edit term
    stays relative to the empty prompt; num_images_per_prompt and generator lists carry edits."""
    edits = pipe._edits(["3=1", "5=-0.5"])
    x_T = sampler.seed_latents(pipe._model(), [4])
    kw = dict(edits=edits, num_inference_steps=3, output_type="latent")
    prompt, negative = "a shape at middle center", "a red circle"
    cond, neg, empty = encoded(pipe, prompt), encoded(pipe, negative), encoded(pipe, "")
    with_negative = pipe(prompt, negative_prompt=negative, guidance_scale=3.0, latents=x_T, **kw).images
    expected = reference(pipe, x_T, cond, neg, edits, 3.0, 3)
    torch.testing.assert_close(with_negative, expected, atol=2e-4, rtol=0)
    embeds = pipe(prompt_embeds=cond, negative_prompt_embeds=neg, guidance_scale=3.0, latents=x_T, **kw)
    torch.testing.assert_close(embeds.images, expected, atol=2e-4, rtol=0)
    no_cfg = pipe(prompt, guidance_scale=1.0, latents=x_T, **kw).images  # an empty row is added
    torch.testing.assert_close(no_cfg, reference(pipe, x_T, cond, None, edits, 1.0, 3), atol=2e-4, rtol=0)
    plain = pipe(prompt, guidance_scale=3.0, latents=x_T, **kw).images  # uncond row = the empty prompt
    torch.testing.assert_close(plain, reference(pipe, x_T, cond, empty, edits, 3.0, 3), atol=2e-4, rtol=0)

    # Two prompts x two images, one generator each: every image edited as it is alone.
    many = pipe(
        [prompt, "a shape"], num_images_per_prompt=2, guidance_scale=3.0, generator=gens(1, 2, 3, 4), **kw
    ).images
    assert many.shape[0] == 4
    for i, (text, g) in enumerate(zip([prompt, prompt, "a shape", "a shape"], gens(1, 2, 3, 4), strict=True)):
        one = pipe(text, guidance_scale=3.0, generator=[g], **kw).images
        torch.testing.assert_close(many[i : i + 1], one, atol=2e-4, rtol=0)


def test_a_list_of_prompts_with_one_generator_or_none(fresh):
    pipe, sd = fresh
    kw = dict(guidance_scale=4.0, num_inference_steps=2, output_type="np")
    theirs = sd(["a shape", "a red circle"], generator=torch.Generator().manual_seed(3), **kw).images
    ours = pipe(["a shape", "a red circle"], generator=torch.Generator().manual_seed(3), **kw).images
    np.testing.assert_array_equal(ours, theirs)
    assert pipe(["a shape", "a red circle"], edits="3=1", **kw).images.shape[0] == 2  # seed 0's images
    edited = pipe(["a shape", "a red circle"], edits="3=1", generator=torch.Generator().manual_seed(3), **kw)
    assert edited.images.shape[0] == 2 and np.abs(edited.images - ours).max() > 0.02


def test_callbacks_see_the_edited_latents_and_the_call_state_is_set(pipe):
    seen = {}

    def record(p, i, t, tensors):
        seen[(p.guidance_scale > 1, i)] = tensors["latents"].clone()
        assert set(tensors) == {"latents", "prompt_embeds"}
        return {}

    kw = dict(seed=1, num_inference_steps=3, guidance_scale=4.0, output_type="latent")
    cb = dict(callback_on_step_end=record, callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
    final = pipe(edits="3=1", **cb, **kw).images
    torch.testing.assert_close(seen[(True, 2)], final)  # the last callback saw the edited x_0
    assert pipe.guidance_scale == 4.0 and pipe.num_timesteps == 3
    assert pipe.do_classifier_free_guidance and pipe.interrupt is False
    plain = pipe(**kw).images
    assert (final - plain).abs().max() > 1e-3  # what the callback saw was edited

    def stop(p, i, t, tensors):
        p._interrupt = True  # diffusers' way to end the loop early
        return {}

    pipe(edits="3=1", callback_on_step_end=stop, **kw)
    assert pipe.interrupt is True


def test_eta_rescale_timesteps_and_attention_kwargs_pass_through(fresh):
    """SD's remaining arguments: without edits SD's image exactly; with edits they still apply."""
    pipe, sd = fresh
    base = dict(guidance_scale=4.0, output_type="np", height=64, width=64)
    cases = [
        dict(num_inference_steps=3, eta=0.7),
        dict(num_inference_steps=3, guidance_rescale=0.7),
        dict(num_inference_steps=3, cross_attention_kwargs={}),
        dict(timesteps=[999, 700, 400, 100]),  # Euler takes its own timesteps
        dict(sigmas=[14.0, 3.0, 1.0, 0.3]),
    ]
    for case in cases:
        if "timesteps" in case or "sigmas" in case:
            pipe.scheduler = sd.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        theirs = sd("a shape", generator=gens(5), **base, **case).images
        ours = pipe("a shape", generator=gens(5), **base, **case).images
        np.testing.assert_array_equal(ours, theirs, err_msg=str(case))
        edited = pipe("a shape", edits="3=2", generator=gens(5), **base, **case).images
        assert np.isfinite(edited).all() and np.abs(edited - ours).max() > 0.02, case


def test_saved_as_bin_variant_and_per_component_dtypes_load_and_edit(pipe, tmp_path):
    """save_pretrained / from_pretrained as SD's: pickled .bin weights, a variant, and a dtype
    per component; the bank still loads (its fingerprint is taken before the cast)."""
    expected = pipe(edits="3=1", seed=1, num_inference_steps=2, output_type="np").images
    pipe.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert len(list((tmp_path / "bin").rglob("diffusion_pytorch_model.bin"))) == 2  # UNet and VAE
    # a plain SD folder: diffusers' DiffusionPipeline loads it as StableDiffusionPipeline
    assert type(DiffusionPipeline.from_pretrained(tmp_path / "bin")) is StableDiffusionPipeline
    pipe.save_pretrained(tmp_path / "variant", variant="v1")
    for folder, kw in (("bin", {}), ("variant", {"variant": "v1"})):
        other = NoiseCLRPipeline.from_pretrained(tmp_path / folder, **kw)
        other.set_progress_bar_config(disable=True)
        other.load_bank(BANK)
        got = other(edits="3=1", seed=1, num_inference_steps=2, output_type="np").images
        np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=folder)
    dtypes = {"vae": torch.float16, "default": torch.bfloat16}  # diffusers' own test's form
    mixed = NoiseCLRPipeline.from_pretrained(EMBEDDED["shapes"], torch_dtype=dtypes)
    assert mixed.vae.dtype == torch.float16 and mixed.unet.dtype == mixed.text_encoder.dtype == torch.bfloat16
    mixed = NoiseCLRPipeline.from_pretrained(EMBEDDED["shapes"], torch_dtype={"default": torch.bfloat16})
    mixed.set_progress_bar_config(disable=True)
    mixed.load_bank(BANK)
    got = mixed(edits="3=1", seed=1, num_inference_steps=2, output_type="np").images
    assert np.abs(got - expected).mean() < 0.05  # bf16's rounding, not another image


def test_cpu_offload_runs_the_edit_on_the_execution_device(pipe):
    """Model offload (accelerate's hooks, here with the CPU as execution device: no GPU on CI)
    composes with the edit rows: the same image as without offload. (Sequential offload with a
    CPU execution device fails inside accelerate for a plain StableDiffusionPipeline too, with
    this torch: it is left to a GPU machine.)"""
    expected = pipe(edits="3=1", seed=1, num_inference_steps=2, output_type="np").images
    other = bank_pipeline()
    other.enable_model_cpu_offload(device="cpu")
    got = other(edits="3=1", seed=1, num_inference_steps=2, output_type="np").images
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_a_request_without_a_prompt_edits_the_banks_domain(pipe):
    """No prompt: the bank's gallery prompt at the model's guidance; "" asks for unconditional."""
    bank = DirectionBank.load(BANK)
    assert request.domain_prompt([bank]) == bank.config["gallery_prompt"]
    kw = dict(seed=0, num_inference_steps=3, output_type="np")
    default = pipe(edits="3=1", **kw).images
    domain = pipe(bank.config["gallery_prompt"], edits="3=1", **kw).images
    np.testing.assert_array_equal(default, domain)
    assert np.abs(pipe("", edits="3=1", **kw).images - default).max() > 0.05
    with pytest.raises(EditError, match="not used with image="):
        pipe(image=np.zeros((64, 64, 3), np.uint8), num_images_per_prompt=2)


def ip_adapter_weights(unet) -> dict:
    """An IP-Adapter state dict in the released files' layout for this UNet, random weights:
    "image_proj" (ImageProjection: 4 tokens from a cross_attention_dim-wide image embedding) and
    "ip_adapter" (to_k_ip / to_v_ip of every cross-attention, numbered 1, 3, 5, ...)."""
    from diffusers.models.embeddings import ImageProjection

    width = unet.config.cross_attention_dim
    gen = torch.Generator().manual_seed(0)
    layers, key = {}, 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        hidden = unet.get_submodule(name.rsplit(".processor", 1)[0]).to_k.out_features
        for part in ("to_k_ip", "to_v_ip"):
            layers[f"{key}.{part}.weight"] = torch.randn(hidden, width, generator=gen) * 0.1
        key += 2
    proj = ImageProjection(
        cross_attention_dim=width, image_embed_dim=width, num_image_text_embeds=4
    ).state_dict()
    image_proj = {
        "proj.weight": proj["image_embeds.weight"],
        "proj.bias": proj["image_embeds.bias"],
        "norm.weight": proj["norm.weight"],
        "norm.bias": proj["norm.bias"],
    }
    return {"image_proj": image_proj, "ip_adapter": layers}


def test_ip_adapter_inputs_condition_the_edit_rows_too(pipe):
    """The IP-Adapter loading the class inherits works with edits: the image embeddings reach
    the rows the edits add (a batch of other size would fail inside attention)."""
    ours = bank_pipeline()  # its own UNet: the adapter changes its attention processors
    ours.unet._load_ip_adapter_weights([ip_adapter_weights(ours.unet)])
    sd = StableDiffusionPipeline(**ours.components)
    sd.set_progress_bar_config(disable=True)
    width = ours.unet.config.cross_attention_dim
    image = torch.randn(1, 1, width, generator=torch.Generator().manual_seed(1))
    embeds = [torch.cat([torch.zeros_like(image), image])]  # negative, positive (CFG)
    kw = dict(guidance_scale=4.0, num_inference_steps=3, output_type="np", ip_adapter_image_embeds=embeds)
    theirs = sd("a shape", generator=gens(2), **kw).images
    plain = ours("a shape", generator=gens(2), **kw).images
    np.testing.assert_array_equal(plain, theirs)
    edited = ours("a shape", edits="3=1", generator=gens(2), **kw).images
    assert np.abs(edited - plain).max() > 0.02
    ours.set_ip_adapter_scale(0.0)
    without = ours("a shape", edits="3=1", generator=gens(2), **kw).images
    assert np.abs(edited - without).max() > 0.02  # the adapter's image conditions the edited image


def test_cfg_cut_off_by_a_callback_keeps_the_edit_relative_to_the_empty_prompt(pipe):
    """diffusers' SDCFGCutoffCallback drops the unconditional rows part way: from then on the
    edit term's eps(empty) rows are added to the batch, not read off the text rows."""
    from diffusers.callbacks import SDCFGCutoffCallback

    edits = pipe._edits("3=1")
    x_T = sampler.seed_latents(pipe._model(), [6])
    prompt = "a shape at middle center"
    got = pipe(
        prompt, edits=edits, latents=x_T, guidance_scale=3.0, num_inference_steps=4, output_type="latent",
        callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=0.5),
    ).images  # fmt: skip
    empty, cond = encoded(pipe, ""), encoded(pipe, prompt)
    expected = reference(pipe, x_T, cond, empty, edits, 3.0, 4, cfg_steps=3)  # cut after step 2
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=0)


def test_earlier_calling_forms_still_work_or_say_what_changed(pipe):
    """Seeds or latents for several images of one prompt give one image each; edits passed by
    position get a one-line error naming the keyword; a bank without a gallery prompt never
    borrows another bank's domain."""
    kw = dict(num_inference_steps=2, output_type="np")
    three = pipe(edits="3=1", seed=[0, 1, 2], **kw).images
    assert three.shape[0] == 3
    np.testing.assert_allclose(three[1:2], pipe(edits="3=1", seed=1, **kw).images, atol=1e-5)
    x_T = sampler.seed_latents(pipe._model(), [0, 1])
    assert pipe(edits="3=1", latents=x_T, **kw).images.shape[0] == 2
    with pytest.raises(TypeError, match=r"pass edits by name, pipe\(prompt, edits=...\)"):
        pipe("a shape", ["3=1"])
    two = bank_pipeline()
    plain = DirectionBank.load(BANK)
    plain.config["gallery_prompt"] = None
    two.load_bank(plain, name="plain")
    np.testing.assert_array_equal(
        two(edits="plain:3=1", seed=0, **kw).images, two("", edits="plain:3=1", seed=0, **kw).images
    )
