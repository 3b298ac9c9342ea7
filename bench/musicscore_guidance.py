"""Do generated synthetic score pages follow their prompt? Accuracy of the prompted staff layout, by guidance scale.

The synthetic generator's own rule decides the layout from the instrument (violin, flute: treble staves; cello,
bassoon: bass staves; piano: grand staff). A logistic-regression classifier trained on freshly drawn synthetic
pages (another seed than the demo's data) at the model's resolution reads the layout of a sample; the prompts
are the held-out (test + val) captions of the demo data, and a sample counts as correct when the classifier's
layout equals the layout its caption's instrument implies. Guidance 0 is the unconditional model (the chance
level is the share of the most common layout), 1 the conditional model as trained, w > 1 classifier-free guidance.

    PYTHONPATH=. python bench/musicscore_guidance.py --ckpt runs/.../last.ckpt --root datasets/musicscore-synthetic
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from diffscore.data.musicscore import MusicScoreDataset, find_scale_dir, index_split, read_metadata
from diffscore.data.synthetic_scores import INSTRUMENT_CLEF, write_synthetic_musicscore
from diffscore.loading.open import open_model
from diffscore.sampling.options import SamplingOptions

LAYOUTS = ("treble", "bass", "grand")


def layout_of(caption: str) -> int:
    instrument = re.search(r"instrumentation is (\w+)", caption).group(1)
    return LAYOUTS.index(INSTRUMENT_CLEF[instrument])


def pixels(images: torch.Tensor) -> np.ndarray:
    """[N, 1, R, R] in [-1, 1] -> [N, R*R] features."""
    return images.flatten(1).clamp(-1, 1).numpy()


def dataset_tensors(scale_dir: Path, split: str, resolution: int) -> tuple[torch.Tensor, list[str]]:
    pages = index_split(scale_dir, split, read_metadata(scale_dir / "metadata.json"))
    ds = MusicScoreDataset(pages, resolution, in_memory=True)
    return ds.images.float() / 127.5 - 1, ds.captions


def train_classifier(resolution: int, num_pages: int, seed: int):
    from sklearn.linear_model import LogisticRegression

    with tempfile.TemporaryDirectory() as tmp:
        d = write_synthetic_musicscore(tmp, num_pages={"train": num_pages, "val": 0, "test": num_pages // 4}, seed=seed)
        x_train, c_train = dataset_tensors(d, "train", resolution)
        x_test, c_test = dataset_tensors(d, "test", resolution)
    clf = LogisticRegression(C=0.1, max_iter=2000).fit(pixels(x_train), [layout_of(c) for c in c_train])
    acc = float((clf.predict(pixels(x_test)) == np.array([layout_of(c) for c in c_test])).mean())
    return clf, acc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt")
    p.add_argument("--plot", nargs="+", help="only plot these result JSONs (label=path.json) into --out (a .png)")
    p.add_argument("--root", default="datasets/musicscore-synthetic")
    p.add_argument("--guidance", default="0,1,2,4")
    p.add_argument("--num_prompts", type=int, default=200)
    p.add_argument("--steps", type=int, default=18)
    p.add_argument("--classifier_pages", type=int, default=2000)
    p.add_argument("--out", default="bench/musicscore_guidance.json")
    args = p.parse_args()
    if args.plot:
        results = []
        for item in args.plot:
            label, _, path = item.rpartition("=")
            results.append({**json.loads(Path(path).read_text()), **({"label": label} if label else {})})
        plot(results, Path(args.out))
        return
    if not args.ckpt:
        p.error("--ckpt is required")
    torch.set_num_threads(2)
    model = open_model(args.ckpt)
    resolution = model.data_shape[-1]
    t0 = time.time()
    clf, clf_acc = train_classifier(resolution, args.classifier_pages, seed=12345)
    print(f"classifier: held-out accuracy on real synthetic pages {clf_acc:.3f} ({time.time() - t0:.0f} s)")
    scale_dir = find_scale_dir(args.root)
    captions = []
    for split in ("test", "val"):
        captions += [pg.caption for pg in index_split(scale_dir, split, read_metadata(scale_dir / "metadata.json"))]
    captions = captions[: args.num_prompts]
    target = np.array([layout_of(c) for c in captions])
    x_data, c_data = dataset_tensors(scale_dir, "test", resolution)
    data_acc = float((clf.predict(pixels(x_data)) == np.array([layout_of(c) for c in c_data])).mean())
    result = {
        "ckpt": args.ckpt,
        "resolution": resolution,
        "num_prompts": len(captions),
        "steps": args.steps,
        "classifier_accuracy_on_fresh_pages": clf_acc,
        "classifier_accuracy_on_demo_test_pages": data_acc,
        "chance": float(np.bincount(target, minlength=3).max() / len(target)),
        "accuracy": {},
    }
    for w in (float(v) for v in args.guidance.split(",")):
        t0 = time.time()
        seeds = list(range(len(captions)))
        if w == 0:  # the unconditional model: the empty caption
            samples = model.sampler(SamplingOptions(steps=args.steps, prompt="")).generate(seeds)
        else:  # seed i gets caption i
            guided = SamplingOptions(steps=args.steps, guidance=w)
            samples = model.sampler(guided, prompts=captions).generate(seeds)
        pred = clf.predict(pixels(samples.float().cpu()))
        acc = float((pred == target).mean())
        result["accuracy"][str(w)] = acc
        result.setdefault("predicted_layout_counts", {})[str(w)] = np.bincount(pred, minlength=3).tolist()
        print(f"guidance {w:g}: prompted-layout accuracy {acc:.3f} ({time.time() - t0:.0f} s)", flush=True)
        if w == 4.0 or w == max(float(v) for v in args.guidance.split(",")):
            from torchvision.utils import save_image

            save_image((samples[:32].clamp(-1, 1) + 1) / 2, Path(args.out).with_suffix(f".w{w:g}.png"), nrow=8)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    plot([result], Path(args.out).with_suffix(".png"))


def plot(results: list[dict], path: Path) -> None:
    """Grouped bars: prompted-layout accuracy per guidance scale, one group per result (checkpoint)."""
    from diffscore.io import pyplot

    plt = pyplot()

    ws = list(results[0]["accuracy"])
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    width = 0.8 / len(results)
    for i, r in enumerate(results):
        xs = [j + (i - (len(results) - 1) / 2) * width for j in range(len(ws))]
        ax.bar(xs, [r["accuracy"][w] for w in ws], width, label=r.get("label", Path(r["ckpt"]).stem))
    ax.axhline(results[0]["chance"], color="gray", ls="--", lw=1, label="always the majority layout")
    ax.set_xticks(range(len(ws)), ["unconditional" if not float(w) else f"w = {float(w):g}" for w in ws])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("prompted-layout accuracy")
    ax.set_title(f"synthetic MusicScore, {results[0]['resolution']}px, {results[0]['num_prompts']} prompts", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
