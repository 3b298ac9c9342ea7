"""MusicScoreDataModule: score pages with captions (arXiv 2406.11462), or synthetic pages in the same layout.

Batches are ``(image uint8 [B, 1, R, R], captions list[str])``; images are mapped to [-1, 1] on the device (as
every DataModule here) and the captions are tokenized by the model's own text encoder, whose vocabulary is built
here from the training captions at ``setup`` (before callbacks such as the EMA copy the model) and then travels
in every checkpoint. See diffscore/data/musicscore.py for the layout, metadata and page policy.
"""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from diffscore.data.image_folder import is_power_of_two
from diffscore.data.musicscore import (
    DEFAULT_PREFIX,
    DEFAULT_TEMPLATE,
    PAGE_POLICIES,
    SCALE_FOLDERS,
    MusicScoreDataset,
    check_template,
    find_scale_dir,
    index_split,
    read_metadata,
)
from diffscore.data.synthetic_scores import write_synthetic_musicscore
from diffscore.errors import DiffscoreError
from diffscore.lit.datamodules.base import BaseDataModule
from diffscore.networks.text_encoder import find_text_encoder


class MusicScoreDataModule(BaseDataModule):
    """MusicScore pages (one scale) as grayscale squares with captions built from their metadata."""

    WRITE_ARGS = {"synthetic_pages": None, "extract": False}

    def __init__(
        self,
        root: str = "datasets/musicscore",  # a scale folder (with metadata.json) or the folder holding them
        scale: str | None = None,  # "400", "14k" or "200k" (folder names old and new accepted); None = any
        resolution: int = 64,  # side of the square images (64, 128, 256; a power of two >= 8)
        page_policy: str = "top",  # "top": fit width, keep the top square; "pad": whole page; "center"
        caption_template: dict[str, str] | None = None,  # field -> phrase with one {}; order = caption order
        caption_prefix: str = DEFAULT_PREFIX,  # first phrase of every caption
        require_metadata: bool = False,  # an image without a metadata record is an error (else: bare prefix)
        cache_dir: str | None = None,  # where .tar.gz shards are extracted (default <scale folder>/.extracted)
        in_memory: bool = False,  # decode and resize every page once at start-up (small scales)
        synthetic_pages: int | None = None,  # root has no data: write this many synthetic training pages there
        extract: bool = True,  # extract .tar.gz shards into cache_dir when needed (False: a missing one is an error)
        batch_size: int = 64,  # total training batch (over all devices)
        batch_gpu: int | None = None,  # most images per device at once; the rest is gradient accumulation
        eval_batch_size: int | None = None,  # validation/test batch per device (default: the training one)
        num_workers: int = 0,  # loader processes per device
        epoch_size: int | None = None,  # training samples per epoch (default: the training split once)
        pin_memory: bool = False,  # page-locked host memory for faster copies to the GPU
        seed: int = 0,  # seed of the training order and of synthetic pages
    ) -> None:
        super().__init__(batch_size, batch_gpu, eval_batch_size, num_workers, epoch_size, pin_memory)
        if resolution < 8 or not is_power_of_two(resolution):
            raise DiffscoreError(f"data.resolution must be a power of two >= 8 (64, 128, 256), got {resolution}")
        if page_policy not in PAGE_POLICIES:
            raise DiffscoreError(f"data.page_policy must be one of {PAGE_POLICIES}, got {page_policy!r}")
        if scale is not None and scale not in SCALE_FOLDERS:
            raise DiffscoreError(f"data.scale must be one of {sorted(SCALE_FOLDERS)} or null, got {scale!r}")
        self.template = dict(DEFAULT_TEMPLATE if caption_template is None else caption_template)
        check_template(self.template)
        self.root, self.scale, self.resolution, self.page_policy = root, scale, resolution, page_policy
        self.shuffle_seed = seed
        if synthetic_pages is not None:
            self._write_synthetic(Path(root), synthetic_pages, seed)
        self.scale_dir = find_scale_dir(root, scale)
        metadata = read_metadata(self.scale_dir / "metadata.json")
        cache = Path(cache_dir) if cache_dir is not None else None
        self.datasets: dict[str, MusicScoreDataset] = {}
        for split in ("train", "val", "test"):
            pages = index_split(
                self.scale_dir, split, metadata, self.template, caption_prefix, require_metadata, cache, extract
            )
            self.datasets[split] = MusicScoreDataset(pages, resolution, page_policy, in_memory)
        if not len(self.datasets["train"]):
            raise DiffscoreError(f"{self.scale_dir} has no training images (train/ folder or train*.tar.gz)")
        self.save_hyperparameters()

    def _write_synthetic(self, root: Path, num_pages: int, seed: int) -> None:
        if num_pages < 1:
            raise DiffscoreError(f"data.synthetic_pages must be >= 1 or null, got {num_pages}")
        try:
            find_scale_dir(root, self.scale)
            return  # already there (written by an earlier run)
        except DiffscoreError:
            pass
        sizes = {"train": num_pages, "val": max(1, num_pages // 8), "test": max(1, num_pages // 8)}
        total = sum(sizes.values())
        print(
            f"diffscore: writing {total:,} synthetic score pages (about {total * 40 // 1000:,} MB) into {root} once; "
            "later runs read them",
            flush=True,
        )
        root.mkdir(parents=True, exist_ok=True)
        try:
            write_synthetic_musicscore(root, self.scale or "400", sizes, seed=seed)
        except (DiffscoreError, OSError) as e:
            try:  # another process (a DDP rank) may have written it first
                find_scale_dir(root, self.scale)
            except DiffscoreError:
                raise e from None

    @property
    def data_shape(self) -> tuple[int, ...]:
        return (1, self.resolution, self.resolution)

    def dataset(self, split: str) -> Dataset | None:
        ds = self.datasets[split]
        return ds if len(ds) else None

    def captions(self, split: str = "train") -> list[str]:
        return self.datasets[split].captions

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        encoder = find_text_encoder(self.trainer.lightning_module) if self.trainer is not None else None
        if encoder is not None and not encoder.vocabulary:  # a fresh model; a resumed one restores its own
            encoder.build_vocabulary(self.captions("train"))
