import pytest
import torch

from diffscore.data.synthetic_scores import write_synthetic_musicscore
from diffscore.errors import DiffscoreError
from diffscore.lit.datamodules import MusicScoreDataModule
from diffscore.networks.text_encoder import build_vocabulary
from tests.conftest import REPO, run_cli

SYNTHETIC = str(REPO / "experiments" / "musicscore_synthetic.yaml")
REAL = str(REPO / "experiments" / "musicscore.yaml")
TINY = [
    "--data.init_args.synthetic_pages=16",
    "--data.init_args.batch_size=8",
    "--model.init_args.backbone.init_args.model_channels=8",
    "--model.init_args.sampling.steps=2",
    "--trainer.max_steps=2",
    "--trainer.val_check_interval=2",
    "--trainer.log_every_n_steps=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


def test_datamodule_batches_images_and_captions(tmp_path):
    write_synthetic_musicscore(tmp_path, "14k", {"train": 6, "val": 2, "test": 2}, layout="shards", page_width=64)
    dm = MusicScoreDataModule(root=str(tmp_path), scale="14k", resolution=16, batch_size=4)
    assert dm.data_shape == (1, 16, 16) and dm.label_dim == 0
    x, captions = next(iter(dm.train_dataloader()))
    assert x.dtype == torch.uint8 and x.shape == (4, 1, 16, 16)
    assert len(captions) == 4 and all(c.startswith("a music score, instrumentation is ") for c in captions)
    x, captions = dm.on_after_batch_transfer((x, captions), 0)
    assert x.min() >= -1 and x.max() <= 1 and len(captions) == 4
    assert len(dm.val_dataloader()) == 2 and len(dm.dataset("test")) == 2
    assert sorted(dm.captions()) == sorted(c for _, c in dm.dataset("train"))


def test_datamodule_bad_options(tmp_path):
    write_synthetic_musicscore(tmp_path, num_pages={"train": 2, "val": 0, "test": 0}, page_width=64)
    with pytest.raises(DiffscoreError, match="resolution"):
        MusicScoreDataModule(root=str(tmp_path), resolution=48)
    with pytest.raises(DiffscoreError, match="caption_template: unknown field 'mood'"):
        MusicScoreDataModule(root=str(tmp_path), caption_template={"mood": "mood is {}"})
    with pytest.raises(DiffscoreError, match="MusicScore not found"):
        MusicScoreDataModule(root=str(tmp_path / "none"))


@pytest.mark.slow
def test_synthetic_demo_fits_and_samples_with_a_prompt(in_tmp):
    """The embedded demo end to end: synthetic pages written on first use, the vocabulary built from the training
    captions and saved in the (EMA) checkpoint, then `diffscore sample --prompt --guidance`."""
    assert run_cli(["fit", "--config", SYNTHETIC, *TINY]) == 0
    assert (in_tmp / "datasets/musicscore-synthetic/MisicScore-400/metadata.json").is_file()
    (ckpt,) = in_tmp.glob("runs/**/checkpoints/last.ckpt")
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    vocab = state["denoiser.backbone.text_encoder._extra_state"]["vocabulary"]
    dm = MusicScoreDataModule(root=str(in_tmp / "datasets/musicscore-synthetic"), resolution=32)
    assert vocab == build_vocabulary(dm.captions("train"), 64) and "instrumentation" in vocab
    out = in_tmp / "samples"
    args = ["sample", "--ckpt_path", ckpt, "--num_samples", 2, "--steps", 2, "--accelerator", "cpu"]
    assert run_cli([*args, "--out", out, "--prompt", "a music score, instrumentation is cello", "--guidance", 4]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["000000.png", "000001.png"]


def test_real_config_without_data_says_where_to_put_it(in_tmp, capsys):
    assert run_cli(["fit", "--config", REAL, "--trainer.accelerator=cpu", "--trainer.fast_dev_run=true"]) == 2
    err = capsys.readouterr().err
    assert "MusicScore not found under datasets/musicscore" in err and "MisicScore-400" in err


def _text_model():
    from diffscore.lit.modules import DiffusionModule
    from diffscore.networks import UNet

    torch.manual_seed(0)
    backbone = UNet(
        data_shape=[1, 8, 8],
        model_channels=8,
        channel_mult=[1, 2],
        num_blocks=1,
        attn_resolutions=[],
        text_dim=8,
        text_layers=1,
        text_heads=2,
        text_vocab_size=16,
        text_max_length=8,
        cross_attn_resolutions=[4],
    )
    backbone.text_encoder.build_vocabulary(["a music score violin", "a music score cello"])
    return DiffusionModule(backbone, sampling={"steps": 2}).eval()


def test_sampling_prompts_per_seed_and_guidance():
    from diffscore.commands.evaluate import captions_of
    from diffscore.sampling.options import SamplingOptions

    model = _text_model()
    prompts = ["a music score violin", "a music score cello", "a music score"]
    seeds = [4, 0, 2]
    out = model.sampler(SamplingOptions(guidance=3.0), prompts=prompts).generate(seeds)
    for seed, sample in zip(seeds, out):  # sample i is conditioned on caption i mod 3, whatever the batch
        alone = model.sampler(SamplingOptions(prompt=prompts[seed % 3], guidance=3.0)).generate([seed])[0]
        torch.testing.assert_close(sample, alone)
    unguided = model.sampler(SamplingOptions(prompt=prompts[1])).generate([4])[0]
    assert not torch.equal(unguided, out[0])

    class Captions:
        def captions(self, split):
            return {"test": prompts, "val": []}[split]

    assert captions_of(model, Captions(), "test") == prompts
    with pytest.raises(DiffscoreError, match="has no captions"):
        captions_of(model, Captions(), "val")
    with pytest.raises(DiffscoreError, match="--prompts must be"):
        captions_of(model, Captions(), "holdout")
