import pickle

import numpy as np
import pytest

from diffscore.data.cifar10 import read_cifar10
from diffscore.errors import DiffscoreError
from tests.fixtures import write_cifar10


@pytest.mark.parametrize("archive", [False, True])
def test_reads_the_python_format_from_folder_or_archive(tmp_path, archive):
    x, y = write_cifar10(tmp_path, per_batch=6, archive=archive)
    data = read_cifar10(tmp_path)
    assert data["train"][0].shape == (30, 3, 32, 32) and data["test"][0].shape == (6, 3, 32, 32)
    np.testing.assert_array_equal(data["train"][0].numpy(), x)
    assert data["train"][1].tolist() == y


def test_missing_cifar_names_the_archive_and_folder(tmp_path):
    with pytest.raises(DiffscoreError) as err:
        read_cifar10(tmp_path)
    msg = str(err.value)
    assert "cifar-10-python.tar.gz" in msg and "cifar-10-batches-py" in msg and str(tmp_path) in msg


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_a_pickle_that_would_run_code_is_refused(tmp_path, capsys):
    write_cifar10(tmp_path, per_batch=2)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_3", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": [0]}, f)
    with pytest.raises(DiffscoreError, match="data_batch_3 is malformed"):
        read_cifar10(tmp_path)
    assert "pwned" not in capsys.readouterr().out
