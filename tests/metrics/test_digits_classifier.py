import torch

from diffscore.lit.datamodules import DigitsDataModule
from diffscore.metrics.digits_classifier import digits_features, fd_digits, load_classifier, train_classifier


def test_shipped_classifier_is_accurate_and_fd_separates_real_from_fake():
    model = load_classifier()
    dm = DigitsDataModule()
    dm.setup("fit")
    (x, _), (xv, _), (xt, yt) = dm.splits["train"], dm.splits["val"], dm.splits["test"]
    with torch.no_grad():
        assert (model(xt).argmax(1) == yt).float().mean().item() > 0.97
    held = torch.cat([xv, xt])
    floor = fd_digits(held, x, model)
    blurred = torch.nn.functional.avg_pool2d(held, 3, stride=1, padding=1)
    noise = torch.rand(360, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert floor < fd_digits(blurred, x, model) < fd_digits(noise, x, model)
    assert digits_features(held[:4], model).shape == (4, 64)


def test_training_is_deterministic():
    torch.use_deterministic_algorithms(True)
    try:
        a, _ = train_classifier(epochs=1)
        b, _ = train_classifier(epochs=1)
    finally:
        torch.use_deterministic_algorithms(False)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_retraining_writes_to_the_working_folder_not_into_the_package(tmp_path, monkeypatch):
    import diffscore.metrics.digits_classifier as dc

    shipped = dc.WEIGHTS.read_bytes()
    report = {"test_accuracy": 0.5, "heldout_size": 3, "fd_heldout_vs_train": 1.0}
    monkeypatch.setattr(dc, "train_classifier", lambda epochs: (dc.DigitsClassifier(), report))
    monkeypatch.chdir(tmp_path)
    dc.main(["--epochs", "1"])
    assert (tmp_path / "digits_classifier.pt").is_file()
    assert dc.WEIGHTS.read_bytes() == shipped
